"""The daemon side of a node's runtime: start ``runtime_worker.py`` under the runtime's Python,
open sessions there, run feeds and time them (``verify`` does the judging).

Used by the verify, quantize and bench workers for every provider that ``MODELD_RUNTIMES`` maps
to an interpreter. One ``RuntimeProcess`` per proof and provider; its scratch folder (tensors
going in and out) lives inside the model folder under the work prefix, so leftovers are cleaned
like any other. A runtime that is missing, broken or lacks the provider raises
``RuntimeUnavailableError`` on start, with one line that says which and why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import WORK_PREFIX
from ..errors import RuntimeUnavailableError
from ..runtimes import interpreter_problem, judge_hello
from . import runtime_worker as rw

WORKER_PATH = Path(rw.__file__).resolve()
#: how long a runtime may take to import onnxruntime and say hello (OpenVINO: ~1 s here)
START_TIMEOUT_S = 60.0
#: the longest one request may take (a load compiles the model; a run goes over every feed)
REQUEST_TIMEOUT_S = 300.0


def worker_command(python: str, *args: str) -> list[str]:
    return [python, str(WORKER_PATH), *args]


class RuntimeProcess:
    """One running runtime worker. Use as a context manager; every method may raise
    ``RuntimeUnavailableError`` when the process dies or stops answering."""

    def __init__(self, python: str, provider: str, scratch_parent: Path) -> None:
        self.python = python
        self.provider = provider
        self.scratch = Path(scratch_parent).resolve() / f"{WORK_PREFIX}runtime-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None
        self.info: rw.RuntimeInfo | None = None
        self._stderr: list[str] = []
        self._feeds: dict[int, str] = {}

    def __enter__(self) -> "RuntimeProcess":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> rw.RuntimeInfo:
        if interpreter_problem(self.python):
            raise self._unavailable(interpreter_problem(self.python))
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = subprocess.Popen(worker_command(self.python), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, bufsize=1, cwd=self.scratch,
                                         env=_runtime_env(), preexec_fn=_die_with_worker)
        except OSError as e:
            raise self._unavailable(f"cannot start: {e.strerror or e}") from e
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.info, reason = judge_hello(self._read(START_TIMEOUT_S), self.provider)
        if reason:
            raise self._unavailable(reason)
        assert self.info is not None
        return self.info

    # -- requests ---------------------------------------------------------------------------
    def open(self, path: Path, threads: int, provider: str | None = None) -> rw.Reply:
        return self._ask(rw.OpenRequest(str(Path(path).resolve()), provider or self.provider,
                                        threads))

    def run(self, session: int, feeds: list[dict[str, np.ndarray]]) -> list[list[Any]]:
        """Outputs per feed (None where an output is not a tensor); ``RuntimeError`` with the
        runtime's reason if the session fails."""
        out = self.scratch / f"out-{uuid.uuid4().hex[:8]}.npz"
        reply = self._ask(rw.RunRequest(session, self._feeds_file(feeds), str(out)))
        if not reply.ok:
            raise RuntimeError(reply.reason)
        try:
            with np.load(out, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        finally:
            out.unlink(missing_ok=True)
        width = 1 + max((int(k.partition("/")[2]) for k in arrays), default=-1)
        return [[arrays.get(f"{i}/{j}") for j in range(width)] for i in range(reply.count)]

    def time(self, sessions: list[int], feeds: list[dict[str, np.ndarray]], *,
             budget_s: float, min_rounds: int) -> list[float]:
        reply = self._ask(rw.TimeRequest(tuple(sessions), self._feeds_file(feeds), budget_s,
                                         min_rounds))
        if not reply.ok:
            raise RuntimeError(reply.reason)
        return list(reply.latencies_ms)

    def close_session(self, session: int) -> None:
        self._ask(rw.CloseRequest(session))

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- plumbing ---------------------------------------------------------------------------
    def _feeds_file(self, feeds: list[dict[str, np.ndarray]]) -> str:
        key = id(feeds)
        if key not in self._feeds:
            path = self.scratch / f"feeds-{len(self._feeds)}.npz"
            np.savez(path, **{f"{i}/{name}": value for i, feed in enumerate(feeds)
                              for name, value in feed.items()})
            self._feeds[key] = str(path)
        return self._feeds[key]

    def _ask(self, request: Any) -> rw.Reply:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(rw.encode(request))
            self.proc.stdin.flush()
        except OSError as e:
            raise self._unavailable(f"stopped answering: {e.strerror or e}") from e
        return rw.Reply.from_dict(self._read(REQUEST_TIMEOUT_S))

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            self.proc.kill()
            raise self._unavailable(f"no answer in {timeout_s:.0f} s")
        text = line[0] if line else ""
        if not text:
            code = self.proc.wait(timeout=5)
            raise self._unavailable(f"exited with code {code}" + self._last_stderr())
        import json
        try:
            return json.loads(text)
        except ValueError:
            raise self._unavailable(f"answered something else than the protocol: {text[:80]!r}")

    def _drain_stderr(self) -> None:
        proc = self.proc
        for text in proc.stderr if proc and proc.stderr else ():
            self._stderr = (self._stderr + [text.rstrip()])[-20:]

    def _last_stderr(self) -> str:
        lines = [s for s in self._stderr if s.strip()]
        return f": {lines[-1][:200]}" if lines else ""

    def _unavailable(self, why: str) -> RuntimeUnavailableError:
        return RuntimeUnavailableError(f"runtime {self.python} for {self.provider}: {why}",
                                       provider=self.provider, python=self.python)


def _die_with_worker() -> None:
    """In the runtime's process, before exec: SIGKILL it when the verify worker dies (a worker
    killed at its time limit runs no clean-up; the runtime must not outlive it)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass   # not Linux: the runtime ends when it reads the end of its input


def _runtime_env() -> dict[str, str]:
    """The daemon's environment minus what would make the runtime's Python load the daemon's
    packages instead of its own."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env
