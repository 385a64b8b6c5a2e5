"""Helpers for the serving tests: real model files with real Proof objects, and a real ``Server``
running on its own event loop in a thread (so blocking clients can talk to it from the test).

Imported by tests/integration/test_server.py, test_client.py, test_hot_swap.py and
benchmarks/bench_fanout.py. The tiny CNN is built on call (no onnx at import).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from modeld.serving import ModelView, VariantView
from modeld.server import Server
from modeld.variants import Proof, ProviderProof

CPU = "CPUExecutionProvider"
COREML = "CoreMLExecutionProvider"


def proof(variant: str, sha256: str, *, checker_ok: bool = True,
          providers: Mapping[str, Mapping[str, Any]] | None = None) -> Proof:
    """A real Proof; ``providers`` maps a provider to ProviderProof fields (default: CPU passed)."""
    providers = providers if providers is not None else {CPU: {}}
    pps = []
    for name, fields in providers.items():
        fields = {"usable": True, "passed": True, "speedup": 1.0} | dict(fields)
        pps.append(ProviderProof(provider=name, **fields))
    return Proof(variant=variant, file_sha256=sha256, key="test-key", checker_ok=checker_ok,
                 providers=tuple(pps), onnxruntime="test")


def write_variant(folder: Path, variant: str, data: bytes, *, proven: bool = True,
                  providers: Mapping[str, Mapping[str, Any]] | None = None) -> VariantView:
    """Write ``data`` as ``folder/model-<variant>.onnx`` and describe it as the reconciler would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("model.onnx" if variant == "fp32" else f"model-{variant}.onnx")
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    return VariantView(variant=variant, path=str(path), sha256=sha, size=len(data),
                       proof=proof(variant, sha, providers=providers) if proven else None)


def view(name: str, *variants: VariantView, state: str = "ready", reason: str = "",
         detail: Mapping[str, Any] | None = None) -> ModelView:
    return ModelView(name=name, state=state, variants=tuple(variants), reason=reason,
                     detail=dict(detail or {}))


def yolo_files(models_dir: Path, *, int8_speedup: float = 1.5) -> dict[str, VariantView]:
    """Two real tiny CNN files as one model: fp32 and an "int8" (another seed) faster on CPU."""
    from modeld.testing.onnx_models import tiny_cnn
    folder = models_dir / "yolo"
    return {"fp32": write_variant(folder, "fp32", tiny_cnn(seed=0)),
            "int8": write_variant(folder, "int8", tiny_cnn(seed=1),
                                  providers={CPU: {"speedup": int8_speedup}})}


@contextlib.contextmanager
def serving(socket_path: Path, views: list[ModelView], **server_options: Any):
    """A started ``ServerThread`` that has published ``views``; shut down on exit."""
    st = ServerThread(socket_path, **server_options).start()
    try:
        st.publish(views)
        yield st
    finally:
        st.shutdown()


class ServerThread:
    """A ``Server`` on an event loop of its own thread; ``call`` runs a function on that loop."""

    def __init__(self, socket_path: Path, **server_options: Any) -> None:
        self.socket_path = Path(socket_path)
        self.server_options = server_options
        self.server: Server | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def start(self, sock: socket.socket | None = None) -> "ServerThread":
        async def _start() -> None:
            self.server = Server(socket_path=self.socket_path, **self.server_options)
            await self.server.start(sock)
        self._await(_start())
        return self

    def publish(self, views: Mapping[str, ModelView] | list[ModelView]) -> None:
        if not isinstance(views, Mapping):
            views = {v.name: v for v in views}
        self.call(lambda: self.server.publish(views))

    def call(self, fn: Callable[[], Any]) -> Any:
        async def _call() -> Any:
            return fn()
        return self._await(_call())

    def stop(self) -> None:
        if self.server is not None:
            self._await(self.server.close())
            self.server = None

    def shutdown(self) -> None:
        LineClient.close_all()
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def _await(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


class LineClient:
    """A raw socket client speaking the protocol by hand (what a non-Python node would do).

    Open clients are kept until a ``ServerThread`` shuts down: left to the garbage collector at
    the end of a test, their hang-up would be logged by the server between pytest's capture
    phases, into the test run's own output.
    """

    _open: list["LineClient"] = []

    @classmethod
    def close_all(cls) -> None:
        while cls._open:
            cls._open.pop().close()

    def __init__(self, socket_path: Path, timeout_s: float = 5.0) -> None:
        LineClient._open.append(self)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(socket_path))
        self._buffer = b""

    def send(self, message: Mapping[str, Any] | bytes) -> None:
        raw = message if isinstance(message, bytes) else (json.dumps(message) + "\n").encode()
        self.sock.sendall(raw)

    def read(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The next event; None at EOF."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""  # the daemon hung up while we still had unread lines in flight
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def read_until(self, predicate: Callable[[dict[str, Any]], bool],
                   timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.read(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise EOFError("connection closed before the expected event")
            if predicate(event):
                return event

    def nothing_pending(self) -> bool:
        """True when a ping is answered before any other event: nothing was sent meanwhile."""
        self.send({"op": "ping"})
        return self.read() == {"event": "pong"}

    def request(self, message: Mapping[str, Any], event: str) -> dict[str, Any]:
        self.send(message)
        return self.read_until(lambda e: e.get("event") == event)

    def close(self) -> None:
        self.sock.close()
