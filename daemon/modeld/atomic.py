"""Atomic publishing: nothing half-written is ever visible under a final name.

Write to a unique temp file in the destination folder, fsync it, ``os.replace`` it over the final
name, fsync the folder (the pattern of huggingface_hub's ``_download_to_tmp_and_move``). Used by
the store (manifest, config) and by the workers (downloads, variants). Temp names start with
``TEMP_PREFIX`` so the watcher ignores them and start-up clean-up finds them.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from .errors import DiskFullError

TEMP_PREFIX = ".modeld-tmp-"
WORK_PREFIX = ".modeld-work-"


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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(temp: Path, final: Path) -> None:
    """fsync ``temp``, rename it over ``final``, fsync the folder. ``temp`` must be beside ``final``."""
    if temp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"temp {temp} is not in the folder of {final}")
    fsync_file(temp)
    os.replace(temp, final)
    fsync_dir(final.parent)


def write_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically; a full disk raises ``DiskFullError``, leaves no temp."""
    temp = temp_path_for(final)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        fsync_dir(final.parent)
    except OSError as e:
        _unlink_quietly(temp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(f"no space left writing {final.name}", path=str(final),
                                hint="free disk space; the previous file keeps serving") from e
        raise


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
