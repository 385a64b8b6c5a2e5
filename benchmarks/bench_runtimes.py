"""The variant table per execution provider, each measured in its own node runtime: the CPU
provider in the daemon's onnxruntime, OpenVINO in a real ``onnxruntime-openvino`` venv
(``modeld.testing.noderuntime``, made by ``./dev bench``). Which variant a node is told depends on
its provider: the fastest proven there.

Models: the real YOLOv8n (``nudenet`` wheel) with a static QDQ INT8 calibrated on real frames
(task gate: detection F1 on the frames the proof holds out of the calibration folder), and the generated MatMul MLP with a dynamic INT8.

Run:
    .venv/bin/python benchmarks/bench_runtimes.py        (MODELD_OPENVINO_PYTHON=... optional)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import Results, Row
from modeld.benchtable import format_table
from modeld.testing import noderuntime, onnx_models, realdata
from modeld.variants import Gates
from modeld.workers.bench import BenchRequest, bench_model

CPU = "CPUExecutionProvider"
OV = noderuntime.OPENVINO
GATES = Gates()   # the catalog's defaults: faster than FP32, the task kept


def openvino_python() -> str | None:
    given = os.environ.get("MODELD_OPENVINO_PYTHON")
    if given:
        return given
    return str(noderuntime.python_of(noderuntime.DEFAULT_VENV)) \
        if noderuntime.installed(noderuntime.DEFAULT_VENV) else None


def build(model_dir: Path, name: str, method: str, *, preset: str | None,
          input_size: int | None, calibration: Path | None) -> None:
    from modeld.workers import quantize
    from modeld.methods import canonical
    started = time.perf_counter()
    quantize.quantize_model(quantize.QuantizeRequest(
        name=name, model_dir=str(model_dir),
        method=method,
        params=canonical(method, {}, entry=name),
        calibration=str(calibration) if calibration else None, preprocessing_preset=preset,
        input_size=input_size, providers=(CPU,), gates=Gates(min_cosine=0.0, min_speedup=0.0,
                                                            min_part_cosine=0.0,
                                                            min_detection_f1=0.0)),
        lambda f, d: None)
    print(f"  built {method} in {time.perf_counter() - started:.1f} s")


def bench(label: str, model_bytes: bytes, method: str, python: str, workdir: Path,
          results: Results, *, task: str | None = None, preset: str | None = None,
          input_size: int | None = None, calibration: Path | None = None) -> None:
    print(f"\n== {label}")
    model_dir = workdir / label
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(model_bytes)
    build(model_dir, label, method, preset=preset, input_size=input_size, calibration=calibration)
    started = time.perf_counter()
    rows = bench_model(BenchRequest(str(model_dir), providers=(CPU, OV), gates=GATES,
                                    calibration=str(calibration) if calibration else None,
                                    preprocessing_preset=preset, input_size=input_size,
                                    samples=8, name=label, task=task, runtimes={OV: python}),
                       lambda f, d: None)
    print(f"  bench took {time.perf_counter() - started:.1f} s")
    print(format_table(rows))
    for provider in (CPU, OV):
        mine = [r for r in rows if r["provider"] == provider]
        fp32 = next((r for r in mine if r["variant"] == "fp32"), None)
        for r in mine:
            if r["variant"] == "fp32":
                continue
            speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            task_text = (f", {r['task_metric']} {r['task_value']:.3f}"
                         if r.get("task_metric") and r.get("task_value") is not None else "")
            verdict = "served" if r["passed"] else f"refused: {r['why']}"
            results.add(Row(f"variants per provider: {label}",
                            f"{r['variant']} ({method}) vs FP32 on {provider.removesuffix('ExecutionProvider')}",
                            f"{speed}{task_text}",
                            note=f"{verdict}; measured in {r.get('runtime') or '?'} "
                                 f"(FP32 {fp32['latency_ms']:.2f} ms)" if fp32 and fp32["latency_ms"]
                            else f"{verdict}; measured in {r.get('runtime') or '?'}"))
        passed = [r for r in mine if r["passed"] and r["variant"] != "fp32"
                  and (r["speedup"] or 0) > 1.0]
        chosen = max(passed, key=lambda r: r["speedup"])["variant"] if passed else "fp32"
        results.add(Row(f"variants per provider: {label}",
                        f"a node on {provider.removesuffix('ExecutionProvider')} is told",
                        chosen, note="the fastest variant proven on its provider"))


def main() -> int:
    results = Results()
    python = openvino_python()
    if python is None:
        print("no OpenVINO node runtime: ./dev bench makes one "
              "(python -m modeld.testing.noderuntime --ensure)")
        results.failed("variants per provider", RuntimeError("no OpenVINO node runtime"))
        return results.finish()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    workdir = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    try:
        reason = realdata.missing(*realdata.needed("yolov8n-nudenet"))
        if reason:
            print(f"skipping the YOLOv8n: {reason}")
        else:
            yolo = realdata.model("yolov8n-nudenet")
            # one folder, as a catalog gives it: the proof holds its held-out part back
            calibration = workdir / "calibration"
            calibration.mkdir()
            realdata.write_frames(calibration, yolo.name, "calibration")
            bench("yolov8n", yolo.path.read_bytes(), "auto", python, workdir, results,
                  task=yolo.task, preset=yolo.preset, input_size=yolo.input_size,
                  calibration=calibration)
        mlp = onnx_models.matmul_mlp(features=512, hidden=2048, outputs=256)
        bench("matmul_mlp", mlp, "dynamic_int8", python, workdir, results)
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        results.failed("variants per provider", e)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
