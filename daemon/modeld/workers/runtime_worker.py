"""Run ONNX files in a node's own runtime: the entry point the daemon starts under another
Python interpreter (``python /path/to/runtime_worker.py``), e.g. the venv of
``onnxruntime-openvino`` that a robot's nodes use (issue 14).

It must run there with nothing but the standard library, numpy and onnxruntime: it imports no
other module of modeld (not even by accident: its own folder is removed from ``sys.path``), and
numpy/onnxruntime only inside functions, so the daemon side (``modeld.workers.runtimes``,
``modeld.runtimes``) imports this module for the message types and the shared session helpers
without loading them. It only runs models and times them; the daemon's verify worker judges the
outputs (agreement, task metrics) with its own code, so there is one definition of agreement.

Format, version ``PROTOCOL`` (newline-delimited JSON on stdin/stdout; tensors as ``.npz`` files
in a scratch folder the daemon owns, inside the model folder):

- on start the worker writes one ``Hello`` line: ``{"protocol": 1, "info": {RuntimeInfo}}``,
  or ``{"protocol": 1, "error": "..."}`` (onnxruntime does not import) and exits 1;
- then each request line is ``{"op": OP, ...fields of its dataclass}`` and gets one ``Reply``:
  ``open`` (``OpenRequest``: a session on one provider, CPU fallback disabled, the placement
  checked), ``run`` (``RunRequest``: every feed of an ``.npz`` through one session, outputs
  written to another ``.npz`` as ``"<feed>/<output>"``), ``time`` (``TimeRequest``: median
  latencies of several sessions, interleaved, see ``interleaved_latencies_ms``), ``close``;
- end of input: the worker exits 0.

``python runtime_worker.py --describe`` prints the ``Hello`` line alone and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0] or ".") == \
        os.path.dirname(os.path.abspath(__file__)):
    # run by path, this folder would come first on sys.path: a sibling module (inputs.py,
    # tasks.py ...) must never shadow what numpy or onnxruntime import
    sys.path.pop(0)

PROTOCOL = 1
CPU = "CPUExecutionProvider"   # modeld.protocol.CPU_PROVIDER: modeld is not importable here
#: interleaved timing (verify.py uses the same function, in the daemon's own onnxruntime)
WARMUP_RUNS = 2
MAX_ROUNDS = 1000
#: models faster than this get an untimed run after each switch (see interleaved_latencies_ms)
REWARM_BELOW_MS = 50.0
REASON_CHARS = 300


@dataclass(frozen=True)
class RuntimeInfo:
    """What the runtime is: the interpreter it ran in and its onnxruntime build."""

    protocol: int
    python: str                      # sys.executable of the runtime
    python_version: str
    onnxruntime: str                 # onnxruntime.__version__
    build: str                       # onnxruntime.get_build_info() ("" where it has none)
    package: str                     # the distribution: onnxruntime-openvino, onnxruntime-gpu ...
    device: str                      # onnxruntime.get_device()
    providers: tuple[str, ...]       # onnxruntime.get_available_providers()

    def identity(self) -> str:
        """What a proof made in this runtime depends on (the proof key includes it)."""
        return (f"{self.python} {self.package} {self.onnxruntime} [{self.build}] "
                f"python {self.python_version}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RuntimeInfo":
        return _from_json(cls, d, ("providers",))


@dataclass(frozen=True)
class OpenRequest:
    path: str
    provider: str
    threads: int = 1
    provider_options: dict[str, str] = field(default_factory=dict)
    op: str = "open"


@dataclass(frozen=True)
class RunRequest:
    session: int
    feeds: str                       # .npz: "<feed index>/<input name>"
    out: str                         # .npz written: "<feed index>/<output index>"
    op: str = "run"


@dataclass(frozen=True)
class TimeRequest:
    sessions: tuple[int, ...]
    feeds: str
    budget_s: float
    min_rounds: int
    op: str = "time"


@dataclass(frozen=True)
class CloseRequest:
    session: int
    op: str = "close"


REQUESTS = {"open": OpenRequest, "run": RunRequest, "time": TimeRequest, "close": CloseRequest}


@dataclass(frozen=True)
class Reply:
    ok: bool
    reason: str = ""                 # why not ok: the runtime's own message, one line
    session: int | None = None       # open: the new session's id
    providers: tuple[str, ...] = ()  # open: session.get_providers()
    outputs: tuple[str, ...] = ()    # open: output names
    count: int = 0                   # run: feeds run
    latencies_ms: tuple[float, ...] = ()   # time: median per session, in request order

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Reply":
        return _from_json(cls, d, ("providers", "outputs", "latencies_ms"))


def _from_json(cls, d: dict[str, Any], tuples: tuple[str, ...]):
    """``cls`` from a decoded JSON object: unknown keys dropped (a newer worker may add some),
    lists back to tuples."""
    known = {f.name for f in fields(cls)}
    d = {k: v for k, v in d.items() if k in known}
    for k in tuples:
        d[k] = tuple(d.get(k, ()))
    return cls(**d)


def encode(message: Any) -> str:
    return json.dumps(asdict(message), separators=(",", ":")) + "\n"


def decode_request(line: str) -> Any:
    d = json.loads(line)
    kind = REQUESTS[d.pop("op")]
    if kind is TimeRequest:
        d["sessions"] = tuple(d["sessions"])
    return kind(**d)


# ---------------------------------------------------------------------------------------------
# sessions and timing: shared with verify.py (which runs them in the daemon's own onnxruntime)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool"}


def session_options(ort, threads: int, provider: str):
    """The options every proof session uses, in any runtime."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(int(threads), 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures reach the proof as reasons; no stderr noise
    # two sessions alternate in the speed rounds: threads left spinning by one would steal the
    # cores from the other (measured: FP32 read 3x slower interleaved than alone)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider != CPU:
        # fail the load instead of silently running unsupported nodes on the CPU (issue 14:
        # "proven on OpenVINO" must never mean "ran on the CPU provider")
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return options


def open_on(ort, path: str, provider: str, threads: int,
            provider_options: dict[str, str] | None = None):
    """(session, "") with ``provider`` first and no CPU fallback, or (None, reason)."""
    if provider not in ort.get_available_providers():
        return None, "provider not available on this host"
    options = session_options(ort, threads, provider)
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider],
                                       provider_options=[dict(provider_options or {})])
    except Exception as e:  # noqa: BLE001 - Fail, InvalidGraph, NotImplemented, ...
        return None, first_line(e)
    active = session.get_providers()
    if not active or active[0] != provider:
        return None, f"onnxruntime fell back to {', '.join(active) or 'nothing'} instead of {provider}"
    return session, ""


def adapt_feed(session, feed: dict) -> dict:
    """The feed cast to the session's input types (an FP16 variant may take float16)."""
    adapted = {}
    for meta in session.get_inputs():
        if meta.name not in feed:
            raise ValueError(f"no sample for input {meta.name!r}")
        dtype = _ORT_DTYPES.get(meta.type)
        value = feed[meta.name]
        adapted[meta.name] = value.astype(dtype) if dtype and value.dtype != dtype else value
    return adapted


def run_session(session, feed: dict) -> list:
    return session.run(None, adapt_feed(session, feed))


def interleaved_latencies_ms(sessions: list, feeds: list[dict], *, budget_s: float,
                             min_rounds: int) -> list[float]:
    """Median latency (ms) of each session, timed in alternate rounds.

    Timing noise between separate passes reached 30% on this kind of host; alternating the
    files round by round lets all see the same conditions, and reversing the order every other
    round (A B C C B A ...) cancels what running first or last costs or gains. A fast model also
    gets one untimed run after each switch: otherwise it is timed with the other model's weights
    in the cache (measured: an INT8 MLP read 0.39 ms interleaved, 0.19 ms with the extra run,
    0.12 ms alone), which would flatter a bloated variant and penalise a compact one. The budget
    (``budget_s``, at least ``min_rounds`` rounds) is for all the sessions together.
    """
    import numpy as np
    # inputs cast once per session: a dtype conversion is not the model's latency
    adapted = [[adapt_feed(s, feed) for feed in feeds] for s in sessions]
    slowest_warmup_ms = 0.0
    for s, s_feeds in zip(sessions, adapted):
        for i in range(WARMUP_RUNS):
            t0 = time.perf_counter()
            s.run(None, s_feeds[i % len(s_feeds)])
        slowest_warmup_ms = max(slowest_warmup_ms, (time.perf_counter() - t0) * 1000.0)
    rewarm = len(sessions) > 1 and slowest_warmup_ms < REWARM_BELOW_MS
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < min_rounds
                                   or time.perf_counter() - start < budget_s):
        order = range(len(sessions)) if rounds % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            feed = adapted[k][rounds % len(feeds)]
            if rewarm:
                sessions[k].run(None, feed)
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    return [float(np.median(t)) for t in times]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line[:REASON_CHARS]


# ---------------------------------------------------------------------------------------------
# the worker, under the node's interpreter

def describe(ort) -> RuntimeInfo:
    from importlib import metadata
    package = ""
    for dist in ("onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime-directml",
                 "onnxruntime-qnn", "onnxruntime"):
        try:
            package = f"{dist}=={metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    build = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
    return RuntimeInfo(protocol=PROTOCOL, python=sys.executable,
                       python_version=sys.version.split()[0], onnxruntime=ort.__version__,
                       build=str(build).replace("ORT Build Info: ", ""), package=package,
                       device=str(ort.get_device()),
                       providers=tuple(ort.get_available_providers()))


def read_feeds(path: str) -> list[dict]:
    import numpy as np
    feeds: dict[int, dict] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, _, name = key.partition("/")
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


class Worker:
    """The request loop: sessions by id, one reply per request."""

    def __init__(self, ort) -> None:
        self.ort = ort
        self.sessions: dict[int, Any] = {}
        self.feeds: dict[str, list[dict]] = {}
        self.next_id = 0

    def handle(self, request: Any) -> Reply:
        if isinstance(request, OpenRequest):
            session, reason = open_on(self.ort, request.path, request.provider, request.threads,
                                      request.provider_options)
            if session is None:
                return Reply(False, reason)
            self.next_id += 1
            self.sessions[self.next_id] = session
            return Reply(True, session=self.next_id, providers=tuple(session.get_providers()),
                         outputs=tuple(o.name for o in session.get_outputs()))
        if isinstance(request, CloseRequest):
            self.sessions.pop(request.session, None)
            return Reply(True)
        feeds = self._feeds(request.feeds)
        try:
            if isinstance(request, RunRequest):
                return self._run(self.sessions[request.session], feeds, request.out)
            latencies = interleaved_latencies_ms([self.sessions[s] for s in request.sessions],
                                                 feeds, budget_s=request.budget_s,
                                                 min_rounds=request.min_rounds)
            return Reply(True, latencies_ms=tuple(latencies))
        except Exception as e:  # noqa: BLE001 - the runtime's message is the reason
            return Reply(False, first_line(e))

    def _feeds(self, path: str) -> list[dict]:
        if path not in self.feeds:
            self.feeds[path] = read_feeds(path)
        return self.feeds[path]

    def _run(self, session, feeds: list[dict], out: str) -> Reply:
        import numpy as np
        arrays = {}
        for i, feed in enumerate(feeds):
            for j, value in enumerate(run_session(session, feed)):
                if isinstance(value, np.ndarray):   # sequences/maps (ZipMap) are not compared
                    arrays[f"{i}/{j}"] = value
        tmp = out + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
        return Reply(True, count=len(feeds))


def main(argv: list[str]) -> int:
    # The protocol owns the real stdout; anything native code prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import onnxruntime as ort
        ort.set_default_logger_severity(3)
        info = describe(ort)
    except Exception as e:  # noqa: BLE001 - a broken runtime says why, once
        channel.write(json.dumps({"protocol": PROTOCOL, "error": f"{type(e).__name__}: "
                                  f"{first_line(e)}"}) + "\n")
        return 1
    channel.write(json.dumps({"protocol": PROTOCOL, "info": asdict(info)}) + "\n")
    if "--describe" in argv:
        return 0
    worker = Worker(ort)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = worker.handle(decode_request(line))
        except Exception as e:  # noqa: BLE001 - a bad request is answered, not fatal
            reply = Reply(False, f"bad request: {first_line(e)}")
        channel.write(encode(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
