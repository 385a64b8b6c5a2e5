"""What crosses the worker boundary: one frozen dataclass per worker request and result.

Light (stdlib and the pure modules only): the reconciler builds these (``handoff.request_for``),
``jobs.JobRunner`` pickles them into a ``spawn`` worker as they are, and the worker's result comes
back as one of them, unpickled in the daemon without importing a worker module. What only the
daemon knows travels in the request and is used as it is: a quantized file's ``derivation``, and
the ``ProofBasis`` its proof key is made from; nothing is computed again on the far side or
overwritten when it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from .manifest import FileRecord
from .variants import DEFAULT_PROVIDERS, Derivation, Gates, Proof, Serving, proof_key

#: a worker's progress report: ``progress(0.4, "quantizing")`` (None: fraction unknown)
ProgressFn = Callable[[float | None, str], None]


@dataclass(frozen=True)
class ProofBasis:
    """What a proof key is made of besides the digests of the file and its reference: the
    onnxruntime that proves and the node runtimes' identities (provider -> what
    ``runtimes.probe`` said). The daemon's (``planning.proof_basis``) in every request it sends,
    so a worker's proof carries the key the planner looks for."""

    onnxruntime: str
    runtimes: Mapping[str, str] = field(default_factory=dict)

    def key(self, *, file_sha256: str, reference_sha256: str | None, providers: tuple[str, ...],
            gates: Gates, simulated: Mapping[str, tuple[str, ...]] | None = None) -> str:
        return proof_key(file_sha256=file_sha256, reference_sha256=reference_sha256,
                         providers=providers, gates=gates, onnxruntime=self.onnxruntime,
                         simulated=simulated, runtimes=self.runtimes)


# -- fetch ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchRequest:
    """Pull one catalog entry from the Hub into ``model_dir``."""

    target: ClassVar[str] = "modeld.workers.fetch:fetch_model"

    name: str                      # validated model name (folder under models/)
    model_dir: str                 # absolute path of models/<name>/ (created if missing)
    repo: str                      # "owner/name"
    filename: str                  # path inside the repo
    revision: str | None           # branch/tag/commit; None = "main"
    labels: str | None             # path inside the repo, or None
    task: str
    description: str
    preprocessing_preset: str | None
    input_size: int | None
    known: Mapping[str, FileRecord]   # the manifest's current records by file name
    endpoint: str | None = None       # hub endpoint; None = huggingface_hub's default/HF_ENDPOINT
    token: str | None = None          # HF_TOKEN
    offline: bool = False             # HF_HUB_OFFLINE
    attempts: int = 5                 # bounded retries for temporary faults
    timeout_s: float = 30.0           # per HTTP request (connect/read)
    backoff_base_s: float = 0.5       # exponential backoff with full jitter, capped


@dataclass(frozen=True)
class FetchResult:
    files: tuple[FileRecord, ...]     # records of model.onnx, labels.txt, config.json as published
    commit: str                       # resolved commit
    downloaded_bytes: int
    changed: bool                     # False when every record is as known (nothing downloaded,
                                      # rewritten or re-stat'ed)


# -- quantize ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizeRequest:
    """Build, prove and publish the variant of ``method``; the source is model_dir/model.onnx."""

    target: ClassVar[str] = "modeld.workers.quantize:quantize_model"

    name: str
    model_dir: str              # absolute models/<name>/
    method: str                 # a key of ``methods.METHODS``
    params: Mapping[str, Any]   # canonical options (``methods.canonical``; the catalog's)
    calibration: str | None     # absolute folder, or None
    preprocessing_preset: str | None
    input_size: int | None
    providers: tuple[str, ...]
    gates: Gates
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    task: str | None = None     # the catalog's task: which task metric the proof gates
    #: provider -> the Python of the node runtime that proves it (``Settings.runtimes``)
    runtimes: Mapping[str, str] = field(default_factory=dict)
    #: the daemon's derivation of the file (``planning.desired_derivation``), recorded as it is;
    #: None outside the daemon (``bench``, benchmarks): nothing records the file
    derivation: Derivation | None = None
    #: the daemon's proof key inputs; None: this worker's own onnxruntime, runtimes by path
    basis: ProofBasis | None = None
    #: the variant serving now, built from an older generation of field samples: the build
    #: replaces it only if it passes wherever that one passes, else it is withheld and that one
    #: is proven again on the same newer held-out samples (``QuantizeResult.serving_proof``)
    serving: Serving | None = None


@dataclass(frozen=True)
class QuantizeResult:
    #: the published variant file, the request's derivation set; None: withheld (``serving``)
    record: FileRecord | None
    variant: str                # "int8" | "fp16"
    proof: Proof                # of the built file (also when it is refused or withheld)
    candidates: tuple[dict, ...]  # one row per recipe tried
    warnings: tuple[str, ...]
    withheld: str = ""          # why the build was not published ('' when it was)
    #: withheld: the serving variant's proof on the same held-out samples (None: not made)
    serving_proof: Proof | None = None


# -- prove (the result is a ``variants.Proof``) --------------------------------------------------

@dataclass(frozen=True)
class ProveRequest:
    """Prove one file of a model folder (against FP32 for a derived variant). Also a re-check
    after a node's rejection, and a re-proof on one provider (``Reconciler.reprove``)."""

    target: ClassVar[str] = "modeld.workers.verify:prove"

    model_dir: str
    file_name: str
    variant: str
    reference_file: str | None      # "model.onnx" for derived variants, None for fp32
    providers: tuple[str, ...]
    gates: Gates
    calibration: str | None
    preprocessing_preset: str | None
    input_size: int | None
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    samples: int = 8
    seed: int = 0
    task: str | None = None         # the catalog's task: which task metric is gated
    #: provider -> the Python of the node runtime that proves it (``Settings.runtimes``)
    runtimes: Mapping[str, str] = field(default_factory=dict)
    #: the daemon's proof key inputs; None: this worker's own onnxruntime, runtimes by path
    basis: ProofBasis | None = None


# -- bench (the result is a tuple of table rows) -------------------------------------------------

@dataclass(frozen=True)
class BenchRequest:
    """Which model folder to bench, on which providers, against which gates."""

    target: ClassVar[str] = "modeld.workers.bench:bench_model"

    model_dir: str                       # models/<name>/ holding model.onnx
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    gates: Gates | None = None           # None: the default gates
    calibration: str | None = None
    preprocessing_preset: str | None = None
    input_size: int | None = None
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    samples: int = 8
    seed: int = 0
    #: also build and measure quantize's ``auto`` candidates (slow: minutes on a real model)
    candidates: bool = False
    name: str = ""                       # catalog entry, for messages
    task: str | None = None              # the catalog's task: which task metric is shown
    #: provider -> the Python of the node runtime that measures it (``Settings.runtimes``)
    runtimes: Mapping[str, str] = field(default_factory=dict)


# -- the share (issue 15: modeld.share; the work is in modeld.workers.share) ---------------------

@dataclass(frozen=True)
class AdoptRequest:
    """Look in the share for the variant of ``derivation`` and download it into ``model_dir``."""

    target: ClassVar[str] = "modeld.workers.share:adopt"

    name: str
    model_dir: str
    share: str                        # "owner/repo"
    derivation: Derivation            # the daemon's (source sha256 included): the record's too
    file_name: str | None             # "model-int8.onnx"; None for auto (the record names it)
    endpoint: str | None = None
    token: str | None = None
    offline: bool = False
    attempts: int = 2
    timeout_s: float = 30.0


@dataclass(frozen=True)
class AdoptResult:
    outcome: str                      # share.ADOPTED | share.NONE | share.REFUSED
    detail: str                       # one line for the log and status
    record: FileRecord | None = None  # the published file, the request's derivation set
    commit: str = ""
    builder: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadRequest:
    """Commit a variant built and proven here, with its record, to the share."""

    target: ClassVar[str] = "modeld.workers.share:upload"

    name: str
    model_dir: str
    share: str
    record: FileRecord                # the variant as published here, derivation set
    proof: Proof                      # its proof on this host (the builder's evidence)
    endpoint: str | None = None
    token: str | None = None
    attempts: int = 3                 # look-and-commit rounds when another builder commits first
    timeout_s: float = 60.0


@dataclass(frozen=True)
class UploadResult:
    outcome: str                      # share.SHARED | ALREADY_SHARED | DENIED | FAILED
    detail: str
    commit: str = ""
    path: str = ""


Request = FetchRequest | QuantizeRequest | ProveRequest | BenchRequest | AdoptRequest | UploadRequest
Result = FetchResult | QuantizeResult | Proof | AdoptResult | UploadResult
