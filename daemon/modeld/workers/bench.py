"""The ``bench`` job: prove FP32 and every variant of one model folder and return the table rows.

Run by ``mecha10-modeld bench NAME`` through ``modeld.jobs.JobRunner`` (the CLI formats the rows
with ``modeld.benchtable``). Existing files (model-int8.onnx, model-fp16.onnx) are measured as they
are; with ``candidates=True`` the quantize worker's ``auto`` candidates are also built fresh in a
scratch copy of the folder, so nothing the daemon serves is touched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from ..atomic import WORK_PREFIX, sha256_file
from ..errors import StoreError
from ..variants import DEFAULT_PROVIDERS, FILE_VARIANTS, FP32, VARIANT_FILES, Gates, Proof
from .inputs import CalibrationError, sample_inputs
from .verify import SYNTHETIC_WARNING, prove_file

log = structlog.get_logger(__name__)

ProgressFn = Callable[[float | None, str], None]


@dataclass(frozen=True)
class BenchRequest:
    """Which model folder to bench, on which providers, against which gates."""

    model_dir: str                       # models/<name>/ holding model.onnx
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    gates: Gates | None = None           # None: the default gates
    calibration: str | None = None
    preprocessing_preset: str | None = None
    input_size: int | None = None
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    samples: int = 8
    seed: int = 0
    #: also build and measure quantize's ``auto`` candidates (slow: minutes on a real model)
    candidates: bool = False
    name: str = ""                       # catalog entry, for messages
    task: str | None = None              # the catalog's task: which task metric is shown
    #: provider -> the Python of the node runtime that measures it (``Settings.runtimes``)
    runtimes: Mapping[str, str] = field(default_factory=dict)


def bench_model(request: BenchRequest, progress: ProgressFn) -> tuple[dict[str, Any], ...]:
    """One row per (file or candidate, provider): size, latency, speedup, agreement, verdict."""
    model_dir = Path(request.model_dir)
    fp32 = model_dir / VARIANT_FILES[FP32]
    if not fp32.is_file():
        raise StoreError(f"no {fp32.name} in {model_dir}", entry=request.name or None,
                         hint="pull the model first (the daemon does it from the catalog)")
    try:
        feeds, synthetic = sample_inputs(fp32, calibration=request.calibration,
                                         preset=request.preprocessing_preset,
                                         input_size=request.input_size, count=request.samples,
                                         seed=request.seed, split="holdout")
    except CalibrationError:
        raise  # the entry's calibration settings are wrong: the user must fix them
    except Exception:  # noqa: BLE001 - an unreadable FP32 file: its proof row says why
        feeds, synthetic = None, True
    files = [fp32] + [model_dir / name for variant, name in VARIANT_FILES.items()
                      if variant != FP32 and (model_dir / name).is_file()]
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        progress(i / (len(files) + request.candidates), f"measuring {path.name}")
        reference = None if path == fp32 else fp32
        proof = prove_file(path, variant=FILE_VARIANTS[path.name], reference=reference,
                           providers=request.providers, gates=request.gates or Gates(),
                           feeds=feeds, simulated=request.simulated, model_dir=model_dir,
                           seed=request.seed, task=request.task,
                           preset=request.preprocessing_preset, synthetic=synthetic,
                           runtimes=request.runtimes)
        rows.extend(rows_from_proof(proof, recipe=path.name, file=path.name,
                                    size_bytes=path.stat().st_size))
    if request.candidates:
        start = len(files) / (len(files) + 1)
        progress(start, "building auto candidates")
        rows.extend(_candidate_rows(request, fp32, lambda fraction, detail: progress(
            start + (1 - start) * (fraction or 0.0), f"candidates: {detail}")))
    for row in rows:
        row["synthetic_inputs"] = synthetic
        if synthetic and row["variant"] != FP32 and SYNTHETIC_WARNING not in row["warnings"]:
            row["warnings"].append(SYNTHETIC_WARNING)
    progress(1.0, "bench done")
    log.info("bench_done", model=request.name or model_dir.name, rows=len(rows),
             synthetic_inputs=synthetic)
    return tuple(rows)


def rows_from_proof(proof: Proof, *, recipe: str, file: str | None,
                    size_bytes: int | None) -> list[dict[str, Any]]:
    """One bench row per provider of a proof (a checker refusal gives every provider its reason)."""
    out = []
    for p in proof.providers:
        task = p.task_check
        out.append({"variant": proof.variant, "recipe": recipe, "file": file,
                    "provider": p.provider, "size_bytes": size_bytes,
                    "latency_ms": p.latency_ms, "fp32_latency_ms": p.fp32_latency_ms,
                    "speedup": p.speedup, "cosine": p.cosine, "max_abs_error": p.max_abs_error,
                    "part_cosine": p.part_cosine,
                    "task_metric": task.metric if task else None,
                    "task_value": task.value if task else None,
                    "samples": proof.samples, "inputs": proof.inputs, "usable": p.usable,
                    "passed": proof.checker_ok and p.passed, "why": p.reason,
                    "python": p.python, "onnxruntime": p.onnxruntime,
                    "runtime": p.runtime_package, "warnings": list(proof.warnings)})
    return out


def _candidate_rows(request: BenchRequest, fp32: Path, progress: ProgressFn
                    ) -> list[dict[str, Any]]:
    """Build quantize's ``auto`` candidates in a scratch copy of the folder and report them all."""
    try:
        from . import quantize
    except ImportError:  # the quantize worker is not installed: existing files only
        log.warning("bench_no_quantize_worker")
        return []
    scratch = fp32.parent / f"{WORK_PREFIX}bench-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        _link_or_copy(fp32, scratch / fp32.name)
        result = quantize.quantize_model(quantize.QuantizeRequest(
            name=request.name or fp32.parent.name, model_dir=str(scratch),
            source_sha256=sha256_file(fp32), method="auto",
            params={"samples": request.samples}, calibration=request.calibration,
            preprocessing_preset=request.preprocessing_preset, input_size=request.input_size,
            providers=request.providers, gates=request.gates or Gates(),
            simulated=request.simulated, task=request.task, runtimes=request.runtimes),
            progress)
        provider = request.providers[0] if request.providers else ""
        return [_candidate_row(c, provider, result.warnings) for c in result.candidates]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _candidate_row(candidate: Mapping[str, Any], provider: str,
                   warnings: tuple[str, ...]) -> dict[str, Any]:
    """Normalise one of quantize's candidate rows (measured on the first provider) to a bench row."""
    return {"variant": "fp16" if candidate.get("kind") == "fp16" else "int8",
            "recipe": candidate.get("recipe", "?"), "file": None, "provider": provider,
            "size_bytes": candidate.get("size"), "latency_ms": candidate.get("latency_ms"),
            "fp32_latency_ms": candidate.get("fp32_latency_ms"),
            "speedup": candidate.get("speedup"), "cosine": candidate.get("cosine"),
            "max_abs_error": candidate.get("max_abs_error"),
            "part_cosine": candidate.get("part_cosine"),
            "task_metric": candidate.get("task_metric"), "task_value": candidate.get("task_value"),
            "usable": candidate.get("size") is not None, "passed": bool(candidate.get("passed")),
            "why": candidate.get("reason") or "", "chosen": bool(candidate.get("chosen")),
            "warnings": list(warnings)}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)   # same folder tree: no copy of a large model
    except OSError:
        shutil.copy2(source, target)
