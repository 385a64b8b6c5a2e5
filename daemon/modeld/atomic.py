"""Atomic publishing: nothing half-written is ever visible under a final name.

Write to a unique temp file in the destination folder, fsync it, ``os.replace`` it over the final
name, fsync the folder (the pattern of huggingface_hub's ``_download_to_tmp_and_move``). Used by
the store (manifest, config) and by the workers (downloads, variants). Temp names start with
``TEMP_PREFIX`` so the watcher ignores them and start-up clean-up finds them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

from .errors import DiskFullError, StoreError, StoreWriteError
from .layout import QUARANTINE_PREFIX, TEMP_PREFIX, WORK_PREFIX


#: errnos of a write that the disk refused for a while (full, read-only, failing): temporary
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_ERRNOS = (errno.EIO, errno.EROFS)


def is_temp_name(name: str) -> bool:
    """True for our own temp files and scratch folders (the watcher filters them out)."""
    return name.startswith((TEMP_PREFIX, WORK_PREFIX))


def temp_path_for(final: Path) -> Path:
    """A unique temp path beside ``final`` (same folder, so ``os.replace`` is atomic)."""
    return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(temp: Path, final: Path) -> None:
    """fsync ``temp``, rename it over ``final``, fsync the folder. ``temp`` must be beside ``final``."""
    if temp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"temp {temp} is not in the folder of {final}")
    fsync_file(temp)
    clear_the_way(final)
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomic(final: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Write ``data`` to ``final`` atomically; a full, read-only or failing disk raises a
    ``TemporaryError`` (``DiskFullError``, ``StoreWriteError``) and leaves no temp. The temp file
    is created new (``O_EXCL``), never through a symlink, with ``mode`` under the umask (given at
    creation: a private file is never readable by others, not even for a moment)."""
    temp = temp_path_for(final)
    try:
        clear_the_way(final)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        fsync_dir(final.parent)
    except OSError as e:
        _unlink_quietly(temp)
        raise disk_error(e, final) from e


def disk_error(e: OSError, path: Path | str) -> Exception:
    """The typed error of a failed write (retry once the disk is back), or ``e`` itself."""
    name = Path(path).name
    if e.errno in _SPACE_ERRNOS:
        return DiskFullError(f"no space left writing {name}", path=str(path),
                             hint="free disk space; the previous file keeps serving")
    if e.errno in _DISK_ERRNOS:
        return StoreWriteError(f"cannot write {name}: {e.strerror}", path=str(path),
                               errno=errno.errorcode.get(e.errno or 0),
                               hint="check the disk; the previous file keeps serving")
    return e


def clear_the_way(final: Path) -> None:
    """A folder (or anything but a file or a link) under a final file name cannot be renamed
    over: move it aside to a quarantine name in the same folder."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return   # os.replace replaces the name itself (a link is never followed)
    os.replace(final, quarantine_path_for(final))


def quarantine_path_for(path: Path) -> Path:
    return path.with_name(f"{QUARANTINE_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-"
                          f"{uuid.uuid4().hex[:6]}-{path.name}")


def real_folder(folder: Path, *, create: bool = False) -> Path:
    """``folder`` if it is a real directory (not a symlink to one), else ``StoreError``: nothing
    is ever written through a link out of models/. ``create``: make it (its parent must exist)."""
    folder = Path(folder)
    if create:
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            pass
        except OSError as e:
            raise disk_error(e, folder) if e.errno in _SPACE_ERRNOS + _DISK_ERRNOS else \
                StoreError(f"cannot create {folder.name}/: {e.strerror}", path=str(folder)) from e
    try:
        st = os.lstat(folder)
    except OSError as e:
        raise StoreError(f"cannot use {folder.name}/: {e.strerror}", path=str(folder)) from e
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{folder.name} is {describe_mode(st.st_mode)}, not a folder",
                         path=str(folder), hint="it is moved aside and the model pulled again")
    return folder


def describe_mode(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                       (stat.S_ISREG, "a file")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: Path | str, *, max_bytes: int | None = None, dir_fd: int | None = None
                 ) -> int:
    """An fd of ``path`` for reading, only if it is a regular file (no symlink followed, a FIFO
    or a device never blocks or streams forever); ``OSError`` otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{describe_mode(st.st_mode)}, not a regular file",
                          str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a regular file (a symlink, FIFO or device is refused with ``OSError``)."""
    h = hashlib.sha256()
    with open(open_regular(path), "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see ``open_regular``)."""
    with open(open_regular(path, max_bytes=max_bytes), "rb") as f:
        return f.read(max_bytes + 1)[:max_bytes]


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_leftovers(folder: Path) -> list[str]:
    """Remove what an interrupted run left directly in ``folder``: our temp files and scratch
    folders, and ``*.incomplete`` download blobs. Returns their names. Only call it when no job
    uses the folder (start-up, or the fetch worker's own folder)."""
    removed: list[str] = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (is_temp_name(entry.name) or entry.name.endswith(".incomplete")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
