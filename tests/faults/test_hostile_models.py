"""Campaign 5: hostile model files served by the hub into a running daemon.

External-data paths that escape the model folder (relative and absolute), a protobuf that
declares more than 2 GiB, a file that is not ONNX at all, a model the quantizer rejects, a model
with an unknown operator. Each is refused with a clear reason in ``status``; nothing is written
outside ``models/``; the daemon stays up and a good model beside them keeps serving.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modeld.testing.onnx_models import with_unknown_operator
from tests.support.daemon import DaemonProcess
from tests.support.faults import EventAuditor, wait_ready, wait_until
from tests.support.workspace import entry_toml

pytestmark = pytest.mark.faults


def external_data_model(location: str) -> bytes:
    """y = x + w, where w's bytes are 'stored' at ``location`` (external data)."""
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    return _one_node_model("Add", w, TensorProto.FLOAT, [1, 4])


def declares_huge_graph() -> bytes:
    """A ModelProto prefix whose graph field (7, length-delimited) claims 2**31 + 16 bytes."""
    length, varint = 2**31 + 16, bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x08\x09" + bytes([(7 << 3) | 2]) + bytes(varint) + b"\x0a\x00" * 64


def float64_matmul() -> bytes:
    """Loads and runs in onnxruntime, but dynamic INT8 has nothing it can quantize in it."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float64), "w")
    return _one_node_model("MatMul", w, TensorProto.DOUBLE, [1, 8])


def _one_node_model(op: str, weight: onnx.TensorProto, dtype: int, shape: list[int]) -> bytes:
    """y = op(x, weight), unchecked (the hostile ones would not pass the checker)."""
    graph = helper.make_graph([helper.make_node(op, ["x", weight.name], ["y"])], op.lower(),
                              [helper.make_tensor_value_info("x", dtype, shape)],
                              [helper.make_tensor_value_info("y", dtype, shape)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _entry(name: str, **kw) -> str:
    return entry_toml(name, repo=f"evil/{name}", filename="model.onnx", labels=None, **kw)


def _outside_models(root, models) -> set[str]:
    """Every path under ``root`` that is not in ``models``."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p != models and models not in p.parents}


def test_hostile_models_are_refused_clearly_and_harm_nothing(workspace, tmp_path):
    secret = workspace.root / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    hostile = {
        "escape_rel": external_data_model("../../secret.bin"),
        "escape_abs": external_data_model(str(secret)),
        "huge": declares_huge_graph(),
        "garbage": os.urandom(4096),
        "unknown_op": with_unknown_operator(),
        "no_quant": float64_matmul(),
    }
    for name, data in hostile.items():
        workspace.hub.store.commit(f"evil/{name}", {"model.onnx": data})
    catalog = entry_toml("det") + "".join(
        _entry(n, quantize="dynamic_int8") if n == "no_quant" else _entry(n) for n in hostile)
    workspace.write_catalog(entry_toml("det"))
    outside_before = _outside_models(tmp_path, workspace.models)
    daemon = DaemonProcess(workspace).start()
    try:
        with EventAuditor(daemon.socket, ["det"]) as auditor:
            det = wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"]
            workspace.write_catalog(catalog)

            def settled():
                models = daemon.status()["models"]
                if set(hostile) - set(models) or any(m["state"] == "pending"
                                                     for m in models.values()):
                    return None
                return models
            models = wait_until(settled, 90, "every hostile model to be judged", daemon)
            reasons = {name: _why(models[name]) for name in hostile}
            for name in ("escape_rel", "escape_abs", "huge", "garbage"):
                assert models[name]["variants"] == [], (name, models[name])
                assert models[name]["state"] == "error", (name, models[name])
            assert "refused by every provider" in models["unknown_op"]["reason"], reasons
            assert "escape" in reasons["escape_rel"] or "outside" in reasons["escape_rel"], reasons
            assert "escape" in reasons["escape_abs"] or "outside" in reasons["escape_abs"], reasons
            assert "not an ONNX model" in reasons["huge"], reasons
            assert "not an ONNX model" in reasons["garbage"], reasons
            assert "NoSuchOp" in reasons["unknown_op"] or "nonexistent" in reasons["unknown_op"]
            no_quant = models["no_quant"]
            assert [v["variant"] for v in no_quant["variants"]] == ["fp32"], no_quant
            assert "quantized no operator" in str(no_quant["detail"].get("failures")), no_quant
            # the good model never moved, the daemon is alive
            assert [v["sha256"] for v in models["det"]["variants"]] == [det]
            assert daemon.proc.poll() is None
            # a node following the refused models is never offered one of them
            told = []
            with EventAuditor(daemon.socket, sorted(set(hostile) - {"no_quant"})) as hostile_node:
                wait_until(lambda: len(hostile_node.sub.models) and hostile_node.sub.connects, 10,
                           "the node to subscribe")
                time.sleep(1)
                told = hostile_node.variants
            assert told == []
        assert auditor.mismatches == [] and {e["sha256"] for e in auditor.variants} == {det}
    finally:
        assert daemon.stop() == 0
    outside_after = _outside_models(tmp_path, workspace.models)
    new_outside = {p for p in outside_after - outside_before
                   if not p.startswith("hub") and "daemon-" not in p}
    assert new_outside == set()
    assert secret.read_bytes() == np.arange(4, dtype=np.float32).tobytes()


def _why(model: dict) -> str:
    """Everything status says about a model, as one text."""
    detail = model["detail"]
    parts = [model.get("reason") or "", str(detail.get("error") or ""),
             str(detail.get("failures") or "")]
    for variant in model["variants"]:
        parts.append(str(variant.get("proof")))
    return " | ".join(parts)
