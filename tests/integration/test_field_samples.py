"""Field samples through a real daemon (issue 13): a real node process runs real pages through
the real PP-OCRv4 text detector with ``HotSession(contribute_samples=True)``; with no
calibration folder in the catalog the daemon builds ``static_int8`` from what the node sent
once there are ``field_samples`` of them, proves it on the held-out part, and the node is moved
from FP32 to the proven INT8. A second node sending the wrong shape is refused in one line and
changes nothing; a restart keeps the samples and rebuilds nothing; a node that sends as fast as
it can does not break the disk budget. Speed is not gated (a loaded host must not fail it):
the benchmark and the report carry the speed.

A model of two inputs (one of dynamic size) takes one .npz per call over the real socket, from a
real ``HotSession`` fed real photographs; a frame of the wrong size is refused in one line, and a
generation of .npz samples calibrates and proves a real ``static_int8`` build.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from modeld import client
from modeld.protocol import pack_npz
from tests.support.daemon import DaemonProcess, variant_is, wait_event

MODEL = "ppocr-det"
NEEDED = 16
BUDGET_MB = 120

NODE = r"""
import json, sys, time
from modeld.client import HotSession
from modeld.workers.inputs import sample_inputs
socket_path, model_path, frames, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
feeds, _ = sample_inputs(model_path, calibration=frames, preset="ocr", input_size=640, count=20)
feeds = feeds[:20]
s = HotSession(models="ocr", node="camera", socket_path=socket_path, contribute_samples=True,
               sample_interval_s=0.2, sample_reservoir=32,
               on_swap=lambda l: print(json.dumps({"swap": l.variant}), flush=True))
s.wait_ready(60)
deadline = time.monotonic() + seconds
i = 0
while time.monotonic() < deadline:
    s.run(None, feeds[i % len(feeds)])
    i += 1
    if s.current.variant == "int8" and i % 20 == 0:
        break
print(json.dumps({"calls": i, "sent": s.samples_sent, "refused": s.samples_refused,
                  "variant": s.current.variant}), flush=True)
s.close()
"""


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def disk_bytes(folder) -> int:
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


@pytest.fixture
def ocr_workspace(workspace, real_model):
    model = real_model(MODEL)
    workspace.hub.store.create_repo("acme/ocr")
    workspace.hub.store.commit("acme/ocr", {"det.onnx": model.path.read_bytes()})
    workspace.write_catalog(
        '[[models]]\nname = "ocr"\ntask = "text-detection"\nrepo = "acme/ocr"\n'
        'filename = "det.onnx"\npreprocessing_preset = "ocr"\ninput_size = 640\n\n'
        '[models.quantize]\nenabled = true\nmethod = "static_int8"\n'
        f'field_samples = {NEEDED}\nmin_cosine = 0.95\nmin_speedup = 0\n')
    return workspace, model


def test_a_node_s_real_frames_move_it_from_fp32_to_a_proven_int8(ocr_workspace, real_frames):
    ws, model = ocr_workspace
    env = {"MODELD_SAMPLES_BUDGET_MB": str(BUDGET_MB)}
    daemon = DaemonProcess(ws, env=env).start()
    try:
        sub = daemon.subscribe("ocr")
        wait_event(sub, variant_is("ocr", "fp32"), timeout_s=60, daemon=daemon)
        doc = ws.status()["models"]["ocr"]
        assert doc["reason"] == f"field samples: 0 of {NEEDED} needed", doc["reason"]

        # a second node with the wrong shape: one typed line each, nothing kept
        wrong = client.send_samples("ocr", [npy(np.zeros((1, 1, 64, 64), np.float32))],
                                    node="bad-node", socket_path=daemon.socket)
        assert wrong[0]["event"] == "error" and wrong[0]["code"] == "shape", wrong
        assert "does not fit input" in wrong[0]["error"] and "\n" not in wrong[0]["error"]
        assert not (ws.models / "ocr" / "samples").exists() or not list(
            (ws.models / "ocr" / "samples").glob("*.npy"))

        node = subprocess.run(
            [sys.executable, "-c", NODE, str(daemon.socket), str(model.path),
             str(real_frames(MODEL, "calibration")), "170"],
            env=daemon.env, capture_output=True, text=True, timeout=200)
        assert node.returncode == 0, node.stderr[-3000:]
        lines = [json.loads(l) for l in node.stdout.splitlines()]
        assert {"swap": "fp32"} in lines and {"swap": "int8"} in lines, (lines, daemon.log())
        assert lines[-1]["refused"] == 0 and lines[-1]["sent"] >= NEEDED

        served = ws.status()["models"]["ocr"]
        cpu = served["providers"]["CPUExecutionProvider"]
        assert served["served"]["variant"] == "int8"
        assert cpu["task_metric"] == "mask IoU" and cpu["task_value"] >= 0.9, cpu
        assert cpu["inputs"] != "synthetic", cpu
        samples = ws.cli("samples", "ocr", "--json")
        listed = json.loads(samples.stdout)
        assert listed["count"] >= NEEDED and listed["generation"], listed
        assert {r["node"] for r in listed["samples"]} == {"camera"}
        for f in (ws.models / "ocr" / "samples").glob("*.npy"):
            assert not f.stat().st_mode & 0o007
        quantized = daemon.log().count("quantized")
    finally:
        daemon.stop()

    # a restart keeps the samples and the proven INT8: nothing is built again
    restarted = DaemonProcess(ws, env=env).start()
    try:
        sub = restarted.subscribe("ocr")
        wait_event(sub, variant_is("ocr", "int8"), timeout_s=60, daemon=restarted)
        assert json.loads(ws.cli("samples", "ocr", "--json").stdout)["generation"] == \
            listed["generation"]
        assert "quantized" not in restarted.log() and quantized >= 1

        # a node that sends as fast as it can: refused once the budget is reached, and it holds
        stop = time.monotonic() + 4
        answers: list[dict] = []

        def flood() -> None:
            rng = np.random.default_rng(7)
            while time.monotonic() < stop:
                data = npy(rng.random((1, 3, 640, 640), dtype=np.float32))
                answers.extend(client.send_samples("ocr", [data] * 1, node="flood",
                                                   socket_path=restarted.socket))

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = {a.get("code") for a in answers if a["event"] == "error"}
        assert codes <= {"budget", "full"} and codes, (codes, len(answers))
        assert disk_bytes(ws.models / "ocr" / "samples") <= BUDGET_MB * 1024 * 1024 + (1 << 20)
        cleared = ws.cli("samples", "ocr", "--clear")
        assert cleared.returncode == 0 and "removed" in cleared.stdout
        assert not (ws.models / "ocr" / "samples").exists()
    finally:
        restarted.stop()


PAIR_NEEDED = 6


def test_a_two_input_model_s_npz_samples_calibrate_and_prove_a_static_int8(workspace,
                                                                           real_frames):
    """Two inputs: ``image`` [1, 3, ?, ?] (real photographs at the catalog's input_size) and
    ``prior`` [1, 8]; each call's inputs go as one .npz; the generation folder of them is the
    calibration folder of a real static_int8 build, proven on its held-out samples. As many
    distinct calls as ``field_samples``: one generation, one build."""
    from modeld.client import HotSession
    from modeld.testing.onnx_models import two_input_cnn
    from modeld.testing.realdata import MODELS
    from modeld.workers.inputs import sample_inputs

    ws = workspace
    ws.hub.store.create_repo("acme/pair")
    ws.hub.store.commit("acme/pair", {"pair.onnx": two_input_cnn()})
    ws.write_catalog(
        '[[models]]\nname = "pair"\ntask = "image-features"\nrepo = "acme/pair"\n'
        'filename = "pair.onnx"\npreprocessing_preset = "yolo"\ninput_size = 32\n\n'
        '[models.quantize]\nenabled = true\nmethod = "static_int8"\n'
        f'field_samples = {PAIR_NEEDED}\nmin_cosine = 0.9\nmin_speedup = 0\n')
    frames = real_frames("yolov8n-nudenet", "calibration")
    photos, _ = sample_inputs(MODELS["yolov8n-nudenet"].path, calibration=str(frames),
                              preset="yolo", input_size=32, count=PAIR_NEEDED)
    rng = np.random.default_rng(5)
    feeds = [{"image": p["images"], "prior": rng.standard_normal((1, 8)).astype(np.float32)}
             for p in photos]
    daemon = DaemonProcess(ws).start()
    try:
        sub = daemon.subscribe("pair")
        wait_event(sub, variant_is("pair", "fp32"), timeout_s=60, daemon=daemon)
        small = pack_npz({"image": npy(np.zeros((1, 3, 8, 8), np.float32)),
                          "prior": npy(np.zeros((1, 8), np.float32))})
        refused = client.send_samples("pair", [small, npy(feeds[0]["image"])], node="bad",
                                      socket_path=daemon.socket)
        assert [a.get("code") for a in refused] == ["shape", "format"], refused
        assert "must be 32 (the catalog's input_size)" in refused[0]["error"]
        assert "send one .npz" in refused[1]["error"]

        swaps: list[str] = []
        # prefer int8: the tiny model's int8 need not be faster, and speed is not the point
        session = HotSession(models="pair", node="stereo", socket_path=daemon.socket,
                             prefer="int8", contribute_samples=True, sample_interval_s=0.1,
                             sample_reservoir=len(feeds),
                             on_swap=lambda loaded: swaps.append(loaded.variant))
        try:
            assert session.wait_ready(60)
            deadline = time.monotonic() + 120
            calls = 0
            while time.monotonic() < deadline and session.current.variant != "int8":
                session.run(None, feeds[calls % len(feeds)])
                calls += 1
                time.sleep(0.01)
            assert session.current.variant == "int8", (swaps, session.last_sample_answer,
                                                       daemon.log())
            assert session.samples_refused == 0 and session.samples_sent >= PAIR_NEEDED
        finally:
            session.close()

        doc = ws.status()["models"]["pair"]
        int8 = next(v for v in doc["variants"] if v["variant"] == "int8")["proof"]
        assert int8["inputs"] == "calibration" and int8["samples"] >= 1, int8   # held-out samples
        assert all(p["passed"] for p in int8["providers"]), int8
        listed = json.loads(ws.cli("samples", "pair", "--json").stdout)
        assert listed["generation"] and {r["node"] for r in listed["samples"]} == {"stereo"}
        folder = ws.models / "pair" / "samples"
        assert len(list(folder.glob("*.npz"))) >= PAIR_NEEDED and not list(folder.glob("*.npy"))
        generation = folder / f"gen-{listed['generation']}"
        built = ws.manifest("pair")["files"]["model-int8.onnx"]["derivation"]["params"]
        assert built["calibration"] == str(generation), built   # calibrated on the .npz generation
        members = sorted(generation.iterdir())
        assert len(members) >= PAIR_NEEDED and {m.suffix for m in members} == {".npz"}
        with np.load(members[0]) as archive:   # what calibration read: every input, by name
            assert sorted(archive.files) == ["image", "prior"]
            assert archive["image"].shape == (1, 3, 32, 32)
    finally:
        daemon.stop()
