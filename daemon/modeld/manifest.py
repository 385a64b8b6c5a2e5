"""The manifest of one model folder (``models/<name>/manifest.json``): what each file is.

For every file: sha256, size, the stat triple that lets a re-scan trust it without hashing
(size + mtime_ns + inode), and where it came from (Hub provenance, or the derivation of a variant).
Proofs of variants, permanent failures and nodes' rejections live here too, so they survive a
restart.
Pure data and JSON; ``store`` does the disk work, workers return ``FileRecord``s.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .errors import ManifestError, first_line
from .layout import MANIFEST_NAME
from .variants import Derivation, Proof

SCHEMA_VERSION = 1
#: a manifest is a few KiB; anything far larger is not one of ours (and is not read into memory)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: node rejections kept per model: a client inventing node names cannot grow the manifest
MAX_REJECTIONS = 64
#: the text fields of a persisted rejection (``at_unix_s`` is a number)
REJECTION_TEXT_FIELDS = ("model", "variant", "sha256", "provider", "node", "error", "revision")


def is_plain_name(name: object) -> bool:
    """One file or folder name inside its folder: no separator, no ``..``, not hidden."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name)


@dataclass(frozen=True)
class Provenance:
    """Where a pulled file came from on the Hub."""

    repo: str
    filename: str
    revision: str | None
    commit: str
    etag: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Provenance":
        return cls(**dict(d))


@dataclass(frozen=True)
class FileRecord:
    """One file of a model folder as it was published."""

    name: str
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    provenance: Provenance | None = None   # pulled from the Hub
    derivation: Derivation | None = None   # derived (quantized) from the FP32 file

    def stat_matches(self, st) -> bool:
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.inode)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["provenance"] = asdict(self.provenance) if self.provenance else None
        d["derivation"] = self.derivation.to_dict() if self.derivation else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FileRecord":
        d = dict(d)
        d["provenance"] = Provenance.from_dict(d["provenance"]) if d.get("provenance") else None
        d["derivation"] = Derivation.from_dict(d["derivation"]) if d.get("derivation") else None
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    name: str
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    #: file name -> its latest proof (kept for refused variants too: the reason is the point)
    proofs: Mapping[str, Proof] = field(default_factory=dict)
    #: derivation key -> message of a permanent failure (not retried until an input changes)
    failures: Mapping[str, str] = field(default_factory=dict)
    #: "node|sha256:provider" -> a node's report that it could not load that file on that
    #: provider (model, variant, sha256, provider, node, error, revision, at_unix_s): that node
    #: is not offered that copy again; kept while the file is, and dropped when the file is
    #: published again (a new inode: ``revision``)
    rejections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: "adopt:<derivation key>" / "upload:<sha256>" -> what the last look-up in or upload to the
    #: entry's share did (``modeld.share``): an attempt made is not made again until a reload
    shares: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def with_file(self, record: FileRecord) -> "Manifest":
        proofs = {k: v for k, v in self.proofs.items()
                  if k != record.name or v.file_sha256 == record.sha256}
        return replace(self, files={**self.files, record.name: record},
                       proofs=proofs)._rejections_of_current_files()

    def with_rejection(self, rejection: Mapping[str, Any] | None, key: str = "") -> "Manifest":
        """Add a node's rejection (None with ``key``: forget that one)."""
        if rejection is None:
            return replace(self, rejections={k: v for k, v in self.rejections.items() if k != key})
        key = f"{rejection['node']}|{rejection['sha256']}:{rejection['provider']}"
        return self.with_rejections({**self.rejections, key: dict(rejection)})

    def _rejections_of_current_files(self) -> "Manifest":
        copies = {(r.sha256, str(r.inode)) for r in self.files.values()}
        shas = {sha for sha, _ in copies}
        kept = {k: v for k, v in self.rejections.items() if v.get("sha256") in shas
                and (not v.get("revision") or (v["sha256"], v["revision"]) in copies)}
        return self if len(kept) == len(self.rejections) else replace(self, rejections=kept)

    def with_proof(self, file_name: str, proof: Proof) -> "Manifest":
        return replace(self, proofs={**self.proofs, file_name: proof})

    def with_failure(self, key: str, message: str | None) -> "Manifest":
        failures = {k: v for k, v in self.failures.items() if k != key}
        if message is not None:
            failures[key] = message
        return replace(self, failures=failures)

    def with_share(self, key: str, outcome: Mapping[str, Any] | None) -> "Manifest":
        """Record (None: forget) the outcome of a share look-up or upload."""
        shares = {k: v for k, v in self.shares.items() if k != key}
        if outcome is not None:
            shares[key] = dict(outcome)
        return replace(self, shares=shares)

    def with_rejections(self, rejections: Mapping[str, Mapping[str, Any]]) -> "Manifest":
        """Replace the rejections; only the newest ``MAX_REJECTIONS`` are kept."""
        kept = sorted(rejections.items(), key=lambda kv: kv[1].get("at_unix_s") or 0)
        return replace(self, rejections=dict(kept[-MAX_REJECTIONS:]))

    def to_json(self) -> bytes:
        doc = {"schema": SCHEMA_VERSION, "name": self.name,
               "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
               "proofs": {k: v.to_dict() for k, v in sorted(self.proofs.items())},
               "failures": dict(sorted(self.failures.items())),
               "rejections": {k: dict(v) for k, v in sorted(self.rejections.items())}}
        if self.shares:   # absent without a share: manifests of other entries stay as they were
            doc["shares"] = {k: dict(v) for k, v in sorted(self.shares.items())}
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes | str, *, name: str) -> "Manifest":
        """Parse and check every field's type; ``ManifestError`` for anything else, whatever the
        JSON's shape. ``name`` is the folder's: identity never comes from the file (a copied
        folder must not write its original's manifest)."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{MANIFEST_NAME} is not JSON: {first_line(e, 200)}") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"{MANIFEST_NAME} is {type(doc).__name__}, not an object")
        if doc.get("schema") != SCHEMA_VERSION:
            raise ManifestError(f"unsupported manifest schema {_short(doc.get('schema'))}")
        try:
            files = {k: _build(FileRecord, v, f"files.{k}")
                     for k, v in _section(doc, "files").items()}
            for k, record in files.items():
                if not is_plain_name(k) or record.name != k:
                    raise ManifestError(f"files: {_short(k)} is not a file name of this folder")
            proofs = {k: _build(Proof, v, f"proofs.{k}") for k, v in _section(doc, "proofs").items()}
            failures = {k: _conform(v, str, f"failures.{k}")
                        for k, v in _section(doc, "failures").items()}
            rejections = {k: _rejection(v, f"rejections.{k}")
                          for k, v in _section(doc, "rejections").items()}
            shares = {k: _conform(v, Mapping[str, Any], f"shares.{k}")
                      for k, v in _section(doc, "shares").items()}
        except RecursionError:
            raise ManifestError(f"{MANIFEST_NAME} is nested too deeply") from None
        return cls(name=name, files=files, proofs=proofs, failures=failures,
                   rejections=rejections, shares=shares)


# -- checking the shape of what was read ------------------------------------------------------

def _short(value: object) -> str:
    return repr(value)[:60]


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None and key not in doc:
        return {}
    return _conform(value, Mapping[str, Any], key)


def _rejection(value: Any, where: str) -> dict[str, Any]:
    d = _conform(value, Mapping[str, Any], where)
    out: dict[str, Any] = {k: _conform(d.get(k, ""), str, f"{where}.{k}")
                           for k in REJECTION_TEXT_FIELDS}
    out["at_unix_s"] = _conform(d.get("at_unix_s", 0.0), float, f"{where}.at_unix_s")
    return out


def _build(cls: type, value: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a JSON object, every field type-checked."""
    d = _conform(value, Mapping[str, Any], where)
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _conform(d[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{where}: missing {f.name}")
    return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` says (lists become tuples), or ``ManifestError``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _conform(value, arm, where)
            except ManifestError:
                continue
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            return tuple(_conform(v, typing.get_args(hint)[0], f"{where}[]") for v in value)
    elif origin in (collections.abc.Mapping, dict):
        if isinstance(value, dict):
            inner = typing.get_args(hint)[1]
            return {k: _conform(v, inner, f"{where}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise ManifestError(f"{where}: expected {getattr(hint, '__name__', hint)}, "
                        f"got {type(value).__name__}")
