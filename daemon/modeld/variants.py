"""What a variant is: its file name, the method that makes it, the gates it must pass, its proof.

Pure data shared by the planner, the workers (which produce proofs) and the serving choice
(which reads them). Everything here pickles and round-trips through JSON for the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

FP32, INT8, FP16 = "fp32", "int8", "fp16"

#: variant -> file name inside models/<name>/ (the seeds' names)
VARIANT_FILES: Mapping[str, str] = {FP32: "model.onnx", INT8: "model-int8.onnx",
                                    FP16: "model-fp16.onnx"}
FILE_VARIANTS: Mapping[str, str] = {v: k for k, v in VARIANT_FILES.items()}

#: quantization method -> the variant it produces (``auto`` picks at build time: INT8 or FP16)
METHODS: Mapping[str, str | None] = {"dynamic_int8": INT8, "static_int8": INT8, "fp16": FP16,
                                     "auto": None}

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)

#: The daemon's own quantization code is an input of every derived file, like the onnxruntime
#: version: bump this when a change of recipes, graph rewrites or sample choice changes what a
#: derivation produces, and every derived variant is rebuilt (and proven) once after the upgrade.
#: 2: graph rewrites before quantizing; held-out proof samples; text-like synthetic OCR pages.
RECIPES_VERSION = "2"


@dataclass(frozen=True)
class Gates:
    """What a derived variant must meet against FP32 to be served."""

    min_cosine: float = 0.99
    #: served only when fp32_latency / latency >= min_speedup; 0 allows a slower variant
    min_speedup: float = 1.0
    #: optional bound on the largest absolute difference of any output element
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"min_cosine": self.min_cosine, "min_speedup": self.min_speedup,
                "max_abs_error": self.max_abs_error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Gates":
        return cls(**dict(d or {}))


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
    detection_match: float | None = None  # detectors: share of FP32 detections matched

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProviderProof":
        return cls(**dict(d))


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

    def on(self, provider: str) -> ProviderProof | None:
        return next((p for p in self.providers if p.provider == provider), None)

    @property
    def passed_anywhere(self) -> bool:
        return self.checker_ok and any(p.passed for p in self.providers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = [asdict(p) for p in self.providers]
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Proof":
        d = dict(d)
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


def proof_key(*, file_sha256: str, reference_sha256: str | None, providers: tuple[str, ...],
              gates: Gates, onnxruntime: str, simulated: Mapping[str, tuple[str, ...]] | None = None
              ) -> str:
    """Identity of a proof's inputs: a change of file, reference, providers, gates or runtime
    makes a recorded proof stale."""
    frozen = tuple(sorted((k, tuple(sorted(v))) for k, v in (simulated or {}).items()))
    return _proof_key(file_sha256, reference_sha256, tuple(providers), gates, onnxruntime, frozen)


@functools.lru_cache(maxsize=16384)
def _proof_key(file_sha256, reference_sha256, providers, gates, onnxruntime, simulated) -> str:
    # The planner asks for every model on every pass; the inputs rarely change.
    return digest_of({"file": file_sha256, "reference": reference_sha256,
                      "providers": list(providers), "gates": gates.to_dict(),
                      "onnxruntime": onnxruntime,
                      "simulated": {k: list(v) for k, v in simulated}})


def digest_of(obj: Any) -> str:
    """Stable short digest of a JSON-able value."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:32]
