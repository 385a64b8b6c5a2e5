"""Run one heavy function in a fresh worker process (``spawn``), with a time and a memory limit.

The reconciler calls ``JobRunner.run`` from a thread (``asyncio.to_thread``); the worker modules
(``modeld.workers.*``) hold the functions, so onnx, onnxruntime and huggingface_hub are only ever
imported in the child. A crash, a hang or an exception in the child becomes a typed error here;
the daemon process never dies with it (uvicorn's ``_subprocess.py`` is the model).
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import (DiskFullError, FileVanishedError, ModeldError, PermanentError,
                     StoreWriteError, TemporaryError, WorkerCrashedError, WorkerTimeoutError)
from .work import ProgressFn

_CTX = mp.get_context("spawn")
_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


class JobCancelledError(TemporaryError):
    """The job was cancelled (newer desired state, or shutdown) before it finished."""


@dataclass(frozen=True)
class JobSpec:
    """Which worker function to run: ``module:function``, resolved in the child.

    The request and the result cross as they are (pickled): the worker requests and results are
    the light dataclasses of ``modeld.work``, so the daemon never imports a worker module (they
    import onnxruntime and huggingface_hub at the top).
    """

    target: str                      # e.g. "modeld.workers.fetch:fetch_model"
    timeout_s: float
    memory_mb: int | None = None


class Progress:
    """Handed to worker functions: ``progress(0.4, "quantizing")`` reports to the parent."""

    __slots__ = ("_conn", "_last")

    def __init__(self, conn) -> None:
        self._conn = conn
        self._last = 0.0

    def __call__(self, fraction: float | None, detail: str = "") -> None:
        now = time.monotonic()
        if now - self._last < 0.2 and fraction not in (0.0, 1.0):
            return  # rate-limit: progress is for STATUS= lines, not a stream
        self._last = now
        try:
            self._conn.send(("progress", fraction, detail))
        except (BrokenPipeError, OSError):
            pass


def _resolve(path: str):
    module_name, _, attr = path.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when the daemon dies: a daemon killed with SIGKILL
    runs no clean-up, and an orphan would go on publishing behind the next daemon's back."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl (not Linux): an orphan ends when it finds its pipe closed
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the daemon died before the request above took effect


def _child_main(conn, spec: JobSpec, request: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from . import logs
    try:  # the same level and format as the daemon (the CLI exports its level)
        logs.configure(os.environ.get("MODELD_LOG_LEVEL", "warning"))
    except Exception:  # noqa: BLE001 - logging must never stop the job
        pass
    if spec.memory_mb:
        import resource
        limit = spec.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        target = _resolve(spec.target)
        _quiet_onnxruntime()
        conn.send(("ok", target(request, Progress(conn))))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent as a typed error
        conn.send(("error", _to_modeld_error(e)))
    finally:
        conn.close()


def _quiet_onnxruntime() -> None:
    """onnxruntime's own C++ warnings (graph optimiser notes, "removing initializer...") go to
    stderr, past the log: below debug they are noise to an operator (the proofs say what
    matters). Only touched when the worker module already imported it."""
    ort = sys.modules.get("onnxruntime")
    if ort is None or os.environ.get("MODELD_LOG_LEVEL", "") == "debug":
        return
    try:
        ort.set_default_logger_severity(3)   # errors only
    except Exception:  # noqa: BLE001 - a quieter log must never stop the job
        pass


def _to_modeld_error(e: BaseException) -> ModeldError:
    if isinstance(e, ModeldError):
        return e
    if isinstance(e, MemoryError):
        return WorkerCrashedError("worker ran out of memory", hint="raise worker_memory_mb")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFullError(f"no space left on device: {e}", hint="free disk space")
    if isinstance(e, OSError) and e.errno in (errno.EIO, errno.EROFS):
        return StoreWriteError(f"the disk refused a write: {e}",
                               hint="check the disk; the previous files keep serving")
    if isinstance(e, FileNotFoundError):
        # Planning saw every input before the job started: one missing now vanished under it.
        return FileVanishedError(f"a file vanished during the job: {e.filename or e}",
                                 hint="nothing to do: it is retried once the scan has seen why")
    text = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
    return PermanentError(f"{type(e).__name__}: {text}" if text else type(e).__name__)


class JobHandle:
    """One running job; ``cancel()`` kills its process (safe from any thread)."""

    def __init__(self, process) -> None:
        self.process = process
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        _kill(self.process)


class JobRunner:
    """Starts worker processes and remembers them, so shutdown can stop every one."""

    def __init__(self) -> None:
        self._live: set[JobHandle] = set()
        self._lock = threading.Lock()

    def run(self, spec: JobSpec, request: Any, *, on_progress: ProgressFn | None = None,
            on_start: Callable[[JobHandle], None] | None = None) -> Any:
        """Blocking: run ``spec.target(request, progress)`` in a child; return its result or raise
        the child's typed error, ``WorkerTimeoutError``, ``WorkerCrashedError`` or
        ``JobCancelledError``."""
        parent_conn, child_conn = _CTX.Pipe(duplex=False)
        process = _CTX.Process(target=_child_main, name=f"modeld-worker:{spec.target}",
                               args=(child_conn, spec, request),
                               daemon=True)
        handle = JobHandle(process)
        with self._lock:
            self._live.add(handle)
        try:
            process.start()
            child_conn.close()
            if on_start:
                on_start(handle)
            return self._wait(handle, parent_conn, spec, on_progress)
        finally:
            with self._lock:
                self._live.discard(handle)
            parent_conn.close()
            if process.is_alive():
                _kill(process)
            process.join(timeout=5)

    def _wait(self, handle: JobHandle, conn, spec: JobSpec, on_progress: ProgressFn | None):
        deadline = time.monotonic() + spec.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if handle.cancelled.is_set():
                raise JobCancelledError(f"job {spec.target} cancelled", retry_after_s=0)
            if remaining <= 0:
                _kill(handle.process)
                raise WorkerTimeoutError(f"worker exceeded its time limit of {spec.timeout_s:.0f} s",
                                         hint="raise the timeout or check the model")
            try:
                ready = conn.poll(min(remaining, 0.25))
            except (EOFError, OSError):
                ready = True
            if not ready:
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return self._died(handle, spec)
            kind = message[0]
            if kind == "progress":
                if on_progress:
                    on_progress(message[1], message[2])
            elif kind == "ok":
                return message[1]
            elif kind == "error":
                raise message[1]

    def _died(self, handle: JobHandle, spec: JobSpec):
        handle.process.join(timeout=5)
        if handle.cancelled.is_set():
            raise JobCancelledError(f"job {spec.target} cancelled", retry_after_s=0)
        code = handle.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            how = f"was killed by {name}"
        else:
            how = f"exited with code {code}"
        raise WorkerCrashedError(f"worker {how} before it finished", exitcode=code,
                                 hint="see the log; the job is retried")

    def kill_all(self) -> int:
        """Stop every live worker (shutdown). Returns how many were stopped."""
        with self._lock:
            handles = list(self._live)
        for h in handles:
            h.cancel()
        return len(handles)

    @property
    def live_pids(self) -> list[int]:
        with self._lock:
            return [h.process.pid for h in self._live if h.process.pid]


def _kill(process) -> None:
    try:
        if process.pid and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    except (ProcessLookupError, ValueError, AssertionError):
        pass
