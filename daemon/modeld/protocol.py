"""The socket protocol between the daemon and inference nodes, version 1 (see docs/protocol.md).

Newline-delimited JSON objects over a Unix stream socket. Shared by ``server`` (daemon side) and
``client`` (what nodes import), so it depends on the standard library (and ``modeld.errors``) only.
Requests are parsed into small frozen dataclasses; events are built by the ``*_event`` functions.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import ModeldError

PROTOCOL_VERSION = 1
DAEMON_NAME = "mecha10-modeld"
#: where nodes look for the daemon unless MODELD_SOCKET says otherwise
DEFAULT_SOCKET_PATH = "/run/mecha10-modeld/modeld.sock"
SOCKET_ENV = "MODELD_SOCKET"
MAX_LINE_BYTES = 65536

CPU_PROVIDER = "CPUExecutionProvider"
PREFERENCES = ("fastest", "int8", "fp16", "fp32")
DEFAULT_PREFER = "fastest"

#: events a subscription delivers to its reader; the others answer a request or report an error
STATE_EVENTS = frozenset({"variant", "unavailable", "removed"})

# Bounds on what one request may carry, so a client cannot make the daemon hold much for it.
MAX_MODELS_PER_SUBSCRIBE = 256
MAX_NAME_CHARS = 256
MAX_PROVIDERS = 16
MAX_ERROR_CHARS = 2000
#: the largest ``sample`` frame (the .npy or .npz bytes after its header line): one model input
#: (or, for a model of several inputs, one .npz holding each of them)
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
#: the timestamp of every member of an .npz ``pack_npz`` writes: the same arrays, the same bytes
NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class ProtocolError(ModeldError, ValueError):
    """A line that is not a valid protocol message; the text is sent back in an ``error`` event."""


def default_socket_path() -> str:
    """The socket nodes connect to: ``$MODELD_SOCKET`` or the packaged default."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


# --- framing ---------------------------------------------------------------------------------

def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one UTF-8 line. Values JSON cannot hold (a Path, a tuple) become text/lists."""
    return (json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)
            + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict[str, Any]:
    """One line -> a JSON object; anything else raises ``ProtocolError`` (never another error)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"line is not UTF-8 (byte {e.start})") from e
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        # ValueError beyond JSONDecodeError: an integer past Python's 4300-digit limit
        raise ProtocolError(f"line is not JSON: {str(e)[:120]}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


class LineSplitter:
    """Splits a byte stream into lines; used by the blocking client (asyncio has its own)."""

    __slots__ = ("_buffer", "max_line_bytes")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES * 16) -> None:
        self._buffer = bytearray()
        self.max_line_bytes = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines = []
        while (end := self._buffer.find(b"\n")) >= 0:
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[:end + 1]
        if len(self._buffer) > self.max_line_bytes:
            raise ProtocolError(f"line longer than {self.max_line_bytes} bytes")
        return lines

    def clear(self) -> None:
        self._buffer.clear()


# --- requests (client -> daemon) -------------------------------------------------------------

@dataclass(frozen=True)
class Subscribe:
    models: tuple[str, ...]
    providers: tuple[str, ...] = (CPU_PROVIDER,)
    prefer: str = DEFAULT_PREFER
    node: str = ""


@dataclass(frozen=True)
class Ack:
    model: str
    generation: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Admin:
    """An operator's command (the CLI on a running daemon): allowed to the socket's owner and
    group only (docs/protocol.md, "Admin"). ``args`` are checked by the daemon's admin module."""

    command: str
    args: Mapping[str, Any]
    id: str = ""


@dataclass(frozen=True)
class Sample:
    """One input a node ran, offered as calibration and proof data (docs/protocol.md,
    "Field samples"): this header line is followed on the socket by exactly ``size`` bytes of
    ``.npy`` data (or of an ``.npz`` of one ``<input>.npy`` per input: ``pack_npz``)."""

    model: str
    size: int
    node: str = ""


ADMIN_COMMANDS = ("status", "list", "nodes", "pull", "sync", "verify", "bench", "remove",
                  "samples")

Request = Subscribe | Ack | Status | Ping | Admin | Sample
_OPS = "subscribe, ack, status, ping, admin, sample"


def parse_request(obj: Mapping[str, Any]) -> Request:
    """Validate one decoded request; ``ProtocolError`` says what is wrong in one line."""
    op = obj.get("op")
    if op == "subscribe":
        return _parse_subscribe(obj)
    if op == "ack":
        return _parse_ack(obj)
    if op == "status":
        return Status()
    if op == "ping":
        return Ping()
    if op == "admin":
        return _parse_admin(obj)
    if op == "sample":
        return _parse_sample(obj)
    if op is None:
        raise ProtocolError(f'missing "op" (one of {_OPS})')
    raise ProtocolError(f'unknown op {str(op)[:40]!r} (one of {_OPS})')


def _parse_admin(obj: Mapping[str, Any]) -> Admin:
    command = obj.get("command")
    if command not in ADMIN_COMMANDS:
        raise ProtocolError(f'admin: "command" must be one of {", ".join(ADMIN_COMMANDS)}, '
                            f'got {str(command)[:40]!r}')
    name = obj.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS):
        raise ProtocolError('admin: "name" must be a model name')
    request_id = obj.get("id") or ""
    if not isinstance(request_id, str) or len(request_id) > MAX_NAME_CHARS:
        raise ProtocolError('admin: "id" must be a short string')
    args = {"name": name, "candidates": obj.get("candidates") is True,
            "clear": obj.get("clear") is True}
    return Admin(command=command, args=args, id=request_id)


def admin_request(command: str, *, name: str | None = None, candidates: bool = False,
                  request_id: str = "", clear: bool = False) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "admin", "command": command}
    if name is not None:
        msg["name"] = name
    if candidates:
        msg["candidates"] = True
    if clear:
        msg["clear"] = True
    if request_id:
        msg["id"] = request_id
    return msg


def _parse_subscribe(obj: Mapping[str, Any]) -> Subscribe:
    models = obj.get("models")
    if isinstance(models, str):
        models = [models]
    models = _names(models, "models", MAX_MODELS_PER_SUBSCRIBE)
    if not models:
        raise ProtocolError('subscribe: "models" must name at least one model')
    providers = obj.get("providers", [CPU_PROVIDER])
    if isinstance(providers, str):
        providers = [providers]
    providers = _names(providers, "providers", MAX_PROVIDERS) or (CPU_PROVIDER,)
    prefer = obj.get("prefer", DEFAULT_PREFER)
    if prefer not in PREFERENCES:
        raise ProtocolError(f'subscribe: "prefer" must be one of {", ".join(PREFERENCES)}, '
                            f'got {str(prefer)[:40]!r}')
    node = obj.get("node") or ""
    if not isinstance(node, str) or len(node) > MAX_NAME_CHARS:
        raise ProtocolError(f'subscribe: "node" must be a string of at most {MAX_NAME_CHARS} chars')
    return Subscribe(models=models, providers=providers, prefer=prefer, node=node)


def _parse_sample(obj: Mapping[str, Any]) -> Sample:
    model = obj.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_NAME_CHARS:
        raise ProtocolError('sample: "model" must be a model name')
    size = obj.get("bytes")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_SAMPLE_BYTES:
        raise ProtocolError(f'sample: "bytes" must be the size of the .npy/.npz data that follows, '
                            f'1 to {MAX_SAMPLE_BYTES}')
    node = obj.get("node") or ""
    if not isinstance(node, str) or len(node) > MAX_NAME_CHARS:
        raise ProtocolError(f'sample: "node" must be a string of at most {MAX_NAME_CHARS} chars')
    return Sample(model=model, size=size, node=node)


def sample_header(model: str, size: int, *, node: str | None = None) -> dict[str, Any]:
    """The line sent before ``size`` bytes of .npy or .npz data (``Sample``)."""
    msg: dict[str, Any] = {"op": "sample", "model": model, "bytes": size}
    if node:
        msg["node"] = node
    return msg


def _parse_ack(obj: Mapping[str, Any]) -> Ack:
    model = obj.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_NAME_CHARS:
        raise ProtocolError('ack: "model" must be a model name')
    generation = obj.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise ProtocolError('ack: "generation" must be the integer of the event being acked')
    ok = obj.get("ok", True)
    if not isinstance(ok, bool):
        raise ProtocolError('ack: "ok" must be true or false')
    error = obj.get("error") or ""
    if not isinstance(error, str):
        error = json.dumps(error, default=str)
    return Ack(model=model, generation=generation, ok=ok, error=error[:MAX_ERROR_CHARS])


def _names(value: Any, field: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProtocolError(f'"{field}" must be a list of non-empty strings')
    if len(value) > limit or any(len(v) > MAX_NAME_CHARS for v in value):
        raise ProtocolError(f'"{field}": at most {limit} names of at most {MAX_NAME_CHARS} chars')
    return tuple(dict.fromkeys(value))  # de-duplicated, order kept


def subscribe_request(models: Iterable[str], *, providers: Iterable[str] = (CPU_PROVIDER,),
                      prefer: str = DEFAULT_PREFER, node: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "subscribe", "models": list(models),
                           "providers": list(providers), "prefer": prefer}
    if node:
        msg["node"] = node
    return msg


def ack_request(model: str, generation: int, *, ok: bool = True,
                error: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "ack", "model": model, "generation": generation, "ok": ok}
    if not ok:
        msg["error"] = (error or "rejected by the node")[:MAX_ERROR_CHARS]
    return msg


# --- events (daemon -> client) ---------------------------------------------------------------

def hello_event(version: str, **extra: Any) -> dict[str, Any]:
    return {"event": "hello", "protocol": PROTOCOL_VERSION, "daemon": DAEMON_NAME,
            "version": version, **extra}


def variant_event(*, model: str, variant: str, path: str, sha256: str, generation: int,
                  provider: str, reason: str) -> dict[str, Any]:
    return {"event": "variant", "model": model, "variant": variant, "path": path,
            "sha256": sha256, "generation": generation, "provider": provider, "reason": reason}


def unavailable_event(*, model: str, reason: str, generation: int) -> dict[str, Any]:
    return {"event": "unavailable", "model": model, "reason": reason, "generation": generation}


def removed_event(*, model: str) -> dict[str, Any]:
    return {"event": "removed", "model": model}


def error_event(error: str, **extra: Any) -> dict[str, Any]:
    return {"event": "error", "error": error, **extra}


def pong_event() -> dict[str, Any]:
    return {"event": "pong"}


def pack_npz(arrays: Mapping[str, bytes]) -> bytes:
    """One field sample of a model of several inputs: an ``.npz`` (numpy's ``savez`` format: a
    zip of one ``<input>.npy`` per input, here stored uncompressed, with a fixed timestamp) of
    ``arrays`` (input name -> its ``.npy`` bytes), in their order. The client packs a call's
    inputs with it; the daemon repacks what it checked with it, so the same arrays are the same
    bytes, and so one sample, whatever packed them."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE_TIME)
            info.external_attr = 0o600 << 16
            archive.writestr(info, data)
    return out.getvalue()
