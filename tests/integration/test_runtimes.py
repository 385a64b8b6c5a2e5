"""Proofs made in a node's own runtime, on a real second execution provider (issue 14).

The second runtime is real: ``onnxruntime-openvino`` in a venv of its own (``openvino_python``,
made by ``./dev`` or ``modeld.testing.noderuntime``), whose ``OpenVINOExecutionProvider`` runs on
this host's CPU. Nothing is simulated here. What OpenVINO cannot load is real too: a dynamic
INT8 CNN (``ConvInteger``) fails to load there with CPU fallback disabled ("the graph is not
acyclic", measured with onnxruntime-openvino 1.24.1), while the CPU provider runs it.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper


from modeld.catalog_file import CatalogKeeper
from modeld.errors import RuntimeUnavailableError
from modeld.reconciler import Reconciler
from modeld.runtimes import parse_runtimes, probe
from modeld.settings import Settings
from modeld.store import Store
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn
from modeld.variants import Gates
from modeld.workers import verify
from modeld.workers.runtimes import RuntimeProcess
from tests.support.daemon import DaemonProcess, variant_is, wait_event
from tests.support.workspace import entry_toml

CPU = "CPUExecutionProvider"
OV = "OpenVINOExecutionProvider"
BOTH = f'providers = ["{CPU}", "{OV}"]'
NO_SPEED_GATE = Gates(min_speedup=0.0)


def runtime_facts(python: str) -> tuple[str, str]:
    """(sys.executable, onnxruntime.__version__) as that interpreter itself reports them."""
    out = subprocess.run([python, "-c", "import sys, onnxruntime; "
                          "print(sys.executable); print(onnxruntime.__version__)"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    return out[0], out[1]


@pytest.fixture
def cnn_dir(tmp_path) -> Path:
    """tiny_cnn as FP32 and as dynamic INT8 (ConvInteger: OpenVINO cannot load it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    (tmp_path / "model.onnx").write_bytes(tiny_cnn())
    quantize_dynamic(tmp_path / "model.onnx", tmp_path / "model-int8.onnx",
                     weight_type=QuantType.QUInt8)
    return tmp_path


def test_proofs_on_openvino_are_made_in_its_runtime(tmp_path, openvino_python):
    (tmp_path / "model.onnx").write_bytes(matmul_mlp())
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(tmp_path / "model.onnx", tmp_path / "model-int8.onnx",
                     weight_type=QuantType.QUInt8)
    executable, version = runtime_facts(openvino_python)
    assert version != ort.__version__          # really another onnxruntime than the daemon's
    proof = verify.prove_file(tmp_path / "model-int8.onnx", variant="int8",
                              reference=tmp_path / "model.onnx", providers=(CPU, OV),
                              gates=NO_SPEED_GATE, feeds=None, simulated={}, model_dir=tmp_path,
                              runtimes={OV: openvino_python})
    on_ov, on_cpu = proof.on(OV), proof.on(CPU)
    assert on_ov.usable and on_ov.passed, on_ov.reason
    assert (on_ov.python, on_ov.onnxruntime) == (executable, version)
    assert on_ov.runtime_package == f"onnxruntime-openvino=={version}"
    assert on_ov.cosine > 0.99 and on_ov.speedup is not None and on_ov.checks
    assert (on_cpu.python, on_cpu.onnxruntime) == (sys.executable, ort.__version__)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".modeld-")]


def test_openvino_refuses_what_it_cannot_load_with_cpu_fallback_off(cnn_dir, openvino_python):
    proof = verify.prove_file(cnn_dir / "model-int8.onnx", variant="int8",
                              reference=cnn_dir / "model.onnx", providers=(CPU, OV),
                              gates=NO_SPEED_GATE, feeds=None, simulated={}, model_dir=cnn_dir,
                              runtimes={OV: openvino_python})
    assert proof.on(CPU).passed, proof.on(CPU).reason
    refused = proof.on(OV)
    assert not refused.usable and not refused.passed
    assert "graph is not acyclic" in refused.reason   # OpenVINO's own words, not a stand-in


def test_nodes_openvino_lacks_are_refused_not_run_on_the_cpu(tmp_path, openvino_python):
    """OpenVINO has no Celu: with CPU fallback (onnxruntime's default) the session loads and
    lists OpenVINO first while the node runs on the CPU provider; the proof disables fallback
    and refuses it."""
    graph = helper.make_graph([helper.make_node("Celu", ["x"], ["y"])], "celu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    code = ("import onnxruntime as o, sys; s = o.InferenceSession(sys.argv[1], "
            "providers=['OpenVINOExecutionProvider']); print(s.get_providers()[0])")
    loose = subprocess.run([openvino_python, "-c", code, str(path)], capture_output=True,
                           text=True, timeout=60)
    assert loose.stdout.strip() == OV              # what a check of get_providers() alone sees
    proof = verify.prove_file(path, variant="fp32", reference=None, providers=(CPU, OV),
                              gates=Gates(), feeds=None, simulated={}, model_dir=tmp_path,
                              runtimes={OV: openvino_python})
    assert proof.on(CPU).passed
    assert not proof.on(OV).usable and "fallback to CPU EP has been explicitly disabled" in \
        proof.on(OV).reason


@pytest.mark.parametrize("python, says", [
    ("/nonexistent/bin/python", "no executable interpreter at this path"),
    (sys.executable, f"has no {OV}"),                        # a runtime without the provider
    ("/bin/false", "exited with code 1"),                     # a broken interpreter
])
def test_a_runtime_that_cannot_prove_is_one_clear_reason(cnn_dir, python, says):
    with pytest.raises(RuntimeUnavailableError) as raised:
        with RuntimeProcess(python, OV, cnn_dir):
            pass
    assert says in str(raised.value) and python in str(raised.value)
    copy = pickle.loads(pickle.dumps(raised.value))        # it crosses the worker boundary
    assert isinstance(copy, RuntimeUnavailableError) and str(copy) == str(raised.value)
    assert copy.fields()["provider"] == OV
    assert says in probe(OV, python).reason
    proof = verify.prove_file(cnn_dir / "model.onnx", variant="fp32", reference=None,
                              providers=(CPU, OV), gates=Gates(), feeds=None, simulated={},
                              model_dir=cnn_dir, runtimes={OV: python})
    assert proof.on(CPU).passed                                # the other provider goes on
    assert not proof.on(OV).usable and says in proof.on(OV).reason
    assert not [p for p in cnn_dir.iterdir() if p.name.startswith(".modeld-")]


def test_runtime_settings_parse_and_say_what_is_wrong():
    assert parse_runtimes(f"{OV}=/opt/ov/bin/python; CUDAExecutionProvider=/opt/gpu/python") == {
        OV: "/opt/ov/bin/python", "CUDAExecutionProvider": "/opt/gpu/python"}
    with pytest.raises(ValueError, match="PROVIDER=PYTHON"):
        parse_runtimes("/opt/ov/bin/python")
    from modeld.cli import build_parser, settings_from
    args = build_parser().parse_args(["status", "--runtime", f"{OV}=/b/python"])
    settings = settings_from(args, {"MODELD_RUNTIMES": f"{OV}=/a/python;{CPU}=/c/python"})
    assert settings.runtimes == {OV: "/b/python", CPU: "/c/python"}


def test_nodes_on_openvino_and_on_cpu_each_get_what_their_provider_proved(workspace,
                                                                          openvino_python):
    """A real daemon proves FP32 and a dynamic INT8 of a CNN and of an MLP on both providers,
    OpenVINO in its own runtime. Each node is told what its provider's proofs chose: the INT8 CNN
    (ConvInteger) is served on CPU and refused on OpenVINO, which serves FP32 instead; for the
    MLP each node gets the fastest variant proven on its own provider."""
    det = entry_toml("det", quantize="dynamic_int8", extra=BOTH) + "allow_slower = true\n"
    mlp = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                     quantize="dynamic_int8", extra=BOTH)
    workspace.write_catalog(det + mlp)
    daemon = DaemonProcess(workspace, env={"MODELD_RUNTIMES": f"{OV}={openvino_python}"}).start()
    try:
        with daemon.subscribe("det", providers=[OV], prefer="int8", node="ov") as ov_det, \
                daemon.subscribe("det", providers=[CPU], prefer="int8", node="cpu") as cpu_det:
            on_cpu = wait_event(cpu_det, variant_is("det", "int8"), timeout_s=120, daemon=daemon)
            on_ov = wait_event(ov_det, variant_is("det", "fp32"), timeout_s=120, daemon=daemon)
        assert on_cpu["provider"] == CPU and on_ov["provider"] == OV
        assert "int8 not served" in on_ov["reason"] and "graph is not acyclic" in on_ov["reason"]
        status = daemon.status()
        executable, version = runtime_facts(openvino_python)
        assert status["runtimes"][OV]["onnxruntime"] == version
        proofs = workspace.manifest("det")["proofs"]
        for file_name in ("model.onnx", "model-int8.onnx"):
            ov = next(p for p in proofs[file_name]["providers"] if p["provider"] == OV)
            assert (ov["python"], ov["onnxruntime"]) == (executable, version)
        # the MLP: once its INT8 is proven, each node gets the fastest proven on its provider
        deadline = time.monotonic() + 120
        while not _proven_both(workspace) and time.monotonic() < deadline:
            time.sleep(0.2)
        manifest = workspace.manifest("mlp")
        for provider in (OV, CPU):
            expected = _fastest_proven(manifest, provider)
            with daemon.subscribe("mlp", providers=[provider], node=provider) as sub:
                told = wait_event(sub, lambda e: e.get("event") == "variant", timeout_s=30,
                                  daemon=daemon)
            assert (told["variant"], told["provider"]) == (expected, provider), told
        # a nack from a node on OpenVINO is evidence: the daemon proves the file again, on
        # OpenVINO in the OpenVINO runtime, and the rejection stays with that node
        with daemon.subscribe("mlp", providers=[OV], node="ov-nack") as sub:
            told = wait_event(sub, lambda e: e.get("event") == "variant", timeout_s=30,
                              daemon=daemon)
            sub.ack("mlp", told["generation"], ok=False, error="does not load here")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not _log_has(daemon, "recheck_done", "mlp"):
                time.sleep(0.2)
        done = _log_has(daemon, "recheck_done", "mlp")
        assert done and done["file"] == Path(told["path"]).name, daemon.log()
        assert done["verdict"] == "the rejection stays with that node"
        again = workspace.manifest("mlp")["proofs"][done["file"]]
        ov = next(p for p in again["providers"] if p["provider"] == OV)
        assert (ov["python"], ov["onnxruntime"]) == (executable, version)
    finally:
        daemon.stop()
    # the nack path's evidence: the INT8 CNN re-proven on OpenVINO, in the OpenVINO runtime
    settings = Settings(catalog_path=workspace.catalog, models_dir=workspace.models,
                        runtimes={OV: openvino_python})
    reconciler = Reconciler(settings, store=Store(workspace.models),
                            catalog=CatalogKeeper(workspace.catalog))
    reconciler.catalog.reload()

    async def reprove():
        await reconciler.probe_runtimes()
        return await reconciler.reprove("det", "model-int8.onnx", OV)
    again = asyncio.run(reprove())
    assert again.provider == OV and not again.usable and "not acyclic" in again.reason
    assert again.python == executable


def _log_has(daemon, event: str, model: str) -> dict | None:
    """The daemon's last JSON log event ``event`` for ``model``, if any."""
    found = None
    for line in Path(daemon.log_path).read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == event and doc.get("model") == model:
                found = doc
    return found


def _proven_both(workspace) -> bool:
    try:
        proofs = workspace.manifest("mlp")["proofs"]
    except (OSError, ValueError):
        return False
    return "model-int8.onnx" in proofs and "model.onnx" in proofs


def _fastest_proven(manifest: dict, provider: str) -> str:
    """What serving.choose picks for "fastest", from the recorded proofs on ``provider``."""
    best, best_speed = "fp32", 1.0
    proof = manifest["proofs"].get("model-int8.onnx")
    p = next((p for p in proof["providers"] if p["provider"] == provider), None) if proof else None
    if p and p["passed"] and (p["speedup"] or 1.0) > best_speed:
        best = "int8"
    return best


def test_a_broken_runtime_path_is_a_per_model_error_while_cpu_serves(workspace, tmp_path,
                                                                     openvino_python):
    """The OpenVINO runtime's path does not exist: the node on CPU is served, the node on
    OpenVINO is told why nothing is, the log has one event per model and provider; once the
    path works, a SIGHUP makes the daemon ask again and prove there."""
    wrapper = tmp_path / "ov-python"           # where the runtime will be, not there yet
    workspace.write_catalog(entry_toml("det", extra=BOTH))
    daemon = DaemonProcess(workspace, env={"MODELD_RUNTIMES": f"{OV}={wrapper}"}).start()
    try:
        with daemon.subscribe("det", providers=[OV], node="ov") as ov, \
                daemon.subscribe("det", providers=[CPU], node="cpu") as cpu:
            wait_event(cpu, variant_is("det", "fp32"), timeout_s=60, daemon=daemon)
            told = wait_event(ov, lambda e: e.get("event") == "unavailable"
                              and "no executable interpreter" in e.get("reason", ""),
                              timeout_s=60, daemon=daemon)
            assert str(wrapper) in told["reason"] and OV in told["reason"]
            events = [json.loads(line) for line in Path(daemon.log_path).read_text().splitlines()
                      if line.startswith("{") and "runtime_unavailable" in line]
            assert any(e.get("model") == "det" and e.get("provider") == OV for e in events), events
            wrapper.write_text(f'#!/bin/sh\nexec "{openvino_python}" "$@"\n')
            wrapper.chmod(0o755)
            daemon.signal(1)   # SIGHUP: ask the runtimes again; the proof key changed
            fixed = wait_event(ov, variant_is("det", "fp32"), timeout_s=60, daemon=daemon)
            assert fixed["provider"] == OV
    finally:
        daemon.stop()
