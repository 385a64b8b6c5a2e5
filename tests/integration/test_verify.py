"""Proving variants with the real onnx checker and real onnxruntime sessions on seeded models.

Everything runs for real on this host's CPU provider. The only stand-in is the *simulated*
CoreML provider: CoreML cannot exist on this Linux machine, so ``simulated`` makes a provider
that runs on CPU but refuses the operator types it is given.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from modeld.errors import StoreError
from modeld.jobs import JobRunner, JobSpec
from modeld.testing import onnx_models
from modeld.variants import Gates, Proof
from modeld.workers import verify
from modeld.workers.verify import ProveRequest, prove_file

CPU = "CPUExecutionProvider"
COREML = "CoreMLExecutionProvider"   # simulated: CoreML cannot exist on this Linux host
LENIENT = Gates(min_cosine=0.99, min_speedup=0.0)


def _prove(path: Path, *, reference: Path | None = None, providers=(CPU,), gates=LENIENT,
           simulated=None, variant: str | None = None) -> Proof:
    return prove_file(path, variant=variant or ("fp32" if reference is None else "int8"),
                      reference=reference, providers=providers, gates=gates, feeds=None,
                      simulated=simulated or {}, model_dir=path.parent)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_models.tiny_cnn())
    return folder


@pytest.fixture
def int8_file(model_dir: Path) -> Path:
    """A dynamic INT8 variant: Conv becomes ConvInteger (U8 weights, the fast kind here)."""
    out = model_dir / "model-int8.onnx"
    quantize_dynamic(str(model_dir / "model.onnx"), str(out), weight_type=QuantType.QUInt8)
    assert "ConvInteger" in verify.op_types(onnx.load(str(out)).graph)
    return out


def _with_perturbed_weights(source: Path, out: Path, *, scale: float) -> Path:
    model = onnx.load(str(source))
    rng = np.random.default_rng(42)
    for init in model.graph.initializer:
        if init.name.startswith("w"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(
                (w + rng.normal(0, scale, w.shape)).astype(np.float32), init.name))
    onnx.save(model, str(out))
    return out


# ---- FP32 -----------------------------------------------------------------------------------

def test_fp32_is_proven_on_cpu_with_a_latency(model_dir: Path) -> None:
    proof = _prove(model_dir / "model.onnx")
    cpu = proof.on(CPU)
    assert proof.checker_ok and proof.passed_anywhere
    assert cpu.usable and cpu.passed and cpu.reason == ""
    assert cpu.latency_ms > 0 and cpu.speedup == 1.0 and cpu.cosine is None
    assert proof.variant == "fp32" and len(proof.file_sha256) == 64


def test_missing_file_is_a_store_error(model_dir: Path) -> None:
    with pytest.raises(StoreError, match="missing"):
        _prove(model_dir / "model-int8.onnx", reference=model_dir / "model.onnx")


# ---- agreement --------------------------------------------------------------------------------

def test_int8_variant_gets_agreement_numbers_and_passes_lenient_gates(model_dir, int8_file):
    proof = _prove(int8_file, reference=model_dir / "model.onnx")
    cpu = proof.on(CPU)
    assert cpu.usable and cpu.passed, cpu.reason
    assert 0.99 <= cpu.cosine <= 1.0
    assert cpu.max_abs_error > 0          # quantization changed something
    assert cpu.latency_ms > 0 and cpu.fp32_latency_ms > 0
    assert cpu.speedup == pytest.approx(cpu.fp32_latency_ms / cpu.latency_ms)
    assert cpu.task_check is None         # tiny_cnn's output is a feature map, not a detector
    assert cpu.part_cosine is not None and any(c.gate == "min_part_cosine" for c in cpu.checks)


def test_max_abs_error_gate_refuses_with_the_numbers(model_dir, int8_file):
    proof = _prove(int8_file, reference=model_dir / "model.onnx",
                   gates=Gates(min_cosine=0.9, min_speedup=0.0, max_abs_error=1e-6))
    cpu = proof.on(CPU)
    assert cpu.usable and not cpu.passed
    assert "max abs error" in cpu.reason and "> max_abs_error 1e-06" in cpu.reason


def test_perturbed_weights_are_refused_on_cosine(model_dir):
    variant = _with_perturbed_weights(model_dir / "model.onnx", model_dir / "model-int8.onnx",
                                      scale=0.5)
    cpu = _prove(variant, reference=model_dir / "model.onnx").on(CPU)
    assert cpu.usable and not cpu.passed
    assert cpu.cosine < 0.99
    assert f"cosine {cpu.cosine:.4f} < min_cosine 0.9900" in cpu.reason


def test_corrupted_raw_data_still_parses_but_is_refused_on_agreement(model_dir):
    raw = (model_dir / "model.onnx").read_bytes()
    w2 = next(i for i in onnx.load_from_string(raw).graph.initializer if i.name == "w2")
    start = raw.index(w2.raw_data)
    corrupted = bytearray(raw)
    for at in range(start + 3, start + len(w2.raw_data), 4):  # sign bit of every float32 (LE)
        corrupted[at] ^= 0x80
    (model_dir / "model-int8.onnx").write_bytes(bytes(corrupted))
    proof = _prove(model_dir / "model-int8.onnx", reference=model_dir / "model.onnx")
    cpu = proof.on(CPU)
    assert proof.checker_ok                      # structurally fine ...
    assert cpu.usable and not cpu.passed         # ... but it computes something else
    assert "cosine" in cpu.reason and cpu.cosine < 0.99


# ---- load / run failures ----------------------------------------------------------------------

def test_operator_the_cpu_lacks_is_unusable_with_the_runtime_message(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_models.with_unknown_operator())
    proof = _prove(path)
    cpu = proof.on(CPU)
    assert proof.checker_ok
    assert not cpu.usable and not cpu.passed
    assert "NoSuchOp" in cpu.reason and "not a registered function/op" in cpu.reason
    assert "\n" not in cpu.reason


def test_unavailable_provider_is_unusable(model_dir):
    proof = _prove(model_dir / "model.onnx", providers=(CPU, "CUDAExecutionProvider"))
    cuda = proof.on("CUDAExecutionProvider")
    assert not cuda.usable and cuda.reason == "provider not available on this host"
    assert proof.on(CPU).passed


# ---- checker refusals -------------------------------------------------------------------------

@pytest.mark.parametrize("make_bytes, expected", [
    (lambda good: good[: len(good) // 2], "truncated, or not ONNX at all"),
    (lambda good: np.random.default_rng(7).bytes(4096), "not ONNX at all"),
    (lambda good: b"version: 1\nthis is a text file, not a model\n", "not ONNX at all"),
    (lambda good: b"", "not an ONNX model"),
], ids=["truncated", "random-bytes", "text", "empty"])
def test_files_that_are_not_sound_onnx_are_refused_by_the_checker(model_dir, make_bytes, expected):
    path = model_dir / "model-int8.onnx"
    path.write_bytes(make_bytes((model_dir / "model.onnx").read_bytes()))
    proof = _prove(path, reference=model_dir / "model.onnx")
    assert not proof.checker_ok and proof.checker_error
    assert expected in proof.checker_error
    assert "\n" not in proof.checker_error
    assert not proof.passed_anywhere
    assert all(not p.usable and p.reason.startswith("onnx checker: ") for p in proof.providers)


def test_protobuf_over_the_size_limit_is_refused_before_parsing(model_dir, monkeypatch):
    monkeypatch.setattr(verify, "MAX_PROTOBUF_BYTES", 1000)
    proof = _prove(model_dir / "model.onnx")
    assert not proof.checker_ok and "byte limit" in proof.checker_error


def _save_with_external_data(model_bytes: bytes, folder: Path, location: str) -> Path:
    model = onnx.load_from_string(model_bytes)
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=256)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def test_external_data_inside_the_folder_is_proven(model_dir):
    path = _save_with_external_data(onnx_models.tiny_cnn(), model_dir, "model.onnx.data")
    proof = _prove(path)
    assert proof.checker_ok and proof.on(CPU).passed


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    path = _save_with_external_data(onnx_models.tiny_cnn(), folder, "weights.bin")
    os.replace(folder / "weights.bin", tmp_path / "evil.bin")   # real data, outside the folder
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../evil.bin"
    onnx.save_model(model, str(path))
    proof = _prove(path)
    assert not proof.checker_ok
    assert "escapes the model folder" in proof.checker_error and "../evil.bin" in proof.checker_error
    assert not proof.passed_anywhere


def test_external_data_escaping_from_a_subgraph_is_refused(tmp_path):
    # the hostile location hides in the then-branch of an If: only a walk of subgraphs finds it
    hostile = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4],
                               data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        hostile.external_data.add(key=key, value=value)
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
        [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [4])], [hostile])
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["e"])], "else", [],
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [4])])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                               else_branch=else_branch)], "branchy",
        [onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                    str(path))
    proof = _prove(path)
    assert not proof.checker_ok
    assert "'w'" in proof.checker_error and "escapes the model folder" in proof.checker_error


def test_external_data_behind_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    path = _save_with_external_data(onnx_models.tiny_cnn(), folder, "weights.bin")
    os.replace(folder / "weights.bin", tmp_path / "outside.bin")
    (folder / "weights.bin").symlink_to(tmp_path / "outside.bin")
    proof = _prove(path)
    assert not proof.checker_ok and "through a symlink" in proof.checker_error


# ---- simulated provider, speed gate, keys -----------------------------------------------------

def test_simulated_coreml_refuses_convinteger_but_accepts_fp32(model_dir, int8_file):
    # CoreML cannot exist on this Linux host: the simulated provider runs on CPU and refuses
    # the operator types listed for it, as the real CoreML provider refuses ConvInteger.
    simulated = {COREML: ("ConvInteger", "MatMulInteger")}
    fp32 = _prove(model_dir / "model.onnx", providers=(COREML,), simulated=simulated)
    assert fp32.on(COREML).usable and fp32.on(COREML).passed
    int8 = _prove(int8_file, reference=model_dir / "model.onnx", providers=(CPU, COREML),
                  simulated=simulated)
    assert not int8.on(COREML).usable
    assert int8.on(COREML).reason == f"ConvInteger is not implemented for {COREML} (simulated)"
    assert int8.on(CPU).passed


def test_variant_on_a_provider_where_fp32_cannot_run_is_compared_against_cpu(model_dir, int8_file):
    # simulated provider (no such hardware here) that lacks Conv: FP32 cannot run on it, INT8 can
    proof = _prove(int8_file, reference=model_dir / "model.onnx", providers=(COREML,),
                   simulated={COREML: ("Conv",)})
    sim = proof.on(COREML)
    assert sim.usable and sim.passed and sim.cosine > 0.99
    assert sim.speedup is None and sim.fp32_latency_ms is None
    assert any("speed not compared" in w for w in proof.warnings)


def test_speed_gate_refuses_with_the_numbers(model_dir, int8_file):
    cpu = _prove(int8_file, reference=model_dir / "model.onnx",
                 gates=Gates(min_cosine=0.9, min_speedup=100.0)).on(CPU)
    assert cpu.usable and not cpu.passed
    assert f"{cpu.speedup:.2f}x < min_speedup 100.00" in cpu.reason
    assert "cosine" not in cpu.reason


def test_files_proven_together_get_their_own_proofs_and_one_timing_loop(model_dir, int8_file,
                                                                          monkeypatch):
    """auto proves its candidates together: FP32 runs once per provider, every file keeps its
    own reasons, and with time_refused=False a file refused on agreement is not timed."""
    bad = _with_perturbed_weights(model_dir / "model.onnx", model_dir / "bad.onnx", scale=0.5)
    broken = model_dir / "broken.onnx"
    broken.write_bytes(b"not onnx")
    loops = []
    real = verify.interleaved_latencies_ms
    monkeypatch.setattr(verify, "interleaved_latencies_ms",
                        lambda sessions, feeds: loops.append(len(sessions))
                        or real(sessions, feeds))
    proofs = verify.prove_files([(int8_file, "int8"), (bad, "int8"), (broken, "int8")],
                                reference=model_dir / "model.onnx", providers=(CPU,),
                                gates=LENIENT, feeds=None, simulated={}, model_dir=model_dir,
                                time_refused=False)
    good, refused, unreadable = (p.on(CPU) for p in proofs)
    assert good.passed and good.speedup is not None and good.cosine > 0.99
    assert not refused.passed and refused.usable and refused.reason.startswith("cosine")
    assert refused.latency_ms is None and refused.speedup is None
    assert not proofs[2].checker_ok and not unreadable.usable
    assert loops == [2]  # FP32 and the one file that agrees, timed together
    assert [p.file_sha256 for p in proofs] == [verify._sha256_of(f)
                                               for f in (int8_file, bad, broken)]
    # timed by default, as a single prove_file always is
    both = verify.prove_files([(int8_file, "int8"), (bad, "int8")],
                              reference=model_dir / "model.onnx", providers=(CPU,),
                              gates=LENIENT, feeds=None, simulated={}, model_dir=model_dir)
    assert all(p.on(CPU).speedup is not None for p in both) and loops[-1] == 3


def test_proof_key_follows_gates_and_providers(model_dir, int8_file):
    ref = model_dir / "model.onnx"
    base = _prove(int8_file, reference=ref).key
    assert _prove(int8_file, reference=ref).key == base
    assert _prove(int8_file, reference=ref, gates=Gates(min_cosine=0.95, min_speedup=0)).key != base
    assert _prove(int8_file, reference=ref, providers=(CPU, "CUDAExecutionProvider")).key != base
    assert _prove(int8_file, reference=ref, simulated={COREML: ("Conv",)}).key != base


def test_fp16_variant_with_float16_inputs_is_fed_and_compared(model_dir):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(model_dir / "model.onnx")), keep_io_types=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    onnx.save(model, str(model_dir / "model-fp16.onnx"))
    cpu = _prove(model_dir / "model-fp16.onnx", reference=model_dir / "model.onnx",
                 variant="fp16").on(CPU)
    assert cpu.usable, cpu.reason
    assert cpu.cosine > 0.99


# ---- the worker entry point -------------------------------------------------------------------

def test_prove_runs_in_a_spawn_worker_and_the_proof_pickles(model_dir, int8_file):
    request = ProveRequest(model_dir=str(model_dir), file_name=int8_file.name, variant="int8",
                           reference_file="model.onnx", providers=(CPU, COREML), gates=LENIENT,
                           calibration=None, preprocessing_preset=None, input_size=None,
                           simulated={COREML: ("ConvInteger",)}, samples=3)
    updates = []
    proof = JobRunner().run(JobSpec("modeld.workers.verify:prove", timeout_s=120), request,
                            on_progress=lambda f, d: updates.append((f, d)))
    assert isinstance(proof, Proof)
    assert proof.on(CPU).passed and not proof.on(COREML).usable
    assert pickle.loads(pickle.dumps(proof)) == proof
    assert Proof.from_dict(proof.to_dict()) == proof
    assert any("synthetic" in w for w in proof.warnings)
    assert updates and updates[-1][0] == 1.0


def _fp32_request(folder: Path, file_name: str) -> ProveRequest:
    return ProveRequest(model_dir=str(folder), file_name=file_name, variant="fp32",
                        reference_file=None, providers=(CPU,), gates=LENIENT, calibration=None,
                        preprocessing_preset=None, input_size=None, samples=2)


def test_prove_with_calibration_data_has_no_synthetic_warning(model_dir, int8_file, tmp_path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        np.save(calibration / f"sample-{i}.npy", rng.random((1, 3, 32, 32), dtype=np.float32))
    request = ProveRequest(model_dir=str(model_dir), file_name=int8_file.name, variant="int8",
                           reference_file="model.onnx", providers=(CPU,), gates=LENIENT,
                           calibration=str(calibration), preprocessing_preset=None,
                           input_size=None, samples=3)
    proof = verify.prove(request, lambda f, d: None)
    assert proof.on(CPU).passed and proof.on(CPU).cosine > 0.99
    assert not any("synthetic" in w for w in proof.warnings)


def test_prove_of_an_unreadable_fp32_file_is_a_refusal_not_an_exception(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"<html>rate limited</html>")
    proof = verify.prove(_fp32_request(tmp_path, "model.onnx"), lambda f, d: None)
    assert not proof.checker_ok and "not ONNX at all" in proof.checker_error


def test_prove_of_a_missing_file_raises_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="model.onnx: file is missing"):
        verify.prove(_fp32_request(tmp_path, "model.onnx"), lambda f, d: None)


# ---- detection agreement (pure numpy) ---------------------------------------------------------

def _yolo_head(boxes: np.ndarray, classes: np.ndarray, n_classes: int = 3, n: int = 200):
    """[1, 4+C, N] YOLOv8-style raw head with the given confident boxes, the rest empty."""
    head = np.zeros((4 + n_classes, n), np.float32)
    head[:4, :] = 10.0
    for i, (box, cls) in enumerate(zip(boxes, classes)):
        head[:4, i] = box
        head[4 + cls, i] = 0.9
    return head[None]


def _yolo_like_model(seed: int) -> bytes:
    """images [1,3,16,16] -> Conv 1x1 -> Sigmoid -> boxes scaled to pixels -> [1, 4+3, 256]."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    inits = [numpy_helper.from_array(rng.normal(0, 1.5, (7, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([16, 16, 8, 8, 1, 1, 1], np.float32)
                                     .reshape(1, 7, 1, 1), "scale"),
             numpy_helper.from_array(np.array([1, 7, 256], np.int64), "shape")]
    graph = h.make_graph(
        [h.make_node("Conv", ["images", "w"], ["c"]), h.make_node("Sigmoid", ["c"], ["s"]),
         h.make_node("Mul", ["s", "scale"], ["m"]),
         h.make_node("Reshape", ["m", "shape"], ["output0"])], "yolo_like",
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [h.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, [1, 7, 256])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def test_a_yolo_style_output_is_gated_on_detection_f1(tmp_path):
    (tmp_path / "model.onnx").write_bytes(_yolo_like_model(seed=0))
    (tmp_path / "model-int8.onnx").write_bytes(_yolo_like_model(seed=0))
    same = _prove(tmp_path / "model-int8.onnx", reference=tmp_path / "model.onnx").on(CPU)
    assert same.task_check is not None and same.task_check.gate == "min_detection_f1"
    assert same.task_check.value == 1.0 and same.cosine == pytest.approx(1.0)
    _with_perturbed_weights(tmp_path / "model.onnx", tmp_path / "model-int8.onnx", scale=1.0)
    moved = _prove(tmp_path / "model-int8.onnx", reference=tmp_path / "model.onnx").on(CPU)
    assert moved.task_check.value is not None and moved.task_check.value < 0.9
    assert not moved.passed and "< min_detection_f1 0.9000" in moved.reason


# ---- agreement arithmetic (pure numpy) ----------------------------------------------------------

def test_outputs_that_are_both_zero_prove_nothing():
    """A detector on inputs with nothing to detect: two ~0 maps. Their angle says nothing, so a
    ~0 output is left out with a warning, and when every output is ~0 there is no proof."""
    ref = [[np.full((1, 1, 8, 8), 1e-7, np.float32)]]
    var = [[np.full((1, 1, 8, 8), -3e-7, np.float32)]]
    agreement = verify.compare_outputs(ref, var, names=["maps"])
    assert agreement.max_abs_error == pytest.approx(4e-7)
    assert agreement.notes and "'maps' is ~0" in agreement.notes[0]
    assert "cannot be measured" in agreement.problem
    assert verify.gate_failures(Gates(), agreement, 2.0) == [agreement.problem]
    logits = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)
    partly = verify.compare_outputs([[ref[0][0], logits]], [[var[0][0], logits * 1.01]],
                                    names=["maps", "logits"])
    assert partly.problem == "" and partly.cosine == pytest.approx(1.0) and partly.notes
    fires = [[np.where(np.arange(64).reshape(1, 1, 8, 8) % 7 == 0, 1.0, 0.0)]]
    disagreement = verify.compare_outputs(ref, fires)   # the variant sees what FP32 does not
    assert disagreement.cosine < 0.5 and disagreement.max_abs_error == pytest.approx(1.0)


def test_shape_and_nan_mismatches_fail_outright():
    ref = [[np.ones((2, 3), np.float32)]]
    shape = verify.compare_outputs(ref, [[np.ones((3, 2), np.float32)]], names=["logits"])
    assert "'logits' shape (3, 2) differs from FP32 (2, 3)" in shape.problem
    nan = verify.compare_outputs(ref, [[np.array([[1, np.nan, 1], [1, 1, 1]], np.float32)]])
    assert "NaN/Inf" in nan.problem
    failures = verify.gate_failures(Gates(), nan, speedup=2.0)
    assert failures == [nan.problem]
