"""Typed errors of the daemon: the exception's type carries the decision (retry or not).

Every module raises these (converting library errors at the edge with ``raise ... from e``);
the CLI prints ``str(error)`` as one line, the log gets ``error.fields()``. Errors cross the
worker-process boundary, so every class here must pickle (see ``__reduce__``).
"""

from __future__ import annotations

from typing import Any


def first_line(error: BaseException, limit: int = 300) -> str:
    """A library error as one short line for a message of ours: its first line, or its type's
    name when it says nothing (onnx and onnxruntime errors run to pages)."""
    text = str(error).strip()
    return (text.splitlines()[0].strip() if text else type(error).__name__)[:limit]


class ModeldError(Exception):
    """Root of the daemon's errors: one line for the user, structured fields for the log.

    ``entry`` names the catalog entry (model name) the error belongs to, ``hint`` says what to do.
    """

    def __init__(self, message: str, *, entry: str | None = None, hint: str | None = None,
                 **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.entry = entry
        self.hint = hint
        self.extra = fields

    def __str__(self) -> str:
        head = f"{self.entry}: {self.message}" if self.entry else self.message
        return f"{head} ({self.hint})" if self.hint else head

    def fields(self) -> dict[str, Any]:
        """Structured log fields (``log.error("...", **err.fields())``)."""
        out: dict[str, Any] = {"error": self.message, "error_type": type(self).__name__}
        if self.entry:
            out["entry"] = self.entry
        if self.hint:
            out["hint"] = self.hint
        out.update(self.extra)
        return out

    def __reduce__(self):  # keyword-only constructors do not pickle by default
        return (_rebuild, (type(self), self.message, self.entry, self.hint, self.extra,
                           self._state()))

    def _state(self) -> dict[str, Any]:
        return {}


def _rebuild(cls, message, entry, hint, extra, state):
    err = cls.__new__(cls)
    ModeldError.__init__(err, message, entry=entry, hint=hint, **extra)
    err.__dict__.update(state)
    return err


class TemporaryError(ModeldError):
    """Worth retrying later: a hub hiccup, a full disk, a crashed worker."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s

    def _state(self) -> dict[str, Any]:
        return {"retry_after_s": self.retry_after_s}


class PermanentError(ModeldError):
    """Retrying cannot help until an input changes (the catalog, the upstream file, the model)."""


class UsageError(PermanentError, ValueError):
    """Bad command-line use (exit code 2)."""


class CatalogError(PermanentError, ValueError):
    """The catalog (or one entry of it) does not parse or validate.

    ``path``, ``index`` and ``field`` locate the problem; ``str()`` is one line such as
    ``model_catalog.toml: models[2] (yolov8n).quantize.method: unknown method 'int4'; expected one of ...``.
    """

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None,
                 name: str | None = None, field: str | None = None, **kw: Any) -> None:
        super().__init__(message, entry=name, **kw)
        self.path = path
        self.index = index
        self.name = name
        self.field = field

    def __str__(self) -> str:
        where = self.path or "catalog"
        if self.index is not None:
            where += f": models[{self.index}]"
            if self.name:
                where += f" ({self.name})"
        if self.field:
            where += ("." if self.index is not None else ": ") + self.field
        text = f"{where}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        out.update({k: v for k, v in (("path", self.path), ("index", self.index),
                                      ("field", self.field)) if v is not None})
        return out

    def _state(self) -> dict[str, Any]:
        return {"path": self.path, "index": self.index, "name": self.name, "field": self.field}


class HubError(ModeldError):
    """Base of errors talking to the Hub."""


class HubUnavailableError(HubError, TemporaryError):
    """Connection refused or reset, timeout, 5xx, a body cut short: retry with backoff."""


class HubNotFoundError(HubError, PermanentError):
    """Repo, revision or file does not exist (404)."""


class HubAuthError(HubError, PermanentError):
    """401/403: the repo is private or gated; set HF_TOKEN."""


class HubOfflineError(HubError, PermanentError):
    """Offline (HF_HUB_OFFLINE) and the wanted file is not already here: nothing to retry until
    the daemon may reach the Hub again."""


class IntegrityError(TemporaryError):
    """A file's content does not match its expected digest or size."""


class FileVanishedError(TemporaryError):
    """A file the job was reading disappeared under it (deleted, or renamed over); the next scan
    sees what changed, and the job is retried."""


class DiskFullError(TemporaryError):
    """Not enough free space for the write; retried once space returns."""


class StoreWriteError(TemporaryError):
    """The disk refused a write (read-only, I/O error); retried, the previous files keep serving."""


class StoreUnavailableError(TemporaryError):
    """models/ itself cannot be used (not a folder, unreadable): nothing is scanned or written
    until it can; the daemon keeps running and says why."""


class ManifestError(ModeldError, ValueError):
    """A manifest.json that does not parse or has the wrong shape: that model's files are
    verified again (or pulled again), the daemon goes on."""


class StoreError(PermanentError):
    """A file in the store is unusable or unsafe (hostile path, unreadable, not a model)."""


class StoreLockedError(PermanentError):
    """Another daemon already manages this models directory."""


class QuantizeError(PermanentError):
    """Quantization failed for this model with this method and options."""


class VerifyError(PermanentError):
    """A variant failed its proof (checker, load, run, agreement or speed)."""


class WorkerCrashedError(TemporaryError):
    """The worker process died (signal, out of memory) before it returned."""


class WorkerTimeoutError(TemporaryError):
    """The worker process ran past its time limit and was killed."""


class RuntimeUnavailableError(PermanentError):
    """The node runtime mapped to a provider (``MODELD_RUNTIMES``) is missing, broken or lacks
    the provider: proofs on that provider fail with this one line until the runtime is fixed
    (the daemon asks it again at every resync and SIGHUP), and the other providers go on."""
