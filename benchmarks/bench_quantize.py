"""Benchmark the quantize worker on a real CNN: each stock method and ``auto``, then the variant
each one would serve measured against FP32 on held-out inputs, in interleaved rounds in one
process (timing noise between separate passes reached 30% on this kind of host).

Not a test: the numbers depend on the host; they are printed as ratios and written to
``bench-results/bench_quantize.json`` (and as rows for ``run_all``). The targets: with ``auto``,
the served variant of a YOLO-class or OCR-detector CNN is >= 1.3x faster than FP32 at cosine
>= 0.99; the ``auto`` job of a 12 MB CNN takes < 30 s (``--generated --width 2.25``).

Model, in order: ``--model PATH``; the PP-OCRv4 text detector shipped inside the PyPI package
``rapidocr-onnxruntime`` (a real trained CNN; bench only, not a dependency: ``pip install
rapidocr-onnxruntime``, or ``pip download --no-deps rapidocr-onnxruntime`` and unzip the wheel,
then ``--model .../rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``); else a generated
YOLO-sized CNN (random weights: its accuracy numbers mean little).

    .venv/bin/python benchmarks/bench_quantize.py [--model PATH] [--size 640] [--rounds 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import Results, Row
from modeld.testing.images import text_like_image, write_png
from modeld.methods import canonical
from modeld.variants import Gates
from modeld.workers import verify
from modeld.workers.inputs import sample_inputs
from modeld.workers.quantize import QuantizeRequest, quantize_model

CPU = "CPUExecutionProvider"
TARGET_SPEEDUP = 1.3
TARGET_COSINE = 0.99
#: the auto job's wall time, for a 12 MB CNN (``--generated --width 2.25``)
TARGET_SECONDS = 30.0
OCR_DET = "models/ch_PP-OCRv4_det_infer.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX CNN (default: PP-OCRv4 det)")
    parser.add_argument("--generated", action="store_true",
                        help="use the generated YOLO-sized CNN even if rapidocr is installed")
    parser.add_argument("--width", type=float, default=1.0,
                        help="channel multiplier of the generated CNN (2.25: a 12 MB file, "
                        "the size of YOLOv8n)")
    parser.add_argument("--preset", default=None, help="preprocessing preset (default: ocr "
                        "for the OCR detector, yolo otherwise)")
    parser.add_argument("--size", type=int, default=640, help="input side in pixels")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--methods", default="dynamic_int8,static_int8,auto")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench_quantize.json"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    try:
        model_path, label = _find_model(args.model, work, generated=args.generated,
                                        width=args.width)
        preset = args.preset or ("ocr" if "ocr" in label.lower() else "yolo")
        print(f"model: {label} ({model_path}), preset {preset}, input {args.size}px, "
              f"onnxruntime {ort.__version__}, cores {verify.cores_available()}")
        report = _run(model_path, label, preset, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    results = Results()
    results.add(*_rows(report, args.samples))
    return results.finish()


def _rows(report: dict, samples: int) -> list[Row]:
    """The report's rows for ``run_all``: the served variant's speed and agreement on held-out
    inputs, and how long the ``auto`` job took (the 30 s target is for a 12 MB CNN)."""
    rows = []
    for r in report["results"]:
        name = f"quantize {r['method']}"
        if r["method"] == "auto":
            ok = report["target_met"]
            rows.append(Row(name, f"served vs FP32 on held-out inputs ({report['model']})",
                            f"{r['held_out_speedup']:.2f}x at cosine {r['held_out_cosine']:.4f}",
                            f">= {TARGET_SPEEDUP:.2f}x at cosine >= {TARGET_COSINE}", ok,
                            note=f"{r['recipe']}, served={r['served']}"))
            rows.append(Row(name, f"job wall time ({report['model_mb']:.1f} MB, {samples} "
                            "calibration samples)", f"{r['seconds']:.1f} s",
                            f"< {TARGET_SECONDS:.0f} s", r["seconds"] < TARGET_SECONDS))
        else:
            rows.append(Row(name, "held-out vs FP32", f"{r['held_out_speedup']:.2f}x at cosine "
                            f"{r['held_out_cosine']:.4f}, {r['seconds']:.1f} s",
                            note=f"served={r['served']}"))
    return rows


def _run(model_path: Path, label: str, preset: str, work: Path, args) -> dict:
    folder = work / "models" / "bench"
    folder.mkdir(parents=True)
    shutil.copy(model_path, folder / "model.onnx")
    calibration = work / "calibration"
    held_out = work / "held-out"
    _write_pages(calibration, count=max(args.samples, 8), seed=0, text=preset == "ocr",
                 size=args.size)
    _write_pages(held_out, count=8, seed=1000, text=preset == "ocr", size=args.size)
    eval_feeds, _ = sample_inputs(folder / "model.onnx", calibration=str(held_out), preset=preset,
                                  input_size=args.size, count=8)
    results = []
    for method in args.methods.split(","):
        params = {"samples": args.samples} if method in ("static_int8", "auto") else {}
        request = QuantizeRequest(
            name="bench", model_dir=str(folder), method=method,
            # dynamic_int8 ignores the folder, but its proof then checks agreement on real pages
            # (synthetic noise leaves an OCR detector's output all but zero: a cosine of nothing)
            params=canonical(method, params), calibration=str(calibration),
            preprocessing_preset=preset, input_size=args.size, providers=(CPU,),
            gates=Gates(min_cosine=TARGET_COSINE, min_speedup=1.0), simulated={})
        started = time.monotonic()
        result = quantize_model(request, lambda fraction, detail: None)
        seconds = time.monotonic() - started
        kept = work / f"{method}-{result.record.name}"
        shutil.copy(folder / result.record.name, kept)
        (folder / result.record.name).unlink()
        speedup, cosine = _measure(folder / "model.onnx", kept, eval_feeds, args.rounds)
        primary = result.proof.on(CPU)
        results.append({"method": method, "variant": result.variant, "seconds": round(seconds, 1),
                        "size_ratio": round(result.record.size / (folder / "model.onnx").stat().st_size, 3),
                        "served": result.proof.passed_anywhere,
                        "proof_speedup": primary.speedup if primary else None,
                        "proof_cosine": primary.cosine if primary else None,
                        "held_out_speedup": round(speedup, 3), "held_out_cosine": round(cosine, 5),
                        "recipe": next((c["recipe"] for c in result.candidates if c.get("chosen")),
                                       result.candidates[0]["recipe"]),
                        "candidates": list(result.candidates), "warnings": list(result.warnings)})
        _print_result(results[-1])
    auto = next((r for r in results if r["method"] == "auto"), None)
    met = bool(auto and auto["served"] and auto["held_out_speedup"] >= TARGET_SPEEDUP
               and auto["held_out_cosine"] >= TARGET_COSINE)
    print(f"\ntarget (auto served, >= {TARGET_SPEEDUP}x, cosine >= {TARGET_COSINE} on held-out "
          f"inputs): {'MET' if met else 'MISSED'}")
    return {"model": label, "model_mb": model_path.stat().st_size / 1e6, "preset": preset,
            "input_size": args.size, "rounds": args.rounds,
            "onnxruntime": ort.__version__, "cores": verify.cores_available(),
            "target_met": met, "results": results}


def _measure(reference: Path, variant: Path, feeds: list[dict], rounds: int) -> tuple[float, float]:
    """(FP32 latency / variant latency, worst cosine) on ``feeds``, timed in alternate rounds."""
    ref, _ = verify.open_session(reference, None, CPU, {})
    var, reason = verify.open_session(variant, None, CPU, {})
    if var is None:
        print(f"  {variant.name} does not load: {reason}")
        return 0.0, 0.0
    agreement = verify.compare_outputs([verify.run_session(ref, f) for f in feeds],
                                       [verify.run_session(var, f) for f in feeds])
    times: dict[str, list[float]] = {"ref": [], "var": []}
    for i in range(rounds):
        feed = feeds[i % len(feeds)]
        order = (("ref", ref), ("var", var)) if i % 2 == 0 else (("var", var), ("ref", ref))
        for key, session in order:  # alternate who goes first: neither always runs warm
            start = time.perf_counter()
            verify.run_session(session, feed)
            times[key].append(time.perf_counter() - start)
    return float(np.median(times["ref"]) / np.median(times["var"])), agreement.cosine


def _print_result(row: dict) -> None:
    print(f"\n{row['method']}: {row['variant']} via {row['recipe']}, {row['seconds']} s, size "
          f"x{row['size_ratio']}, served={row['served']}; held-out: speedup "
          f"{row['held_out_speedup']}x, cosine {row['held_out_cosine']}")
    for c in row["candidates"]:
        print(f"    {c['recipe']:34s} speedup {c.get('speedup')!s:>6}  cosine "
              f"{c.get('cosine')!s:>8}  passed {c['passed']!s:5}  {c.get('reason', '')[:70]}")
    for w in row["warnings"]:
        print(f"    warning: {w}")


def _write_pages(folder: Path, *, count: int, seed: int, text: bool, size: int) -> None:
    """Calibration / held-out images: text-like pages for an OCR detector (noise makes its
    output all but zero), smooth colour fields with shapes otherwise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        height = size if i % 2 == 0 else size * 3 // 4
        if text:
            page = text_like_image(height, size, seed=seed + i)
        else:
            coarse = rng.uniform(0, 255, (height // 32 + 1, size // 32 + 1, 3))
            page = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:height, :size]
            for _ in range(6):
                y, x = rng.integers(0, height - 40), rng.integers(0, size - 40)
                page[y:y + rng.integers(10, 40), x:x + rng.integers(10, 40)] = rng.uniform(0, 255, 3)
            page = np.clip(page + rng.normal(0, 8, page.shape), 0, 255).astype(np.uint8)
        write_png(folder / f"{i:03d}.png", page, filters=(1, 2, 4))


def _find_model(given: Path | None, work: Path, *, generated: bool = False,
                width: float = 1.0) -> tuple[Path, str]:
    if given:
        return given, given.stem
    spec = None if generated else importlib.util.find_spec("rapidocr_onnxruntime")
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / OCR_DET
        if candidate.is_file():
            return candidate, "PP-OCRv4 det (rapidocr-onnxruntime)"
    print("using a generated YOLO-sized CNN (random weights; its accuracy numbers mean little)",
          file=sys.stderr)
    path = work / "generated-cnn.onnx"
    path.write_bytes(generated_cnn(width=width))
    return path, f"generated YOLO-sized CNN ({path.stat().st_size / 1e6:.1f} MB)"


def generated_cnn(*, seed: int = 0, width: float = 1.0) -> bytes:
    """A YOLO-sized backbone (stride-2 3x3 convs with SiLU, 3 to 256 x ``width`` channels, a 1x1
    head), symbolic input size: what the benchmark falls back to without a real model."""
    rng = np.random.default_rng(seed)
    nodes, inits, current, channels = [], [], "images", 3
    for i, base in enumerate((16, 32, 32, 64, 64, 128, 128, 256)):
        out = max(1, round(base * width))
        stride = 2 if i in (0, 1, 3, 5, 7) else 1
        w = rng.normal(0, np.sqrt(2 / (channels * 9)), (out, channels, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.05, out).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"], name=f"sigmoid{i}"),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"], name=f"silu{i}")]
        current, channels = f"a{i}", out
    inits.append(numpy_helper.from_array(
        rng.normal(0, 0.05, (84, channels, 1, 1)).astype(np.float32), "w_head"))
    nodes.append(helper.make_node("Conv", [current, "w_head"], ["output0"], name="head"))
    graph = helper.make_graph(
        nodes, "generated_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 84, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


if __name__ == "__main__":
    sys.exit(main())
