"""The bench job on real files (real onnxruntime, seeded models) and the table it prints."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from modeld.atomic import WORK_PREFIX
from modeld.benchtable import format_markdown, format_table
from modeld.errors import StoreError
from modeld.jobs import JobRunner, JobSpec
from modeld.store import sha256_file
from modeld.testing import onnx_models
from modeld.variants import Gates
from modeld.workers.bench import BenchRequest, bench_model
from modeld.workers.verify import SYNTHETIC_WARNING

CPU = "CPUExecutionProvider"
COREML = "CoreMLExecutionProvider"   # simulated: CoreML cannot exist on this Linux host


def _no_progress(fraction, detail) -> None:
    pass


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mlp"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_models.matmul_mlp())
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model-int8.onnx"),
                     weight_type=QuantType.QUInt8)
    return folder


def _by_variant(rows, provider=CPU):
    return {r["variant"]: r for r in rows if r["provider"] == provider}


def test_bench_measures_fp32_and_each_existing_variant(model_dir: Path) -> None:
    rows = bench_model(BenchRequest(str(model_dir), gates=Gates(min_speedup=0.0), samples=3),
                       _no_progress)
    by = _by_variant(rows)
    assert set(by) == {"fp32", "int8"}
    fp32, int8 = by["fp32"], by["int8"]
    assert fp32["passed"] and fp32["speedup"] == 1.0 and fp32["latency_ms"] > 0
    assert fp32["size_bytes"] == (model_dir / "model.onnx").stat().st_size
    assert int8["size_bytes"] == (model_dir / "model-int8.onnx").stat().st_size
    assert int8["size_bytes"] < fp32["size_bytes"] / 2
    assert int8["cosine"] > 0.99 and int8["max_abs_error"] > 0
    assert int8["speedup"] > 0 and int8["passed"] and int8["why"] == ""
    assert all(r["synthetic_inputs"] for r in rows)
    assert any("synthetic inputs" in w for w in int8["warnings"])
    notes = [line for line in format_table(rows).splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {SYNTHETIC_WARNING}"]


def test_bench_of_an_unreadable_fp32_file_reports_the_checker(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x00" * 100)
    rows = bench_model(BenchRequest(str(tmp_path)), _no_progress)
    assert len(rows) == 1 and not rows[0]["passed"] and rows[0]["why"].startswith("onnx checker")


def test_bench_reports_a_broken_variant_with_its_reason(model_dir: Path) -> None:
    (model_dir / "model-fp16.onnx").write_bytes(np.random.default_rng(3).bytes(2048))
    rows = bench_model(BenchRequest(str(model_dir), providers=(CPU, COREML),
                                    simulated={COREML: ("MatMulInteger",)}, samples=2),
                       _no_progress)
    fp16 = _by_variant(rows)["fp16"]
    assert not fp16["passed"] and not fp16["usable"]
    assert "not ONNX at all" in fp16["why"]
    coreml_int8 = _by_variant(rows, COREML)["int8"]
    assert coreml_int8["why"] == f"MatMulInteger is not implemented for {COREML} (simulated)"
    table = format_table(rows)
    assert "not ONNX at all" in table and "unusable" in table and "CoreML" in table


def test_bench_without_fp32_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no model.onnx"):
        bench_model(BenchRequest(str(tmp_path), name="ghost"), _no_progress)


def test_bench_runs_in_a_spawn_worker(model_dir: Path) -> None:
    rows = JobRunner().run(JobSpec("modeld.workers.bench:bench_model", timeout_s=120),
                           BenchRequest(str(model_dir), gates=Gates(min_speedup=100.0), samples=2))
    assert pickle.loads(pickle.dumps(rows)) == rows
    int8 = _by_variant(rows)["int8"]
    assert not int8["passed"] and "< min_speedup 100.00" in int8["why"]


def test_bench_takes_the_cli_request_without_gates(model_dir: Path) -> None:
    # the CLI sends a typed BenchRequest as it is, and gates=None for an entry without a
    # quantize table: the default gates apply
    spec = JobSpec(BenchRequest.target, 120, None)
    rows = JobRunner().run(spec, BenchRequest(model_dir=str(model_dir), providers=(CPU,),
                                              gates=None, calibration=None,
                                              preprocessing_preset=None, input_size=None,
                                              candidates=False, simulated={}))
    assert {r["variant"] for r in rows} == {"fp32", "int8"}
    assert _by_variant(rows)["int8"]["cosine"] > 0.99


def test_bench_candidates_are_built_aside_and_leave_served_files_alone(model_dir: Path) -> None:
    pytest.importorskip("modeld.workers.quantize")
    before = sha256_file(model_dir / "model-int8.onnx")
    rows = bench_model(BenchRequest(str(model_dir), gates=Gates(min_speedup=0.0), samples=2,
                                    candidates=True), _no_progress)
    candidates = [r for r in rows if r["file"] is None]
    assert candidates, "auto built no candidate"
    assert all(r["recipe"] and r["provider"] == CPU for r in candidates)
    assert sum(r.get("chosen", False) for r in candidates) == 1
    assert sha256_file(model_dir / "model-int8.onnx") == before
    assert not [p for p in model_dir.iterdir() if p.name.startswith(WORK_PREFIX)]


# ---- the table -------------------------------------------------------------------------------

ROWS = [
    {"variant": "fp32", "recipe": "model.onnx", "file": "model.onnx", "provider": CPU,
     "size_bytes": 4_000_000, "latency_ms": 12.5, "speedup": 1.0, "cosine": None,
     "max_abs_error": None, "usable": True, "passed": True, "why": ""},
    {"variant": "int8", "recipe": "model-int8.onnx", "file": "model-int8.onnx", "provider": CPU,
     "size_bytes": 1_000_000, "latency_ms": 19.5, "speedup": 0.64, "cosine": 0.99871,
     "max_abs_error": 0.0123, "task_metric": "F1", "task_value": 0.97, "usable": True, "passed": False,
     "why": "slower than FP32: 0.64x < min_speedup 1.00"},
    {"variant": "int8", "recipe": "static_qdq_u8s8_conv_keep_head", "file": None, "provider": CPU,
     "size_bytes": 1_200_000, "latency_ms": None, "speedup": 1.31, "cosine": 0.995,
     "max_abs_error": None, "usable": True, "passed": True, "why": "",
     "chosen": True},
]


def test_table_is_aligned_and_says_why() -> None:
    table = format_table(ROWS)
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert len({len(line) for line in lines}) == 1          # every column aligned
    assert lines[0].split("|")[1].strip() == "variant"
    assert "provider" not in lines[0]                       # one provider: no column for it
    assert "0.64x" in lines[3] and "refused" in lines[3] and "slower than FP32" in lines[3]
    assert "cos 0.9987" in lines[3] and "F1 0.970" in lines[3] and "(25%)" in lines[3]
    assert "static_qdq_u8s8_conv_keep_head (chosen)" in lines[4] and "yes" in lines[4]
    assert "3.8 MB" in lines[2]


def test_table_shows_providers_when_there_are_several() -> None:
    rows = ROWS + [dict(ROWS[1], provider=COREML, usable=False, passed=False,
                        why="ConvInteger is not implemented for CoreMLExecutionProvider (simulated)")]
    table = format_table(rows)
    assert "provider" in table.splitlines()[0] and "| CoreML " in table and "unusable" in table


def test_markdown_escapes_pipes() -> None:
    rows = [dict(ROWS[1], why="op a|b failed")]
    md = format_markdown(rows).splitlines()
    assert md[1].startswith("|---|")
    assert "op a\\|b failed" in md[2]
    assert md[2].count(" | ") == len(md[0].split(" | ")) - 1
