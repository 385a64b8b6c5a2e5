"""Bench every variant of two models with the daemon's own proof: a real trained CNN (the PP-OCRv4
text detector shipped inside the PyPI package ``rapidocr-onnxruntime``) and the generated
MatMul-heavy MLP. Prints the bench tables and ratios (size, speed vs FP32, agreement) and how
much the interleaved speed measurement moves between repeated proofs.

Setup (benchmark only, not a runtime dependency; the ONNX files are all it needs):
    .venv/bin/pip install --no-deps rapidocr-onnxruntime
Run:
    .venv/bin/python benchmarks/bench_variants.py [--input-size 640] [--candidates] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Results, Row
from modeld.benchtable import format_table
from modeld.testing import onnx_models
from modeld.variants import VARIANT_FILES, Gates
from modeld.workers.bench import BenchRequest, bench_model
from modeld.workers.inputs import sample_inputs
from modeld.workers.verify import prove_file

CPU = "CPUExecutionProvider"
GATES = Gates(min_cosine=0.99, min_speedup=1.0)


def ocr_detector() -> Path | None:
    """The PP-OCRv4 det model inside rapidocr_onnxruntime (found without importing the package,
    which would want OpenCV)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("models/*det*.onnx"))
    return found[0] if found else None


def text_pages(folder: Path, count: int, *, side: int = 640, seed: int = 0) -> Path:
    """``count`` PPM pictures of dark glyph rows on light paper: the OCR detector fires on them
    (3-5% of its probability map above 0.3), where on random blobs its output is ~0 and
    agreement would be measured on nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = np.full((side, side, 3), rng.integers(200, 256), np.uint8)
        for _ in range(rng.integers(6, 14)):                    # lines of text
            y, x = rng.integers(10, side - 40), rng.integers(10, side // 2)
            size, ink = int(rng.integers(12, 32)), rng.integers(0, 80)
            for _ in range(rng.integers(4, 20)):                # glyphs: coarse 5x3 bitmaps
                width = int(size * rng.uniform(0.5, 0.9))
                if x + width >= side - 5:
                    break
                glyph = np.kron(rng.random((5, 3)) < 0.55,
                                np.ones((size // 5 + 1, width // 3 + 1), bool))[:size, :width]
                img[y:y + size, x:x + width][glyph] = ink
                x += width + size // 4
        (folder / f"page-{i:02d}.ppm").write_bytes(b"P6 %d %d 255\n" % (side, side) + img.tobytes())
    return folder


def build_variants(model_dir: Path, name: str, preset: str | None, input_size: int | None,
                   calibration: Path | None) -> None:
    """model-int8.onnx (dynamic_int8) and model-fp16.onnx with the quantize worker's stock methods."""
    from modeld.workers import quantize
    from modeld.methods import canonical
    for method in ("dynamic_int8", "fp16"):
        started = time.perf_counter()
        try:
            quantize.quantize_model(quantize.QuantizeRequest(
                name=name, model_dir=str(model_dir),
                method=method,
                params=canonical(method, {}, entry=name),
                calibration=str(calibration) if calibration else None,
                preprocessing_preset=preset, input_size=input_size, providers=(CPU,),
                gates=Gates(min_cosine=0.0, min_speedup=0.0)), lambda f, d: None)
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"  {method}: build failed: {e}")
            continue
        print(f"  built {method} in {time.perf_counter() - started:.1f} s")


def speed_spread(model_dir: Path, preset: str | None, input_size: int | None,
                 calibration: Path | None, repeat: int) -> None:
    """Prove model-int8.onnx ``repeat`` times: how far apart are the interleaved speedups?"""
    variant = model_dir / VARIANT_FILES["int8"]
    if not variant.is_file() or repeat < 2:
        return
    fp32 = model_dir / VARIANT_FILES["fp32"]
    feeds, _ = sample_inputs(fp32, calibration=str(calibration) if calibration else None,
                             preset=preset, input_size=input_size, count=4)
    speedups = []
    for _ in range(repeat):
        proof = prove_file(variant, variant="int8", reference=fp32, providers=(CPU,),
                           gates=GATES, feeds=feeds, simulated={}, model_dir=model_dir)
        speedups.append(proof.on(CPU).speedup)
    spread = (max(speedups) - min(speedups)) / statistics.median(speedups)
    print(f"  int8 speedup over {repeat} proofs: "
          f"{', '.join(f'{s:.3f}x' for s in speedups)} (spread {spread:.1%} of the median)")


def bench(label: str, model_bytes: bytes, *, preset: str | None, input_size: int | None,
          calibration: Path | None, candidates: bool, repeat: int, workdir: Path,
          results: Results) -> None:
    print(f"\n== {label}")
    model_dir = workdir / label
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(model_bytes)
    build_variants(model_dir, label, preset, input_size, calibration)
    started = time.perf_counter()
    rows = bench_model(BenchRequest(str(model_dir), gates=GATES, preprocessing_preset=preset,
                                    calibration=str(calibration) if calibration else None,
                                    input_size=input_size, samples=4, candidates=candidates,
                                    name=label), lambda f, d: None)
    print(f"  bench took {time.perf_counter() - started:.1f} s")
    print(format_table(rows))
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    for r in rows:
        if r["variant"] == "fp32" or not r["size_bytes"]:
            continue
        ratio = f"size {r['size_bytes'] / fp32['size_bytes']:.2f}"
        speed = f"speed {r['speedup']:.2f}x" if r["speedup"] is not None else "speed -"
        cos = f"cosine {r['cosine']:.4f}" if r["cosine"] is not None else "cosine -"
        print(f"  ratio {label} {r['recipe']}: {ratio}, {speed}, {cos}")
        served = "served" if r.get("passed") else f"refused: {r.get('why')}"
        results.add(Row(f"variants of {label}", f"{r['variant']} ({r['recipe']}) vs FP32",
                        f"{speed.removeprefix('speed ')}, {cos}, {ratio}",
                        note=f"{served}; stock recipe, no target (the gates decide: "
                             f"cosine >= {GATES.min_cosine}, faster than FP32)"))
    speed_spread(model_dir, preset, input_size, calibration, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=640,
                        help="side of the OCR detector's input (its dims are symbolic)")
    parser.add_argument("--candidates", action="store_true",
                        help="also build and measure quantize's auto candidates (minutes)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="prove the INT8 variant this many times to show measurement spread")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    results = Results()
    # other processes on the same cores move every number: say how busy the host was
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    try:
        det = ocr_detector()
        if det is None:
            print("rapidocr-onnxruntime is not installed: "
                  "pip install --no-deps rapidocr-onnxruntime (skipping the OCR detector)")
        else:
            pages = text_pages(workdir / "pages", 8, side=args.input_size)
            bench("ppocr_det", det.read_bytes(), preset="ocr", input_size=args.input_size,
                  calibration=pages, candidates=args.candidates, repeat=args.repeat, workdir=workdir,
                  results=results)
        mlp = onnx_models.matmul_mlp(features=512, hidden=2048, outputs=256)
        bench("matmul_mlp", mlp, preset=None, input_size=None, calibration=None, candidates=args.candidates,
              repeat=args.repeat, workdir=workdir, results=results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
