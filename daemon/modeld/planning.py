"""Pure planning: compare the desired state (catalog) with the actual state (inventory).

``plan(catalog, inventory, context) -> list[Action]`` gives at most one action per model, the
first thing that model needs (pull before derive before prove); the reconciler runs it and plans
again. No disk, no clock: tested with plain tables in tests/unit/test_planning.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Union

from .catalog import Catalog, ModelEntry
from .inventory import UNREADABLE, Inventory, ModelState
from .layout import CONFIG_FILE, FP32_FILE, LABELS_FILE
from .manifest import FileRecord, Manifest
from .methods import METHODS, worker_params
from .unchanged import MISSING, PassMemo
from .variants import (FILE_VARIANTS, FP32, RECIPES_VERSION, Derivation, Gates, Proof, Serving,
                       proof_key)  # noqa: F401 - proof_key: tests
from .samples import (FieldSamples, field_calibration, same_but_samples,
                      waiting_for_samples)
from .share import ADOPTED, adopt_key, is_adopted, upload_key
from .work import ProofBasis

_COMMIT = re.compile(r"[0-9a-f]{40}")
RECHECK_REASON = "a node rejected it: hashing and proving it again"


@dataclass(frozen=True)
class PlanContext:
    """Inputs of planning that are not the catalog or the store."""

    providers: tuple[str, ...]                       # daemon default (an entry may override)
    onnx_version: str
    onnxruntime_version: str
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: provider -> identity of the node runtime that proves it (``modeld.runtimes.Probed``)
    runtimes: Mapping[str, str] = field(default_factory=dict)
    #: models whose upstream branch/tag should be asked again (resync, SIGHUP, `sync`)
    refresh: frozenset[str] = frozenset()
    #: (model, file name) to prove again although its proof is current: a node rejected it, and
    #: a nack is evidence, not a verdict (the daemon's own proof decides for every node)
    recheck: frozenset[tuple[str, str]] = frozenset()
    #: model -> its field samples (``modeld.samples``), for entries that calibrate on them
    field_samples: Mapping[str, FieldSamples] = field(default_factory=dict)


@dataclass(frozen=True)
class Pull:
    name: str
    entry: ModelEntry
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.name, "pull", self.entry.source(), config_params(self.entry))


@dataclass(frozen=True)
class Derive:
    name: str
    entry: ModelEntry
    derivation: Derivation
    reason: str
    #: the variant of an older generation of field samples serving now (``serving_now``): the
    #: build replaces it only if it passes wherever that one passes
    serving: Serving | None = None

    @property
    def identity(self) -> tuple:
        return (self.name, "derive", self.derivation.key())


@dataclass(frozen=True)
class Adopt:
    """Look in the entry's share for a variant of the same FP32 bytes and derivation, and
    download it (digest-checked) in place of building one; a ``Prove`` follows as for any file."""

    name: str
    entry: ModelEntry
    derivation: Derivation
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.name, "adopt", self.derivation.key())


@dataclass(frozen=True)
class Share:
    """Upload a variant built and proven here, with its record, to the entry's share."""

    name: str
    entry: ModelEntry
    file_name: str
    sha256: str
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.name, "share", self.file_name, self.sha256)


@dataclass(frozen=True)
class Prove:
    name: str
    entry: ModelEntry
    file_name: str
    variant: str
    key: str                     # the proof key the result will be recorded under
    reference_file: str | None   # FP32 file for derived variants
    gates: Gates
    reason: str
    recheck: bool = False        # proven again after a node's rejection

    @property
    def identity(self) -> tuple:
        return (self.name, "prove", self.file_name, self.key, self.recheck)


@dataclass(frozen=True)
class RestoreMode:
    name: str
    file_name: str
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.name, "restore-mode", self.file_name)


@dataclass(frozen=True)
class Quarantine:
    """models/<name> is not a real folder (a file, a symlink): move it aside, then pull."""

    name: str
    reason: str

    @property
    def identity(self) -> tuple:
        return (self.name, "quarantine")


Action = Union[Pull, Derive, Prove, RestoreMode, Quarantine, Adopt, Share]


def plan(catalog: Catalog, inventory: Inventory, context: PlanContext) -> list[Action]:
    actions = []
    for entry in catalog.entries.values():
        action = plan_model(entry, inventory.get(entry.name), context)
        if action is not None:
            actions.append(action)
    return actions


class Planner:
    """``plan`` with a memory of the previous pass: a model whose entry and scanned state are the
    very objects planned last time gets its previous answer (the identity contract:
    ``modeld.unchanged``). A no-op pass over a large catalog costs identity checks, not planning."""

    def __init__(self) -> None:
        self._memo: PassMemo[Action | None] = PassMemo()
        self._context: tuple | None = None

    def plan(self, catalog: Catalog, inventory: Inventory, context: PlanContext) -> list[Action]:
        fixed = (context.providers, context.onnx_version, context.onnxruntime_version,
                 dict(context.simulated), dict(context.runtimes))
        if fixed != self._context:
            self._memo.clear()
            self._context = fixed
        memo, refresh = self._memo, context.refresh
        rechecked = {(name, f) for name, f in context.recheck}
        actions = []
        for name, entry in catalog.entries.items():
            state = inventory.models.get(name)
            asked = (name in refresh, frozenset(f for n, f in rechecked if n == name)) \
                if rechecked else (name in refresh,)
            if name in context.field_samples:   # a new generation is new work
                asked += (context.field_samples[name],)
            action = memo.recall(name, (entry, state), asked)
            if action is MISSING:
                action = plan_model(entry, state, context)
            memo.remember(name, (entry, state), asked, action)
            if action is not None:
                actions.append(action)
        memo.end_pass()
        return actions


def plan_model(entry: ModelEntry, state: ModelState | None, context: PlanContext) -> Action | None:
    manifest = state.manifest if state else Manifest(name=entry.name)
    if state is not None and state.misplaced:
        return Quarantine(entry.name, state.problem)
    if state is not None:
        for file_state in state.files.values():
            if file_state.status == UNREADABLE and file_state.record is not None:
                return RestoreMode(entry.name, file_state.name, f"{file_state.name}: {file_state.detail}")

    stale = source_problem(entry, state)
    if stale:
        return Pull(entry.name, entry, stale)
    fp32 = manifest.files[FP32_FILE]
    return (local_work(entry, state, manifest, fp32, context)
            or upstream_check(entry, fp32, context))


def upstream_check(entry: ModelEntry, fp32: FileRecord, context: PlanContext) -> Pull | None:
    """Last in line: an unreachable hub must never hold up proving or deriving local files."""
    if entry.name in context.refresh and not is_pinned(entry, fp32):
        return Pull(entry.name, entry, "check upstream for a new commit")
    return None


def local_work(entry: ModelEntry, state: ModelState | None, manifest: Manifest, fp32: FileRecord,
               context: PlanContext) -> Action | None:
    """Proofs and derived variants of the FP32 file that is on disk."""
    providers = providers_for(entry, context)
    fp32_key = proof_basis(context).key(file_sha256=fp32.sha256, reference_sha256=None,
                                        providers=providers, gates=Gates(),
                                        simulated=context.simulated)
    fp32_proof = manifest.proofs.get(FP32_FILE)
    if fp32_proof is None or fp32_proof.key != fp32_key:
        return Prove(entry.name, entry, FP32_FILE, FP32, fp32_key, None, Gates(),
                     "FP32 not proven" if fp32_proof is None else "FP32 proof is stale")
    if (entry.name, FP32_FILE) in context.recheck:
        return Prove(entry.name, entry, FP32_FILE, FP32, fp32_key, None, Gates(),
                     RECHECK_REASON, recheck=True)

    spec = entry.quantize
    if spec is None or not spec.enabled:
        return None
    if spec.method == "static_int8" and waiting_for_samples(
            entry, context.field_samples.get(entry.name)):
        return None   # no calibration folder: built from field samples once there are enough
    derivation = desired_derivation(entry, fp32, context)
    if derivation.key() in manifest.failures:
        return None  # failed permanently for exactly these inputs; a change of any input retries
    record = derived_record(manifest, derivation)
    if record is None:
        if spec.share and adopt_key(derivation) not in manifest.shares:
            return Adopt(entry.name, entry, derivation, f"look in {spec.share} for this variant")
        serving = serving_now(state, derivation)
        return Derive(entry.name, entry, derivation,
                      f"newer field samples: rebuilding {spec.method} (the current one serves "
                      "until the new one passes)" if serving else
                      f"no {spec.method} variant for these inputs", serving=serving)
    if state is None or not state.intact(record.name):
        detail = state.files[record.name].detail if state and record.name in state.files else "missing"
        if is_adopted(record) and (manifest.shares.get(adopt_key(derivation)) or {}).get(
                "outcome") == ADOPTED:   # fetched from the share: fetch it again (once)
            return Adopt(entry.name, entry, derivation, f"{record.name}: {detail}")
        return Derive(entry.name, entry, derivation, f"{record.name}: {detail}")
    key = derived_proof_key(entry, record, fp32, context)
    proof = manifest.proofs.get(record.name)
    if proof is None or proof.key != key:
        return Prove(entry.name, entry, record.name, variant_of(record), key, FP32_FILE,
                     spec.gates, f"{record.name} not proven" if proof is None else
                     f"{record.name} proof is stale")
    if (entry.name, record.name) in context.recheck:
        return Prove(entry.name, entry, record.name, variant_of(record), key, FP32_FILE,
                     spec.gates, RECHECK_REASON, recheck=True)
    return share_work(entry, manifest, record, proof)


def share_work(entry: ModelEntry, manifest: Manifest, record: FileRecord,
               proof: Proof) -> Action | None:
    """After a current proof: a shared variant that fails here is replaced by our own build; one
    built and proven here is shared (once: the outcome is kept in the manifest)."""
    spec = entry.quantize
    assert spec is not None and record.derivation is not None
    if is_adopted(record):
        if not proof.passed_anywhere:
            return Derive(entry.name, entry, record.derivation,
                          "the shared variant did not prove on this host: building our own")
        return None
    if spec.share and proof.passed_anywhere and upload_key(record.sha256) not in manifest.shares:
        return Share(entry.name, entry, record.name, record.sha256, f"share it in {spec.share}")
    return None


def source_problem(entry: ModelEntry, state: ModelState | None) -> str:
    """Why the pulled files do not match the entry ('' when they do)."""
    if state is None:
        return "not pulled yet"
    if state.problem and not state.manifest.files:
        return state.problem
    fp32 = state.manifest.files.get(FP32_FILE)
    if fp32 is None or fp32.provenance is None:
        return "not pulled yet"
    p = fp32.provenance
    if (p.repo, p.filename, p.revision or "main") != (entry.repo, entry.filename,
                                                      entry.revision or "main"):
        return "catalog source changed"
    if not state.intact(FP32_FILE):
        return f"{FP32_FILE}: {state.files[FP32_FILE].detail}"
    labels = state.manifest.files.get(LABELS_FILE)
    if entry.labels:
        if labels is None or labels.provenance is None or labels.provenance.filename != entry.labels:
            return "labels not pulled yet"
        if not state.intact(LABELS_FILE):
            return f"{LABELS_FILE}: {state.files[LABELS_FILE].detail}"
    config = state.manifest.files.get(CONFIG_FILE)
    if config is None or config.derivation is None:
        return "config.json not written yet"
    if config.derivation.key() != config_derivation(entry, fp32, labels).key():
        return "config.json out of date"
    if not state.intact(CONFIG_FILE):
        return f"{CONFIG_FILE}: {state.files[CONFIG_FILE].detail}"
    return ""


def is_pinned(entry: ModelEntry, fp32: FileRecord) -> bool:
    """A full commit hash never moves: no need to ask the hub again."""
    return bool(entry.revision and _COMMIT.fullmatch(entry.revision))


def providers_for(entry: ModelEntry, context: PlanContext) -> tuple[str, ...]:
    return tuple(entry.providers) if entry.providers else tuple(context.providers)


def config_params(entry: ModelEntry) -> dict:
    return {"task": entry.task, "description": entry.description,
            "preprocessing_preset": entry.preprocessing_preset, "input_size": entry.input_size}


def config_derivation(entry: ModelEntry, fp32: FileRecord, labels: FileRecord | None) -> Derivation:
    """config.json is derived from the model, its labels and the entry's metadata."""
    params = config_params(entry) | {"labels_sha256": labels.sha256 if labels and entry.labels else None}
    return Derivation(source_sha256=fp32.sha256, method="config", params=params)


def desired_derivation(entry: ModelEntry, fp32: FileRecord, context: PlanContext) -> Derivation:
    """The one derivation of a quantized file: the canonical options of the method's table
    (``methods.METHODS``), what shapes the calibration and agreement inputs, the recipes
    version, and for a method that chooses (``auto``) what its choice depends on. The quantize
    request carries it (``handoff.request_for``); the worker records it as it is."""
    spec = entry.quantize
    assert spec is not None
    method = METHODS[spec.method]
    # The preset and input size shape the calibration and agreement inputs: inputs too.
    # The calibration folder is the catalog's, or the generation of field samples in use.
    params = worker_params(spec.method, spec.params) | {
        "calibration": field_calibration(entry, context.field_samples.get(entry.name)),
        "preprocessing_preset": entry.preprocessing_preset, "input_size": entry.input_size,
        "recipes": RECIPES_VERSION}
    if method.chooses:
        # auto chooses among candidates by the gates and the providers: they are inputs too
        providers = providers_for(entry, context)
        params |= {"gates": spec.gates.to_dict(), "providers": list(providers)}
        mapped = {p: r for p, r in context.runtimes.items() if p in providers}
        if mapped:  # its candidates were timed there too
            params["runtimes"] = mapped
    return Derivation(source_sha256=fp32.sha256, method=spec.method, params=params,
                      onnx=context.onnx_version, onnxruntime=context.onnxruntime_version)


def derived_record(manifest: Manifest, derivation: Derivation) -> FileRecord | None:
    key = derivation.key()
    for record in manifest.files.values():
        if record.derivation is not None and record.derivation.method != "config" \
                and record.derivation.key() == key:
            return record
    return None


def served_record(manifest: Manifest, derivation: Derivation) -> FileRecord | None:
    """The derived file to offer: the one of ``derivation``, else one that differs from it only
    by an older generation of field samples (it keeps serving until the new one is proven)."""
    return derived_record(manifest, derivation) or next(
        (r for r in manifest.files.values()
         if r.derivation is not None and same_but_samples(r.derivation, derivation)), None)


def serving_now(state: ModelState | None, derivation: Derivation) -> Serving | None:
    """The variant of an older generation of field samples than ``derivation`` that serves now
    (intact, proven for its bytes, passing somewhere): what a rebuild must do as well as to
    replace it. A build that does not is withheld, so a worse calibration never un-serves a
    good variant."""
    if state is None or derived_record(state.manifest, derivation) is not None:
        return None
    older = served_record(state.manifest, derivation)
    proof = state.manifest.proofs.get(older.name) if older is not None else None
    if older is None or proof is None or proof.file_sha256 != older.sha256 \
            or not state.intact(older.name) or not proof.passed_on:
        return None
    return Serving(older.name, variant_of(older), proof.passed_on)


def derived_proof_key(entry: ModelEntry, record: FileRecord, fp32: FileRecord,
                      context: PlanContext) -> str:
    assert entry.quantize is not None
    return proof_basis(context).key(file_sha256=record.sha256, reference_sha256=fp32.sha256,
                                    providers=providers_for(entry, context),
                                    gates=entry.quantize.gates, simulated=context.simulated)


def proof_basis(context: PlanContext) -> ProofBasis:
    """The daemon's proof key inputs besides the files: planned keys are made from it, and every
    proving request carries it (``handoff.request_for``), so a proof comes back under its key."""
    return ProofBasis(context.onnxruntime_version, context.runtimes)


def variant_of(record: FileRecord) -> str:
    return FILE_VARIANTS.get(record.name, record.name)
