"""The demo behind ``./dev demo``: the mission end to end on this machine alone.

Starts the loopback hub with a real trained CNN (the PP-OCRv4 text detector that the PyPI package
``rapidocr-onnxruntime`` ships) and a MatMul-heavy head made with onnx.helper, writes a catalog,
starts the daemon and two nodes that run inference in a loop, then edits the catalog as a person
would and prints what each node was told and how fast. With a real OpenVINO node runtime
(``MODELD_OPENVINO_PYTHON``, which ``./dev demo`` makes) a third node runs the intent head on
``OpenVINOExecutionProvider``, proven in that runtime, and is told what its provider's proof chose.
With the real YOLOv8n and photographs of ``modeld.testing.realdata`` (issue 13), a camera node
with ``contribute_samples=True`` feeds an ``auto`` entry that has no calibration folder: the
daemon collects its frames, builds and proves INT8 from them in the background while the other
steps run, the node is hot-swapped, and the demo measures the served variant's detections
against FP32's on photographs the node never sent (``--no-field-samples`` leaves this act out).
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
#: the field-samples act: ``modeld.testing.realdata``'s YOLOv8n, served as this catalog entry
FIELD_MODEL = "yolov8n-nudenet"
FIELD_ENTRY = "people-det"
#: samples before the first generation: every one of the camera's 42 frames (6 photographs, 7
#: views each; about 15 s of sending), so no second generation (a rebuild) can follow. Its
#: held-out share (``inputs.HOLDOUT_MAX``: 8) then holds 7 of FP32's detections; with 36, the
#: 7 held out held 2 (measured), too few for auto to see that quantizing every node loses some
FIELD_SAMPLES = 42
#: the camera node's pace: a robot camera's, not a tight loop that would starve the build
CAMERA_FPS = 10.0
#: the camera node hands samples over this often (HotSession's default is 10 s)
SAMPLE_INTERVAL_S = 0.2


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
                 openvino: bool = False, people: bool = False) -> str:
    parts = ["# The demo catalog: edited by the demo the way a person would.\n"]
    if people:   # no calibration folder: auto calibrates and proves on the nodes' frames
        parts.append(f'''[[models]]
name = "{FIELD_ENTRY}"
description = "YOLOv8n detector of faces and body parts (the trained 320n that nudenet ships)"
task = "object-detection"
repo = "notai-tech/nudenet-320n"
filename = "320n.onnx"
preprocessing_preset = "yolo"
input_size = 320

[models.quantize]
enabled = true
method = "auto"
field_samples = {FIELD_SAMPLES}

''')
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
    #: real frames to run in turn (None: a random tensor shaped like the model's input)
    frames: list[dict[str, np.ndarray]] | None = None
    contribute: bool = False       # HotSession(contribute_samples=True)
    pause_s: float = 0.002         # between calls
    calls: int = 0
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Node":
        extra: dict[str, Any] = {}
        if self.contribute:
            extra = {"contribute_samples": True, "sample_interval_s": SAMPLE_INTERVAL_S}
        self.session = client.HotSession(models=self.model, socket_path=self.socket,
                                         node=self.name, prefer="fastest",
                                         providers=self.providers,
                                         on_event=lambda e: self.events.put((time.monotonic(), e)),
                                         **extra)
        self.thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
        self.thread.start()
        return self

    def _loop(self) -> None:
        feed = None
        loaded_sha = None
        while not self.stop.is_set():
            current = self.session.current
            if current is None or self.paused.is_set():
                time.sleep(0.01)
                continue
            if self.frames:
                feed = self.frames[self.calls % len(self.frames)]
            elif current.sha256 != loaded_sha:
                feed = _feed_for(self.session.session)
                loaded_sha = current.sha256
            try:
                self.session.run(None, feed)
                self.calls += 1
            except Exception:  # counted, not hidden: the demo prints the failure count
                self.failures += 1
            time.sleep(self.pause_s)

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


class FieldAct:
    """Issue 13 on the demo's stage: the real YOLOv8n, the photographs a camera node runs (and
    contributes), the photographs it never sends, and the check of the served variant on those."""

    def __init__(self, model_path: Path, folder: Path) -> None:
        self.model_path = model_path
        self.folder = folder
        self.started = 0.0
        self.node: Node | None = None
        self.swapped_at: float | None = None
        self.frames: list[dict[str, np.ndarray]] = []
        self.unseen = 0
        self.error: BaseException | None = None
        # decoding the photographs takes a while (JPEG in pure Python): meanwhile step 1 runs
        self._preparing = threading.Thread(target=self._prepare, daemon=True,
                                           name="photographs")
        self._preparing.start()

    def _prepare(self) -> None:
        """Write the photographs' frames (``realdata``: the camera's from six photographs, the
        unseen ones from two others) and read the camera's as the daemon preprocesses them, in a
        seeded shuffle (the first samples span every photograph)."""
        try:
            from .testing import realdata
            realdata.write_frames(self.folder / "camera", FIELD_MODEL, "calibration")
            self.unseen = len(realdata.write_frames(self.folder / "never-sent", FIELD_MODEL,
                                                    "holdout"))
            feeds = self.feeds("camera")
            order = np.random.default_rng(13).permutation(len(feeds))
            self.frames = [feeds[i] for i in order]
        except BaseException as e:  # noqa: BLE001 - raised again on the demo's thread
            self.error = e

    def prepare(self) -> tuple[list[dict[str, np.ndarray]], int]:
        """The camera's feeds and how many unseen frames there are (waits for ``_prepare``)."""
        self._preparing.join()
        if self.error is not None:
            raise self.error
        return self.frames, self.unseen

    def feeds(self, which: str) -> list[dict[str, np.ndarray]]:
        from .testing import realdata
        from .workers.inputs import sample_inputs
        found = realdata.model(FIELD_MODEL)
        feeds, _ = sample_inputs(self.model_path, calibration=str(self.folder / which),
                                 preset=found.preset, input_size=found.input_size, count=10_000)
        return feeds

    def check_unseen(self, fp32: Path, served: Path, *, budget_s: float = 4.0):
        """The served file against FP32 on the frames the node never sent: the proofs' own
        detection check (``workers.tasks.measure``: decoded, class-aware NMS, F1 at IoU 0.5)
        and their interleaved timing (``verify.interleaved_latencies_ms``)."""
        from .testing import realdata
        from .variants import Gates
        from .workers import tasks, verify
        from .workers.selection import cpu_session
        found = realdata.model(FIELD_MODEL)
        feeds = self.feeds("never-sent")
        reference, variant = cpu_session(fp32), cpu_session(served)
        ref = [verify.run_session(reference, f) for f in feeds]
        var = [verify.run_session(variant, f) for f in feeds]
        head = tasks.head_for(found.task, found.preset, ref[0])
        if head is None:
            raise RuntimeError(f"{fp32.name}: no detection head recognised in its outputs")
        check = tasks.measure(head, ref, var, Gates())
        fp32_ms, served_ms = verify.interleaved_latencies_ms([reference, variant], feeds,
                                                              budget_s=budget_s)
        return check, len(feeds), fp32_ms, served_ms


class Demo:
    def __init__(self, workdir: Path, *, timeout_s: float, field_samples: bool = True,
                 field_timeout_s: float = 900.0) -> None:
        self.dir = workdir
        self.timeout_s = timeout_s
        self.field_timeout_s = field_timeout_s
        self.catalog = workdir / "model_catalog.toml"
        self.models = workdir / "models"
        self.socket = workdir / "modeld.sock"
        self.hub: LocalHub | None = None
        self.daemon: subprocess.Popen | None = None
        self.nodes: list[Node] = []
        self.ocr = real_cnn_path()
        python = os.environ.get("MODELD_OPENVINO_PYTHON", "")
        self.openvino = python if python and os.access(python, os.X_OK) else None
        self.field: FieldAct | None = None
        self.field_skipped = "--no-field-samples" if not field_samples else ""
        if field_samples:
            from .testing import realdata
            self.field_skipped = realdata.missing(*realdata.needed(FIELD_MODEL)) or ""
            if not self.field_skipped:
                self.field = FieldAct(realdata.model(FIELD_MODEL).path, workdir / "photographs")

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
        print("mecha10-modeld demo: a loopback hub, the daemon and inference nodes, all on this "
              "machine.\n")
        self.start_hub()
        self.write_catalog(intent=False, intent_quant=False, ocr_quant=False)
        self.start_daemon()
        t0 = time.monotonic()
        ocr_node = intent_node = None
        if self.ocr:
            self.say("step 1", "catalog lists ocr-det (FP32); an OCR node subscribes")
            ocr_node = self.add_node("ocr-node", "ocr-det", pause_s=1.0 / CAMERA_FPS)
            self.wait_told(ocr_node, lambda e: e.get("variant") == "fp32", t0,
                           "daemon start: pulled from the hub, checked, loaded, run")

        self.field_begin(t0)

        self.say("step 3", "add intent-head to the catalog; an intent node subscribes")
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

        self.say("step 4", "enable dynamic_int8 quantization on intent-head")
        t = self.write_catalog(intent=True, intent_quant=True, ocr_quant=False)
        self.wait_told(intent_node, lambda e: e.get("variant") == "int8", t,
                       "the save: quantized in a worker, proven against FP32")
        self.show_proof("intent-head")
        if ov_node is not None:
            self.drain(ov_node, t, "the save")
            current = ov_node.session.current
            self.say("", f"{ov_node.name} runs {current.variant if current else 'nothing'}: the "
                         f"fastest proven on {OPENVINO} (the CPU node's choice is its own)")

        self.say("step 5", "break intent-head's INT8 file (truncate it to 100 bytes)")
        int8 = self.models / "intent-head" / "model-int8.onnx"
        t = time.monotonic()
        os.truncate(int8, 100)
        self.wait_told(intent_node, lambda e: e.get("variant") == "fp32", t, "the damage")
        self.wait_told(intent_node, lambda e: e.get("variant") == "int8", t,
                       "the damage: rebuilt and proven again")

        field_ok = self.field_end()

        # after the field act: two auto builds at once on this 2-core host would time each
        # other's candidates
        if self.ocr:
            self.say("step 7", "enable auto quantization on ocr-det (serve the fastest proven variant)")
            t = self.write_catalog(intent=True, intent_quant=True, ocr_quant=True)
            self.wait_settled("ocr-det", t)
            self.show_proof("ocr-det")
            self.drain(ocr_node, t, "the save")

        self.say("step 8", "status, as `mecha10-modeld status` prints it")
        out = subprocess.run([sys.executable, "-m", "modeld.cli", "status"], env=self.env(),
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            self.say("", line)
        for node in self.nodes:
            self.say("nodes", f"{node.name}: {node.calls} inference calls, {node.failures} failed, "
                              f"{node.session.swaps} hot swaps")
        return 0 if all(n.failures == 0 for n in self.nodes) and field_ok else 1

    # -- issue 13: field samples, from a camera node to a proven INT8 ---------------------------
    def field_begin(self, since: float) -> None:
        """Step 2: the camera node subscribes and contributes; the daemon collects its frames
        until a generation is cut, then builds in the background while the demo goes on."""
        act = self.field
        if act is None:
            self.say("step 2", f"field samples: skipped ({self.field_skipped})")
            return
        self.say("step 2", f"field samples: {FIELD_ENTRY} (a real YOLOv8n) has been in the "
                           f"catalog since the start with only `method = \"auto\"` and "
                           f"`field_samples = {FIELD_SAMPLES}`: no calibration folder")
        frames, unseen = act.prepare()
        self.say("", f"a camera node runs {len(frames)} frames of 6 real photographs at "
                     f"{CAMERA_FPS:g} per second with HotSession(contribute_samples=True); "
                     f"{unseen} frames of 2 other photographs are kept back: it never sends them")
        act.started = time.monotonic()
        act.node = self.add_node("camera-node", FIELD_ENTRY, frames=frames, contribute=True,
                                 pause_s=1.0 / CAMERA_FPS)
        self.wait_told(act.node, lambda e: e.get("variant") == "fp32", since,
                       "daemon start (no field samples yet: auto cannot prove a detector)")
        self.say("", "until there are enough, auto builds what it can without them (synthetic "
                     "inputs, on which a detector's proof cannot pass: FP32 stays); the first "
                     "generation of samples cancels that job")
        deadline = time.monotonic() + self.timeout_s
        last, shown_at = None, 0.0
        while time.monotonic() < deadline:
            info = client.status(socket_path=self.socket)["models"].get(FIELD_ENTRY, {})
            samples = (info.get("detail") or {}).get("field_samples") or {}
            reason = info.get("reason") or ""
            if reason != last or time.monotonic() - shown_at >= 3 or samples.get("generation"):
                last, shown_at = reason, time.monotonic()
                # the NOTE that `status` prints: what the daemon does, and the samples count
                self.say("", f"status of {FIELD_ENTRY}: \"{reason}\" "
                             f"({act.node.session.samples_sent} sent, "
                             f"{time.monotonic() - act.started:.1f} s)")
            if samples.get("generation"):
                self.say("", f"{samples.get('generation_count')} samples make the first "
                             f"generation ({samples['generation'][:12]}): the daemon calibrates "
                             "and proves auto's candidates on them in the background; the demo "
                             "goes on meanwhile and comes back to it in step 6")
                return
            time.sleep(0.25)
        self.say("", f"no generation of field samples after {self.timeout_s:.0f} s")

    def field_end(self) -> bool:
        """Step 6: wait for the camera node's swap to the proven INT8 (saying what the build is
        doing), then measure it against FP32 on the photographs the node never sent."""
        act = self.field
        if act is None or act.node is None:
            self.say("step 6", f"field samples: skipped ({self.field_skipped or 'see step 2'})")
            return act is None
        node = act.node
        self.say("step 6", f"field samples: back to {FIELD_ENTRY} "
                           f"({time.monotonic() - act.started:.0f} s since the camera node "
                           "started)")
        deadline = time.monotonic() + self.field_timeout_s
        last_step, told, idle, said_at = "", None, 0, 0.0
        while time.monotonic() < deadline and told is None:
            try:
                at, event = node.events.get(timeout=2.0)
                self.told(node, event, act.started, at, "the camera node started")
                if event["event"] == "variant" and event.get("variant") != "fp32":
                    told, act.swapped_at = event, at
                continue
            except queue.Empty:
                pass
            info = client.status(socket_path=self.socket)["models"].get(FIELD_ENTRY, {})
            activity = (info.get("detail") or {}).get("activity") or {}
            step = f"{activity.get('action') or ''}: {activity.get('detail') or ''}".strip(": ")
            if step and (step != last_step or time.monotonic() - said_at >= 30):
                # a search's probes can run for minutes under one step: say it is still at it
                still = "still " if step == last_step else ""
                self.say("", f"{FIELD_ENTRY}: {still}{step} "
                             f"({time.monotonic() - act.started:.0f} s since the camera started)")
                last_step, said_at = step, time.monotonic()
            # nothing to do for a while and nothing new told: the proof refused the variant
            idle = idle + 1 if not step and info.get("state") in ("ready", "error") else 0
            if idle >= 3:
                break
        self.show_proof(FIELD_ENTRY)
        self.say("", f"camera-node: {node.calls} inference calls, {node.failures} failed, "
                     f"{node.session.swaps} hot swaps; {node.session.samples_sent} samples sent, "
                     f"{node.session.samples_refused} refused")
        if told is None:
            self.say("", f"{FIELD_ENTRY}: no proven variant after "
                         f"{time.monotonic() - act.started:.0f} s: the camera node keeps FP32 "
                         "(the proof above says why)")
            return False
        self.say("", f"{FIELD_ENTRY}: the camera node went from FP32 to a proven "
                     f"{told['variant']} without anyone preparing data, "
                     f"{act.swapped_at - act.started:.0f} s after it started")
        for n in self.nodes:   # the demo's own timing must not compete with its nodes
            n.paused.set()
        try:
            check, frames, fp32_ms, served_ms = act.check_unseen(
                self.models / FIELD_ENTRY / "model.onnx", Path(told["path"]))
        finally:
            for n in self.nodes:
                n.paused.clear()
        speedup = fp32_ms / served_ms if served_ms else 0.0
        self.say("", f"on the {frames} frames of photographs the node never sent: "
                     f"{check.detail}")
        self.say("", f"speed on them (interleaved, this process, nodes paused): {told['variant']} "
                     f"{served_ms:.1f} ms vs FP32 {fp32_ms:.1f} ms = {speedup:.2f}x")
        met = check.value is not None and check.value >= 0.9 and speedup >= 1.3
        self.say("", f"issue 13's target (>= 1.3x, F1 >= 0.9): "
                     f"{'met' if met else 'NOT met'} (F1 {check.value or 0:.3f}, {speedup:.2f}x)")
        return True

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
        if self.field is not None:
            store.create_repo("notai-tech/nudenet-320n")
            store.commit("notai-tech/nudenet-320n", {"320n.onnx": self.field.model_path})
            served.append(f"notai-tech/nudenet-320n "
                          f"({self.field.model_path.stat().st_size / 1e6:.1f} MB, a real YOLOv8n)")
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

    def add_node(self, name: str, model: str, providers: tuple[str, ...] = (CPU,),
                 **options: Any) -> Node:
        node = Node(name, model, self.socket, providers, **options).start()
        self.nodes.append(node)
        return node

    def write_catalog(self, **flags: bool) -> float:
        text = catalog_text(have_ocr=self.ocr is not None, openvino=self.openvino is not None,
                            people=self.field is not None, **flags)
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
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per step")
    parser.add_argument("--field-timeout", type=float, default=900.0,
                        help="seconds to wait for the INT8 built from field samples (step 6)")
    parser.add_argument("--no-field-samples", action="store_true",
                        help="leave out the field-samples act (steps 2 and 6)")
    args = parser.parse_args(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="modeld-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir.absolute(), timeout_s=args.timeout,
                field_samples=not args.no_field_samples, field_timeout_s=args.field_timeout)
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
