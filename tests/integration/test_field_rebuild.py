"""A rebuild from newer field samples that fails its proof leaves the proven variant serving
(issue 13), through a real daemon: the MatMul model of the loopback hub, ``static_int8`` from
field samples sent over the real socket. A first generation of ordinary inputs builds an INT8
that proves and serves; a second generation with one sample far out of range among its
calibration part (a glitching camera) builds one that fails its proof on the ordinary held-out
part: it is withheld (never published under the INT8's name), the serving INT8 is proven again
on those held-out samples and passes, status says why, nodes keep the first INT8, and a restart
rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np

from modeld import client
from modeld.workers.inputs import held_out
from tests.support.daemon import DaemonProcess, variant_is, wait_event
from tests.support.workspace import entry_toml

NEEDED = 4


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array.astype(np.float32))
    return out.getvalue()


def name_of(data: bytes) -> str:
    """The file name the daemon keeps a sample under (content-addressed)."""
    return f"{hashlib.sha256(data).hexdigest()}.npy"


def second_generation(first: list[bytes], rng) -> list[bytes]:
    """Two more samples (a quarter of six is new: a generation is cut), one ordinary and one far
    out of range, chosen so that the far one is calibrated on, not held out."""
    ordinary = npy(rng.standard_normal((1, 64)))
    while True:
        far = npy(rng.standard_normal((1, 64)) * 1000)
        pool = [Path(name_of(d)) for d in first + [ordinary, far]]
        if name_of(far) not in {p.name for p in held_out(pool)}:
            return [ordinary, far]


def test_a_failing_rebuild_from_newer_samples_keeps_the_proven_int8_serving(workspace):
    ws = workspace
    ws.write_catalog(entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                                quantize="static_int8").replace(
        'method = "static_int8"',
        f'method = "static_int8"\nfield_samples = {NEEDED}\nmin_speedup = 0\nmin_cosine = 0.98'))
    daemon = DaemonProcess(ws).start()
    try:
        # the node asks for INT8 (speed is not gated here: a loaded host may time INT8 slower)
        sub = daemon.subscribe("mlp", prefer="int8")
        wait_event(sub, variant_is("mlp", "fp32"), timeout_s=60, daemon=daemon)
        rng = np.random.default_rng(5)
        first = [npy(rng.standard_normal((1, 64))) for _ in range(NEEDED)]
        answers = client.send_samples("mlp", first, node="arm", socket_path=daemon.socket)
        assert all(a["event"] == "sample" for a in answers), answers
        served = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
        gen_a = ws.status()["models"]["mlp"]["detail"]["field_samples"]["generation"]

        answers = client.send_samples("mlp", second_generation(first, rng), node="arm",
                                      socket_path=daemon.socket)
        assert answers[-1]["generation_cut"], answers
        doc = _wait_withheld(ws, daemon)
        why = next(iter(doc["detail"]["failures"].values()))
        assert "did not pass" in why and "passes on them and keeps serving" in why, why
        assert "\n" not in why
        int8 = next(v for v in doc["variants"] if v["variant"] == "int8")
        assert int8["sha256"] == served["sha256"] and int8["proof"]["inputs"] == "calibration"
        assert [p["passed"] for p in int8["proof"]["providers"]] == [True], int8["proof"]
        # the node was never moved off it
        while (event := sub.next_event(timeout_s=0.5)) is not None:
            assert event.get("event") != "variant" or event["sha256"] == served["sha256"], event
        on_disk = ws.models / "mlp" / "model-int8.onnx"
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == served["sha256"]
        # the generation the serving INT8 was calibrated on is kept beside the newer one
        assert (ws.models / "mlp" / "samples" / f"gen-{gen_a}").is_dir()
        assert "rebuild_withheld" in daemon.log()
    finally:
        daemon.stop()

    restarted = DaemonProcess(ws).start()
    try:
        sub = restarted.subscribe("mlp", prefer="int8")
        again = wait_event(sub, variant_is("mlp", "int8"), timeout_s=60, daemon=restarted)
        assert again["sha256"] == served["sha256"]
        assert "quantized" not in restarted.log()
    finally:
        restarted.stop()


def _wait_withheld(ws, daemon, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = ws.status()["models"]["mlp"]
        if doc.get("detail", {}).get("failures") and doc["state"] == "ready":
            return doc
        time.sleep(0.3)
    raise AssertionError(f"no withheld rebuild in {timeout_s} s: {doc}\n{daemon.log()[-3000:]}")
