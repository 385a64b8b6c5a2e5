"""Pure: how proven variants are laid out in a share repo on the Hub, and what their record says.

A catalog entry with ``[models.quantize] share = "owner/repo"`` looks there for a variant built
from the same FP32 bytes with the same derivation before quantizing, and shares what it built and
proved. The planner (``planning``) asks this module which keys mark an attempt as done; the
workers (``modeld.workers.share``) read and write the repo; ``views`` shows the provenance.
No disk, no network, no clock. The layout is documented in docs/share.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import IntegrityError
from .manifest import FileRecord
from .methods import METHODS
from .variants import FP32, RECIPES_VERSION, VARIANT_FILES, Derivation, Proof

#: the record's schema: a reader refuses other versions (never guesses at a field's meaning)
RECORD_SCHEMA = 1
RECORD_FILE = "record.json"
#: at most this many bytes are read as a record (a record is a few KiB)
MAX_RECORD_BYTES = 256 * 1024

#: ``Manifest.shares`` outcomes: what the last look-up (``adopt:``) or upload (``upload:``) did
ADOPTED, NONE, REFUSED = "adopted", "none", "refused"
SHARED, ALREADY_SHARED, DENIED, FAILED = "shared", "already_shared", "denied", "failed"


def variant_folder(source_sha256: str, derivation_key: str) -> str:
    """``variants/<first 16 hex of the FP32 sha256>/<derivation key>``: one folder per (source,
    derivation); a lookup is a path, never a search."""
    return f"variants/{source_sha256[:16]}/{derivation_key}"


def variant_path(derivation: Derivation, file_name: str) -> str:
    return f"{variant_folder(derivation.source_sha256, derivation.key())}/{file_name}"


def record_path(derivation: Derivation) -> str:
    return variant_path(derivation, RECORD_FILE)


def file_for(derivation: Derivation) -> str | None:
    """The file a derivation makes ("model-int8.onnx"); None for ``auto``, which picks at build
    time (the record names it)."""
    method = METHODS.get(derivation.method)
    return VARIANT_FILES[method.variant] if method and method.variant else None


def adopt_key(derivation: Derivation) -> str:
    """The ``Manifest.shares`` key of the look-up for this derivation."""
    return f"adopt:{derivation.key()}"


def upload_key(sha256: str) -> str:
    """The ``Manifest.shares`` key of the upload of these bytes."""
    return f"upload:{sha256}"


def is_adopted(record: FileRecord) -> bool:
    """A derived file that came from a share (its Hub provenance) rather than a local build."""
    return record.derivation is not None and record.provenance is not None


@dataclass(frozen=True)
class ShareRecord:
    """``record.json`` next to a shared variant: what it is, what it was made from, and the
    builder's proof (evidence for people; each host proves it again before serving it)."""

    file_name: str                 # "model-int8.onnx"
    sha256: str                    # of the variant's bytes
    size: int
    source_sha256: str             # of the FP32 file it was derived from
    derivation: Mapping[str, Any]  # Derivation.to_dict(): method, params, onnx, onnxruntime
    derivation_key: str
    recipes: str = RECIPES_VERSION
    #: the builder: host kind, and per provider what it measured (speed, task metric)
    builder: Mapping[str, Any] = field(default_factory=dict)
    schema: int = RECORD_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"derivation": dict(self.derivation), "builder": dict(self.builder)}

    @classmethod
    def from_dict(cls, doc: Any) -> "ShareRecord":
        """Parse a downloaded record; ``IntegrityError`` for anything that is not one of ours."""
        if not isinstance(doc, dict) or doc.get("schema") != RECORD_SCHEMA:
            raise IntegrityError(f"{RECORD_FILE} is not a schema {RECORD_SCHEMA} record")
        try:
            record = cls(**{k: doc[k] for k in (
                "file_name", "sha256", "size", "source_sha256", "derivation", "derivation_key",
                "recipes", "builder", "schema")})
            Derivation.from_dict(record.derivation)
        except (KeyError, TypeError) as e:
            raise IntegrityError(f"{RECORD_FILE} is malformed: {e}") from None
        return record

    def check(self, derivation: Derivation, file_name: str | None) -> None:
        """The record is for exactly these inputs: the same FP32 bytes, the same derivation
        (recomputed from the record's own fields, not taken from its label) and file."""
        mine = Derivation.from_dict(self.derivation)
        if self.source_sha256 != derivation.source_sha256 or mine.source_sha256 != self.source_sha256:
            raise IntegrityError(f"shared {RECORD_FILE} is for FP32 {self.source_sha256[:12]}, "
                                 f"not {derivation.source_sha256[:12]}")
        if mine.key() != derivation.key() or self.derivation_key != derivation.key():
            raise IntegrityError(f"shared {RECORD_FILE} is for derivation {mine.key()[:12]}, "
                                 f"not {derivation.key()[:12]}")
        derived = set(VARIANT_FILES.values()) - {VARIANT_FILES[FP32]}
        if self.file_name != (file_name or self.file_name) or self.file_name not in derived:
            raise IntegrityError(f"shared {RECORD_FILE} names {self.file_name!r}, not "
                                 f"{file_name or 'a derived variant'!r}")


def builder_evidence(proof: Proof, host: str) -> dict[str, Any]:
    """The builder's proof as a record carries it: per provider, pass, speed and task metric."""
    providers = []
    for p in proof.providers:
        task = p.task_check
        providers.append({"provider": p.provider, "passed": p.passed, "speedup": p.speedup,
                          "latency_ms": p.latency_ms, "fp32_latency_ms": p.fp32_latency_ms,
                          "task_metric": task.metric if task else None,
                          "task_value": task.value if task else None,
                          "onnxruntime": p.onnxruntime or proof.onnxruntime})
    return {"host": host, "providers": providers, "samples": proof.samples,
            "inputs": proof.inputs, "task": proof.task}


def make_record(record: FileRecord, proof: Proof, host: str) -> ShareRecord:
    assert record.derivation is not None
    d = record.derivation
    return ShareRecord(file_name=record.name, sha256=record.sha256, size=record.size,
                       source_sha256=d.source_sha256, derivation=d.to_dict(),
                       derivation_key=d.key(), builder=builder_evidence(proof, host))


def provenance_detail(record: FileRecord, outcome: Mapping[str, Any] | None,
                      proof: Proof | None) -> dict[str, Any]:
    """What ``status`` says of an adopted file: from which share and commit, what its builder
    measured, and what this host measured."""
    assert record.provenance is not None
    here = {}
    for p in (proof.providers if proof is not None and proof.file_sha256 == record.sha256 else ()):
        task = p.task_check
        here[p.provider] = {"passed": p.passed, "speedup": p.speedup,
                            "task_metric": task.metric if task else None,
                            "task_value": task.value if task else None, "reason": p.reason}
    return {"file": record.name, "repo": record.provenance.repo,
            "path": record.provenance.filename, "commit": record.provenance.commit,
            "builder": dict((outcome or {}).get("builder") or {}), "measured_here": here}
