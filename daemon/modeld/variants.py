"""What a variant is: its file name, the method that makes it, the gates it must pass, its proof.

Pure data shared by the planner, the workers (which produce proofs) and the serving choice
(which reads them). Everything here pickles and round-trips through JSON for the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .protocol import CPU_PROVIDER

FP32, INT8, FP16 = "fp32", "int8", "fp16"

#: variant -> file name inside models/<name>/ (the seeds' names)
VARIANT_FILES: Mapping[str, str] = {FP32: "model.onnx", INT8: "model-int8.onnx",
                                    FP16: "model-fp16.onnx"}
FILE_VARIANTS: Mapping[str, str] = {v: k for k, v in VARIANT_FILES.items()}

DEFAULT_PROVIDERS: tuple[str, ...] = (CPU_PROVIDER,)

#: The daemon's own quantization code is an input of every derived file, like the onnxruntime
#: version: bump this when a change of recipes, graph rewrites or sample choice changes what a
#: derivation produces, and every derived variant is rebuilt (and proven) once after the upgrade.
#: 2: graph rewrites before quantizing; held-out proof samples; text-like synthetic OCR pages.


#: 3: proofs gate on the worst part of every output and on the model's task (detections,
#: top-1, masks); auto keeps detection heads out of quantization.
#: 4: auto keeps every head's decode in FP32 (found structurally) and searches by the task metric.
#: 5: a detector's task search starts Percentile-calibrated with its stem and head convs in FP32,
#: judged on every calibration frame; the searches share one time budget.
RECIPES_VERSION = "5"


@dataclass(frozen=True)
class Gates:
    """What a derived variant must meet against FP32 to be served (catalog defaults here)."""

    min_cosine: float = 0.99
    #: served only when fp32_latency / latency >= min_speedup; 0 allows a slower variant
    min_speedup: float = 1.0
    #: optional bound on the largest absolute difference of any output element
    max_abs_error: float | None = None
    #: worst cosine of any part of an output (box coordinates vs class scores, a map's channel)
    min_part_cosine: float = 0.9
    #: detectors: F1 of the variant's detections against FP32's (class-aware NMS, IoU >= 0.5)
    min_detection_f1: float = 0.9
    #: classifiers: share of samples (or positions) whose top-1 class is FP32's
    min_top1_agreement: float = 0.98
    #: probability maps and segmentation: IoU of the masks at the model's threshold
    min_mask_iou: float = 0.9

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Gates":
        return cls(**dict(d or {}))


@dataclass(frozen=True)
class Check:
    """One gate measured on one provider: its value, threshold, and what the value stands on."""

    gate: str                 # "min_detection_f1", "min_part_cosine", ...
    value: float | None       # None: could not be measured (and so not passed)
    threshold: float
    passed: bool
    detail: str = ""          # "detection F1 0.93: 27 of FP32's 29 detections matched ..."

    @property
    def metric(self) -> str:
        """The measured quantity's short name: "F1", "top-1", "mask IoU", "cosine" ..."""
        return _METRICS.get(self.gate, self.gate)

    def failure(self) -> str:
        """The one-line reason of a failed check ("" if it passed)."""
        if self.passed:
            return ""
        if self.value is None:
            return self.detail
        if self.gate.startswith("max_"):
            return f"{self.detail} > {self.gate} {self.threshold:.4g}"
        digits = 2 if self.gate == "min_speedup" else 4
        return f"{self.detail} < {self.gate} {self.threshold:.{digits}f}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Check":
        return cls(**dict(d))


@dataclass(frozen=True)
class ProviderProof:
    """The result of proving one file on one execution provider."""

    provider: str
    usable: bool                 # loaded and ran on this provider
    passed: bool                 # usable and within the gates: may be served on this provider
    reason: str = ""             # why not usable / not passed (the runtime's message where it has one)
    latency_ms: float | None = None
    fp32_latency_ms: float | None = None
    speedup: float | None = None  # fp32_latency_ms / latency_ms, measured interleaved
    cosine: float | None = None   # worst output's cosine similarity against FP32
    max_abs_error: float | None = None
    part_cosine: float | None = None   # the worst part's cosine (see workers.tasks.parts)
    worst_part: str = ""               # which part that was ("output0 class scores")
    #: every gate measured on this provider, the task's first when the model has one
    checks: tuple[Check, ...] = ()
    #: what ran it: the interpreter and its onnxruntime (the node runtime that ``runtimes``
    #: maps to this provider, else the daemon's own verify worker)
    python: str = ""
    onnxruntime: str = ""
    runtime_package: str = ""         # "onnxruntime-openvino==1.24.1"

    @property
    def task_check(self) -> Check | None:
        """The task metric's check (detection F1, top-1, mask IoU), if the model has a task."""
        return next((c for c in self.checks if c.gate in TASK_GATES), None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProviderProof":
        d = {k: v for k, v in dict(d).items() if k in _PROVIDER_PROOF_FIELDS}
        d["checks"] = tuple(Check.from_dict(c) for c in d.get("checks", ()))
        return cls(**d)


@dataclass(frozen=True)
class Proof:
    """Whether a file may be served, per provider, and why. Keyed by what it was proven against."""

    variant: str
    file_sha256: str
    key: str                              # proof_key(...) of the inputs it was proven with
    checker_ok: bool
    checker_error: str = ""
    providers: tuple[ProviderProof, ...] = ()
    onnxruntime: str = ""
    warnings: tuple[str, ...] = ()
    #: what the agreement stands on: how many held-out samples, from where
    samples: int = 0
    inputs: str = ""          # "calibration" (real, held out), "synthetic", "" (FP32 alone)
    task: str = ""            # "detection" | "classification" | "mask" | "" (per-part only)

    @property
    def synthetic(self) -> bool:
        return self.inputs == SYNTHETIC

    def evidence(self, provider: str) -> str:
        """What the proof on ``provider`` stands on, for a person or a node: "F1 0.934 on 8
        held-out samples" or "cosine 0.9990 on 4 synthetic samples (weak: no calibration
        folder)"; "" for FP32, which is proven alone."""
        if not self.samples:
            return ""
        p = self.on(provider)
        check = next((c for c in (p.checks if p else ()) if c.value is not None
                      and c.gate != "min_speedup"), None)
        digits = (4 if "cosine" in check.metric else 3) if check else 0
        measured = f"{check.metric} {check.value:.{digits}f} on " if check else ""
        if self.synthetic:
            return f"{measured}{self.samples} synthetic samples (weak: no calibration folder)"
        return f"{measured}{self.samples} held-out samples"

    def on(self, provider: str) -> ProviderProof | None:
        return next((p for p in self.providers if p.provider == provider), None)

    @property
    def passed_anywhere(self) -> bool:
        return self.checker_ok and any(p.passed for p in self.providers)

    @property
    def passed_on(self) -> tuple[str, ...]:
        """The providers this file may be served on."""
        return tuple(p.provider for p in self.providers if p.passed) if self.checker_ok else ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = [asdict(p) | {"checks": [asdict(c) for c in p.checks]}
                          for p in self.providers]
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Proof":
        d = {k: v for k, v in dict(d).items() if k in _PROOF_FIELDS}
        d["providers"] = tuple(ProviderProof.from_dict(p) for p in d.get("providers", ()))
        d["warnings"] = tuple(d.get("warnings", ()))
        return cls(**d)


@dataclass(frozen=True)
class Derivation:
    """What a derived file was made from; any change makes the file stale."""

    source_sha256: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    onnx: str = ""
    onnxruntime: str = ""

    def key(self) -> str:
        cached = self.__dict__.get("_key")
        if cached is None:
            cached = digest_of({"source_sha256": self.source_sha256, "method": self.method,
                                "params": dict(self.params), "onnx": self.onnx,
                                "onnxruntime": self.onnxruntime})
            object.__setattr__(self, "_key", cached)
        return cached

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Derivation":
        return cls(**dict(d))


TASK_GATES = ("min_detection_f1", "min_top1_agreement", "min_mask_iou")
_METRICS = {"min_detection_f1": "F1", "min_top1_agreement": "top-1", "min_mask_iou": "mask IoU",
            "min_part_cosine": "worst part cosine", "min_cosine": "cosine",
            "min_speedup": "speedup", "max_abs_error": "max abs error"}
#: Proof.inputs values
CALIBRATION, SYNTHETIC = "calibration", "synthetic"
# manifests written by older versions may carry fields that no longer exist: their proofs are
# stale anyway (the key changed), but reading them must not fail
_PROVIDER_PROOF_FIELDS = frozenset(f.name for f in fields(ProviderProof))
_PROOF_FIELDS = frozenset(f.name for f in fields(Proof))


def proof_key(*, file_sha256: str, reference_sha256: str | None, providers: tuple[str, ...],
              gates: Gates, onnxruntime: str, simulated: Mapping[str, tuple[str, ...]] | None = None,
              runtimes: Mapping[str, str] | None = None) -> str:
    """Identity of a proof's inputs: a change of file, reference, providers, gates or runtime
    makes a recorded proof stale. ``runtimes`` maps a provider proven in a node's runtime to
    that runtime's identity (interpreter, onnxruntime build): upgrading it re-proves."""
    frozen = tuple(sorted((k, tuple(sorted(v))) for k, v in (simulated or {}).items()))
    mapped = tuple(sorted((p, r) for p, r in (runtimes or {}).items() if p in providers))
    return _proof_key(file_sha256, reference_sha256, tuple(providers), gates, onnxruntime, frozen,
                      mapped)


@functools.lru_cache(maxsize=16384)
def _proof_key(file_sha256, reference_sha256, providers, gates, onnxruntime, simulated,
               runtimes) -> str:
    # The planner asks for every model on every pass; the inputs rarely change.
    inputs = {"file": file_sha256, "reference": reference_sha256,
              "providers": list(providers), "gates": gates.to_dict(),
              "onnxruntime": onnxruntime, "simulated": {k: list(v) for k, v in simulated}}
    if runtimes:   # absent without a mapping: the keys of every existing proof stay as they were
        inputs["runtimes"] = dict(runtimes)
    return digest_of(inputs)


def digest_of(obj: Any) -> str:
    """Stable short digest of a JSON-able value."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class Serving:
    """The derived variant serving now that a rebuild from a newer generation of field samples
    would replace: the rebuild must pass on every provider it passes on (``withheld_reason``)."""

    file_name: str
    variant: str
    passes_on: tuple[str, ...]


def withheld_reason(proof: Proof, serving: Serving | None) -> str:
    """Why a build must not replace the variant serving now ('' when it may): it did not pass on
    every provider that one passes on."""
    if serving is None:
        return ""
    failing = [p for p in serving.passes_on if p not in proof.passed_on]
    if not failing:
        return ""
    return f"rebuilt from newer field samples, it did not pass ({_refusals(proof, failing)})"


def _refusals(proof: Proof, providers: list[str]) -> str:
    if not proof.checker_ok:
        return proof.checker_error[:300]
    return "; ".join(f"{p}: {(proof.on(p).reason if proof.on(p) else '') or 'not proven'}"
                     for p in providers)[:300]


def still_serving(serving: Serving, proof: Proof | None) -> str:
    """After a withheld rebuild, what the serving variant's proof on the newer held-out samples
    says (``proof``; None: it could not be proven again)."""
    if proof is None:
        return f"; {serving.file_name} keeps serving"
    failing = [p for p in serving.passes_on if p not in proof.passed_on]
    if not failing:
        return f"; {serving.file_name} passes on them and keeps serving"
    return (f"; {serving.file_name} fails on them too ({_refusals(proof, failing)}): FP32 serves "
            "there")
