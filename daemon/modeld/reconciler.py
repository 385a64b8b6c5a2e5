"""The reconcile loop: desired state (catalog) vs actual state (store) -> actions in workers.

Level-triggered: a wake-up (file event, SIGHUP, timer, a finished job) only makes the loop
re-read the catalog, re-scan the store and plan again; what to do is always derived from the
state, never from the event. One job per model at a time, a bounded number of workers, and the
newest desired state wins (a running job that the plan no longer wants is cancelled). Retry is
decided by the error's type: ``TemporaryError`` backs off, ``PermanentError`` waits for an input
to change. Knows nothing of sockets: it hands ``ModelView``s to a ``publish`` callback.

The loop, dispatch and cancellation live here; what a job is asked (the typed requests of
``modeld.work``) and what its result changes in the manifest are ``modeld.handoff``'s pure
functions, the backoff is ``modeld.failures``', nodes' rejections ``modeld.rejections``'.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from . import handoff
from .atomic import sha256_file
from .catalog import Catalog
from .catalog_file import CatalogKeeper
from .errors import (ModeldError, PermanentError, StoreLockedError, StoreUnavailableError,
                     TemporaryError)
from .failures import Failures
from .inventory import Inventory
from .jobs import JobCancelledError, JobHandle, JobRunner, JobSpec
from .layout import FP32_FILE
from .manifest import Manifest
from .runtimes import Probed, probe_all
from . import share
from .rejections import Rejection, Rejections
from .planning import (Action, Adopt, Derive, PlanContext, Prove, Planner, Pull, Quarantine,
                       RestoreMode, Share, variant_of)
from .samplestore import SamplesArea, field_samples_context
from .serving import ModelView
from .settings import Settings
from .store import Store, stat_key
from .variants import Gates, Proof
from .views import Activity, ViewBuilder
from .work import (AdoptRequest, AdoptResult, FetchRequest, ProveRequest, QuantizeRequest,
                   QuantizeResult, Request, UploadRequest, UploadResult)

log = structlog.get_logger(__name__)

_VERBS = {Pull: "pulling", Derive: "quantizing", Prove: "proving", RestoreMode: "repairing",
          Quarantine: "repairing", Adopt: "adopting", Share: "sharing"}
#: how many files' re-check times are remembered (the oldest are forgotten first)
_RECHECK_MEMORY = 4096


def runtime_versions() -> tuple[str, str]:
    """onnx and onnxruntime versions, read without importing them (the daemon stays small)."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"
    return version("onnx"), version("onnxruntime")


@dataclass
class _Running:
    action: Action
    task: asyncio.Task
    started: bool = False            # holds a worker slot (else still waiting for one)
    handle: JobHandle | None = None  # the worker process, once it started


class Reconciler:
    def __init__(self, settings: Settings, *, store: Store, catalog: CatalogKeeper,
                 jobs: JobRunner | None = None,
                 publish: Callable[[Mapping[str, ModelView]], None] | None = None,
                 on_change: Callable[[], None] | None = None,
                 rejections: Rejections | None = None,
                 backoff_base_s: float = 2.0, backoff_cap_s: float = 300.0,
                 samples: SamplesArea | None = None) -> None:
        self.settings = settings
        #: the nodes' field samples (``modeld.samples``): read for the plan context only
        self.samples = samples or SamplesArea(settings.models_dir)
        self.store = store
        self.catalog = catalog
        self.jobs = jobs or JobRunner()
        self._publish = publish or (lambda views: None)
        self._on_change = on_change or (lambda: None)
        self.onnx_version, self.ort_version = runtime_versions()
        self.views: dict[str, ModelView] = {}
        self._planner = Planner()
        self._view_builder = ViewBuilder()
        self.pending: frozenset[str] = frozenset()
        self._running: dict[str, _Running] = {}
        #: nodes' rejections, shared with the server (``modeld.rejections``); the manifests
        #: keep the named nodes' ones across restarts
        self.rejections = rejections if rejections is not None else Rejections()
        self.failures = Failures(base_s=backoff_base_s, cap_s=backoff_cap_s,
                                 max_timeouts=settings.max_timeouts)
        self._activity: dict[str, Activity] = {}
        self._refresh_due: set[str] = set()
        self._wake_event: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._oneshot = False
        self._catalog_error_logged: str | None = None
        #: model -> files to prove again because a node rejected them (see record_rejection)
        self._recheck: dict[str, set[str]] = {}
        #: (model, sha256) -> monotonic time of its last re-check: at most one per interval
        self._rechecked_at: dict[tuple[str, str], float] = {}
        #: why nothing can be scanned now (models/ is not a folder), logged once
        self.store_error: ModeldError | None = None
        #: the store's lock could not be taken at start-up (models/ not a folder): take it once
        #: it can be, before any job runs
        self.lock_later = False
        self._catalog_job: asyncio.Future | None = None
        self.passes = 0
        #: what each node runtime (settings.runtimes) said it is; asked again at every refresh
        self.runtimes: dict[str, Probed] = {}
        self._probe_due = bool(settings.runtimes)

    # -- waking ---------------------------------------------------------------------------------
    def wake(self, *, refresh: bool = False) -> None:
        """Ask for a pass soon (call on the event loop's thread). ``refresh``: also ask the hub
        whether branches and tags moved."""
        if refresh:
            self._refresh_due.update(self.catalog.current.entries)
            self._forget_permanent_pull_failures()
            self._probe_due = bool(self.settings.runtimes)
        if self._wake_event is not None:
            self._wake_event.set()

    def _ensure_loop_state(self) -> None:
        if self._wake_event is None:
            self._wake_event = asyncio.Event()
            self._semaphore = asyncio.Semaphore(self.settings.max_workers)

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile on every wake-up and at least every ``resync_interval_s``, until ``stopping``."""
        self._ensure_loop_state()
        assert self._wake_event is not None
        next_refresh = time.monotonic() + self.settings.resync_interval_s
        if self.store.scrubbed_at() is None:
            self.store.mark_scrubbed()   # a new store: its files were just hashed; start the clock
        scrubbing: asyncio.Task | None = None
        while not stopping.is_set():
            if time.monotonic() >= next_refresh:
                self.wake(refresh=True)
                next_refresh = time.monotonic() + self.settings.resync_interval_s
                if self.scrub_due() and (scrubbing is None or scrubbing.done()):
                    scrubbing = asyncio.get_running_loop().create_task(self.scrub(), name="scrub")
            await self.reconcile()
            waiter = asyncio.ensure_future(self._wake_event.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            timeout = max(0.0, next_refresh - time.monotonic())
            await asyncio.wait({waiter, stopper}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            for f in (waiter, stopper):
                f.cancel()

    def scrub_due(self) -> bool:
        """Whether a scrub is due (wall clock, from the store's stamp: it outlives restarts)."""
        interval = self.settings.scrub_interval_s
        last = self.store.scrubbed_at()
        return interval > 0 and (last is None or time.time() >= last + interval)

    async def scrub(self) -> list[str]:
        """Re-hash every intact recorded file, one at a time in a thread (the loop stays free).
        Bit rot keeps a file's size and mtime, so scans, which trust the stat, cannot see it; a
        file found changed is marked damaged and healed like any other. Returns those files."""
        rotten = []
        hashed = 0
        for name in list(self.catalog.current.entries):
            for path, record, st in self.store.scrub_targets(name):
                try:
                    digest = await asyncio.to_thread(sha256_file, Path(path))
                    now = os.stat(path)
                except OSError:
                    continue                  # gone or unreadable: the scans say so
                hashed += 1
                # Files are only ever replaced whole (renamed over), never written in place: one
                # replaced while it was read has a new stat, and is not rot.
                if digest != record.sha256 and stat_key(now) == stat_key(st):
                    self.store.mark_rotten(name, path, st)
                    rotten.append(f"{name}/{record.name}")
                    log.error("file_rotten", model=name, file=record.name,
                              expected=record.sha256[:12], found=digest[:12])
        self.store.mark_scrubbed()
        log.info("scrubbed", files=hashed, damaged=len(rotten))
        if rotten:
            self.wake()
        return rotten

    async def converge(self, names: set[str] | None = None, *, refresh: bool = True) -> None:
        """One-shot (``sync``/``pull``): work until nothing runnable is left; failures are final
        for this run (the fetch worker already retried transient hub faults)."""
        self._ensure_loop_state()
        assert self._wake_event is not None
        self._oneshot = True
        self.catalog.reload()
        if refresh:
            self._refresh_due.update(names if names is not None else self.catalog.current.entries)
        while True:
            await self.reconcile(only=names)
            if not self._running:
                return
            await self._wake_event.wait()

    async def shutdown(self) -> None:
        """Stop every worker and wait for the job tasks to end."""
        self.jobs.kill_all()
        tasks = [r.task for r in self._running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    # -- one pass -------------------------------------------------------------------------------
    async def reconcile(self, only: set[str] | None = None, *, dispatch: bool = True
                        ) -> list[Action]:
        """One pass: reload, scan, plan, start what is runnable (unless ``dispatch`` is False:
        ``status`` plans without acting), publish the views. Returns the planned actions."""
        self._ensure_loop_state()
        assert self._wake_event is not None
        self._wake_event.clear()
        self.passes += 1
        if self._probe_due:
            self._probe_due = False
            await self.probe_runtimes()
        await self.reload_catalog()
        self._log_catalog_error()
        catalog = self.catalog.current
        names = [n for n in catalog.entries if only is None or n in only]
        inventory = await self._scan(names, dispatch)
        if dispatch and self.store_error is None:
            for state in inventory.models.values():
                self.store.refresh_stats(state)
        context = self.context(frozenset(self._refresh_due))
        actions = self._planner.plan(catalog, inventory, context)
        if only is not None:
            actions = [a for a in actions if a.name in only]
        if self.store_error is not None:
            actions = []   # nothing is pulled into a models/ that is not a folder
        self._cancel_obsolete(catalog, actions)
        if dispatch:
            self.pending = frozenset(a.name for a in actions if self._dispatch(action=a))
        else:
            self.pending = frozenset(a.name for a in actions)
        self.views = self._view_builder.build(catalog, inventory, context, self._activity_now(),
                                              self.pending, str(self.store.root))
        self._publish(self.views)
        self._on_change()
        return actions

    async def _scan(self, names: list[str], dispatch: bool) -> Inventory:
        """The store's state; models/ itself unusable (a file, unreadable) is the daemon's
        error, said once in the log and in every status, and nothing is done until it heals."""
        try:
            if dispatch and self.lock_later and not self.store.locked:
                self.store.lock()   # models/ was not a folder at start-up
            inventory = await self.store.scan_off_loop(names)   # hashing in a thread
        except (StoreUnavailableError, StoreLockedError) as e:
            if self.store_error is None or str(self.store_error) != str(e):
                log.error("store_unavailable", **e.fields())
            self.store_error = e
            return Inventory()
        if self.store_error is not None:
            log.info("store_available", path=str(self.store.root))
            self.store_error = None
        return inventory

    async def reload_catalog(self) -> None:
        """Re-read the catalog in a thread: parsing hostile text can take seconds (tomlkit), and
        the loop feeds the watchdog and the nodes. Past ``catalog_parse_timeout_s`` the pass goes
        on with the current catalog, and the one after the parse ends sees its result."""
        job = self._catalog_job
        if job is not None and not job.done():
            return   # still parsing (logged when it began to take long)
        job = self._catalog_job = asyncio.ensure_future(asyncio.to_thread(self.catalog.reload))
        done, _ = await asyncio.wait({job}, timeout=self.settings.catalog_parse_timeout_s)
        if not done:
            log.warning("catalog_parse_slow", path=str(self.settings.catalog_path),
                        waited_s=self.settings.catalog_parse_timeout_s,
                        kept=f"current catalog ({len(self.catalog.current.entries)} models)")
            job.add_done_callback(lambda _: self.wake())
        elif job.exception() is not None:   # a bug, not bad input (that is a CatalogError)
            log.error("catalog_reload_failed", error=repr(job.exception()))

    def context(self, refresh: frozenset[str] = frozenset()) -> PlanContext:
        recheck = frozenset((n, f) for n, files in self._recheck.items() for f in files)
        return PlanContext(providers=self.settings.providers, onnx_version=self.onnx_version,
                           onnxruntime_version=self.ort_version,
                           simulated=dict(self.settings.simulated_providers),
                           runtimes={p: r.identity for p, r in self.runtimes.items()},
                           refresh=refresh, recheck=recheck,
                           field_samples=field_samples_context(self.samples,
                                                               self.catalog.current))

    async def probe_runtimes(self) -> dict[str, Probed]:
        """Ask every node runtime what it is (in a thread: each is a subprocess). A change of
        what one says changes the proof keys on its provider: those proofs are made again."""
        probed = await asyncio.to_thread(probe_all, dict(self.settings.runtimes))
        for provider, now in probed.items():
            before = self.runtimes.get(provider)
            if before is not None and before.identity == now.identity:
                continue
            if now.reason:
                log.error("runtime_unavailable", provider=provider, python=now.python,
                          reason=now.reason)
            else:
                assert now.info is not None
                log.info("runtime", provider=provider, python=now.python,
                         onnxruntime=now.info.onnxruntime, package=now.info.package,
                         build=now.info.build)
        self.runtimes = probed
        return probed

    async def reprove(self, model: str, file_name: str, provider: str) -> Any:
        """Prove ``file_name`` of ``model`` again on ``provider`` alone, in that provider's node
        runtime when one is mapped (else the daemon's own onnxruntime), against the entry's
        gates: the evidence for a node's nack (issue 14). Returns the ``ProviderProof``; records
        nothing (the caller decides what the evidence means). Raises ``UsageError`` for a model
        or file the store does not have."""
        from .errors import UsageError
        entry = self.catalog.current.entries.get(model)
        state = self.store.scan_model(model)
        if entry is None or state is None or file_name not in state.manifest.files:
            raise UsageError(f"{model}/{file_name} is not in the store", entry=model)
        derived = file_name != FP32_FILE
        action = Prove(model, entry, file_name, variant_of(state.manifest.files[file_name]), "",
                       FP32_FILE if derived else None,
                       entry.quantize.gates if derived and entry.quantize else Gates(),
                       f"re-prove on {provider}")
        request = self._request_for(action)
        assert isinstance(request, ProveRequest)
        request = replace(request, providers=(provider,),
                          runtimes=handoff.runtimes_for(self.settings, (provider,)))
        proof = await asyncio.to_thread(self.jobs.run, self._spec_for(request), request)
        return proof.on(provider)

    def _log_catalog_error(self) -> None:
        err = self.catalog.error
        text = str(err) if err else None
        if text != self._catalog_error_logged:
            if err is not None:
                log.error("catalog_refused", **err.fields(),
                          kept=f"last good catalog ({len(self.catalog.current.entries)} models)")
            elif self._catalog_error_logged is not None:
                log.info("catalog_ok", models=len(self.catalog.current.entries))
            self._catalog_error_logged = text

    def _cancel_obsolete(self, catalog: Catalog, actions: list[Action]) -> None:
        wanted = {a.name: a.identity for a in actions}
        for name, running in list(self._running.items()):
            if wanted.get(name) == running.action.identity:
                continue
            if not running.started:
                running.task.cancel()        # still waiting for a worker slot
            elif running.handle is not None:
                running.handle.cancel()      # kills the worker; the job ends as cancelled
            else:
                continue                     # starting right now: the next pass cancels it
            log.info("job_cancelled", model=name, job=_VERBS[type(running.action)],
                     why="removed from the catalog" if name not in catalog.entries
                     else "desired state changed")

    def _dispatch(self, action: Action) -> bool:
        """Start ``action`` unless its model is busy or it failed and must wait.
        True when it is running or about to run (the model is pending)."""
        name = action.name
        if name in self._running:
            return True
        hold = self.failures.hold(action, time.monotonic(), oneshot=self._oneshot)
        if hold is not None:
            if hold != math.inf:
                self._schedule_wake(hold)
            return False
        assert self._semaphore is not None
        task = asyncio.get_running_loop().create_task(self._execute(action),
                                                      name=f"job:{name}")
        self._running[name] = _Running(action, task)
        return True

    def _schedule_wake(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        # Only a timer still to come makes this one redundant: a handle that already ran is
        # neither cancelled nor in the future, and must not swallow every later retry.
        if (self._timer is not None and not self._timer.cancelled()
                and loop.time() < self._timer.when() <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self.wake)

    # -- running one action ---------------------------------------------------------------------
    async def _execute(self, action: Action) -> None:
        name = action.name
        verb = _VERBS[type(action)]
        assert self._semaphore is not None
        loop = asyncio.get_running_loop()
        try:
            async with self._semaphore:
                self._running[name].started = True
                self._activity[name] = Activity(action=verb, detail=action.reason, progress=None)
                self._on_change()
                started = time.monotonic()
                log.info("job_started", model=name, job=verb, reason=action.reason)
                if isinstance(action, RestoreMode):
                    self.store.restore_mode(name, action.file_name)
                    result: Any = None
                elif isinstance(action, Quarantine):
                    result = self.store.quarantine(name)
                else:
                    request = self._request_for(action)

                    def on_progress(fraction: float | None, detail: str) -> None:
                        loop.call_soon_threadsafe(self._progress, name, verb, fraction, detail)

                    def on_start(handle: JobHandle) -> None:
                        loop.call_soon_threadsafe(self._attach_handle, name, handle)

                    result = await asyncio.to_thread(self.jobs.run, self._spec_for(request),
                                                     request, on_progress=on_progress,
                                                     on_start=on_start)
                self._apply(action, result, seconds=time.monotonic() - started)
                self.failures.succeeded(name)
                self._activity.pop(name, None)
        except (JobCancelledError, asyncio.CancelledError):
            self._activity.pop(name, None)
        except ModeldError as e:
            self._record_failure(action, e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the loop; it is an entry error
            log.exception("job_crashed", model=name, job=verb)
            self._record_failure(action, PermanentError(f"internal error: {type(e).__name__}: {e}",
                                                        entry=name))
        finally:
            self._running.pop(name, None)
            if isinstance(action, Prove) and action.recheck:
                self._recheck.get(name, set()).discard(action.file_name)
            self._tidy(name)
            self.wake()

    def _tidy(self, name: str) -> None:
        """The job is over, however it ended: its scratch goes (a killed worker left it)."""
        try:
            removed = self.store.tidy(name)
        except (ModeldError, OSError) as e:
            log.warning("tidy_failed", model=name, error=str(e))
            return
        if removed:
            log.info("scratch_removed", model=name, files=removed[:10])

    def _attach_handle(self, name: str, handle: JobHandle) -> None:
        running = self._running.get(name)
        if running is not None:
            running.handle = handle

    def _progress(self, name: str, verb: str, fraction: float | None, detail: str) -> None:
        if name in self._running:
            self._activity[name] = Activity(action=verb, detail=detail, progress=fraction)
            self._on_change()

    def _record_failure(self, action: Action, error: ModeldError) -> None:
        name = action.name
        failure = self.failures.record(action, error, time.monotonic())
        error, delay = failure.error, failure.delay_s
        if not isinstance(error, TemporaryError) and isinstance(action, Derive) \
                and self._source_unchanged(action):
            # Persisted: the same inputs are not quantized again, even after a restart.
            # (When the FP32 file vanished or changed under the job, its failure says nothing
            # about these inputs: it stays in memory, and the pull that heals the file clears it.)
            self._write(name, lambda m: m.with_failure(action.derivation.key(), str(error)))
        self._activity[name] = Activity(error=str(error), error_type=type(error).__name__,
                                        retry_in_s=round(delay, 1) if delay else None)
        log.error("job_failed", model=name, job=_VERBS[type(action)], attempts=failure.attempts,
                  retry_in_s=round(delay, 1) if delay else None,
                  **{k: v for k, v in error.fields().items() if k != "entry"})

    def _source_unchanged(self, action: Derive) -> bool:
        """The FP32 file a derive job read is still on disk, intact, with the digest it had."""
        state = self.store.scan_model(action.name)
        record = state.record(FP32_FILE) if state is not None else None
        return (state is not None and record is not None and state.intact(FP32_FILE)
                and record.sha256 == action.derivation.source_sha256)

    def forget_failures(self, names: set[str] | None = None) -> list[str]:
        """An operator's retry (SIGHUP, ``sync``): failed jobs run again, quantizations that
        failed for the same inputs included (e.g. after the calibration folder was fixed), and
        files nodes rejected are offered again. Returns the models that had any."""
        names = set(self.catalog.current.entries) if names is None else names
        forgotten = set()
        for name in names:
            if self.failures.forget(name):
                self._activity.pop(name, None)
                forgotten.add(name)
            manifest = self.store.read_manifest(name)
            if manifest.failures or manifest.rejections or manifest.shares:
                self._write(name, lambda m: replace(m, failures={}, rejections={}, shares={}))
                forgotten.add(name)
        # the watchers (the server) offer these models' files to those nodes again
        forgotten.update(r.model for r in self.rejections.forget(lambda r: r.model in names))
        if forgotten:
            log.info("failures_forgotten", models=sorted(forgotten))
        return sorted(forgotten)

    def retry(self, names: set[str] | None = None, *, refresh: bool = True) -> None:
        """An operator's pull/sync/verify on the running daemon (``modeld.admin``): what failed
        for these models runs again, ``refresh`` asks the hub again, and a pass is due."""
        self.forget_failures(names)
        if refresh:
            self._refresh_due.update(self.catalog.current.entries if names is None else names)
        self.wake()

    def _write(self, name: str, change: Callable[[Manifest], Manifest]) -> bool:
        """A manifest update that is not the outcome of a job (a failure, a rejection): a disk
        that refuses it is logged, the daemon goes on (the fact stays in memory)."""
        try:
            self.store.update_manifest(name, change)
            return True
        except (ModeldError, OSError) as e:
            log.warning("manifest_not_written", model=name, error=str(e))
            return False

    def record_rejection(self, *, model: str, variant: str, sha256: str, provider: str,
                         node: str | None, error: str, revision: str = "") -> None:
        """A node could not load ``sha256`` on ``provider``. Kept in the manifest for that node
        (a named one) while that copy of the file is current, so a restarted daemon does not
        offer it to that node again. And evidence to weigh: the file is hashed and proven again
        in a worker, at most once per ``recheck_interval_s`` per file, whoever nacks it."""
        if model not in self.catalog.current.entries:
            return
        manifest = self.store.read_manifest(model)
        file_name = next((n for n, r in sorted(manifest.files.items()) if r.sha256 == sha256), None)
        if file_name is None:
            return
        if node:
            rejection = {"model": model, "variant": variant, "sha256": sha256,
                         "provider": provider, "node": node, "error": error,
                         "revision": revision, "at_unix_s": round(time.time(), 3)}
            self._write(model, lambda m: m.with_rejection(rejection))
        now = time.monotonic()
        last = self._rechecked_at.get((model, sha256))
        if last is not None and now - last < self.settings.recheck_interval_s:
            log.info("recheck_skipped", model=model, file=file_name,
                     why=f"re-checked {now - last:.0f} s ago")
            return
        self._rechecked_at.pop((model, sha256), None)
        self._rechecked_at[(model, sha256)] = now
        while len(self._rechecked_at) > _RECHECK_MEMORY:
            del self._rechecked_at[next(iter(self._rechecked_at))]
        self._recheck.setdefault(model, set()).add(file_name)
        log.info("recheck_requested", model=model, file=file_name, node=node, provider=provider)
        self.wake()

    def restore_rejections(self) -> int:
        """Start-up: the rejections the manifests of the catalog's models kept (named nodes')
        go back into ``self.rejections``. Returns how many."""
        return len(self.rejections.add(
            Rejection.from_record(r) for name in self.catalog.current.entries
            for r in self.store.read_manifest(name).rejections.values()))

    def _forget_permanent_pull_failures(self) -> None:
        for name in self.failures.forget_pulls():
            self._activity.pop(name, None)

    # -- worker requests and results ------------------------------------------------------------
    def _request_for(self, action: Pull | Derive | Prove | Adopt | Share) -> Request:
        known = None
        if isinstance(action, Pull):
            # Only intact files are "known": the fetch worker trusts a known record's stat, and
            # a damaged file (bit rot keeps the stat) must be downloaded again.
            state = self.store.scan_model(action.name)
            known = {n: r for n, r in (state.manifest.files.items() if state else ())
                     if state.intact(n)}
        # a Share uploads what the manifest holds; a Prove of a derived file reads the calibration
        # folder its derivation names
        manifest = (self.store.read_manifest(action.name) if isinstance(action, (Share, Prove))
                    else None)
        return handoff.request_for(action, model_dir=str(self.store.model_dir(action.name)),
                                   settings=self.settings, context=self.context(), known=known,
                                   token=_hf_token(), manifest=manifest)

    def _spec_for(self, request: Request) -> JobSpec:
        s = self.settings
        timeout_s = {FetchRequest: s.pull_timeout_s, QuantizeRequest: s.quantize_timeout_s,
                     ProveRequest: s.verify_timeout_s, AdoptRequest: s.pull_timeout_s,
                     UploadRequest: s.pull_timeout_s}[type(request)]
        return JobSpec(request.target, timeout_s, s.worker_memory_mb)

    def _apply(self, action: Action, result: Any, *, seconds: float) -> None:
        """Record a finished job's result (``handoff.apply``) and say what it did."""
        name = action.name
        if isinstance(action, Prove) and action.recheck:
            self._judge_recheck(action, result)
        if isinstance(action, (Pull, Derive, Prove, Adopt, Share)):
            self.store.update_manifest(name, handoff.apply(action, result))
        if isinstance(action, Pull):
            self._refresh_due.discard(name)
            log.info("pulled", model=name, repo=action.entry.repo, commit=result.commit,
                     changed=result.changed, bytes=result.downloaded_bytes,
                     seconds=round(seconds, 2))
        elif isinstance(action, Derive):
            self._log_derived(action, result, seconds)
        elif isinstance(action, Prove):
            refused = {p.provider: p.reason for p in result.providers if not p.passed}
            log.info("proven", model=name, file=action.file_name,
                     passed=list(result.passed_on), refused=refused,
                     checker_ok=result.checker_ok, seconds=round(seconds, 2))
        elif isinstance(action, RestoreMode):
            log.info("file_repaired", model=name, file=action.file_name,
                     how="read permission restored")
        elif isinstance(action, (Adopt, Share)):
            self._log_shared(action, result, seconds)

    def _log_derived(self, action: Derive, result: QuantizeResult, seconds: float) -> None:
        record, proof = result.record, result.proof
        if record is None:
            log.warning("rebuild_withheld", model=action.name, method=action.derivation.method,
                        seconds=round(seconds, 2), reason=result.withheld,
                        serving=action.serving.file_name if action.serving else None,
                        still_passes_on=list(result.serving_proof.passed_on)
                        if result.serving_proof else None)
            return
        if proof.passed_anywhere:   # the samples it was calibrated on are kept while it serves
            self.samples.proven(action.name, action.derivation.params.get("calibration"))
        fp32_size = (self.store.read_manifest(action.name).files.get(FP32_FILE) or record).size
        log.info("quantized", model=action.name, method=action.derivation.method,
                 file=record.name, seconds=round(seconds, 2),
                 size_ratio=round(record.size / max(1, fp32_size), 3),
                 served=bool(proof and proof.passed_anywhere), warnings=list(result.warnings))

    def _log_shared(self, action: Adopt | Share, result: AdoptResult | UploadResult,
                    seconds: float) -> None:
        fields = dict(model=action.name, share=action.entry.quantize.share,
                      outcome=result.outcome, detail=result.detail,
                      commit=result.commit or None, seconds=round(seconds, 2))
        if result.outcome in (share.DENIED, share.FAILED, share.REFUSED):
            log.warning("not_shared" if isinstance(action, Share) else "share_refused", **fields)
        elif isinstance(action, Adopt):
            adopted = isinstance(result, AdoptResult) and result.record is not None
            log.info("share_adopted" if adopted else "share_missed", **fields)
        else:
            log.info("share_uploaded", **fields)

    def _judge_recheck(self, action: Prove, proof: Proof) -> None:
        """A node rejected the file and the worker hashed and proved it again: bytes that are
        not the recorded ones (under an unchanged stat) mean the node was right, and the file is
        damaged for everyone (healed by the next pass); a proof that still passes leaves the
        rejection to that node alone."""
        record = self.store.read_manifest(action.name).files.get(action.file_name)
        if record is None:
            return
        if proof.file_sha256 != record.sha256:
            path = self.store.model_dir(action.name) / action.file_name
            try:
                st = os.lstat(path)
            except OSError:
                return
            if record.stat_matches(st):
                self.store.mark_rotten(action.name, str(path), st)
            log.error("recheck_found_damage", model=action.name, file=action.file_name,
                      expected=record.sha256[:12], found=proof.file_sha256[:12])
            return
        log.info("recheck_done", model=action.name, file=action.file_name,
                 passed=list(proof.passed_on),
                 verdict="the rejection stays with that node" if proof.passed_anywhere
                 else "refused for every node")

    # -- reporting ------------------------------------------------------------------------------
    def _activity_now(self) -> dict[str, Activity]:
        now = time.monotonic()
        out = dict(self._activity)
        for name, failure in self.failures.items():
            if name in out and failure.retry_at is not None and out[name].error:
                out[name] = replace(out[name], retry_in_s=round(max(0.0, failure.retry_at - now), 1))
        return out

    def activity(self) -> dict[str, Activity]:
        """What each model's job is doing now, or last failed doing."""
        return dict(self._activity)

    def failed_models(self) -> dict[str, ModeldError]:
        return {n: f.error for n, f in self.failures.items()}

    def summary(self) -> str:
        """One line for systemd's STATUS=: '3 models ready, 1 quantizing (yolov8s 40%), catalog ok'."""
        views = self.views
        ready = sum(1 for v in views.values() if v.variants and v.state == "ready")
        parts = [f"{ready} model{'s' if ready != 1 else ''} ready"]
        busy = [(n, a) for n, a in self._activity.items() if a.action]
        by_verb: dict[str, list[str]] = {}
        for name, act in sorted(busy):
            pct = f" {act.progress:.0%}" if act.progress is not None else ""
            by_verb.setdefault(act.action or "", []).append(f"{name}{pct}")
        for verb, items in by_verb.items():
            parts.append(f"{len(items)} {verb} ({', '.join(items[:3])}"
                         f"{', ...' if len(items) > 3 else ''})")
        failed = [n for n, a in self._activity.items() if a.error and not a.action]
        if failed:
            parts.append(f"{len(failed)} failed ({', '.join(sorted(failed)[:3])})")
        err = self.catalog.error
        parts.append(f"catalog error: {err.message}" if err else "catalog ok")
        if self.store_error is not None:
            parts.append(f"models error: {self.store_error.message}")
        return ", ".join(parts)

    def status(self) -> dict[str, Any]:
        err = self.catalog.error
        return {"catalog": {"path": str(self.settings.catalog_path), "ok": err is None,
                            "error": str(err) if err else None,
                            "entry_errors": [str(e) for e in self.catalog.current.errors]},
                "store_error": str(self.store_error) if self.store_error else None,
                "summary": self.summary(), "workers": len(self._running),
                "onnxruntime": self.ort_version,
                "runtimes": {p: {"python": r.python, "usable": not r.reason, "reason": r.reason,
                                 "onnxruntime": r.info.onnxruntime if r.info else None,
                                 "package": r.info.package if r.info else None}
                             for p, r in self.runtimes.items()}}


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None
