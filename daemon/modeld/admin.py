"""Operators' commands on a running daemon: the admin part of the protocol (docs/protocol.md).

The runner creates one ``AdminService`` and hands its ``handle`` to the server as the
``on_admin`` hook: the server only parses requests and passes them on with the peer's
credentials, so it still knows nothing of reconciling. Admin requests are allowed to root, the
daemon's user, the socket file's owner and members of its group (SO_PEERCRED, with the peer's
supplementary groups from /proc); anyone else gets one ``error`` line. Long commands (pull,
sync, verify, bench) stream ``progress`` events and end with one ``result``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from . import reports
from .catalog_file import CatalogKeeper
from .errors import CatalogError, ModeldError, UsageError
from .handoff import runtimes_for
from .jobs import JobRunner, JobSpec
from .protocol import Admin, error_event
from .reconciler import Reconciler
from .samples import needed_for as samples_needed, uses_field_samples
from .settings import Settings
from .store import Store
from .work import BenchRequest

log = structlog.get_logger(__name__)

Send = Callable[[Mapping[str, Any]], None]
#: progress events at most this often per model (a terminal redraws; a slow reader is spared)
PROGRESS_INTERVAL_S = 0.2
POLL_INTERVAL_S = 0.05


# -- who may ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowed:
    uids: frozenset[int]
    gid: int | None


def may_administer(uid: int | None, gid: int | None, groups: frozenset[int],
                   allowed: Allowed) -> bool:
    """Root, the allowed users, and members (primary or supplementary) of the socket's group."""
    if uid is None:
        return False
    if uid == 0 or uid in allowed.uids:
        return True
    return allowed.gid is not None and (gid == allowed.gid or allowed.gid in groups)


def peer_groups(pid: int | None) -> frozenset[int]:
    """Supplementary groups of a local process (``Groups:`` of /proc/PID/status)."""
    if pid is None:
        return frozenset()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def socket_owner(path: Path) -> Allowed:
    """The daemon's user and the socket file's owner and group."""
    uids = {os.geteuid()}
    gid = None
    try:
        st = os.stat(path)
        uids.add(st.st_uid)
        gid = st.st_gid
    except OSError:
        pass
    return Allowed(uids=frozenset(uids), gid=gid)


# -- the operations both modes share ------------------------------------------------------------

def bench_job(settings: Settings, store: Store, keeper: CatalogKeeper, name: str,
              candidates: bool) -> tuple[JobSpec, BenchRequest]:
    """The ``bench`` worker job for catalog entry ``name`` (its files must be pulled)."""
    entry = require_entry(keeper, name)
    folder = store.model_dir(name)
    if not store.is_pulled(name):
        raise UsageError(f"{name} is not pulled yet", hint=f"run `mecha10-modeld pull {name}` "
                                                           "first")
    q = entry.quantize
    providers = tuple(entry.providers or settings.providers)
    request = BenchRequest(model_dir=str(folder), providers=providers,
                           calibration=q.calibration if q else None,
                           preprocessing_preset=entry.preprocessing_preset,
                           input_size=entry.input_size, gates=q.gates if q else None,
                           candidates=candidates,
                           simulated={k: tuple(v) for k, v in settings.simulated_providers.items()},
                           name=name, task=entry.task or None,
                           runtimes=runtimes_for(settings, providers))
    spec = JobSpec(BenchRequest.target, settings.quantize_timeout_s, settings.worker_memory_mb)
    return spec, request


BENCH_SAMPLES = BenchRequest.samples


def require_entry(keeper: CatalogKeeper, name: str):
    """The catalog entry ``name``; a ``UsageError`` saying it is invalid (and why) or absent."""
    catalog = keeper.current
    entry = catalog.entries.get(name)
    if entry is not None:
        return entry
    why = reports.invalid_error(catalog, name)
    if why is not None:
        raise UsageError(f"{name} is invalid in {keeper.path}: {why}",
                         hint="fix the entry, then try again")
    if keeper.error is not None:
        raise keeper.error
    raise UsageError(f"{name} is not in {keeper.path}", hint="see `mecha10-modeld list`")


def forget_proofs(store: Store, name: str) -> None:
    """Make every proof of ``name`` stale while keeping it: the files stay served on their old
    proofs while they are proven again (a proof is redone when its key does not match)."""
    store.update_manifest(name, lambda m: replace(
        m, proofs={f: replace(p, key=f"stale:{p.key}") for f, p in m.proofs.items()}))


# -- the service --------------------------------------------------------------------------------

class AdminService:
    """Runs operators' commands inside the daemon (one asyncio task per request)."""

    def __init__(self, settings: Settings, *, reconciler: Reconciler,
                 server_status: Callable[[], dict[str, Any]],
                 forget_rejections: Callable[[], int] | None = None,
                 jobs: JobRunner | None = None) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.store: Store = reconciler.store
        self.keeper: CatalogKeeper = reconciler.catalog
        self._server_status = server_status
        self._forget_rejections = forget_rejections or (lambda: 0)
        self._jobs = jobs or reconciler.jobs   # stopped with the reconciler's on shutdown
        self.started_at_unix_s = time.time()
        self._started_monotonic = time.monotonic()
        self._tasks: set[asyncio.Task] = set()

    def handle(self, request: Admin, peer: Any, send: Send) -> None:
        """The server's ``on_admin`` hook: check the peer, then run the command in a task."""
        groups = peer_groups(peer.pid)
        if not may_administer(peer.uid, peer.gid, groups, socket_owner(self.settings.socket_path)):
            log.warning("admin_refused", command=request.command, pid=peer.pid, uid=peer.uid,
                        gid=peer.gid)
            send(error_event(f"admin: {request.command} refused for uid {peer.uid} gid "
                             f"{peer.gid}: only the daemon's user, root and the socket's group "
                             "may administer", id=request.id, refused=True))
            return
        log.debug("admin_request", command=request.command, name=request.args.get("name"),
                  pid=peer.pid, uid=peer.uid)
        task = asyncio.get_running_loop().create_task(self._run(request, send),
                                                      name=f"admin:{request.command}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: Admin, send: Send) -> None:
        command = getattr(self, f"_cmd_{request.command}")
        try:
            data, exit_code = await command(request, send)
        except ModeldError as e:
            send({"event": "result", "id": request.id, "command": request.command, "ok": False,
                  "exit": 2 if isinstance(e, (UsageError, CatalogError)) else 1,
                  "error": str(e), "error_type": type(e).__name__})
            return
        except Exception as e:  # noqa: BLE001 - an operator's command must not kill the daemon
            log.exception("admin_failed", command=request.command)
            send({"event": "result", "id": request.id, "command": request.command, "ok": False,
                  "exit": 1, "error": f"internal error: {type(e).__name__}: {e}"})
            return
        send({"event": "result", "id": request.id, "command": request.command,
              "ok": exit_code == 0, "exit": exit_code, "data": data})

    # -- reading ----------------------------------------------------------------------------
    def mode(self) -> dict[str, Any]:
        return {"daemon": True, "pid": os.getpid(), "socket": str(self.settings.socket_path),
                "models_dir": str(self.settings.models_dir),
                "up_since_unix_s": round(self.started_at_unix_s, 3),
                "uptime_s": round(time.monotonic() - self._started_monotonic, 1)}

    def status_document(self) -> dict[str, Any]:
        server = self._server_status()
        rejected = frozenset((r.get("sha256", ""), r.get("provider", ""))
                             for r in server.get("rejected") or ())
        return reports.status_document(
            self.reconciler.views, self.keeper.current, providers=self.settings.providers,
            catalog_state=self.reconciler.status()["catalog"], mode=self.mode(),
            pending={n: self.reconciler.views[n].reason for n in self.reconciler.pending
                     if n in self.reconciler.views},
            rejected=rejected, nodes=reports.node_rows(server))

    async def _cmd_status(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        doc = self.status_document()
        catalog = doc["catalog"]
        if not catalog.get("ok"):   # broken file: the last good catalog is still served
            return doc, 1 if self.keeper.current.entries else 2
        return doc, 1 if catalog.get("entry_errors") else 0

    async def _cmd_nodes(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        return {"mode": self.mode(), "nodes": reports.node_rows(self._server_status())}, 0

    async def _cmd_list(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        catalog = self.keeper.current
        # one stat per model, in a thread: a slow disk must not hold up the nodes' answers
        doc = await asyncio.to_thread(
            reports.list_document, catalog, self.store.is_pulled,
            mode=self.mode(), states={n: v.state for n, v in self.reconciler.views.items()})
        if self.keeper.error is not None:
            doc["catalog_error"] = str(self.keeper.error)
        return doc, 1 if catalog.errors or self.keeper.error else 0

    # -- acting -----------------------------------------------------------------------------
    async def _cmd_pull(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        name = request.args["name"] or ""
        require_entry(self.keeper, name)
        return await self._converge({name}, send, refresh=True)

    async def _cmd_sync(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        await self.reconciler.reload_catalog()   # in a thread: a hostile catalog parses slowly
        if self.keeper.error is not None:
            raise self.keeper.error
        return await self._converge(None, send, refresh=True)

    async def _cmd_verify(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        name = request.args["name"] or ""
        require_entry(self.keeper, name)
        forget_proofs(self.store, name)
        return await self._converge({name}, send, refresh=False)

    async def _cmd_remove(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        name = request.args["name"] or ""
        aside = self.store.set_aside(name)
        if aside is None:
            raise UsageError(f"{name} is not in {self.settings.models_dir}")
        self.reconciler.samples.forget(name)   # they were in the folder
        await asyncio.to_thread(shutil.rmtree, aside, True)   # off the loop: a model is large
        log.info("model_removed", model=name, by="admin")
        self.reconciler.wake()
        return {"mode": self.mode(), "removed": name,
                "still_in_catalog": name in self.keeper.current.entries}, 0

    async def _cmd_samples(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        """List a model's field samples, or with ``clear`` remove them all."""
        name = request.args["name"] or ""
        area = self.reconciler.samples
        entry = self.keeper.current.entries.get(name)
        if entry is None and not area.rows(name):
            require_entry(self.keeper, name)
        if request.args.get("clear"):
            removed = await asyncio.to_thread(area.clear, name)
            log.info("samples_cleared", model=name, count=removed, by="admin")
            self.reconciler.wake()
            return {"mode": self.mode(), "model": name, "cleared": removed}, 0
        state = area.state(name, samples_needed(entry))
        return {"mode": self.mode(), "model": name, **state.to_dict(),
                "uses_field_samples": bool(entry and uses_field_samples(entry)),
                "disk_bytes": area.disk_bytes(), "samples": area.rows(name)}, 0

    async def _cmd_bench(self, request: Admin, send: Send) -> tuple[dict[str, Any], int]:
        name = request.args["name"] or ""
        spec, job = bench_job(self.settings, self.store, self.keeper, name,
                              bool(request.args.get("candidates")))
        loop = asyncio.get_running_loop()
        throttle = _Throttle()

        def on_progress(fraction: float | None, detail: str) -> None:
            if throttle.due(name):
                loop.call_soon_threadsafe(send, progress_event(name, "benchmarking", detail,
                                                               fraction))

        rows = await asyncio.to_thread(self._jobs.run, spec, job, on_progress=on_progress)
        return {"mode": self.mode(), "model": name, "samples": BENCH_SAMPLES,
                "rows": [dict(r) for r in rows]}, 0

    async def _converge(self, names: set[str] | None, send: Send, *, refresh: bool
                        ) -> tuple[dict[str, Any], int]:
        """Ask the reconciler for these models now and wait until none of them is pending,
        streaming what each is doing."""
        r = self.reconciler
        r.retry(names, refresh=refresh)
        passes = r.passes
        last: dict[str, tuple] = {}
        throttle = _Throttle()
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            wanted = set(r.catalog.current.entries) if names is None else names
            for name, act in r.activity().items():
                if name in wanted and act.action:
                    key = (act.action, act.detail, act.progress)
                    if last.get(name) != key and throttle.due(name):
                        last[name] = key
                        send(progress_event(name, act.action, act.detail, act.progress))
            if r.passes > passes and not (wanted & r.pending):
                break
        failed = {n: str(e) for n, e in r.failed_models().items() if n in wanted}
        doc = self.status_document()
        doc["models"] = {n: m for n, m in doc["models"].items()
                         if names is None or n in names}
        doc["failed"] = failed
        entry_errors = doc["catalog"].get("entry_errors") if names is None else []
        return doc, 1 if failed or entry_errors else 0


def progress_event(model: str, action: str, detail: str, fraction: float | None
                   ) -> dict[str, Any]:
    return {"event": "progress", "model": model, "action": action, "detail": detail,
            "progress": fraction}


class _Throttle:
    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, 0.0) < PROGRESS_INTERVAL_S:
            return False
        self._last[key] = now
        return True
