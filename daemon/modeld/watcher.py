"""File events -> debounced wake-ups of the reconciler: the catalog file and everything in models/.

The runner starts a ``Watcher`` and hops each ``wake(reason)`` onto its event loop. A wake-up is
only a hint (level-triggered: the reconciler re-reads everything), so the filters here only save
work: the daemon's own temp files, its lock file and its manifest writes never wake it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog
from watchdog import events as ev
from watchdog.observers import Observer

from .atomic import is_temp_name
from .errors import CatalogError, StoreError
from .layout import MANIFEST_NAME, OWN_NAMES

log = structlog.get_logger(__name__)

_REARM_POLL_S = 0.2

#: the events that can change what the reconciler sees. Not opened/closed-without-write (the
#: daemon's own reads would wake it in a loop) and not DirModifiedEvent (watchdog derives it from
#: every child event, including the ones filtered out); DirAttribEvent catches chmod of a folder.
_EVENT_TYPES = [ev.FileCreatedEvent, ev.DirCreatedEvent, ev.FileModifiedEvent, ev.FileClosedEvent,
                ev.FileDeletedEvent, ev.DirDeletedEvent, ev.FileMovedEvent, ev.DirMovedEvent,
                ev.FileAttribEvent, ev.DirAttribEvent]
_CATALOG_EVENT_TYPES = [ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileClosedEvent,
                        ev.FileDeletedEvent, ev.FileMovedEvent, ev.FileAttribEvent]


@dataclass(frozen=True)
class WakeReason:
    """Why the reconciler is woken: a hint, never the whole truth."""

    catalog_changed: bool = False
    models: frozenset[str] = frozenset()    # model folder names touched under models/
    #: models/ itself was deleted and is watched again: anything may have changed
    rescan: bool = False

    def __or__(self, other: "WakeReason") -> "WakeReason":
        return WakeReason(self.catalog_changed or other.catalog_changed,
                          self.models | other.models, self.rescan or other.rescan)

    def __bool__(self) -> bool:
        return self.catalog_changed or bool(self.models) or self.rescan


class Debouncer:
    """Two knobs: quiet step and maximum hold (watchfiles' step/debounce): fire after `step_ms`
    without new events, but never later than `max_ms` after the first event of a burst.

    A pure state machine on a caller-supplied clock: ``debouncer(reason, now_s)`` adds an event,
    ``due_at()`` says when to fire, ``take(now_s)`` returns the merged reason once due.
    """

    __slots__ = ("step_s", "max_s", "_pending", "_first_s", "_last_s")

    def __init__(self, step_ms: int = 50, max_ms: int = 500) -> None:
        if step_ms < 0 or max_ms < step_ms:
            raise ValueError(f"need 0 <= step_ms <= max_ms, got step_ms={step_ms} max_ms={max_ms}")
        self.step_s = step_ms / 1000
        self.max_s = max_ms / 1000
        self._pending = WakeReason()
        self._first_s = 0.0
        self._last_s = 0.0

    def __call__(self, reason: WakeReason, now_s: float) -> None:
        if not self._pending:
            self._first_s = now_s
        self._pending |= reason
        self._last_s = now_s

    def due_at(self) -> float | None:
        """Clock time at which the pending burst fires; None when nothing is pending."""
        if not self._pending:
            return None
        return min(self._last_s + self.step_s, self._first_s + self.max_s)

    def take(self, now_s: float) -> WakeReason | None:
        """The merged reason if it is due at ``now_s`` (and reset), else None."""
        due = self.due_at()
        if due is None or now_s < due:
            return None
        reason, self._pending = self._pending, WakeReason()
        return reason


def catalog_chain(catalog_path: Path, max_links: int = 40) -> list[str]:
    """``catalog_path`` and, through any symlinks, each path up to the real file: configuration
    tools often link /etc files elsewhere, and an edit of the target must count too."""
    chain = [os.path.abspath(catalog_path)]
    for _ in range(max_links):
        try:
            target = os.readlink(chain[-1])
        except OSError:   # not a link (or gone): the chain ends here
            break
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    return chain


class _EventSorter(ev.FileSystemEventHandler):
    """Runs on watchdog's thread: turns one event into a WakeReason (or nothing) and queues it."""

    def __init__(self, *, catalog_path: Path, models_dir: Path,
                 queue: Callable[[WakeReason], None], root_lost: Callable[[], None]) -> None:
        #: the catalog's path and, if it is a symlink, every path on the way to the real file
        self.catalog_files = frozenset(catalog_chain(catalog_path))
        self._models_dir = str(models_dir)
        self._queue = queue
        self._root_lost = root_lost

    def on_any_event(self, event: ev.FileSystemEvent) -> None:
        if event.event_type == ev.EVENT_TYPE_DELETED and event.is_directory \
                and os.fsdecode(event.src_path) == self._models_dir:
            self._root_lost()   # inotify drops a deleted folder's watch: it must be set again
            return
        paths = [os.fsdecode(event.src_path)]
        if event.event_type == ev.EVENT_TYPE_MOVED:
            paths.append(os.fsdecode(event.dest_path))
        reason = WakeReason()
        for path in paths:
            reason |= self.classify(path, event)
        if reason:
            self._queue(reason)

    def classify(self, path: str, event: ev.FileSystemEvent) -> WakeReason:
        if not path:
            return WakeReason()
        if path in self.catalog_files:
            return WakeReason(catalog_changed=True)
        relative = os.path.relpath(path, self._models_dir)
        if relative == "." or relative.startswith(".." + os.sep) or relative == "..":
            return WakeReason()
        parts = relative.split(os.sep)
        if any(is_temp_name(part) for part in parts):
            return WakeReason()
        if len(parts) == 1 and parts[0] in OWN_NAMES:
            return WakeReason()
        if parts[-1] == MANIFEST_NAME and event.event_type == ev.EVENT_TYPE_MOVED \
                and is_temp_name(os.path.basename(os.fsdecode(event.src_path))):
            return WakeReason()   # the daemon's own manifest writes: a temp renamed over it
        if parts[-1] == MANIFEST_NAME and event.event_type in (ev.EVENT_TYPE_OPENED,
                                                               ev.EVENT_TYPE_CLOSED_NO_WRITE):
            return WakeReason()   # read, not changed (a person's edit in place is damage)
        return WakeReason(models=frozenset({parts[0]}))


class Watcher:
    """Watches the catalog's folder and ``models/`` (recursively); calls ``wake`` from its own
    thread with a debounced, merged ``WakeReason``."""

    def __init__(self, *, catalog_path: Path, models_dir: Path, wake: Callable[[WakeReason], None],
                 step_ms: int = 50, max_ms: int = 500) -> None:
        self.catalog_path = Path(catalog_path).absolute()
        self.models_dir = Path(models_dir).absolute()
        self._wake = wake
        self._debouncer = Debouncer(step_ms, max_ms)
        self._cond = threading.Condition()
        self._stopping = False
        self._root_missing = False
        self._catalog_moved = False
        self._catalog_folders: set[str] = set()
        self._observer: Observer | None = None
        self._models_watch = None
        self._sorter: _EventSorter | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        if not self.catalog_path.parent.is_dir():
            raise CatalogError("the catalog's folder does not exist", path=str(self.catalog_path),
                               hint="create it or pass --catalog with an existing folder")
        if not self.models_dir.is_dir():
            raise StoreError(f"models directory {self.models_dir} does not exist",
                             hint="create it or pass --models")
        self._sorter = _EventSorter(catalog_path=self.catalog_path, models_dir=self.models_dir,
                                    queue=self._queue, root_lost=self._on_root_lost)
        observer = Observer()
        observer.daemon = True
        self._observer = observer
        self._catalog_folders = set()
        try:
            # the folders, not the file: editors replace the file (rename, sed -i), which a watch
            # on the file's inode would miss
            self._watch_catalog_folders()
            self._models_watch = observer.schedule(self._sorter, str(self.models_dir),
                                                   recursive=True, event_filter=_EVENT_TYPES)
            observer.start()
        except OSError as e:
            observer.stop()
            self._observer = None
            raise _watch_error(self.models_dir, e) from e
        self._stopping = False
        self._root_missing = False
        self._pump = threading.Thread(target=self._run_pump, name="modeld-watcher", daemon=True)
        self._pump.start()
        log.info("watching", catalog=str(self.catalog_path), models=str(self.models_dir))

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._pump is not None:
            self._pump.join(timeout=5)
            self._pump = None

    def _queue(self, reason: WakeReason) -> None:
        if reason.catalog_changed:
            self._catalog_moved = True   # a symlink may point elsewhere now: checked by the pump
        with self._cond:
            self._debouncer(reason, time.monotonic())
            self._cond.notify_all()

    def _watch_catalog_folders(self) -> None:
        """Watch the folder of every path on the catalog's symlink chain (once each)."""
        assert self._observer is not None and self._sorter is not None
        chain = catalog_chain(self.catalog_path)
        self._sorter.catalog_files = frozenset(chain)
        for folder in dict.fromkeys(os.path.dirname(p) for p in chain):
            if folder not in self._catalog_folders and os.path.isdir(folder):
                self._observer.schedule(self._sorter, folder, recursive=False,
                                        event_filter=_CATALOG_EVENT_TYPES)
                self._catalog_folders.add(folder)

    def _on_root_lost(self) -> None:
        log.warning("models_dir_deleted", models=str(self.models_dir))
        with self._cond:
            self._root_missing = True
            self._cond.notify_all()

    def _rearm(self) -> None:
        """After models/ was deleted: watch it again once it exists again (pump thread)."""
        if not self.models_dir.is_dir() or self._observer is None:
            return
        try:
            if self._models_watch is not None:
                self._observer.unschedule(self._models_watch)
            self._models_watch = self._observer.schedule(
                self._sorter, str(self.models_dir), recursive=True, event_filter=_EVENT_TYPES)
        except (OSError, KeyError) as e:
            log.error("rewatch_failed", models=str(self.models_dir), error=str(e))
            return
        self._root_missing = False
        # whatever appeared before the new watch was set is reported now, as a hint
        present = frozenset(n for n in os.listdir(self.models_dir)
                            if not is_temp_name(n) and n not in OWN_NAMES)
        log.info("models_dir_watched_again", models=str(self.models_dir), entries=len(present))
        self._queue(WakeReason(models=present, rescan=True))

    def _run_pump(self) -> None:
        while True:
            # outside our lock: watchdog calls our handler while holding its own lock
            if self._root_missing:
                self._rearm()
            if self._catalog_moved:
                self._catalog_moved = False
                try:
                    self._watch_catalog_folders()
                except OSError as e:
                    log.error("catalog_watch_failed", catalog=str(self.catalog_path), error=str(e))
            with self._cond:
                if self._stopping:
                    return
                due = self._debouncer.due_at()
                now = time.monotonic()
                reason = self._debouncer.take(now) if due is not None and now >= due else None
                if reason is None:
                    wait_s = None if due is None else due - now
                    if self._root_missing:   # poll for the folder's return
                        wait_s = _REARM_POLL_S if wait_s is None else min(wait_s, _REARM_POLL_S)
                    self._cond.wait(wait_s)
                    continue
            try:
                self._wake(reason)
            except Exception as e:  # noqa: BLE001 - a failing callback must not stop the watching
                log.error("wake_failed", error=str(e), error_type=type(e).__name__)


def _watch_error(path: Path, e: OSError) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EMFILE):
        # inotify's limits, not the disk: fs.inotify.max_user_watches / max_user_instances
        return StoreError(f"cannot watch {path}: inotify limit reached ({e.strerror})",
                          hint="raise fs.inotify.max_user_watches and max_user_instances (sysctl)")
    return StoreError(f"cannot watch {path}: {e.strerror or e}", hint="check the folder's permissions")
