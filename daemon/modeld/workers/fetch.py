"""Pull one catalog entry from the Hub into ``models/<name>/``: model.onnx, labels.txt, config.json.

Run by ``modeld.jobs.JobRunner`` in a spawn worker (``modeld.workers.fetch:fetch_model``); the
reconciler builds the ``FetchRequest`` and records the returned ``FileRecord``s in the manifest.
A revision is resolved to a commit first (one HEAD); a file already here at that commit and ETag
is neither downloaded nor hashed. Downloads land in a private scratch folder inside the model
folder, are checked against the ETag's sha256 and the ONNX checker, then renamed into place.

Retries, measured with huggingface_hub 2.4 against ``modeld.testing.hub``: our HEAD does not
retry by itself, so a hub that is down costs ``attempts`` quick failures plus the backoff. Inside
one download attempt the client re-GETs a body that fails without progress up to 5 times, 1 s
apart (resuming with Range past each 10 MiB chunk), and retries its own HEAD (the one after ours)
up to 5 times over 23 s. Per file: at most ``attempts`` HEADs of ours, then ``attempts``
downloads of at most 6 HEADs and 6 GETs each (a body that keeps progressing past 10 MiB chunks
may resume more often). A 5xx on a GET, a reset and a digest mismatch end a download at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import httpx2
import structlog
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

from ..atomic import (WORK_PREFIX, publish_file, read_regular, real_folder, sha256_file,
                      temp_path_for, write_atomic)
from ..errors import (DiskFullError, HubAuthError, HubNotFoundError, HubOfflineError,
                      HubUnavailableError, IntegrityError, ModeldError, StoreError)
from ..errors import first_line as _one_line
from ..layout import CONFIG_FILE, LABELS_FILE
from ..layout import FP32_FILE as MODEL_FILE
from ..manifest import FileRecord, Provenance
from ..progress import bytes_detail
from ..work import FetchRequest, FetchResult, ProgressFn
from .describe import NotAnOnnxModel, describe_model

log = structlog.get_logger(__name__)

#: the longest single wait between two attempts, whatever the attempt number
BACKOFF_CAP_S = 30.0
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


@dataclass(frozen=True)
class _Remote:
    """One file as the Hub describes it at the resolved commit."""

    local_name: str
    path: str               # inside the repo
    commit: str
    etag: str
    size: int | None

    def provenance(self, request: FetchRequest) -> Provenance:
        return Provenance(request.repo, self.path, request.revision, self.commit, self.etag)


class _LocalFile:
    """A file of the model folder, hashed at most once and only when its stat is not trusted."""

    __slots__ = ("path", "known", "stat", "_sha256")

    def __init__(self, path: Path, known: FileRecord | None) -> None:
        self.path = path
        self.known = known
        try:
            self.stat: os.stat_result | None = os.stat(path)
        except OSError:   # missing, or a dangling/looping symlink: nothing usable is here
            self.stat = None
        self._sha256: str | None = None

    @property
    def exists(self) -> bool:
        return self.stat is not None

    @property
    def sha256(self) -> str | None:
        """None when the file cannot be read: it is then simply downloaded over."""
        if self._sha256 is None:
            if self.known is not None and self.known.stat_matches(self.stat):
                self._sha256 = self.known.sha256   # the stat triple vouches for it: no read
            else:
                try:
                    self._sha256 = sha256_file(self.path)
                except OSError as e:
                    log.warning("local_file_unreadable", file=str(self.path), error=str(e))
                    self._sha256 = ""
        return self._sha256 or None

    def intact(self) -> bool:
        """Present and still the content its known record describes."""
        return self.exists and self.known is not None and self.sha256 == self.known.sha256

    def record(self, provenance: Provenance | None) -> FileRecord:
        st, sha256 = self.stat, self.sha256
        assert st is not None and sha256 is not None
        return FileRecord(self.path.name, sha256, st.st_size, st.st_mtime_ns, st.st_ino,
                          provenance=provenance)


# ------------------------------------------------------------------------------------------------
# Entry point


def fetch_model(request: FetchRequest, progress: ProgressFn) -> FetchResult:
    """Make ``request.model_dir`` hold the entry's current files; see the module docstring."""
    model_dir = _model_dir(request)
    targets = {MODEL_FILE: request.filename}
    if request.labels:
        targets[LABELS_FILE] = request.labels
    for repo_path in targets.values():
        _check_repo_path(request, repo_path)
    local = {name: _LocalFile(model_dir / name, request.known.get(name)) for name in targets}

    remotes = _remotes_without_hub(request, targets, local)
    if remotes is None:
        if request.offline:
            raise HubOfflineError(
                f"offline, and {request.repo}@{request.revision or 'main'} "
                f"({', '.join(targets.values())}) is not here", entry=request.name,
                repo=request.repo,
                hint="unset HF_HUB_OFFLINE or place the files with `mecha10-modeld pull` online")
        progress(0.0, f"resolving {request.repo}@{request.revision or 'main'}")
        remotes = _resolve_remotes(request, targets)

    records: dict[str, FileRecord] = {}
    to_download: list[_Remote] = []
    for name, remote in remotes.items():
        record = _reuse_or_adopt(request, local[name], remote)
        if record is None:
            to_download.append(remote)
        else:
            records[name] = record

    downloaded_bytes = 0
    description = None
    if to_download:
        staged, description = _download_all(request, model_dir, to_download, progress)
        for remote in to_download:
            records[remote.local_name] = staged[remote.local_name]
            downloaded_bytes += staged[remote.local_name].size
    dropped_labels = not request.labels and _drop_stale_labels(request, model_dir)

    commit = remotes[MODEL_FILE].commit
    progress(0.97, "writing config.json")
    records[CONFIG_FILE] = _write_config(request, model_dir, commit, records, description)
    ordered = tuple(records[n] for n in (MODEL_FILE, LABELS_FILE, CONFIG_FILE) if n in records)
    changed = (bool(downloaded_bytes) or dropped_labels
               or any(request.known.get(r.name) != r for r in ordered))
    log.info("fetched", entry=request.name, repo=request.repo, commit=commit, changed=changed,
             downloaded_bytes=downloaded_bytes)
    progress(1.0, "up to date" if not changed else f"published {request.repo}@{commit[:7]}")
    return FetchResult(files=ordered, commit=commit, downloaded_bytes=downloaded_bytes,
                       changed=changed)


# ------------------------------------------------------------------------------------------------
# Deciding what is needed


def _model_dir(request: FetchRequest) -> Path:
    folder = Path(request.model_dir)
    if not folder.is_absolute():
        raise StoreError(f"model folder {request.model_dir!r} is not an absolute path",
                         entry=request.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # models/<name> itself must be a real folder: a symlink in its place is never written
    # through (the daemon moves it aside); resolve() would follow it out of models/
    real_folder(folder, create=True)
    return folder


def _check_repo_path(request: FetchRequest, repo_path: str) -> None:
    """A path inside the repo must stay inside it: no absolute, ``..``, backslash or NUL."""
    parts = repo_path.split("/")
    if (not repo_path or repo_path.startswith("/") or "\\" in repo_path or "\0" in repo_path
            or any(p in ("", ".", "..") for p in parts)):
        raise StoreError(f"unsafe file path {repo_path!r} in {request.repo}", entry=request.name,
                         repo=request.repo, hint="fix filename/labels in model_catalog.toml")


def _remotes_without_hub(request: FetchRequest, targets: Mapping[str, str],
                         local: Mapping[str, _LocalFile]) -> dict[str, _Remote] | None:
    """The known provenance, when it answers the request without asking the Hub: the revision
    is the very commit we have (or we are offline and have what this revision last gave)."""
    pinned = request.revision if request.revision and _COMMIT_RE.match(request.revision) else None
    if not pinned and not request.offline:
        return None
    remotes = {}
    for name, repo_path in targets.items():
        known = request.known.get(name)
        prov = known.provenance if known else None
        if prov is None or (prov.repo, prov.filename) != (request.repo, repo_path):
            return None
        same_revision = (prov.commit == pinned if pinned
                         else (prov.revision or "main") == (request.revision or "main"))
        if not same_revision or not local[name].intact():
            return None
        remotes[name] = _Remote(name, repo_path, prov.commit, prov.etag, known.size)
    if len({r.commit for r in remotes.values()}) != 1:
        return None
    return remotes


def _resolve_remotes(request: FetchRequest, targets: Mapping[str, str]) -> dict[str, _Remote]:
    """HEAD the model at the requested revision, then the labels at the commit it resolved to,
    so both files come from one snapshot."""
    model = _retrying(request, MODEL_FILE, lambda: _head(request, MODEL_FILE, request.filename,
                                                         request.revision))
    remotes = {MODEL_FILE: model}
    if LABELS_FILE in targets:
        remotes[LABELS_FILE] = _retrying(request, LABELS_FILE, lambda: _head(
            request, LABELS_FILE, targets[LABELS_FILE], model.commit))
    log.info("fetch_resolved", entry=request.name, repo=request.repo,
             revision=request.revision or "main", commit=model.commit)
    return remotes


def _reuse_or_adopt(request: FetchRequest, local: _LocalFile, remote: _Remote) -> FileRecord | None:
    """The record of the file already here if it is what the Hub serves, else None (download).

    Same provenance and intact: kept as is. Otherwise, content equal to the ETag (a branch that
    moved without touching this file, or a crash between publish and manifest write): adopted
    with the new provenance, without a download.
    """
    if not local.exists:
        return None
    provenance = remote.provenance(request)
    known_prov = local.known.provenance if local.known else None
    if known_prov is not None and local.intact() and (
            (known_prov.repo, known_prov.filename, known_prov.commit, known_prov.etag)
            == (request.repo, remote.path, remote.commit, remote.etag)):
        if known_prov == provenance and local.known.stat_matches(local.stat):
            return local.known
        return local.record(provenance)
    if _matches_etag(local.path, local.sha256, remote.etag):
        log.info("fetch_adopted", entry=request.name, file=local.path.name, commit=remote.commit)
        return local.record(provenance)
    return None


def _matches_etag(path: Path, sha256: str | None, etag: str) -> bool:
    """LFS files carry their sha256 as ETag; plain git files carry the git blob sha1."""
    if sha256 is None:
        return False
    if _SHA256_RE.match(etag):
        return sha256 == etag
    if _COMMIT_RE.match(etag):
        return _git_blob_sha1(path) == etag
    return False   # an ETag we cannot check proves nothing: download


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Talking to the Hub (every library error is converted here, at the edge)


def _head(request: FetchRequest, local_name: str, repo_path: str, revision: str | None) -> _Remote:
    with _hub_errors(request, repo_path, revision):
        url = hf_hub_url(request.repo, repo_path, revision=revision, endpoint=request.endpoint)
        meta = get_hf_file_metadata(url, token=request.token, timeout=request.timeout_s,
                                    endpoint=request.endpoint)
    if not meta.commit_hash or not meta.etag:
        raise HubUnavailableError(f"{url} answered without a commit or ETag", entry=request.name,
                                  hint="check that HF_ENDPOINT points to a Hub")
    return _Remote(local_name, repo_path, meta.commit_hash, meta.etag, meta.size)


def _retrying(request: FetchRequest, what: str, call: Callable[[], T]) -> T:
    """Call ``call`` up to ``request.attempts`` times while it fails with a temporary Hub or
    integrity error, sleeping with exponential backoff and full jitter in between."""
    attempts = max(1, request.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (HubUnavailableError, IntegrityError) as e:
            if attempt >= attempts:
                raise
            delay_s = random.uniform(0, min(BACKOFF_CAP_S, request.backoff_base_s * 2 ** (attempt - 1)))
            log.warning("fetch_retry", **{**e.fields(), "file": what, "attempt": attempt,
                                          "attempts": attempts, "delay_s": round(delay_s, 3)})
            time.sleep(delay_s)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _hub_errors(request: FetchRequest, repo_path: str, revision: str | None) -> Iterator[None]:
    """Convert huggingface_hub, httpx2 and OS errors into the daemon's typed errors."""
    where = f"{request.repo}@{revision or 'main'}:{repo_path}"
    fields: dict[str, Any] = {"entry": request.name, "repo": request.repo, "file": repo_path,
                              "revision": revision or "main"}
    fix = "fix repo/revision/filename in model_catalog.toml"
    try:
        yield
    except ModeldError:
        raise
    except hf_errors.GatedRepoError as e:
        raise HubAuthError(f"{request.repo} is gated and this token has no access", **fields,
                           hint="accept the repo's terms on the Hub and set HF_TOKEN") from e
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"{request.repo} refused access (HTTP {status})", **fields,
                               hint="set HF_TOKEN to a token that may read this repo") from e
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            raise HubNotFoundError(f"repository {request.repo} not found", **fields, hint=fix) from e
        if isinstance(e, hf_errors.RevisionNotFoundError):
            raise HubNotFoundError(f"revision {revision or 'main'} not found in {request.repo}",
                                   **fields, hint=fix) from e
        if isinstance(e, hf_errors.RemoteEntryNotFoundError) or status == 404:
            raise HubNotFoundError(f"{where} not found", **fields, hint=fix) from e
        raise HubUnavailableError(f"hub answered HTTP {status} for {where}", **fields,
                                  status=status, hint="retried with backoff") from e
    except hf_errors.OfflineModeIsEnabled as e:
        raise HubOfflineError(f"offline (HF_HUB_OFFLINE) while fetching {where}", **fields,
                              hint="unset HF_HUB_OFFLINE") from e
    except hf_errors.HFValidationError as e:
        raise HubNotFoundError(f"not a valid repo id or revision: {where}", **fields, hint=fix) from e
    except (httpx2.HTTPError, hf_errors.LocalEntryNotFoundError, hf_errors.FileMetadataError) as e:
        raise HubUnavailableError(f"hub unreachable for {where}: {_one_line(e)}", **fields,
                                  hint="retried with backoff; check the network or HF_ENDPOINT") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(f"no space left downloading {where}", **fields,
                                hint="free disk space; the previous files keep serving") from e
        if "Consistency check failed" in str(e):   # the client's size check after a short body
            raise IntegrityError(f"download of {where} came short: {_one_line(e)}",
                                 **fields) from e
        raise


@contextlib.contextmanager
def _download_timeout(timeout_s: float) -> Iterator[None]:
    """huggingface_hub reads the GET timeout from a module constant at call time (there is no
    parameter); set it for this call only."""
    saved = hf_constants.HF_HUB_DOWNLOAD_TIMEOUT
    hf_constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout_s
    try:
        yield
    finally:
        hf_constants.HF_HUB_DOWNLOAD_TIMEOUT = saved


class _ByteProgress:
    """Stands in for tqdm in ``hf_hub_download(tqdm_class=...)``: forwards bytes received."""

    __slots__ = ("_report", "_done")

    def __init__(self, *, report: Callable[[int], None], initial: int = 0, **_tqdm_kwargs) -> None:
        self._report = report
        self._done = initial

    def __enter__(self) -> "_ByteProgress":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        self._done += n
        self._report(self._done)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Downloading, checking, publishing


def _download_all(request: FetchRequest, model_dir: Path, remotes: list[_Remote],
                  progress: ProgressFn) -> tuple[dict[str, FileRecord], dict[str, Any] | None]:
    """Download every file into one scratch folder, check them all, then publish them all:
    a bad file stops the pull before anything under a final name changes."""
    scratch = model_dir / f"{WORK_PREFIX}{uuid.uuid4().hex[:12]}"
    scratch.mkdir()
    try:
        total = sum(r.size or 0 for r in remotes) or 1
        done_before = 0
        staged: dict[str, tuple[Path, str]] = {}
        for remote in remotes:
            _check_free_space(request, model_dir, remote)

            def report(done: int, base: int = done_before, name: str = remote.local_name) -> None:
                progress(0.05 + 0.9 * min(1.0, (base + done) / total),
                         bytes_detail(f"downloading {name}", base + done, total))

            staged[remote.local_name] = _retrying(
                request, remote.local_name,
                lambda: _download_one(request, scratch, remote, report))
            done_before += remote.size or 0
        description = None
        if MODEL_FILE in staged:
            description = _describe_or_refuse(request, staged[MODEL_FILE][0],
                                              remotes[0].commit)
        records = {}
        for remote in remotes:
            path, sha256 = staged[remote.local_name]
            records[remote.local_name] = _publish(model_dir, path, remote, sha256, request)
        return records, description
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_free_space(request: FetchRequest, model_dir: Path, remote: _Remote) -> None:
    if remote.size is None:
        return
    free = shutil.disk_usage(model_dir).free
    if free < remote.size:
        raise DiskFullError(f"{remote.local_name} needs {remote.size} bytes, {free} free in "
                            f"{model_dir}", entry=request.name, needed_bytes=remote.size,
                            free_bytes=free, hint="free disk space; the previous files keep serving")


def _download_one(request: FetchRequest, scratch: Path, remote: _Remote,
                  report: Callable[[int], None]) -> tuple[Path, str]:
    """One attempt: download at the resolved commit into a fresh cache folder, check the
    digest, and move the blob to ``scratch/<local name>``. Returns (path, sha256)."""
    cache_dir = scratch / f"attempt-{uuid.uuid4().hex[:8]}"
    try:
        with _hub_errors(request, remote.path, remote.commit), _download_timeout(request.timeout_s):
            pointer = hf_hub_download(
                request.repo, remote.path, revision=remote.commit, cache_dir=cache_dir,
                endpoint=request.endpoint, token=request.token, etag_timeout=request.timeout_s,
                tqdm_class=functools.partial(_ByteProgress, report=report))
        blob = Path(pointer).resolve()
        if not blob.is_relative_to(cache_dir.resolve()) or not blob.is_file():
            raise StoreError(f"download of {remote.path} landed outside its scratch folder",
                             entry=request.name, path=str(blob))
        sha256 = sha256_file(blob)
        if not _matches_etag(blob, sha256, remote.etag):
            raise IntegrityError(
                f"{remote.path} from {request.repo}@{remote.commit[:7]} does not match its ETag "
                f"{remote.etag[:12]}… (got sha256 {sha256[:12]}…)", entry=request.name,
                repo=request.repo, file=remote.path, hint="retried; the previous files keep serving")
        staged = scratch / remote.local_name
        os.replace(blob, staged)
        return staged, sha256
    finally:
        # a failed attempt's blob must not be found as "already cached" by the next attempt
        shutil.rmtree(cache_dir, ignore_errors=True)


def _describe_or_refuse(request: FetchRequest, path: Path, commit: str) -> dict[str, Any]:
    try:
        described = describe_model(path)
    except NotAnOnnxModel as e:
        raise StoreError(f"{MODEL_FILE} from {request.repo}@{commit[:7]} is not an ONNX model: {e}",
                         entry=request.name, repo=request.repo, commit=commit,
                         hint="point filename in model_catalog.toml at an .onnx file") from e
    return {"inputs": [t.to_dict() for t in described.inputs],
            "outputs": [t.to_dict() for t in described.outputs], "opset": described.opset}


def _publish(model_dir: Path, staged: Path, remote: _Remote, sha256: str,
             request: FetchRequest) -> FileRecord:
    """Rename the staged file beside its final name, then atomically over it (no copy)."""
    final = model_dir / remote.local_name
    if final.parent != model_dir:
        raise StoreError(f"refusing to write {final} outside {model_dir}", entry=request.name)
    temp = temp_path_for(final)
    os.replace(staged, temp)
    publish_file(temp, final)
    st = os.stat(final)
    log.info("fetch_published", entry=request.name, file=remote.local_name, size_bytes=st.st_size,
             commit=remote.commit, sha256=sha256)
    return FileRecord(remote.local_name, sha256, st.st_size, st.st_mtime_ns, st.st_ino,
                      provenance=remote.provenance(request))


def _drop_stale_labels(request: FetchRequest, model_dir: Path) -> bool:
    """The entry no longer names labels: remove a labels.txt we published before."""
    if LABELS_FILE not in request.known:
        return False
    (model_dir / LABELS_FILE).unlink(missing_ok=True)
    log.info("labels_removed", entry=request.name)
    return True


# ------------------------------------------------------------------------------------------------
# config.json


def _write_config(request: FetchRequest, model_dir: Path, commit: str,
                  records: Mapping[str, FileRecord], description: dict[str, Any] | None) -> FileRecord:
    """Write config.json when its content would change; reuse what the current one already
    says about an unchanged model and labels, so a no-op pull never parses the model."""
    final = model_dir / CONFIG_FILE
    current_raw, current = _read_config(final)
    model, labels = records[MODEL_FILE], records.get(LABELS_FILE)
    files = {r.name: {"sha256": r.sha256, "size": r.size} for r in (model, labels) if r}
    same_model = current.get("files", {}).get(MODEL_FILE) == files[MODEL_FILE]
    if description is None:
        if same_model and all(k in current for k in ("inputs", "outputs", "opset")):
            description = {k: current[k] for k in ("inputs", "outputs", "opset")}
        else:
            description = _describe_local(request, model_dir / MODEL_FILE, commit, model.sha256)
    labels_count = None
    if labels is not None:
        if current.get("files", {}).get(LABELS_FILE) == files[LABELS_FILE] \
                and isinstance(current.get("labels_count"), int):
            labels_count = current["labels_count"]
        else:
            labels_count = _count_labels(model_dir / LABELS_FILE)
    doc = {"name": request.name, "task": request.task, "description": request.description,
           "preprocessing_preset": request.preprocessing_preset, "input_size": request.input_size,
           "labels_count": labels_count, **description,
           "source": {"repo": request.repo, "filename": request.filename, "commit": commit},
           "files": files}
    raw = (json.dumps(doc, indent=2) + "\n").encode()
    known = request.known.get(CONFIG_FILE)
    if raw != current_raw:
        write_atomic(final, raw)
        log.info("config_written", entry=request.name)
    elif known is not None and known.stat_matches(os.stat(final)) \
            and known.sha256 == hashlib.sha256(raw).hexdigest():
        return known
    st = os.stat(final)
    # the reconciler sets config.json's derivation; keep it while the content is the same
    derivation = known.derivation if known is not None and raw == current_raw else None
    return FileRecord(CONFIG_FILE, hashlib.sha256(raw).hexdigest(), st.st_size, st.st_mtime_ns,
                      st.st_ino, provenance=None, derivation=derivation)


def _describe_local(request: FetchRequest, path: Path, commit: str, sha256: str) -> dict[str, Any]:
    """Describe the model already here. It parsed when it was published: if it no longer does
    and its bytes are not the recorded ones, it was damaged here meanwhile (a local fault the
    next pass repairs by downloading again), not an upstream file that is not ONNX."""
    try:
        return _describe_or_refuse(request, path, commit)
    except StoreError as e:
        try:
            changed = sha256_file(path) != sha256
        except OSError:
            changed = True
        if not changed:
            raise
        raise IntegrityError(f"{MODEL_FILE} changed on disk while config.json was written",
                             entry=request.name, path=str(path),
                             hint="retried; the file is pulled again") from e


#: a config.json we write is a few KiB: anything larger is not ours, and is not read
MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> tuple[bytes | None, dict[str, Any]]:
    """The current config.json, if it is a regular file of ours; a FIFO, a device, a symlink
    (to /dev/zero...) or a huge file is treated as absent and replaced, never read."""
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
        doc = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None, {}
    return raw, doc if isinstance(doc, dict) else {}


def _count_labels(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
