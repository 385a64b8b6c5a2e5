"""The manifest of one model folder (``models/<name>/manifest.json``): what each file is.

For every file: sha256, size, the stat triple that lets a re-scan trust it without hashing
(size + mtime_ns + inode), and where it came from (Hub provenance, or the derivation of a variant).
Proofs of variants, permanent failures and nodes' rejections live here too, so they survive a
restart.
Pure data and JSON; ``store`` does the disk work, workers return ``FileRecord``s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .variants import Derivation, Proof

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


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
    #: "sha256:provider" -> a node's report that it could not load that file on that provider
    #: (model, variant, sha256, provider, node, error, at_unix_s); kept while the file is
    rejections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def with_file(self, record: FileRecord) -> "Manifest":
        proofs = {k: v for k, v in self.proofs.items()
                  if k != record.name or v.file_sha256 == record.sha256}
        return replace(self, files={**self.files, record.name: record},
                       proofs=proofs)._rejections_of_current_files()

    def with_rejection(self, rejection: Mapping[str, Any] | None, key: str = "") -> "Manifest":
        """Add a node's rejection (None with ``key``: forget that one)."""
        if rejection is None:
            return replace(self, rejections={k: v for k, v in self.rejections.items() if k != key})
        key = f"{rejection['sha256']}:{rejection['provider']}"
        return replace(self, rejections={**self.rejections, key: dict(rejection)})

    def _rejections_of_current_files(self) -> "Manifest":
        shas = {r.sha256 for r in self.files.values()}
        kept = {k: v for k, v in self.rejections.items() if v.get("sha256") in shas}
        return self if len(kept) == len(self.rejections) else replace(self, rejections=kept)

    def without_file(self, name: str) -> "Manifest":
        return replace(self, files={k: v for k, v in self.files.items() if k != name},
                       proofs={k: v for k, v in self.proofs.items() if k != name})

    def with_proof(self, file_name: str, proof: Proof) -> "Manifest":
        return replace(self, proofs={**self.proofs, file_name: proof})

    def with_failure(self, key: str, message: str | None) -> "Manifest":
        failures = {k: v for k, v in self.failures.items() if k != key}
        if message is not None:
            failures[key] = message
        return replace(self, failures=failures)

    def to_json(self) -> bytes:
        doc = {"schema": SCHEMA_VERSION, "name": self.name,
               "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
               "proofs": {k: v.to_dict() for k, v in sorted(self.proofs.items())},
               "failures": dict(sorted(self.failures.items())),
               "rejections": {k: dict(v) for k, v in sorted(self.rejections.items())}}
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Manifest":
        doc = json.loads(raw)
        if doc.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported manifest schema {doc.get('schema')!r}")
        return cls(name=doc["name"],
                   files={k: FileRecord.from_dict(v) for k, v in doc.get("files", {}).items()},
                   proofs={k: Proof.from_dict(v) for k, v in doc.get("proofs", {}).items()},
                   failures=dict(doc.get("failures", {})),
                   rejections={k: dict(v) for k, v in doc.get("rejections", {}).items()})
