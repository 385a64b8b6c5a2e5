"""The demo behind ``./dev demo``: the mission end to end on this machine alone.

Starts the loopback hub with a real trained CNN (the PP-OCRv4 text detector that the PyPI package
``rapidocr-onnxruntime`` ships) and a MatMul-heavy head made with onnx.helper, writes a catalog,
starts the daemon and two nodes that run inference in a loop, then edits the catalog as a person
would and prints what each node was told and how fast. With a real OpenVINO node runtime
(``MODELD_OPENVINO_PYTHON``, which ``./dev demo`` makes) a third node runs the intent head on
``OpenVINOExecutionProvider``, proven in that runtime, and is told what its provider's proof chose.
Ends by itself; leaves nothing running.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import client
from .protocol import CPU_PROVIDER as CPU
from .testing.hub import LocalHub

OCR_WHEEL_MODEL = "ch_PP-OCRv4_det_infer.onnx"
OPENVINO = "OpenVINOExecutionProvider"


def real_cnn_path() -> Path | None:
    """The PP-OCRv4 detector inside rapidocr-onnxruntime, if that wheel is installed."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / OCR_WHEEL_MODEL
    return path if path.exists() else None


def catalog_text(*, intent: bool, intent_quant: bool, ocr_quant: bool, have_ocr: bool,
                 openvino: bool = False) -> str:
    parts = ["# The demo catalog: edited by the demo the way a person would.\n"]
    if have_ocr:
        parts.append('''[[models]]
name = "ocr-det"
description = "PP-OCRv4 text detector (a real trained CNN shipped by rapidocr-onnxruntime)"
task = "text-detection"
repo = "rapidocr/ppocr-v4"
filename = "det/ch_PP-OCRv4_det_infer.onnx"
preprocessing_preset = "ocr"
input_size = 320
''' + ('''
[models.quantize]
enabled = true
method = "auto"
''' if ocr_quant else "") + "\n")
    if intent:
        parts.append('''[[models]]
name = "intent-head"
description = "MatMul-heavy intent classifier head (made with onnx.helper)"
task = "classification"
repo = "acme/intent-head"
filename = "intent-head.onnx"
labels = "labels.txt"
''' + (f'providers = ["{CPU}", "{OPENVINO}"]\n' if openvino else "") + ('''
[models.quantize]
enabled = true
method = "dynamic_int8"
''' if intent_quant else "") + "\n")
    return "".join(parts)


@dataclass
class Node:
    """A demo inference node: a HotSession and a thread running inference in a tight loop."""

    name: str
    model: str
    socket: Path
    providers: tuple[str, ...] = (CPU,)
    events: "queue.Queue[tuple[float, dict]]" = field(default_factory=queue.Queue)
    calls: int = 0
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Node":
        self.session = client.HotSession(models=self.model, socket_path=self.socket,
                                         node=self.name, prefer="fastest",
                                         providers=self.providers,
                                         on_event=lambda e: self.events.put((time.monotonic(), e)))
        self.thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
        self.thread.start()
        return self

    def _loop(self) -> None:
        feed = None
        loaded_sha = None
        while not self.stop.is_set():
            current = self.session.current
            if current is None:
                time.sleep(0.01)
                continue
            if current.sha256 != loaded_sha:
                feed = _feed_for(self.session.session)
                loaded_sha = current.sha256
            try:
                self.session.run(None, feed)
                self.calls += 1
            except Exception:  # counted, not hidden: the demo prints the failure count
                self.failures += 1
            time.sleep(0.002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.session.close()


def _feed_for(session) -> dict[str, np.ndarray]:
    feed = {}
    for arg in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 320)
                for i, d in enumerate(arg.shape)]
        feed[arg.name] = np.random.default_rng(0).random(dims, dtype=np.float32)
    return feed


class Demo:
    def __init__(self, workdir: Path, *, timeout_s: float) -> None:
        self.dir = workdir
        self.timeout_s = timeout_s
        self.catalog = workdir / "model_catalog.toml"
        self.models = workdir / "models"
        self.socket = workdir / "modeld.sock"
        self.hub: LocalHub | None = None
        self.daemon: subprocess.Popen | None = None
        self.nodes: list[Node] = []
        self.ocr = real_cnn_path()
        python = os.environ.get("MODELD_OPENVINO_PYTHON", "")
        self.openvino = python if python and os.access(python, os.X_OK) else None

    # -- printing ---------------------------------------------------------------------------------
    def say(self, tag: str, text: str) -> None:
        print(f"{tag:<8} {text}", flush=True)

    def told(self, node: Node, event: dict, since: float, at: float, note: str = "") -> None:
        ms = (at - since) * 1000
        took = f"{ms:.0f} ms" if ms < 2000 else f"{ms / 1000:.1f} s"
        if event["event"] == "variant":
            what = (f"{event['variant']:<5} {Path(event['path']).name} "
                    f"sha256 {event['sha256'][:12]}")
        else:
            what = f"{event['event']} ({event.get('reason', '').split(';')[0]})"
        reason = f"  ({event['reason']})" if event.get("reason") and event["event"] == "variant" else ""
        self.say("", f"{node.name} <- {what}  [{took} after {note}]{reason}")

    # -- steps ------------------------------------------------------------------------------------
    def run(self) -> int:
        print("mecha10-modeld demo: a loopback hub, the daemon and two inference nodes, all on this "
              "machine.\n")
        self.start_hub()
        self.write_catalog(intent=False, intent_quant=False, ocr_quant=False)
        self.start_daemon()
        t0 = time.monotonic()
        ocr_node = intent_node = None
        if self.ocr:
            self.say("step 1", "catalog lists ocr-det (FP32); an OCR node subscribes")
            ocr_node = self.add_node("ocr-node", "ocr-det")
            self.wait_told(ocr_node, lambda e: e.get("variant") == "fp32", t0,
                           "daemon start: pulled from the hub, checked, loaded, run")

        self.say("step 2", "add intent-head to the catalog; an intent node subscribes")
        intent_node = self.add_node("intent-node", "intent-head")
        ov_node = None
        if self.openvino:
            self.say("", f"a second intent node declares {OPENVINO}: its variants are proven in "
                         f"the node runtime {self.openvino} (the demo node itself runs in the "
                         "demo's onnxruntime, which falls back to the CPU)")
            ov_node = self.add_node("intent-node-ov", "intent-head", providers=(OPENVINO,))
        t = self.write_catalog(intent=True, intent_quant=False, ocr_quant=False)
        self.wait_told(intent_node, lambda e: e.get("variant") == "fp32", t, "the catalog save")
        if ov_node is not None:
            self.wait_told(ov_node, lambda e: e.get("variant") == "fp32", t, "the catalog save")

        self.say("step 3", "enable dynamic_int8 quantization on intent-head")
        t = self.write_catalog(intent=True, intent_quant=True, ocr_quant=False)
        self.wait_told(intent_node, lambda e: e.get("variant") == "int8", t,
                       "the save: quantized in a worker, proven against FP32")
        self.show_proof("intent-head")
        if ov_node is not None:
            self.drain(ov_node, t, "the save")
            current = ov_node.session.current
            self.say("", f"{ov_node.name} runs {current.variant if current else 'nothing'}: the "
                         f"fastest proven on {OPENVINO} (the CPU node's choice is its own)")

        if self.ocr:
            self.say("step 4", "enable auto quantization on ocr-det (serve the fastest proven variant)")
            t = self.write_catalog(intent=True, intent_quant=True, ocr_quant=True)
            self.wait_settled("ocr-det", t)
            self.show_proof("ocr-det")
            self.drain(ocr_node, t, "the save")

        self.say("step 5", "break intent-head's INT8 file (truncate it to 100 bytes)")
        int8 = self.models / "intent-head" / "model-int8.onnx"
        t = time.monotonic()
        os.truncate(int8, 100)
        self.wait_told(intent_node, lambda e: e.get("variant") == "fp32", t, "the damage")
        self.wait_told(intent_node, lambda e: e.get("variant") == "int8", t,
                       "the damage: rebuilt and proven again")

        self.say("step 6", "status, as `mecha10-modeld status` prints it")
        out = subprocess.run([sys.executable, "-m", "modeld.cli", "status"], env=self.env(),
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            self.say("", line)
        for node in self.nodes:
            self.say("nodes", f"{node.name}: {node.calls} inference calls, {node.failures} failed, "
                              f"{node.session.swaps} hot swaps")
        return 0 if all(n.failures == 0 for n in self.nodes) else 1

    def start_hub(self) -> None:
        from .testing.onnx_models import matmul_mlp   # onnx: not needed to read catalog_text()
        self.hub = LocalHub(self.dir / "hub").start()
        store = self.hub.store
        store.create_repo("acme/intent-head")
        store.commit("acme/intent-head", {"intent-head.onnx": matmul_mlp(features=256, hidden=1024),
                                          "labels.txt": b"stop\ngo\nleft\nright\nfollow\nwait\n"})
        served = ["acme/intent-head (onnx.helper)"]
        if self.ocr:
            store.create_repo("rapidocr/ppocr-v4")
            store.commit("rapidocr/ppocr-v4", {f"det/{OCR_WHEEL_MODEL}": self.ocr})
            served.insert(0, f"rapidocr/ppocr-v4 ({self.ocr.stat().st_size / 1e6:.1f} MB, real trained CNN)")
        else:
            self.say("note", "rapidocr-onnxruntime is not installed: the real-CNN steps are skipped")
        self.say("hub", f"{self.hub.endpoint} serves {', '.join(served)}")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HF_ENDPOINT": self.hub.endpoint, "MODELD_CATALOG": str(self.catalog),
                    "MODELD_MODELS": str(self.models), "MODELD_SOCKET": str(self.socket),
                    "HF_HUB_DISABLE_TELEMETRY": "1"})
        env.pop("HF_TOKEN", None)
        if self.openvino:
            env["MODELD_RUNTIMES"] = f"{OPENVINO}={self.openvino}"
        return env

    def start_daemon(self) -> None:
        log = open(self.dir / "daemon.log", "wb")
        self.daemon = subprocess.Popen([sys.executable, "-m", "modeld.cli", "run"], env=self.env(),
                                       stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SystemExit(f"the daemon exited: see {self.dir / 'daemon.log'}")
            try:
                client.request({"op": "ping"}, socket_path=self.socket, timeout_s=1)
                break
            except (OSError, client.DaemonUnavailableError, ValueError):
                time.sleep(0.05)
        self.say("daemon", f"running (pid {self.daemon.pid}), nodes connect to {self.socket}")

    def add_node(self, name: str, model: str, providers: tuple[str, ...] = (CPU,)) -> Node:
        node = Node(name, model, self.socket, providers).start()
        self.nodes.append(node)
        return node

    def write_catalog(self, **flags: bool) -> float:
        text = catalog_text(have_ocr=self.ocr is not None, openvino=self.openvino is not None,
                            **flags)
        tmp = self.catalog.with_name(".model_catalog.toml.tmp")
        tmp.write_text(text)
        t = time.monotonic()
        os.replace(tmp, self.catalog)   # as editors save
        return t

    def wait_told(self, node: Node, want: Callable[[dict], bool], since: float, note: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                at, event = node.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.told(node, event, since, at, note)
            if event["event"] == "variant" and want(event):
                return
        self.say("", f"{node.name}: nothing after {self.timeout_s:.0f} s (see {self.dir}/daemon.log)")

    def drain(self, node: Node, since: float, note: str) -> None:
        while True:
            try:
                at, event = node.events.get(timeout=1.0)
            except queue.Empty:
                return
            self.told(node, event, since, at, note)

    def wait_settled(self, model: str, since: float) -> None:
        deadline = time.monotonic() + self.timeout_s
        seen_busy = False
        last_step = ""
        while time.monotonic() < deadline:
            info = client.status(socket_path=self.socket)["models"].get(model, {})
            state = info.get("state")
            seen_busy = seen_busy or state == "pending"
            activity = (info.get("detail") or {}).get("activity") or {}
            step = f"{activity.get('action') or ''}: {activity.get('detail') or ''}".strip(": ")
            if step and step != last_step:   # a long step says what it is doing, not silence
                self.say("", f"{model}: {step} ({time.monotonic() - since:.0f} s)")
                last_step = step
            if seen_busy and state in ("ready", "error"):
                took = time.monotonic() - since
                self.say("", f"{model}: candidates built and proven in {took:.1f} s")
                return
            time.sleep(0.2)
        self.say("", f"{model}: still working after {self.timeout_s:.0f} s")

    def show_proof(self, model: str) -> None:
        import json

        from .variants import Proof
        manifest = json.loads((self.models / model / "manifest.json").read_text())
        for file_name, recorded in manifest["proofs"].items():
            if file_name == "model.onnx":
                continue
            proof = Proof.from_dict(recorded)
            for p in proof.providers:
                verdict = "served" if p.passed else f"refused: {p.reason}"
                speed = f"{p.speedup:.2f}x FP32 speed" if p.speedup else "speed n/a"
                measured = ", ".join(f"{c.metric} {c.value:.4f}" for c in p.checks
                                     if c.value is not None and c.gate != "min_speedup")
                samples = (f"{proof.samples} synthetic samples (no calibration folder)"
                           if proof.synthetic else f"{proof.samples} held-out samples")
                self.say("", f"proof of {model}/{file_name} on {p.provider}: {speed}, {measured}, "
                             f"on {samples}; {verdict}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                code = self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                code = self.daemon.wait(10)
            self.say("daemon", f"stopped (exit {code})")
        if self.hub is not None:
            self.hub.stop()
            self.say("hub", "stopped; nothing left running")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modeld.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it afterwards")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per step")
    args = parser.parse_args(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="modeld-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir.absolute(), timeout_s=args.timeout)
    try:
        return demo.run()
    except KeyboardInterrupt:
        return 130
    finally:
        demo.close()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
