"""Side by side on real models and real held-out photographs (issue 10, point 6): FP32, our
``auto``, stock onnxruntime static QDQ and dynamic INT8, and NNCF (plain, and with the detection
head in an ignored scope as Ultralytics exports YOLO to INT8), all in one process.

For each model of ``modeld.testing.realdata`` (a YOLOv8n, a PicoDet layout detector with separate
score and box outputs, an orientation classifier, the PP-OCRv4 text detector): calibration frames
and held-out frames from different photographs (``realdata.write_frames``); every variant is built
from the calibration frames, then all are timed in interleaved rounds against FP32
(``verify.interleaved_latencies_ms``) and their task metric against FP32's is measured on the
held-out frames with the proofs' own definition (``workers.tasks.measure``: detection F1 /
top-1 agreement / mask IoU). Columns: speed vs FP32, task metric, size, build time.

- ``auto``: ``quantize_model`` with a ``QuantizeRequest`` (as the daemon runs it), whatever auto
  is at the time; its row says whether the daemon would serve it (its own proof).
- stock onnxruntime: ``quant_pre_process`` (symbolic shapes skipped: it fails on these models),
  opset 13 where per-channel needs it, then ``quantize_static`` (QDQ, U8 activations, S8 weights
  per channel, MinMax) and ``quantize_dynamic`` (its defaults).
- NNCF lives in the benchmark's own venv (``benchmarks/.venv-nncf``, created on first use with
  ``pip install nncf==... onnxruntime==<ours> onnx numpy``), not in the daemon's dependencies;
  ``nncf_build.py`` runs there as a subprocess and writes the .onnx measured here. Its build time
  includes starting that interpreter and importing nncf. Without the venv (``--quick``, or pip
  fails) its rows say why.

    .venv/bin/python benchmarks/bench_task.py [--quick] [--models yolov8n-nudenet,...] [--no-nncf]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from common import ROOT, Results, Row
from modeld.testing import realdata
from modeld.variants import Gates
from modeld.workers import tasks, verify
from modeld.workers.inputs import sample_inputs
from modeld.workers.quantize import QuantizeRequest, quantize_model

CPU = "CPUExecutionProvider"
NNCF_VENV = ROOT / "benchmarks" / ".venv-nncf"
NNCF_VERSION = "3.4.0"
NNCF_SCRIPT = Path(__file__).resolve().parent / "nncf_build.py"
#: issue 10's target for auto on a detector with real frames: speed and detection F1 vs FP32
TARGET_SPEEDUP = 1.3
TARGET_F1 = 0.9
#: run_all's per-script limit for a full run (four models, six variants, NNCF's venv the first time)
RUN_ALL_TIMEOUT_S = 3600
VARIANTS = ("fp32", "auto", "ort static QDQ", "ort dynamic", "nncf", "nncf head ignored")


@dataclass
class Built:
    """One variant of one model: its file (None: not built, ``why`` says why), build seconds."""

    variant: str
    path: Path | None
    seconds: float = 0.0
    why: str = ""
    note: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the YOLO detector only, few samples, no NNCF unless its "
                        "venv already exists")
    parser.add_argument("--models", default="", help=f"comma-separated: {', '.join(realdata.MODELS)}")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF rows")
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]),
                        help="comma-separated, besides fp32 (the smoke test builds only "
                        "'ort dynamic')")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--budget-s", type=float, default=12.0,
                        help="interleaved timing budget per model (all variants together)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench_task.json")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("MODELD_BENCH_QUICK") == "1"
    names = [n.strip() for n in args.models.split(",") if n.strip()] or (
        ["yolov8n-nudenet"] if quick else list(realdata.MODELS))
    samples = min(args.samples, 8) if quick else args.samples
    budget_s = min(args.budget_s, 3.0) if quick else args.budget_s
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = wanted - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}: use {', '.join(VARIANTS)}")
    nncf_python, nncf_why = (None, "--no-nncf") if args.no_nncf or not wanted & {
        "nncf", "nncf head ignored"} else nncf_interpreter(create=not quick)
    print(f"onnxruntime {ort.__version__}, cores {verify.cores_available()}, NNCF: "
          f"{nncf_python or nncf_why}", flush=True)

    results = Results()
    report = []
    for name in names:
        reason = realdata.missing(*realdata.needed(name))
        if reason:
            results.add(Row(f"task {name}", "skipped", reason))
            continue
        try:
            rows, doc = bench_model(realdata.model(name), wanted, samples=samples,
                                    budget_s=budget_s, nncf_python=nncf_python,
                                    nncf_why=nncf_why, quick=quick)
        except Exception as e:  # one model that fails is a row, the others still run
            results.failed(f"task {name}", e)
            continue
        results.add(*rows)
        report.append(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return results.finish()


# ---- one model ---------------------------------------------------------------------------------

def bench_model(model: realdata.RealModel, wanted: set[str], *, samples: int, budget_s: float,
                nncf_python: Path | None, nncf_why: str, quick: bool) -> tuple[list[Row], dict]:
    print(f"\n== {model.name} ({model.path.name}, {model.path.stat().st_size / 1e6:.1f} MB)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix=f"bench-task-{model.name}-") as tmp:
        work = Path(tmp)
        calibration, held_out = work / "calibration", work / "held-out"
        realdata.write_frames(calibration, model.name, "calibration")
        held = realdata.write_frames(held_out, model.name, "holdout")
        folder = work / "models" / model.name
        folder.mkdir(parents=True)
        source = folder / "model.onnx"
        shutil.copy(model.path, source)
        cal_feeds, _ = sample_inputs(source, calibration=str(calibration), preset=model.preset,
                                     input_size=model.input_size, count=samples)
        eval_feeds, _ = sample_inputs(source, calibration=str(held_out), preset=model.preset,
                                      input_size=model.input_size,
                                      count=min(len(held), 12) if quick else len(held))
        builders = {
            "auto": lambda out: _auto(model, folder, calibration, samples, out),
            "ort static QDQ": lambda out: _ort_static(source, cal_feeds, out, work),
            "ort dynamic": lambda out: _ort_dynamic(source, out, work),
            "nncf": lambda out: _nncf(nncf_python, source, cal_feeds, out, work,
                                      head_ignored=False),
            "nncf head ignored": lambda out: _nncf(nncf_python, source, cal_feeds, out, work,
                                                   head_ignored=True),
        }
        built = [Built("fp32", source)]
        for variant in VARIANTS[1:]:
            if variant not in wanted:
                continue
            if variant == "nncf head ignored" and model.task != "object-detection":
                built.append(Built(variant, None, why="not a detector: no detection head to "
                                   "keep out (the plain NNCF row stands for it)"))
                continue
            if variant.startswith("nncf") and nncf_python is None:
                built.append(Built(variant, None, why=f"NNCF not run: {nncf_why}"))
                continue
            built.append(_timed(variant, builders[variant], work))
        return _measure(model, built, eval_feeds, budget_s, len(cal_feeds))


def _timed(variant: str, build, work: Path) -> Built:
    out = work / f"{variant.replace(' ', '-')}.onnx"
    started = time.monotonic()
    try:
        note = build(out) or ""
    except Exception as e:  # a recipe that fails is a row with its reason
        print(f"  {variant}: failed: {type(e).__name__}: {e}", flush=True)
        return Built(variant, None, time.monotonic() - started,
                     why=f"build failed: {type(e).__name__}: {str(e)[:160]}")
    seconds = time.monotonic() - started
    print(f"  {variant}: built in {seconds:.1f} s {note}", flush=True)
    return Built(variant, out, seconds, note=note)


def _auto(model: realdata.RealModel, folder: Path, calibration: Path, samples: int,
          out: Path) -> str:
    """Our ``auto`` exactly as the daemon runs it; the note says what it chose and whether its
    own proof would let the daemon serve it."""
    request = QuantizeRequest(
        name=model.name, model_dir=str(folder),
        method="auto", params={"samples": samples}, calibration=str(calibration),
        preprocessing_preset=model.preset, input_size=model.input_size, providers=(CPU,),
        gates=Gates(), simulated={}, task=model.task)
    result = quantize_model(request, lambda fraction, detail: None)
    published = folder / result.record.name
    shutil.move(published, out)
    chosen = next((c for c in result.candidates if c.get("chosen")), result.candidates[0])
    primary = result.proof.on(CPU)
    why = f": {primary.reason}" if primary is not None and primary.reason else ""
    return (f"recipe {chosen['recipe']}; the daemon would "
            f"{'serve it' if result.proof.passed_anywhere else 'serve FP32' + why}")


@contextlib.contextmanager
def _inside(folder: Path):
    """quant_pre_process leaves temp files in the working directory (measured-facts.md)."""
    before = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _ort_prepared(source: Path, work: Path, *, opset13: bool) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = work / "ort-prepared.onnx"
    with _inside(work / "ort-scratch"):
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    if opset13:
        m = onnx.load(str(prepared))
        if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
            m = onnx.version_converter.convert_version(m, 13)
            prepared = work / "ort-prepared-13.onnx"
            onnx.save(m, str(prepared))
    return prepared


def _ort_static(source: Path, feeds: list[dict], out: Path, work: Path) -> str:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    prepared = _ort_prepared(source, work, opset13=True)
    with _inside(work / "ort-scratch"):
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return f"(QDQ U8/S8 per channel, MinMax, {len(feeds)} samples)"


def _ort_dynamic(source: Path, out: Path, work: Path) -> str:
    from onnxruntime.quantization import quantize_dynamic
    prepared = _ort_prepared(source, work, opset13=False)
    with _inside(work / "ort-scratch"):
        quantize_dynamic(str(prepared), str(out))
    return "(quantize_dynamic defaults: S8 weights)"


def _nncf(python: Path, source: Path, feeds: list[dict], out: Path, work: Path, *,
          head_ignored: bool) -> str:
    archive = work / "nncf-feeds.npz"
    if not archive.exists():
        np.savez(archive, **{f"{i:04d}__{k}": v for i, f in enumerate(feeds)
                             for k, v in f.items()})
    command = [str(python), str(NNCF_SCRIPT), str(source), str(archive), str(out)]
    if head_ignored:
        command.append("--head-ignored")
    # NNCF_CI: nncf's own switch that turns its telemetry off (no network here)
    env = dict(os.environ, NNCF_CI="1", CI="true", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env,
                          cwd=work)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"nncf_build.py exit {done.returncode}: "
                           + (done.stderr.strip().splitlines() or ["no output"])[-1][:200])
    info = json.loads(done.stdout.strip().splitlines()[-1])
    ignored = f", {info['ignored_nodes']} nodes ignored" if head_ignored else ""
    return f"(nncf {info['nncf']}, quantize {info['quantize_s']} s{ignored})"


# ---- measuring -----------------------------------------------------------------------------

def _measure(model: realdata.RealModel, built: list[Built], feeds: list[dict], budget_s: float,
             cal_count: int) -> tuple[list[Row], dict]:
    fp32_size = built[0].path.stat().st_size
    sessions, loaded = [], []
    for b in built:
        if b.path is None:
            continue
        session, reason = verify.open_session(b.path, None, CPU, {})
        if session is None:
            b.why, b.path = f"does not load: {reason}"[:200], None
            continue
        sessions.append(session)
        loaded.append(b)
    runs = [[verify.run_session(s, f) for f in feeds] for s in sessions]
    input_hw = tuple(next(iter(feeds[0].values())).shape[2:4])
    head = tasks.head_for(model.task, model.preset, runs[0][0])
    checks = [tasks.measure(head, runs[0], r, Gates(), input_hw) if head else None for r in runs]
    latencies = verify.interleaved_latencies_ms(sessions, feeds, budget_s=budget_s, min_rounds=10)
    metric = {"detection": "F1", "classification": "top-1", "mask": "mask IoU"}.get(
        head.kind if head else "", "task")
    benchmark = f"task {model.name}"
    rows, doc = [], {"model": model.name, "file": model.path.name, "head": head.kind if head else None,
                     "held_out_frames": len(feeds), "calibration_samples": cal_count,
                     "fp32_ms": round(latencies[0], 2), "variants": []}
    fp32_ref = _what_fp32_finds(head, runs[0], input_hw)
    doc["fp32"] = fp32_ref
    for b, check, ms in zip(loaded, checks, latencies):
        speed = latencies[0] / ms
        value = check.value if check else None
        size_mb = b.path.stat().st_size / 1e6
        doc["variants"].append({"variant": b.variant, "speedup": round(speed, 3),
                                "latency_ms": round(ms, 2), "task_value": value,
                                "task_detail": check.detail if check else "",
                                "size_mb": round(size_mb, 2), "build_s": round(b.seconds, 1),
                                "note": b.note})
        figure = (f"{speed:.2f}x FP32, {metric} {value:.3f}" if value is not None
                  else f"{speed:.2f}x FP32, {metric} not measurable")
        figure += f", {size_mb:.1f} MB ({b.path.stat().st_size / fp32_size:.2f}), built in {b.seconds:.0f} s"
        if b.variant == "fp32":
            figure = f"{ms:.1f} ms, {size_mb:.1f} MB, {len(feeds)} held-out frames"
            rows.append(Row(benchmark, "fp32", figure, note=fp32_ref))
            continue
        target, ok = "", None
        if b.variant == "auto" and head is not None and head.kind == "detection":
            target = f">= {TARGET_SPEEDUP}x and F1 >= {TARGET_F1}"
            ok = speed >= TARGET_SPEEDUP and value is not None and value >= TARGET_F1
        rows.append(Row(benchmark, b.variant, figure, target, ok,
                        note=" ".join(x for x in (b.note, check.detail if check else "") if x)))
    for b in built:
        if b.path is None:
            rows.append(Row(benchmark, b.variant, "not measured", note=b.why))
            doc["variants"].append({"variant": b.variant, "why": b.why})
    if any(b.variant == "auto" for b in built):
        rows.append(_auto_vs_others(benchmark, doc["variants"], metric))
    return rows, doc


def _what_fp32_finds(head, runs: list, input_hw: tuple[int, int]) -> str:
    """What the task metric stands on: FP32's own answers on the held-out frames."""
    if head is None:
        return "no task head recognised: no task metric"
    if head.kind == "detection":
        counts = [len(tasks.detections(head, r, input_hw).classes) for r in runs]
        return (f"FP32 finds {sum(counts)} objects (score >= {tasks.SCORE_THRESHOLD}, after NMS) "
                f"in {sum(1 for c in counts if c)} of {len(runs)} held-out frames")
    o = head.outputs[0]
    if head.kind == "classification":
        top1 = np.bincount([int(np.argmax(r[o])) for r in runs])
        return f"FP32's top-1 classes over {len(runs)} held-out frames: {top1.tolist()}"
    share = float(np.mean([np.mean(tasks._mask(head, r[o])) for r in runs]))
    return f"FP32's mask covers {share:.1%} of the pixels of {len(runs)} held-out frames"


def _auto_vs_others(benchmark: str, variants: list[dict], metric: str) -> Row:
    """Is auto ahead of every stock and NNCF variant on both speed and the task metric?"""
    auto = next((v for v in variants if v["variant"] == "auto" and "speedup" in v), None)
    others = [v for v in variants if v["variant"] not in ("fp32", "auto") and "speedup" in v]
    if auto is None or not others:
        return Row(benchmark, "auto ahead of stock and NNCF on speed and task", "not measured",
                   "ahead on both", False)
    behind = [f"{v['variant']} ({v['speedup']:.2f}x, {metric} {_fmt(v['task_value'])})"
              for v in others if v["speedup"] > auto["speedup"]
              or (v["task_value"] or 0) > (auto["task_value"] or 0)]
    figure = "yes" if not behind else "no: " + ", ".join(behind) + " beat it on speed or task"
    return Row(benchmark, "auto ahead of stock and NNCF on speed and task",
               f"auto {auto['speedup']:.2f}x, {metric} {_fmt(auto['task_value'])}; {figure}",
               "ahead on both", not behind)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---- the NNCF venv -----------------------------------------------------------------------------

def nncf_interpreter(*, create: bool) -> tuple[Path | None, str]:
    """The python of ``benchmarks/.venv-nncf`` (created when ``create`` and absent), or None and
    why not."""
    python = NNCF_VENV / "bin" / "python"
    stamp = NNCF_VENV / f".installed-nncf-{NNCF_VERSION}-ort-{ort.__version__}"
    if python.exists() and stamp.exists():
        return python, ""
    if not create:
        return None, f"{NNCF_VENV.relative_to(ROOT)} does not exist (a full run creates it)"
    print(f"creating {NNCF_VENV} (nncf {NNCF_VERSION}: a few minutes, ~460 MB)", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(NNCF_VENV)], check=True,
                           capture_output=True, text=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"nncf=={NNCF_VERSION}", f"onnxruntime=={ort.__version__}",
                        f"onnx=={onnx.__version__}", "numpy"],
                       check=True, capture_output=True, text=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"pip install nncf failed: {str(detail).strip().splitlines()[-1:]}"
    stamp.touch()
    return python, ""


if __name__ == "__main__":
    sys.exit(main())
