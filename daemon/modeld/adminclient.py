"""The CLI's side of the admin protocol: find a running daemon, send one command, follow it.

``connect(socket_path)`` returns an ``AdminConnection`` when a daemon answers on the socket and
None when none runs there (no file, or nobody listening: the CLI then works on the folder).
``run(request, on_progress)`` sends one admin request and returns its ``result`` event.
Standard library and ``modeld.protocol`` only.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ModeldError, PermanentError, UsageError
from .protocol import LineSplitter, decode, encode

HELLO_TIMEOUT_S = 3.0
MAX_LINE_BYTES = 64 * 1024 * 1024   # a status of many models is one long line


class AdminRefusedError(UsageError):
    """The daemon refused an admin request from this user (not its user, root or its group)."""


class DaemonGoneError(PermanentError):
    """The daemon closed the connection before it answered."""


class AdminConnection:
    def __init__(self, sock: socket.socket, path: Path, hello: Mapping[str, Any],
                 splitter: LineSplitter) -> None:
        self._sock = sock
        self.path = path
        self.hello = dict(hello)
        self._splitter = splitter
        self._lines: list[bytes] = []

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "AdminConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, request: Mapping[str, Any], *, timeout_s: float | None,
            on_progress: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send ``request``; feed ``progress`` events to ``on_progress``; return the result.
        ``timeout_s`` bounds the wait for each line (None: as long as the daemon works)."""
        self._sock.sendall(encode(request))
        while True:
            event = self._next(timeout_s)
            kind = event.get("event")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(event)
            elif kind == "result":
                return event
            elif kind == "error":
                text = str(event.get("error") or "the daemon refused the request")
                if event.get("refused"):
                    raise AdminRefusedError(text, hint="run it as the daemon's user or root, or "
                                                       "join the socket's group")
                raise ModeldError(text)

    def _next(self, timeout_s: float | None) -> dict[str, Any]:
        while not self._lines:
            self._sock.settimeout(timeout_s)
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout as e:
                raise DaemonGoneError(f"the daemon on {self.path} did not answer within "
                                      f"{timeout_s} s") from e
            except OSError as e:
                raise DaemonGoneError(f"lost the daemon on {self.path}: {e.strerror or e}") from e
            if not data:
                raise DaemonGoneError(f"the daemon on {self.path} closed the connection",
                                      hint="see its log: journalctl -u mecha10-modeld")
            self._lines.extend(self._splitter.feed(data))
        return decode(self._lines.pop(0))


def connect(path: Path) -> AdminConnection | None:
    """A connection to the daemon on ``path`` (its ``hello`` read), or None when none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HELLO_TIMEOUT_S)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        return None
    except PermissionError as e:
        sock.close()
        raise UsageError(f"cannot connect to the daemon's socket {path}: permission denied",
                         hint="join the socket's group (sudo usermod -aG mecha10 $USER, then "
                              "log in again) or run as root") from e
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot connect to {path}: {e.strerror or e}") from e
    splitter = LineSplitter(MAX_LINE_BYTES)
    conn = AdminConnection(sock, path, {}, splitter)
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    try:
        hello = conn._next(max(0.01, deadline - time.monotonic()))
    except DaemonGoneError:
        conn.close()
        raise
    if hello.get("event") != "hello":
        conn.close()
        raise DaemonGoneError(f"{path} did not greet like mecha10-modeld: {str(hello)[:80]}")
    conn.hello = hello
    return conn
