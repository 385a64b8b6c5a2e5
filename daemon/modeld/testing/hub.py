"""A small Hugging Face Hub server on 127.0.0.1 for tests, the demo and the benchmarks.

``HubStore`` keeps repos as immutable commits in a folder; ``LocalHub`` serves them with the
``/resolve`` endpoints huggingface_hub's ``hf_hub_download`` uses, takes uploads the way
``HfApi.create_repo`` and ``create_commit`` send them (preupload, LFS batch/upload/verify, the
NDJSON commit: all or nothing, 412 on a stale parent, writes only with a token in
``write_tokens``), and injects faults on request (``hub.faults.add("cut", "*model.onnx",
times=2)``) so retry paths are tested for real.
Run it standalone with ``python -m modeld.testing.hub --root DIR --port N``.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Iterator, Mapping
from urllib.parse import quote, unquote, urlsplit

CHUNK_BYTES = 256 * 1024
#: where ``cdn_redirects`` sends downloads: /_cdn/{repo id, %-encoded}/{sha256}/{path}
CDN_PREFIX = "/_cdn/"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

#: fault kinds ``FaultPlan.add`` accepts; the last three only apply to a GET's body (or a HEAD's
#: announced size for ``wrong_size``)
FAULT_KINDS = ("status_500", "status_503", "not_found", "reset", "stall", "cut", "wrong_size",
               "corrupt")
_BODY_FAULTS = ("cut", "corrupt")


class HubStoreError(ValueError):
    """Bad use of the store in a test (unknown repo, unsafe name)."""


class StaleParentError(HubStoreError):
    """A commit named a parent that is no longer its branch's head."""


# --------------------------------------------------------------------------------------------
# Storage: root/<owner>/<name>/{repo.json, refs.json, commits/<sha>.json, objects/<sha256>}


@dataclass(frozen=True)
class RepoAccess:
    """Who may read a repo: ``private`` needs one of ``tokens``; ``gated`` answers 403 to others."""

    private: bool = False
    gated: bool = False
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlobInfo:
    """One file of a commit, as the server needs it."""

    path: str
    sha256: str
    size: int
    blob: Path


class HubStore:
    """Hub repos in a folder: commits are immutable snapshots; branches and tags point to commits.

    ``commit(repo_id, {"model.onnx": data})`` keeps every file of the parent commit it does not
    name (``None`` deletes one); contents are stored once, by sha256.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- writing (tests and the demo) ----

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False,
                    tokens: tuple[str, ...] | list[str] = ()) -> None:
        """Create ``repo_id`` (or change its access). Idempotent."""
        folder = self._repo_dir(repo_id)
        (folder / "commits").mkdir(parents=True, exist_ok=True)
        (folder / "objects").mkdir(exist_ok=True)
        _write_json(folder / "repo.json", {"private": private, "gated": gated,
                                           "tokens": list(tokens)})
        if not (folder / "refs.json").exists():
            _write_json(folder / "refs.json", {"branches": {}, "tags": {}})

    def commit(self, repo_id: str, files: Mapping[str, bytes | os.PathLike[str] | None], *,
               branch: str = "main", message: str = "") -> str:
        """Record a new commit on ``branch`` (created if missing) and return its 40-hex sha.

        Values are the bytes of a file, a path to copy it from (streamed, for big files), or
        ``None`` to delete the file in this commit.
        """
        folder = self._repo_dir(repo_id)
        if not (folder / "repo.json").exists():
            self.create_repo(repo_id)
        for path in files:
            _check_repo_path(path)
        stored = {path: None if content is None else self._store_object(folder, content)
                  for path, content in files.items()}
        return self.commit_objects(repo_id, stored, branch=branch, message=message)

    def commit_objects(self, repo_id: str, changes: Mapping[str, str | None], *,
                       branch: str = "main", message: str = "", parent_commit: str | None = None,
                       deleted_folders: tuple[str, ...] = ()) -> str:
        """Commit objects already stored (path -> sha256, ``None`` deletes) on ``branch``, all or
        nothing: the commit and the branch move are written only once every object is there,
        and the branch moves by one atomic rename. With ``parent_commit``, raise
        ``StaleParentError`` unless it is still the branch's head (what the Hub answers 412 to).
        """
        folder = self._repo_dir(repo_id)
        for path in [*changes, *deleted_folders]:
            _check_repo_path(path)
        missing = [p for p, sha in changes.items()
                   if sha is not None and self.object(repo_id, sha) is None]
        if missing:
            raise HubStoreError(f"no stored object for {', '.join(sorted(missing))}")
        with self._lock:
            refs = self._refs(folder)
            parent = refs["branches"].get(branch)
            if parent_commit is not None and parent_commit != parent:
                raise StaleParentError(f"{branch} is at {parent}, not {parent_commit}")
            tree = dict(self._commit_doc(folder, parent)["files"]) if parent else {}
            for prefix in deleted_folders:
                tree = {p: v for p, v in tree.items() if not p.startswith(prefix.rstrip("/") + "/")}
            for path, sha256 in changes.items():
                if sha256 is None:
                    tree.pop(path, None)
                else:
                    tree[path] = sha256
            doc = {"parent": parent, "branch": branch, "message": message,
                   "time_ns": time.time_ns(), "nonce": uuid.uuid4().hex, "files": tree}
            sha = hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()
            _write_json(folder / "commits" / f"{sha}.json", doc)
            refs["branches"][branch] = sha
            _write_json(folder / "refs.json", refs)
        return sha

    def store_object(self, repo_id: str, content: bytes | os.PathLike[str] | IO[bytes], *,
                     length: int | None = None, expected_sha256: str | None = None) -> str:
        """Store a content (bytes, a path, or ``length`` bytes of a stream) by its sha256, as an
        LFS upload does: stored contents are in no commit until one names them. A content whose
        sha256 is not ``expected_sha256`` is discarded (``HubStoreError``)."""
        return self._store_object(self._repo_dir(repo_id), content, length=length,
                                  expected_sha256=expected_sha256)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        """Point tag ``name`` at ``commit`` (moving it if it exists)."""
        self._set_ref(repo_id, "tags", name, commit)

    def set_branch(self, repo_id: str, name: str, commit: str) -> None:
        """Point branch ``name`` (e.g. ``refs/pr/1``) at ``commit``, e.g. to roll it back."""
        self._set_ref(repo_id, "branches", name, commit)

    # ---- reading (the server) ----

    def access(self, repo_id: str) -> RepoAccess | None:
        """The repo's access rules, or None when it does not exist."""
        try:
            doc = json.loads((self._repo_dir(repo_id) / "repo.json").read_text())
        except (FileNotFoundError, HubStoreError):
            return None
        return RepoAccess(private=doc["private"], gated=doc["gated"], tokens=tuple(doc["tokens"]))

    def resolve(self, repo_id: str, revision: str) -> str | None:
        """Branch, tag or full commit sha -> commit sha; None if unknown."""
        folder = self._repo_dir(repo_id)
        refs = self._refs(folder)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if _COMMIT_RE.match(revision) and (folder / "commits" / f"{revision}.json").exists():
            return revision
        return None

    def files(self, repo_id: str, commit: str) -> dict[str, str]:
        """path -> sha256 of every file in ``commit``."""
        return dict(self._commit_doc(self._repo_dir(repo_id), commit)["files"])

    def blob(self, repo_id: str, commit: str, path: str) -> BlobInfo | None:
        sha256 = self.files(repo_id, commit).get(path)
        return None if sha256 is None else self.object(repo_id, sha256, path)

    def object(self, repo_id: str, sha256: str, path: str = "") -> BlobInfo | None:
        """A stored content by its sha256 (what a CDN URL names), or None."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        blob = self._repo_dir(repo_id) / "objects" / sha256
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            return None
        return BlobInfo(path=path, sha256=sha256, size=size, blob=blob)

    # ---- internals ----

    def _repo_dir(self, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) not in (1, 2) or not all(_NAME_RE.match(p) and ".." not in p for p in parts):
            raise HubStoreError(f"not a valid repo id: {repo_id!r}")
        return self.root.joinpath(*parts)

    @staticmethod
    def _refs(folder: Path) -> dict:
        try:
            return json.loads((folder / "refs.json").read_text())
        except FileNotFoundError:
            return {"branches": {}, "tags": {}}

    @staticmethod
    def _commit_doc(folder: Path, commit: str) -> dict:
        try:
            return json.loads((folder / "commits" / f"{commit}.json").read_text())
        except FileNotFoundError:
            raise HubStoreError(f"unknown commit {commit} in {folder.name}") from None

    def _set_ref(self, repo_id: str, kind: str, name: str, commit: str) -> None:
        folder = self._repo_dir(repo_id)
        with self._lock:
            self._commit_doc(folder, commit)  # must exist
            refs = self._refs(folder)
            refs[kind][name] = commit
            _write_json(folder / "refs.json", refs)

    @staticmethod
    def _store_object(folder: Path, content: bytes | os.PathLike[str] | IO[bytes], *,
                      length: int | None = None, expected_sha256: str | None = None) -> str:
        objects = folder / "objects"
        temp = objects / f".incoming-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        try:
            with open(temp, "wb") as out:
                if isinstance(content, (bytes, bytearray, memoryview)):
                    digest.update(content)
                    out.write(content)
                elif hasattr(content, "read"):
                    for chunk in _chunks(content, length):
                        digest.update(chunk)
                        out.write(chunk)
                else:
                    with open(content, "rb") as src:
                        while chunk := src.read(1024 * 1024):
                            digest.update(chunk)
                            out.write(chunk)
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise HubStoreError(f"content has sha256 {sha256}, not {expected_sha256}")
            os.replace(temp, objects / sha256)
        finally:
            temp.unlink(missing_ok=True)
        return sha256


def _chunks(stream: IO[bytes], length: int | None) -> Iterator[bytes]:
    """``length`` bytes of ``stream`` (all of it when None), in chunks."""
    left = length
    while left is None or left > 0:
        chunk = stream.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
        if not chunk:
            if left:
                raise HubStoreError(f"the body ended {left} bytes early")
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _check_repo_path(path: str) -> None:
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubStoreError(f"not a valid path inside a repo: {path!r}")


def _write_json(path: Path, doc: dict) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(temp, path)


# --------------------------------------------------------------------------------------------
# Faults and the request log


@dataclass
class Fault:
    """One planned fault; ``remaining`` counts the requests it will still affect."""

    kind: str
    path_glob: str = "*"
    remaining: int = 1
    method: str | None = None         # "HEAD", "GET" or None for both
    seconds: float = 5.0              # stall: how long
    at_byte: int | None = None        # cut/stall/corrupt: absolute offset in the file
    extra_bytes: int = 1024           # wrong_size: how much more is announced than sent

    def applies_to(self, method: str, path: str) -> bool:
        if self.remaining <= 0 or (self.method and self.method != method):
            return False
        if method != "GET" and (self.kind in _BODY_FAULTS
                                or (self.kind == "stall" and self.at_byte is not None)):
            return False
        return fnmatch.fnmatchcase(path, self.path_glob)


class FaultPlan:
    """Faults to inject, consumed in the order they were added (thread-safe)."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, kind: str, path_glob: str = "*", times: int = 1, *, method: str | None = None,
            seconds: float = 5.0, at_byte: int | None = None, extra_bytes: int = 1024) -> Fault:
        """Affect the next ``times`` requests whose decoded URL path matches ``path_glob``.

        ``stall`` hangs ``seconds`` before the headers (then closes unanswered), or after
        ``at_byte`` bytes of the body (then goes on);
        ``cut`` closes the connection after ``at_byte`` (default: half the file) with the full
        Content-Length announced; ``wrong_size`` announces ``extra_bytes`` more than it sends
        (HEAD: announces that size); ``corrupt`` flips one byte (the body no longer matches
        the ETag); ``reset`` closes the connection at once with a TCP RST.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        fault = Fault(kind, path_glob, times, method.upper() if method else None, seconds,
                      at_byte, extra_bytes)
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first pending fault for this request (consumed by one), or None."""
        with self._lock:
            for fault in self._faults:
                if fault.applies_to(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if f.remaining > 0]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the hub saw it; ``status`` 0 means the connection was reset unanswered."""

    method: str
    path: str                  # decoded URL path, e.g. /owner/name/resolve/main/model.onnx
    status: int
    range: str | None = None   # the Range header as sent
    fault: str | None = None   # the fault kind injected, if any
    auth: bool = False         # an Authorization header was sent
    time_s: float = field(default_factory=time.monotonic)


class RequestLog:
    """Every request the hub answered (or refused), in order (thread-safe); a standalone hub
    keeps the last ``max_records``."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._lock = threading.Lock()

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def records(self, method: str | None = None, path_glob: str = "*") -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._records
                    if (method is None or r.method == method)
                    and fnmatch.fnmatchcase(r.path, path_glob)]

    def count(self, method: str | None = None, path_glob: str = "*") -> int:
        return len(self.records(method, path_glob))


# --------------------------------------------------------------------------------------------
# The HTTP server


class _Resolved:
    __slots__ = ("repo_id", "commit", "info")

    def __init__(self, repo_id: str, commit: str | None, info: BlobInfo) -> None:
        self.repo_id = repo_id
        self.commit = commit      # None on the CDN: a signed URL names content, not a commit
        self.info = info


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True       # a stalled handler must never hold up shutdown
    allow_reuse_address = True

    def __init__(self, address, hub: "LocalHub") -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _HubHandler)


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the real Hub; huggingface_hub pools connections
    server: _HubHTTPServer
    timeout = 60                    # idle keep-alive connections end on their own

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # the request log is the record; stderr noise helps nobody

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # ---- request handling ----

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        fault = hub.faults.take(method, path)
        if fault is not None and method in ("POST", "PUT"):
            self.close_connection = True   # its body is never read: the connection is done

        def record(status: int) -> None:
            hub.log.append(RequestRecord(method, path, status, range_header,
                                         fault.kind if fault else None,
                                         auth="Authorization" in self.headers))

        try:
            if fault and fault.kind == "reset":
                record(0)
                self._reset()
                return
            if fault and fault.kind == "stall" and fault.at_byte is None:
                # a hung server: logged on arrival (status 0: never answered), then dropped
                record(0)
                hub.stopping.wait(fault.seconds)
                self._close_now()
                return
            if fault and fault.kind in ("status_500", "status_503"):
                status = 500 if fault.kind == "status_500" else 503
                record(status)
                self._send_error(method, status, None, "injected fault")
                return
            if fault and fault.kind == "not_found":
                record(404)
                self._send_error(method, 404, "EntryNotFound", "injected fault")
                return
            if method in ("POST", "PUT") or path.startswith("/api/"):
                _WriteAPI(self, method, path, record).answer()
                return
            if path.startswith(CDN_PREFIX):
                resolved = self._resolve_cdn(method, record)
            else:
                resolved = self._resolve(method, path, record)
                if resolved is not None and hub.cdn_redirects:
                    self._send_cdn_redirect(resolved, fault, record)
                    return
            if resolved is not None:
                self._send_file(method, resolved, range_header, fault, record)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    def _resolve(self, method: str, path: str, record) -> _Resolved | None:
        """Map /{repo}/resolve/{revision}/{file} to a blob, answering errors as the Hub does."""
        store = self.server.hub.store
        raw_parts = urlsplit(self.path).path.split("/")[1:]
        # owner/name/resolve/... first: a repo may itself be named "resolve"
        at = next((i for i in (2, 1) if len(raw_parts) > i and raw_parts[i] == "resolve"), -1)
        if at < 0 or len(raw_parts) < at + 3:
            record(404)
            self._send_error(method, 404, None, "not a /resolve url")
            return None
        repo_id = "/".join(unquote(p) for p in raw_parts[:at])
        # the revision is one URL segment: "refs%2Fpr%2F1" decodes to "refs/pr/1"
        revision = unquote(raw_parts[at + 1])
        filename = unquote("/".join(raw_parts[at + 2:]))
        access = store.access(repo_id)
        if access is None:
            record(404)
            self._send_error(method, 404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        denied = self._check_access(access)
        if denied:
            status, code, message = denied
            record(status)
            self._send_error(method, status, code, message)
            return None
        commit = store.resolve(repo_id, revision)
        if commit is None:
            record(404)
            self._send_error(method, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        info = store.blob(repo_id, commit, filename)
        if info is None:
            record(404)
            self._send_error(method, 404, "EntryNotFound", f"{filename} does not exist",
                             commit=commit)
            return None
        return _Resolved(repo_id, commit, info)

    def _resolve_cdn(self, method: str, record) -> _Resolved | None:
        """/_cdn/{repo}/{sha256}/{path}: no auth, like the Hub's signed CDN URLs."""
        parts = urlsplit(self.path).path[len(CDN_PREFIX):].split("/")
        info = None
        if len(parts) >= 3:
            try:
                info = self.server.hub.store.object(unquote(parts[0]), parts[1],
                                                    unquote("/".join(parts[2:])))
            except HubStoreError:
                info = None
        if info is None:
            record(404)
            self._send_error(method, 404, None, "no such object")
            return None
        return _Resolved(unquote(parts[0]), None, info)

    def _send_cdn_redirect(self, resolved: _Resolved, fault: Fault | None, record) -> None:
        """302 to another origin (localhost vs 127.0.0.1), carrying the file's metadata as the
        Hub does for LFS files: the client must read it from here and not send its token on."""
        info = resolved.info
        location = (f"http://localhost:{self.server.hub.port}{CDN_PREFIX}"
                    f"{quote(resolved.repo_id, safe='')}/{info.sha256}/{quote(info.path)}")
        record(302)
        self.send_response(302)
        self.send_header("X-Repo-Commit", resolved.commit or "")
        self.send_header("ETag", f'"{info.sha256}"')
        self.send_header("X-Linked-Etag", f'"{info.sha256}"')
        extra = fault.extra_bytes if fault and fault.kind == "wrong_size" else 0
        self.send_header("X-Linked-Size", str(info.size + extra))
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _check_access(self, access: RepoAccess) -> tuple[int, str | None, str] | None:
        if not (access.private or access.gated):
            return None
        token = self.bearer_token()
        if token is not None and (token in access.tokens or token in self.server.hub.write_tokens):
            return None
        if access.gated and token is not None:
            return 403, "GatedRepo", "Access to this gated repo is restricted"
        if token is not None:
            return 401, None, "Invalid credentials in Authorization header"
        return 401, "RepoNotFound", "Invalid username or password."

    def _send_error(self, method: str, status: int, code: str | None, message: str, *,
                    commit: str | None = None, body: Mapping[str, object] | None = None) -> None:
        body = json.dumps({"error": message, **(body or {})}).encode()
        self.send_response(status)
        if self.close_connection:
            self.send_header("Connection", "close")
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, doc: object, content_type: str = "application/json") -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def bearer_token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else None

    def _send_file(self, method: str, resolved: _Resolved, range_header: str | None,
                   fault: Fault | None, record) -> None:
        info = resolved.info
        size = info.size
        span = _parse_range(range_header, size) if range_header else (0, size - 1)
        if span is None:
            record(416)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span
        length = end - start + 1
        announced = length
        announced_size = size
        if fault and fault.kind == "wrong_size":
            announced += fault.extra_bytes
            announced_size += fault.extra_bytes if method == "HEAD" else 0
        status = 206 if range_header else 200
        record(status)
        self.send_response(status)
        if resolved.commit:
            self.send_header("X-Repo-Commit", resolved.commit)
        self.send_header("ETag", f'"{info.sha256}"')
        self.send_header("X-Linked-Etag", f'"{info.sha256}"')
        self.send_header("X-Linked-Size", str(announced_size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if method == "HEAD":
            return
        with open(info.blob, "rb") as f:
            f.seek(start)
            self._stream(f, start, end + 1, fault, size)
        if fault and fault.kind == "wrong_size":
            self._close_now()  # the client waits for bytes that never come: end it

    def _stream(self, f: IO[bytes], start: int, stop: int, fault: Fault | None,
                size: int) -> None:
        """Send bytes [start, stop) of the file, applying a body fault on the way."""
        hub = self.server.hub
        kind = fault.kind if fault else None
        mark = None
        if kind in ("cut", "stall", "corrupt"):
            mark = fault.at_byte if fault.at_byte is not None else size // 2
        # a resumed request that starts past the mark is cut (or stalled) before its first byte,
        # so "cut on every request" really makes no progress
        pause_at = max(mark, start) if kind in ("cut", "stall") and mark < stop else None
        position = start
        while position < stop:
            if position == pause_at:
                self.wfile.flush()
                if kind == "cut" or hub.stopping.wait(fault.seconds):
                    self._close_now()
                    return
                pause_at = None
                continue
            limit = pause_at if pause_at is not None else stop
            chunk = f.read(min(CHUNK_BYTES, limit - position))
            if not chunk:
                break  # cannot happen with immutable objects, but never loop forever
            if kind == "corrupt" and position <= mark < position + len(chunk):
                buf = bytearray(chunk)
                buf[mark - position] ^= 0xFF
                chunk = bytes(buf)
            self.wfile.write(chunk)
            position += len(chunk)
        self.wfile.flush()

    def _close_now(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the peer sees a TCP RST, not an orderly end."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass



# --------------------------------------------------------------------------------------------
# The upload side: what HfApi.create_repo, model_info and create_commit call


#: the body of a commit or an upload the server reads into memory at most (bigger: 413)
MAX_JSON_BYTES = 64 * 1024 * 1024
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
#: where the LFS batch answer sends uploads: /_lfs/{repo id, %-encoded}/{sha256}[/verify]
LFS_PREFIX = "/_lfs/"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class _Refused(Exception):
    """An answer other than success: status, the Hub's X-Error-Code, a message."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 **body: object) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class _WriteAPI:
    """One request to the Hub's API, answered as huggingface_hub 2.4 expects (its hf_api.py,
    _commit_api.py and lfs.py): ``POST /api/repos/create``, ``GET /api/models/{repo}[/revision/
    {rev}]``, ``POST /api/models/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/
    batch``, ``PUT /_lfs/...`` (the upload URL the batch hands out, like a presigned one) and its
    ``/verify``, ``POST /api/models/{repo}/commit/{rev}`` (NDJSON). Writes need a token the hub
    accepts (``LocalHub.write_tokens``): none is 401, another one 403."""

    def __init__(self, handler: "_HubHandler", method: str, path: str, record) -> None:
        self.h, self.method, self.path, self.record = handler, method, path, record
        self.hub = handler.server.hub
        self.store = self.hub.store

    def answer(self) -> None:
        try:
            status, doc, content_type = self._route()
        except _Refused as e:
            self.record(e.status)
            self._drain()
            self.h._send_error(self.method, e.status, e.code, e.message, body=e.body)
            return
        except HubStoreError as e:
            self.record(400)
            self.h._send_error(self.method, 400, None, str(e))
            return
        self.record(status)
        self.h.send_json(status, doc, content_type)

    # ---- routing ----

    def _route(self) -> tuple[int, object, str]:
        m, path = self.method, self.path
        if m == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if path.startswith(LFS_PREFIX):
            return self._lfs_object()
        if m == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path[1:-len(".git/info/lfs/objects/batch")])
        if path.startswith("/api/models/"):
            repo_id, verb, revision = _api_parts(path[len("/api/models/"):])
            if m in ("GET", "HEAD") and verb in ("", "revision"):
                return self._model_info(repo_id, revision)
            if m == "POST" and verb == "preupload":
                return self._preupload(repo_id, revision)
            if m == "POST" and verb == "commit":
                return self._commit(repo_id, revision)
        raise _Refused(404, f"no such endpoint: {m} {path}")

    # ---- auth and bodies ----

    def _writer(self, repo_id: str | None = None) -> None:
        token = self.h.bearer_token()
        if token is None:
            raise _Refused(401, "Invalid username or password.")
        if token not in self.hub.write_tokens:
            raise _Refused(403, f"You don't have the rights to write to {repo_id or 'this hub'}")
        if repo_id is not None and self.store.access(repo_id) is None:
            raise _Refused(404, f"Repository {repo_id} not found", "RepoNotFound")

    def _reader(self, repo_id: str) -> RepoAccess:
        access = self.store.access(repo_id)
        if access is None:
            raise _Refused(404, f"Repository {repo_id} not found", "RepoNotFound")
        if self.h.bearer_token() in self.hub.write_tokens:
            return access
        denied = self.h._check_access(access)
        if denied:
            raise _Refused(denied[0], denied[2], denied[1])
        return access

    def _body(self) -> bytes:
        length = self.h.headers.get("Content-Length")
        if self.h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b"".join(_read_chunked(self.h.rfile, MAX_JSON_BYTES))
        else:
            n = int(length or 0)
            if n > MAX_JSON_BYTES:
                raise _Refused(413, f"body of {n} bytes is too large")
            data = self.h.rfile.read(n)
        self._read = True
        return data

    def _json(self) -> dict:
        try:
            doc = json.loads(self._body() or b"{}")
        except ValueError:
            raise _Refused(400, "body is not JSON") from None
        if not isinstance(doc, dict):
            raise _Refused(400, "body is not a JSON object")
        return doc

    def _drain(self) -> None:
        """An error answered before the body was read: the connection cannot be reused."""
        if not getattr(self, "_read", False) and self.method in ("POST", "PUT"):
            self.h.close_connection = True

    # ---- endpoints ----

    def _create_repo(self) -> tuple[int, object, str]:
        self._writer()
        doc = self._json()
        if doc.get("type") not in (None, "model"):
            raise _Refused(400, f"this hub has model repos only, not {doc.get('type')!r}")
        name, owner = doc.get("name"), doc.get("organization")
        repo_id = f"{owner}/{name}" if owner else str(name)
        url = f"{self.hub.endpoint}/{repo_id}"
        if self.store.access(repo_id) is not None:
            raise _Refused(409, "You already created this model repo", url=url)
        private = doc.get("visibility") == "private" or bool(doc.get("private"))
        self.store.create_repo(repo_id, private=private)
        # the Hub's first commit: a repo has a head from the start, so every commit has a parent
        self.store.commit(repo_id, {".gitattributes": GITATTRIBUTES}, message="initial commit")
        return 200, {"url": url, "name": repo_id}, "application/json"

    def _model_info(self, repo_id: str, revision: str | None) -> tuple[int, object, str]:
        access = self._reader(repo_id)
        commit = self.store.resolve(repo_id, revision or "main")
        if commit is None and revision is not None:
            raise _Refused(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = self.store.files(repo_id, commit) if commit else {}
        return 200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": access.private,
                     "gated": access.gated, "disabled": False,
                     "siblings": [{"rfilename": p} for p in sorted(files)]}, "application/json"

    def _preupload(self, repo_id: str, revision: str) -> tuple[int, object, str]:
        self._writer(repo_id)
        doc = self._json()
        commit = self.store.resolve(repo_id, revision)
        current = self.store.files(repo_id, commit) if commit else {}
        lfs_globs = self._lfs_globs(repo_id, commit)
        answer = []
        for f in doc.get("files") or ():
            if not isinstance(f, dict) or not isinstance(f.get("path"), str):
                raise _Refused(400, "preupload: every file needs a path")
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except ValueError:
                raise _Refused(400, f"preupload: {f['path']}: sample is not base64") from None
            size = int(f.get("size") or 0)
            lfs = (b"\0" in sample or size >= self.hub.lfs_threshold_bytes
                   or any(fnmatch.fnmatchcase(f["path"].rsplit("/", 1)[-1], g) for g in lfs_globs))
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False,
                           "oid": current.get(f["path"]) if lfs else None})
        return 200, {"files": answer, "commitOid": commit}, "application/json"

    def _lfs_globs(self, repo_id: str, commit: str | None) -> list[str]:
        """The patterns the repo's .gitattributes sends to LFS (``*.onnx filter=lfs ...``)."""
        info = self.store.blob(repo_id, commit, ".gitattributes") if commit else None
        if info is None:
            return []
        return [line.split()[0] for line in info.blob.read_text(errors="replace").splitlines()
                if "filter=lfs" in line.split()[1:]]

    def _lfs_batch(self, repo_id: str) -> tuple[int, object, str]:
        self._writer(repo_id)
        doc = self._json()
        if doc.get("operation") != "upload":
            raise _Refused(400, "this hub's LFS batch answers uploads only")
        base = f"{self.hub.endpoint}{LFS_PREFIX}{quote(repo_id, safe='')}"
        objects = []
        for obj in doc.get("objects") or ():
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "oid must be a sha256"}})
                continue
            have = self.store.object(repo_id, oid)
            if have is not None and have.size == size:
                objects.append({"oid": oid, "size": size})   # no actions: already stored
                continue
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{base}/{oid}"},
                "verify": {"href": f"{base}/{oid}/verify", "header": {}}}})
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, \
            LFS_CONTENT_TYPE

    def _lfs_object(self) -> tuple[int, object, str]:
        parts = urlsplit(self.h.path).path[len(LFS_PREFIX):].split("/")   # the repo is %-encoded
        if len(parts) not in (2, 3) or not _SHA256_RE.match(parts[1]):
            raise _Refused(404, "no such upload")
        repo_id, oid = unquote(parts[0]), parts[1]
        if self.store.access(repo_id) is None:
            raise _Refused(404, f"Repository {repo_id} not found", "RepoNotFound")
        if len(parts) == 3 and parts[2] == "verify" and self.method == "POST":
            self._writer(repo_id)
            doc = self._json()
            have = self.store.object(repo_id, oid)
            if have is None or have.size != doc.get("size"):
                raise _Refused(404, f"object {oid} of {doc.get('size')} bytes was not uploaded")
            return 200, {"message": "verified"}, LFS_CONTENT_TYPE
        if len(parts) != 2 or self.method != "PUT":
            raise _Refused(404, "no such upload")
        # like a presigned URL: no token; the content must be the oid it was handed out for
        length = self.h.headers.get("Content-Length")
        try:
            if self.h.headers.get("Transfer-Encoding", "").lower() == "chunked":
                stream: IO[bytes] = _ChunkedReader(self.h.rfile)
                self.store.store_object(repo_id, stream, expected_sha256=oid)
            else:
                self.store.store_object(repo_id, self.h.rfile, length=int(length or 0),
                                        expected_sha256=oid)
        finally:
            self._read = True
        return 200, {}, "application/json"

    def _commit(self, repo_id: str, revision: str) -> tuple[int, object, str]:
        self._writer(repo_id)
        if self.h.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise _Refused(400, "a commit is application/x-ndjson")
        lines = [line for line in self._body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError:
            raise _Refused(400, "a commit line is not JSON") from None
        if not items or items[0].get("key") != "header":
            raise _Refused(400, "a commit starts with its header")
        header = items[0].get("value") or {}
        changes: dict[str, str | None] = {}
        folders: list[str] = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str):
                raise _Refused(400, f"{key}: no path")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Refused(400, f"{path}: encoding must be base64")
                try:
                    content = base64.b64decode(value.get("content") or "", validate=True)
                except ValueError:
                    raise _Refused(400, f"{path}: content is not base64") from None
                changes[path] = self.store.store_object(repo_id, content)
            elif key == "lfsFile":
                oid = value.get("oid")
                have = self.store.object(repo_id, oid) if isinstance(oid, str) else None
                if have is None or ("size" in value and value["size"] != have.size):
                    raise _Refused(422, f"{path}: LFS object {oid} was not uploaded")
                changes[path] = oid
            elif key == "deletedFile":
                changes[path] = None
            elif key == "deletedFolder":
                folders.append(path)
            else:
                raise _Refused(400, f"unknown commit operation {key!r}")
        if self.store.resolve(repo_id, revision) is None and revision != "main":
            raise _Refused(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        try:
            sha = self.store.commit_objects(
                repo_id, changes, branch=revision, message=str(header.get("summary") or ""),
                parent_commit=header.get("parentCommit"), deleted_folders=tuple(folders))
        except StaleParentError:
            raise _Refused(412, "A commit has happened since. Please refresh and try again.") \
                from None
        return 200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                     "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}",
                     "commitMessage": header.get("summary"), "hookOutput": ""}, "application/json"


#: what the Hub's first commit holds: binary formats go to LFS
GITATTRIBUTES = b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def _api_parts(rest: str) -> tuple[str, str, str | None]:
    """"owner/name[/verb/revision]" -> (repo id, verb, revision); the revision is one
    %-encoded segment ("refs%2Fpr%2F1")."""
    parts = rest.split("/")
    for at in (2, 1):
        if len(parts) == at + 2 and parts[at] in ("revision", "preupload", "commit"):
            return "/".join(parts[:at]), parts[at], unquote(parts[at + 1])
    return "/".join(parts), "", None


class _ChunkedReader:
    """A ``Transfer-Encoding: chunked`` body as a stream."""

    def __init__(self, rfile: IO[bytes]) -> None:
        self._chunks = _read_chunked(rfile, None)
        self._buffer = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out, self._buffer = (self._buffer, b"") if n < 0 else (self._buffer[:n], self._buffer[n:])
        return out


def _read_chunked(rfile: IO[bytes], limit: int | None) -> Iterator[bytes]:
    total = 0
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline().strip():
                pass   # trailers
            return
        total += size
        if limit is not None and total > limit:
            raise _Refused(413, "body is too large")
        yield rfile.read(size)
        rfile.readline()


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range -> inclusive (start, end); None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if not first:  # suffix: the last N bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


class LocalHub:
    """The hub server: ``with LocalHub(root) as hub: hf_hub_download(..., endpoint=hub.endpoint)``.

    ``hub.store`` publishes repos, ``hub.faults`` plans faults, ``hub.log`` records requests.
    ``HfApi(endpoint=hub.endpoint, token=T).create_commit(...)`` writes, for T in ``write_tokens``.
    With ``cdn_redirects`` (settable any time) ``/resolve`` answers 302 to a CDN stand-in on
    ``localhost``, another origin, as the real Hub does for LFS files.
    """

    def __init__(self, root: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 port: int = 0, cdn_redirects: bool = False,
                 write_tokens: tuple[str, ...] | list[str] = (),
                 lfs_threshold_bytes: int = 10 * 1024 * 1024) -> None:
        self.store = HubStore(root)
        #: tokens that may create repos and commit to any repo (and read every repo)
        self.write_tokens: set[str] = set(write_tokens)
        #: preupload answers "lfs" for files this big, or with a NUL byte in their first 512
        self.lfs_threshold_bytes = lfs_threshold_bytes
        self.faults = FaultPlan()
        self.log = RequestLog()
        self.stopping = threading.Event()
        self.cdn_redirects = cdn_redirects
        self._address = (host, port)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("hub is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("hub is not running")
        return self._httpd.server_address[1]

    def start(self) -> "LocalHub":
        self.stopping.clear()
        self._httpd = _HubHTTPServer(self._address, self)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"local-hub:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: end stalls, close every open connection, release the port."""
        if self._httpd is None:
            return
        self.stopping.set()
        self._httpd.shutdown()
        with self._httpd.connections_lock:
            open_connections = list(self._httpd.connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Standalone: python -m modeld.testing.hub --root DIR --port N


def import_folder(store: HubStore, folder: Path) -> list[str]:
    """Commit every ``<owner>/<name>/`` folder of plain files under ``folder`` on ``main``.

    Lets the demo serve a folder laid out like the Hub without writing Python. Returns repo ids.
    """
    repos = []
    for owner in sorted(p for p in folder.iterdir() if p.is_dir()):
        for repo in sorted(p for p in owner.iterdir() if p.is_dir()):
            files = {f.relative_to(repo).as_posix(): f for f in sorted(repo.rglob("*"))
                     if f.is_file() and not f.name.startswith(".")}
            if files:
                repo_id = f"{owner.name}/{repo.name}"
                store.commit(repo_id, files, message=f"import {repo}")
                repos.append(repo_id)
    return repos


def iter_repo_ids(root: Path) -> Iterator[str]:
    """Repo ids present in a store folder (for the standalone banner)."""
    for marker in sorted(root.glob("**/repo.json")):
        yield marker.parent.relative_to(root).as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeld.testing.hub",
                                     description="Serve a HubStore folder as a loopback Hub.")
    parser.add_argument("--root", required=True, type=Path, help="the store folder")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--import-dir", type=Path, default=None,
                        help="commit <owner>/<name>/ folders of plain files from here first")
    parser.add_argument("--cdn-redirects", action="store_true",
                        help="answer /resolve with 302 to a CDN stand-in, as the Hub does for LFS")
    parser.add_argument("--write-token", action="append", default=[], metavar="TOKEN",
                        help="a token that may create repos and commit (repeatable)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND[:GLOB[:TIMES]]",
                        help=f"inject a fault (repeatable); kinds: {', '.join(FAULT_KINDS)}")
    args = parser.parse_args(argv)
    hub = LocalHub(args.root, host=args.host, port=args.port, cdn_redirects=args.cdn_redirects,
                   write_tokens=args.write_token)
    for spec in args.fault:
        kind, _, rest = spec.partition(":")
        glob, _, times = rest.partition(":")
        try:
            hub.faults.add(kind, glob or "*", int(times or 1))
        except ValueError as e:
            parser.error(f"--fault {spec}: {e}")
    if args.import_dir:
        import_folder(hub.store, args.import_dir)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with hub:
        # the first line is machine-read by the demo and benchmarks (they may pass --port 0)
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        for repo_id in iter_repo_ids(args.root):
            print(f"repo {repo_id}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
