"""Composition root of the daemon: wires watcher -> reconciler -> server, speaks to systemd.

``run_daemon(settings)`` is what ``mecha10-modeld run`` (the unit's ExecStart) calls. Signal
handlers only set flags or wake the loop; the loop acts. READY=1 once the socket listens and the
first scan is served; RELOADING=1 ... READY=1 around SIGHUP; STOPPING=1, workers stopped and temp
files removed on SIGTERM. Neither the server nor the reconciler knows of the other.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import resource
import signal
import time
from typing import Any

import structlog

from . import systemd
from .admin import AdminService
from .catalog_file import CatalogKeeper
from .errors import ModeldError, StoreUnavailableError
from .reconciler import Reconciler
from .rejections import Rejections
from .server import Server
from .samplestore import SamplesArea, accept
from .samples import Limits
from .settings import Settings
from .store import Store
from .watcher import Watcher

log = structlog.get_logger(__name__)

STATUS_MIN_INTERVAL_S = 0.5
#: descriptors kept for all but clients: models/ files, the watcher, workers' pipes, the
#: catalog, the log (LimitNOFILE in the unit is max_clients + this)
FD_RESERVE = 256
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def client_limit(wanted: int) -> int:
    """``wanted`` clients if the descriptor limit leaves ``FD_RESERVE`` besides them (raising
    the soft limit toward the hard one if needed), else fewer: idle connections must never
    take the descriptors a model's files need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    fitted = max(1, soft - FD_RESERVE)
    log.warning("max_clients_lowered", wanted=wanted, max_clients=fitted, nofile=soft,
                hint=f"raise LimitNOFILE to {need}")
    return fitted


class _LoopExceptions:
    """The loop's exception handler. Out of descriptors on accept(), asyncio stops accepting
    for a second, but (CPython 3.11) only after retrying accept() once per backlog slot, each
    retry reported here: a thousand reports a second. One line, then one every
    ``quiet_s`` with the count, never a traceback (issue 11)."""

    __slots__ = ("quiet_s", "_last", "_suppressed")

    def __init__(self, quiet_s: float = 10.0) -> None:
        self.quiet_s = quiet_s
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.quiet_s:
            self._suppressed += 1
            return
        log.error("accept_failed", error=exc.strerror, errno=errno.errorcode.get(exc.errno or 0),
                  retry_in_s=1, since_last=self._suppressed)
        self._last, self._suppressed = now, 0


def run_daemon(settings: Settings) -> int:
    return asyncio.run(Daemon(settings).run())


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.models_dir)
        self.catalog = CatalogKeeper(settings.catalog_path)
        self.samples = SamplesArea(settings.models_dir, Limits(
            per_model=settings.samples_per_model, per_node=settings.samples_per_node,
            budget_bytes=int(settings.samples_budget_mb * 1024 * 1024)))
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the one record of nodes' rejections: the server adds and asks, the reconciler
        #: restores, persists and forgets (modeld.rejections)
        self.rejections = Rejections()
        self.server = Server(socket_path=settings.socket_path, socket_mode=settings.socket_mode,
                             socket_group=settings.socket_group,
                             max_clients=client_limit(settings.max_clients),
                             on_rejection=self._on_rejection, rejections=self.rejections,
                             status_extra=self._status_extra,
                             on_admin=lambda *a: self.admin.handle(*a),
                             on_sample=self._on_sample)
        self.reconciler = Reconciler(settings, store=self.store, catalog=self.catalog,
                                     publish=self.server.publish, on_change=self._on_change,
                                     rejections=self.rejections,
                                     backoff_base_s=settings.retry_backoff_base_s,
                                     backoff_cap_s=settings.retry_backoff_cap_s,
                                     samples=self.samples)
        self.admin = AdminService(settings, reconciler=self.reconciler,
                                  server_status=self.server.status)
        self.stopping = asyncio.Event()
        self._status_task: asyncio.Task | None = None
        self._last_status = ""
        self._last_status_at = 0.0

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        loop.set_exception_handler(_LoopExceptions())
        try:
            self.store.lock()   # StoreLockedError: a second daemon on the same models/ refuses to start
        except StoreUnavailableError as e:
            # models/ is a file, unreadable...: the daemon still serves status and says why,
            # and takes the lock once models/ is a folder again (issue 11)
            log.error("store_unavailable", **e.fields())
            self.reconciler.lock_later = True
        try:
            await asyncio.to_thread(self.samples.load)
            removed = self.store.clean_leftovers()
            if removed:
                log.info("leftovers_removed", count=len(removed), files=removed[:20])
            systemd.extend_timeout(90)
            sockets = systemd.listen_sockets()
            await self.server.start(sockets[0] if sockets else None)
            log.info("listening", socket=str(self.settings.socket_path),
                     activated=bool(sockets))
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload()))
            watcher = Watcher(catalog_path=self.settings.catalog_path,
                              models_dir=self.settings.models_dir,
                              wake=lambda reason: loop.call_soon_threadsafe(self.reconciler.wake),
                              step_ms=self.settings.debounce_step_ms,
                              max_ms=self.settings.debounce_max_ms)
            watcher.start()
            try:
                self.catalog.reload()
                self.reconciler.restore_rejections()
                await self.reconciler.reconcile()   # the first scan is served before READY
                # What exists now lives as long as the daemon: keep the collector off it, so
                # collections stay short (measured: the no-op pass p99 was GC pauses).
                gc.freeze()
                systemd.ready(self.reconciler.summary())
                log.info("ready", models=len(self.catalog.current.entries),
                         summary=self.reconciler.summary())
                watchdog = loop.create_task(systemd.keep_watchdog_fed())
                await self.reconciler.run(self.stopping)
                watchdog.cancel()
            finally:
                systemd.stopping("stopping: workers, socket, temp files")
                log.info("stopping")
                watcher.stop()
                await self.reconciler.shutdown()
                await self.server.close()
                self.store.clean_leftovers()
        finally:
            self.store.unlock()
        log.info("stopped")
        return 0

    async def _reload(self) -> None:
        """SIGHUP / ``systemctl reload``: re-read the catalog, ask the hub again, retry what
        failed, re-plan."""
        systemd.reloading("reloading catalog")
        log.info("reload", catalog=str(self.settings.catalog_path))
        passes = self.reconciler.passes
        await self.reconciler.reload_catalog()
        try:
            self.reconciler.forget_failures()
        except (ModeldError, OSError) as e:   # an unreadable store: the next pass says why
            log.warning("reload_incomplete", error=str(e))
        self.server.forget_rejections()
        self.reconciler.wake(refresh=True)
        while self.reconciler.passes == passes and not self.stopping.is_set():
            await asyncio.sleep(0.01)
        systemd.ready(self.reconciler.summary())

    def _on_change(self) -> None:
        """Keep systemd's STATUS= line current, at most every STATUS_MIN_INTERVAL_S."""
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.get_running_loop().create_task(self._update_status())

    async def _update_status(self) -> None:
        wait_s = self._last_status_at + STATUS_MIN_INTERVAL_S - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        text = self.reconciler.summary()
        if text != self._last_status:
            systemd.status(text)
            self._last_status = text
        self._last_status_at = time.monotonic()

    def _on_rejection(self, model: str, variant: str, sha256: str, provider: str, node: str | None,
                      error: str, revision: str = "") -> None:
        log.warning("node_rejected_variant", model=model, variant=variant, sha256=sha256[:12],
                    provider=provider, node=node, error=error)
        self.reconciler.record_rejection(model=model, variant=variant, sha256=sha256,
                                         provider=provider, node=node, error=error,
                                         revision=revision)

    def _on_sample(self, model: str, node: str, data: bytes) -> dict[str, Any]:
        """A node's field sample (the server calls it in a thread)."""
        answer = accept(self.samples, self.catalog.current.entries, model, node, data)
        if self._loop is not None:   # the count is in status; a new generation is new work
            self._loop.call_soon_threadsafe(self.reconciler.wake)
        return answer

    def _status_extra(self) -> dict[str, Any]:
        return {**self.reconciler.status(),
                "up_since_unix_s": round(self.admin.started_at_unix_s, 3)}

