"""The model store on disk: ``models/<name>/`` folders, their manifests, and the scan -> Inventory.

Called by the reconciler (scan, manifest updates, clean-up) and the one-shot CLI commands. "Is
this file good?" is answered by the manifest: a file whose size + mtime_ns + inode match its record
is trusted without hashing; otherwise it is hashed (once per stat triple, cached) and compared.
Only the reconciler writes manifests; workers publish files and return records.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import stat
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import structlog

from .atomic import (describe_mode, disk_error, quarantine_path_for, read_regular,
                     real_folder, remove_leftovers, sha256_file, write_atomic)
from .errors import (ManifestError, ModeldError, StoreError, StoreLockedError,
                     StoreUnavailableError)
from .inventory import DAMAGED, MISSING, OK, UNREADABLE, FileState, Inventory, ModelState
from .layout import FP32_FILE, LOCK_NAME, MANIFEST_NAME, SCRUB_STAMP_NAME, TEMP_PREFIX
from .manifest import MAX_MANIFEST_BYTES, FileRecord, Manifest, is_plain_name

log = structlog.get_logger(__name__)

_REGULAR_READABLE = stat.S_IFREG | stat.S_IRUSR
#: scans whose hashing runs in a thread before one hashes what is left on the loop itself
_HASH_ROUNDS = 3
#: a file a scan would hash: its path and the stat it was seen with
Unhashed = tuple[str, os.stat_result]


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    """What identifies a file's bytes without reading them: size, mtime_ns, inode. Files are only
    ever replaced whole (renamed over), so a new content always comes with a new key."""
    return st.st_size, st.st_mtime_ns, st.st_ino


class Store:
    """The ``models/`` folder. Not thread-safe: one owner (the reconciler's event loop)."""

    def __init__(self, models_dir: Path, *, hasher: Callable[[Path], str] = sha256_file) -> None:
        self.root = Path(models_dir).absolute()
        self._hasher = hasher
        self._hash_cache: dict[tuple[str, int, int, int], str] = {}
        self._manifest_cache: dict[str, tuple[tuple[int, int, int], Manifest, str]] = {}
        self._lock_fd: int | None = None
        self._dirs: dict[str, Path] = {}
        #: the last scan of each model: a rescan that finds the same manifest and the same file
        #: states returns this very object, so the planner and the views can skip it (the
        #: identity contract: ``modeld.unchanged``)
        self._states: dict[str, ModelState] = {}
        self._folders: dict[str, str] = {}
        #: path -> stat key of a file whose content the scrub found changed under its old stat
        self._rotten: dict[str, tuple[int, int, int]] = {}
        self.hash_count = 0   # how many files were hashed: the no-op benchmark asserts it stays 0
        #: the mode a restored file gets: what a new file gets under this process's umask (the
        #: unit's UMask=0027 makes it 0640: readable by the nodes' group, by no one else)
        self.file_mode = 0o666 & ~_current_umask()
        self._problems_logged: dict[str, str] = {}

    # -- layout ---------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """``models/<name>``; refuses anything that is not one plain folder name inside the root."""
        cached = self._dirs.get(name)
        if cached is not None:
            return cached
        if not is_plain_name(name):
            raise StoreError(f"not a valid model folder name: {name!r}", entry=name)
        path = self.root / name
        if path.parent != self.root:
            raise StoreError(f"model folder escapes {self.root}", entry=name)
        if len(self._dirs) < 100_000:
            self._dirs[name] = path
        return path

    def is_pulled(self, name: str) -> bool:
        """Whether ``models/<name>`` holds its FP32 file (pulled once; intact or not). One stat;
        of the store's state it only adds to the name cache, so it may run in a thread."""
        return os.path.exists(f"{self.model_dir(name)}/{FP32_FILE}")

    # -- manifest -------------------------------------------------------------------------------
    def read_manifest(self, name: str) -> Manifest:
        """The manifest of ``models/<name>`` (empty when absent or unusable: see ``_load``)."""
        return self._load(name)[0]

    def _load(self, name: str) -> tuple[Manifest, str]:
        """(manifest, problem). Whatever is in the file, this returns: a manifest that is not a
        regular file, too big, not JSON or of the wrong shape is an empty manifest and a problem
        (logged once per content): its model's files are verified or pulled again."""
        path = f"{self._folders.get(name) or self._folder(name)}/{MANIFEST_NAME}"
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._manifest_cache.pop(name, None)
            return Manifest(name=name), ""
        except OSError as e:
            return Manifest(name=name), self._problem(name, f"{MANIFEST_NAME}: {e.strerror}")
        key = stat_key(st)
        cached = self._manifest_cache.get(name)
        if cached and cached[0] == key:
            return cached[1], cached[2]
        problem = ""
        try:
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"{MANIFEST_NAME} is {describe_mode(st.st_mode)}")
            manifest = Manifest.from_json(read_regular(path, MAX_MANIFEST_BYTES), name=name)
        except ManifestError as e:
            manifest, problem = Manifest(name=name), self._problem(name, e.message)
        except OSError as e:
            manifest = Manifest(name=name)
            problem = self._problem(name, f"{MANIFEST_NAME}: {e.strerror or e}")
        self._manifest_cache[name] = (key, manifest, problem)
        return manifest, problem

    def _problem(self, name: str, text: str) -> str:
        """Log a model's store problem once (until it changes); returns the text."""
        text = f"{text}; pulled and verified again"[:300]
        if self._problems_logged.get(name) != text:
            if len(self._problems_logged) > 10_000:
                self._problems_logged.clear()
            self._problems_logged[name] = text
            log.warning("store_problem", model=name, problem=text)
        return text

    def write_manifest(self, manifest: Manifest) -> None:
        """Publish ``models/<manifest.name>/manifest.json`` (the name is the folder's: see
        ``read_manifest``); only into a real folder, never through a link."""
        folder = real_folder(self.model_dir(manifest.name), create=True)
        path = folder / MANIFEST_NAME
        write_atomic(path, manifest.to_json())
        try:
            st = os.lstat(path)
        except OSError as e:
            raise disk_error(e, path) from e
        self._manifest_cache[manifest.name] = (stat_key(st), manifest, "")

    def update_manifest(self, name: str, change: Callable[[Manifest], Manifest]) -> Manifest:
        manifest = replace(change(self.read_manifest(name)), name=name)
        self.write_manifest(manifest)
        return manifest

    # -- scan -----------------------------------------------------------------------------------
    def scan(self, names: Iterable[str], *, defer_hashing: list[Unhashed] | None = None
             ) -> Inventory:
        """The actual state of the named models (those with no folder are absent).
        ``StoreUnavailableError`` when models/ itself is not a usable folder. With a list as
        ``defer_hashing``, a file that would have to be hashed is appended to it instead, and
        the inventory is incomplete: see ``scan_off_loop``."""
        self.check_root()
        models = {}
        for name in names:
            state = self.scan_model(name, defer_hashing=defer_hashing)
            if state is not None:
                models[name] = state
        return Inventory(models=models)

    async def scan_off_loop(self, names: Iterable[str]) -> Inventory:
        """``scan`` for a caller on the event loop that serves the nodes: the stat-only scan runs
        here, the hashing it needs (a file touched, copied back: its stat is new, its size the
        same) in a thread, then the scan again, answered from the digests. The loop keeps
        answering while a large file is read. Only the digests cross the thread: the store's
        own state is touched on the loop alone."""
        names = list(names)
        for _ in range(_HASH_ROUNDS):
            wanted: list[Unhashed] = []
            inventory = self.scan(names, defer_hashing=wanted)
            if not wanted:
                return inventory
            digests = await asyncio.to_thread(_hash_each, self._hasher, wanted)
            for (path, st), digest in zip(wanted, digests):
                if digest is not None:
                    self._remember_digest(path, st, digest)
        return self.scan(names)   # files rewritten during every round: what is left, here

    def check_root(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return   # nothing pulled yet: the first write creates it
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {self.root}: {e.strerror}",
                                        path=str(self.root)) from e
        if not stat.S_ISDIR(st.st_mode):
            raise StoreUnavailableError(f"{self.root} is {describe_mode(st.st_mode)}, not a folder",
                                        path=str(self.root),
                                        hint="make it a folder again; nothing is served meanwhile")

    def scan_model(self, name: str, *, defer_hashing: list[Unhashed] | None = None
                   ) -> ModelState | None:
        folder = self._folders.get(name) or self._folder(name)
        try:
            folder_mode = os.lstat(folder).st_mode
        except (FileNotFoundError, NotADirectoryError):
            self._states.pop(name, None)
            return None
        except OSError as e:
            return self._broken(name, f"{name}/: {e.strerror}", misplaced=False)
        if not stat.S_ISDIR(folder_mode):
            return self._broken(name, f"models/{name} is {describe_mode(folder_mode)}, not a "
                                      f"folder", misplaced=True)
        manifest, problem = self._load(name)
        if not problem:
            self._problems_logged.pop(name, None)   # healed: the same damage again is logged again
        previous = self._states.get(name)
        if previous is not None and previous.manifest is not manifest:
            previous = None
        files = {}
        same = previous is not None
        deferred = len(defer_hashing) if defer_hashing is not None else 0
        for file_name, record in manifest.files.items():
            path = f"{folder}/{file_name}"
            before = previous.files.get(file_name) if previous is not None else None
            if before is not None and before.record is record and before.status == OK:
                # the common case, inlined: a regular, readable file with its recorded stat
                try:
                    st = os.lstat(path)
                except OSError:
                    st = None
                if (st is not None and st.st_mode & _REGULAR_READABLE == _REGULAR_READABLE
                        and stat.S_ISREG(st.st_mode) and st.st_ino == record.inode
                        and st.st_mtime_ns == record.mtime_ns and st.st_size == record.size):
                    files[file_name] = before
                    continue
            state = self._check(path, record, defer_hashing)
            same = False
            files[file_name] = state
        if same:
            return previous
        new_stats = any(s.record is not manifest.files[n] for n, s in files.items() if s.ok)
        state = ModelState(name=name, manifest=manifest, files=files, new_stats=new_stats,
                           problem=problem)
        if defer_hashing is None or len(defer_hashing) == deferred:
            self._states[name] = state   # not a state with a file left unhashed
        return state

    def _broken(self, name: str, problem: str, *, misplaced: bool) -> ModelState:
        previous = self._states.get(name)
        if previous is not None and previous.problem == problem and not previous.files:
            return previous
        self._problem(name, problem)
        state = ModelState(name=name, manifest=Manifest(name=name), problem=problem,
                           misplaced=misplaced)
        self._states[name] = state
        return state

    def quarantine(self, name: str) -> str:
        """Move ``models/<name>`` (a file, a symlink: not a real folder) aside under a hidden
        name, the link itself and never its target; the model is then pulled again. Returns the
        new name."""
        folder = self.model_dir(name)
        aside = quarantine_path_for(folder)
        try:
            os.replace(folder, aside)
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise disk_error(e, folder) from e
        self._forget(name)
        log.warning("model_folder_quarantined", model=name, moved_to=aside.name)
        return aside.name

    def _forget(self, name: str) -> None:
        self._manifest_cache.pop(name, None)
        self._states.pop(name, None)

    def _folder(self, name: str) -> str:
        folder = os.fspath(self.model_dir(name))
        if len(self._folders) < 100_000:
            self._folders[name] = folder
        return folder

    def _check(self, path: str, record: FileRecord, defer_hashing: list[Unhashed] | None = None
               ) -> FileState:
        try:
            st = os.lstat(path)   # a symlink is never followed: it is damage, healed by a pull
        except FileNotFoundError:
            return FileState(record.name, MISSING, record, "file is missing")
        except OSError as e:
            return FileState(record.name, UNREADABLE, record, e.strerror or str(e))
        if not stat.S_ISREG(st.st_mode):
            return FileState(record.name, DAMAGED, record,
                             f"{describe_mode(st.st_mode)}, not a regular file")
        if not st.st_mode & stat.S_IRUSR:
            # Root can read a mode-000 file, but the nodes cannot: treat it as unreadable.
            return FileState(record.name, UNREADABLE, record, "file has no read permission")
        if record.stat_matches(st):
            if self._rotten and self._rotten.get(path) == stat_key(st):
                return FileState(record.name, DAMAGED, record,
                                 "content changed under the same size and mtime (found by the scrub)")
            return FileState(record.name, OK, record)
        if st.st_size != record.size:
            return FileState(record.name, DAMAGED, record,
                             f"size {st.st_size} != recorded {record.size}")
        if defer_hashing is not None and _digest_key(path, st) not in self._hash_cache:
            defer_hashing.append((path, st))
            return FileState(record.name, DAMAGED, record, "not hashed yet")
        try:
            digest = self.digest(Path(path), st)
        except OSError as e:
            return FileState(record.name, UNREADABLE, record, e.strerror or str(e))
        if digest != record.sha256:
            return FileState(record.name, DAMAGED, record, "sha256 differs from the manifest")
        # Same content, new stat (touched, copied back): trust it, and remember the new stat.
        return FileState(record.name, OK, replace(record, mtime_ns=st.st_mtime_ns, inode=st.st_ino))

    def digest(self, path: Path, st: os.stat_result | None = None) -> str:
        st = st or path.stat()
        cached = self._hash_cache.get(_digest_key(path, st))
        if cached is None:
            cached = self._remember_digest(path, st, self._hasher(path))
        return cached

    def _remember_digest(self, path: str | Path, st: os.stat_result, digest: str) -> str:
        self.hash_count += 1
        if len(self._hash_cache) > 10_000:
            self._hash_cache.clear()
        self._hash_cache[_digest_key(path, st)] = digest
        return digest

    def scrub_targets(self, name: str) -> list[tuple[str, FileRecord, os.stat_result]]:
        """(path, record, stat) of each file of ``name`` that a scan calls intact: what the scrub
        re-hashes (off the event loop: hashing reads whole files). A file the scan would have to
        hash first is left to the next scan (``scan_off_loop``)."""
        state = self.scan_model(name, defer_hashing=[])
        out = []
        for file_name, file_state in (state.files.items() if state is not None else ()):
            if file_state.ok and file_state.record is not None:
                path = f"{self._folder(name)}/{file_name}"
                try:
                    out.append((path, file_state.record, os.lstat(path)))
                except OSError:
                    continue
        return out

    def scrubbed_at(self) -> float | None:
        """Wall-clock time of the last complete scrub (None: never)."""
        try:
            return os.stat(self.root / SCRUB_STAMP_NAME).st_mtime
        except OSError:
            return None

    def mark_scrubbed(self, at_s: float | None = None) -> None:
        stamp = self.root / SCRUB_STAMP_NAME
        try:
            stamp.touch()
            if at_s is not None:
                os.utime(stamp, (at_s, at_s))
        except OSError as e:   # a read-only or full disk: scrubbing again later costs only time
            log.warning("scrub_stamp_unwritable", path=str(stamp), error=str(e))

    def mark_rotten(self, name: str, path: str, st: os.stat_result) -> None:
        """The scrub found ``path`` (as it was at ``st``) not matching its record: scans call it
        damaged until it is replaced."""
        for known in list(self._rotten):          # forget files replaced since
            try:
                now = os.stat(known)
            except OSError:
                now = None
            if now is None or stat_key(now) != self._rotten[known]:
                del self._rotten[known]
        self._rotten[path] = stat_key(st)
        self._states.pop(name, None)
        self._hash_cache = {k: v for k, v in self._hash_cache.items() if k[0] != path}

    def refresh_stats(self, state: ModelState) -> None:
        """Record the new stat triple of files whose content proved unchanged (saves re-hashing).
        Only saves work: a write the disk refuses is logged (once) and tried on a later pass."""
        if not state.new_stats:
            return
        records = state.manifest.files
        changed = {n: s.record for n, s in state.files.items()
                   if s.ok and s.record is not None and s.record is not records.get(n)
                   and s.record != records.get(n)}
        if changed:
            try:
                self.update_manifest(state.name, lambda m: replace(m, files={**m.files, **changed}))
            except (ModeldError, OSError) as e:
                self._problem(state.name, f"new file stats not recorded: {e}")

    def restore_mode(self, name: str, file_name: str) -> None:
        """A file that lost its read permission but kept its content: give it back the mode a
        new file gets (``file_mode``). Only a regular file directly in the model's real folder:
        no symlink is followed, no name leaves the folder."""
        if not is_plain_name(file_name):
            raise StoreError(f"not a file name of this folder: {file_name!r}", entry=name)
        folder = real_folder(self.model_dir(name))
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(file_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"{file_name} is {describe_mode(st.st_mode)}, not a file",
                                     entry=name)
                # chmod through the O_PATH descriptor: the very inode checked above
                os.chmod(f"/proc/self/fd/{fd}", self.file_mode)
            finally:
                os.close(fd)
        except OSError as e:
            raise disk_error(e, folder / file_name) from e
        finally:
            os.close(dir_fd)

    # -- removal and clean-up -------------------------------------------------------------------
    def remove_model(self, name: str) -> bool:
        """Delete ``models/<name>``: renamed aside first (atomic), then deleted."""
        aside = self.set_aside(name)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return aside is not None

    def set_aside(self, name: str) -> Path | None:
        """Rename ``models/<name>`` to a temp name (atomic: it is gone for every scan at once)
        and return that path, for the caller to delete (in a thread: a model is large); None
        when there is no such folder. A temp name: an interrupted deletion is cleaned up."""
        folder = self.model_dir(name)
        if not folder.exists():
            return None
        aside = self.root / f"{TEMP_PREFIX}removed-{uuid.uuid4().hex[:8]}-{name}"
        os.replace(folder, aside)
        self._forget(name)
        return aside

    def tidy(self, name: str) -> list[str]:
        """After a job of ``name`` ended, however it ended (a killed worker runs no clean-up):
        remove its temp files and scratch folders, and the folder itself if nothing is left
        (a failed first pull leaves no empty folder). Only call it when no job uses the folder."""
        folder = self.model_dir(name)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return []
        except OSError:
            return []
        removed = remove_leftovers(folder)
        try:
            os.rmdir(folder)   # only succeeds when empty
            self._forget(name)
        except OSError:
            pass
        return removed

    def clean_leftovers(self) -> list[str]:
        """Remove temp files and scratch folders of an interrupted run (start-up)."""
        if not self.root.is_dir():
            return []
        removed = remove_leftovers(self.root)
        try:
            folders = list(self.root.iterdir())
        except OSError:
            return removed
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                removed += [f"{folder.name}/{name}" for name in remove_leftovers(folder)]
        return removed

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # -- one daemon per store -------------------------------------------------------------------
    def lock(self) -> None:
        """Take the store's lock, or raise ``StoreLockedError`` naming the holder
        (``StoreUnavailableError``: models/ is not a folder we can use, for now)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.check_root()
            raise StoreUnavailableError(f"cannot create {self.root}: {e.strerror}",
                                        path=str(self.root)) from e
        self.check_root()
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreUnavailableError(f"cannot open {path}: {e.strerror}", path=str(path)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise StoreLockedError(f"{self.root} is already managed by {who}",
                                       hint="stop that mecha10-modeld first, or use another --models") from e
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _digest_key(path: str | Path, st: os.stat_result) -> tuple[str, int, int, int]:
    return (os.fspath(path), *stat_key(st))


def _hash_each(hasher: Callable[[Path], str], files: list[Unhashed]) -> list[str | None]:
    """Run in a thread by ``scan_off_loop``: each file's digest (None: unreadable now; the scan
    on the loop then says why)."""
    out: list[str | None] = []
    for path, _ in files:
        try:
            out.append(hasher(Path(path)))
        except OSError:
            out.append(None)
    return out


def _current_umask() -> int:
    """This process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
