"""The catalog file on disk: read it safely, and keep the last good ``Catalog``.

The runner owns a ``CatalogKeeper`` and calls ``reload()`` on every wake-up (the reconciler, in a
thread); the one-shot commands call ``load_catalog``. Reading is the only I/O of the catalog:
the parsing and validation it hands the bytes to (``modeld.catalog``) are pure.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import structlog

from .catalog import (EMPTY, MAX_CATALOG_BYTES, Catalog, CatalogMemo, catalog_from_bytes,
                      catalog_signature, keep_last_good)
from .errors import CatalogError

log = structlog.get_logger(__name__)


def _file_error(path: Path, message: str, hint: str | None = None) -> CatalogError:
    return CatalogError(message, path=str(path), hint=hint)


def read_catalog_bytes(path: Path) -> bytes:
    """The catalog file's bytes; every way of not being a readable small file is a CatalogError."""
    try:
        # O_NONBLOCK: a FIFO put in the catalog's place must not hang the daemon in open()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as e:
        raise _file_error(path, "file not found",
                          hint="create it (an empty file is an empty catalog)") from e
    except OSError as e:
        raise _file_error(path, f"cannot open: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _file_error(path, "is a directory; expected a TOML file")
        if not stat.S_ISREG(st.st_mode):
            raise _file_error(path, "is not a regular file; expected a TOML file")
        if st.st_size > MAX_CATALOG_BYTES:
            raise _too_large(path)
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_CATALOG_BYTES:  # it grew after fstat
                raise _too_large(path)
        return b"".join(chunks)
    except OSError as e:
        raise _file_error(path, f"cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _too_large(path: Path) -> CatalogError:
    return _file_error(path, f"larger than {MAX_CATALOG_BYTES // (1024 * 1024)} MiB",
                       hint="a catalog is a short list of models; check the path")


def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog at ``path``; raises ``CatalogError`` for file-level problems."""
    path = Path(path)
    return catalog_from_bytes(read_catalog_bytes(path), path=str(path),
                              base_dir=path.absolute().parent)


class CatalogKeeper:
    """Keeps the last good catalog: a catalog that fails to parse or validate never replaces it."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._base_dir = self._path.absolute().parent
        self._current: Catalog = EMPTY
        self._error: CatalogError | None = None
        #: sha256 of the bytes of the latest attempt, good or bad (None: nothing read)
        self._seen_digest: str | None = None
        self._memo = CatalogMemo()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Catalog:
        return self._current

    @property
    def error(self) -> CatalogError | None:
        return self._error

    def reload(self) -> bool:
        """Re-read the file; True if ``current`` changed. Only hashes when the bytes are the same."""
        try:
            raw = read_catalog_bytes(self._path)
        except CatalogError as e:
            # Not logged here: the reconciler logs a file-level error once, with what it keeps.
            self._seen_digest, self._error = None, e
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._seen_digest:
            return False
        self._seen_digest = digest
        try:
            fresh = catalog_from_bytes(raw, path=str(self._path), base_dir=self._base_dir,
                                       memo=self._memo)
        except CatalogError as e:
            self._error = e
            return False
        merged = keep_last_good(fresh, self._current)
        changed = catalog_signature(merged) != catalog_signature(self._current)
        self._current, self._error = merged, None
        log.info("catalog_loaded", path=str(self._path), models=len(merged.entries),
                 errors=len(merged.errors), digest=merged.digest[:12], changed=changed)
        for error in merged.errors:
            log.warning("catalog_entry_error", stale=_is_stale(merged, error), **error.fields())
        return changed



def _is_stale(catalog: Catalog, error: CatalogError) -> bool:
    entry = catalog.entries.get(error.name) if error.name else None
    return entry is not None and entry.stale_error is error
