"""Pure: which variants of each catalog model are offered to nodes right now, as ``ModelView``s.

Called by the reconciler after every pass; the server picks per node among the offered variants
by their proofs (``serving.choose``). Offered means: an intact file whose proof is for exactly its
bytes, and for a derived file, the derivation the catalog asks for now. The last good FP32 keeps
being offered while a new source is pulled; an intact INT8 is offered while a damaged FP32 heals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .catalog import Catalog, ModelEntry
from .inventory import Inventory, ModelState
from .layout import FP32_FILE
from .planning import (PlanContext, desired_derivation, served_record, source_problem,
                       variant_of)
from .samples import uses_field_samples, waiting_for_samples
from .serving import ModelView, VariantView
from .unchanged import MISSING, PassMemo
from .share import adopt_key, is_adopted, provenance_detail
from .variants import FP32


@dataclass(frozen=True)
class Activity:
    """What the reconciler is doing, or last failed doing, for one model."""

    action: str | None = None        # "pulling" | "quantizing" | "proving" | None
    detail: str = ""
    progress: float | None = None
    error: str | None = None         # one line, last failure
    error_type: str | None = None
    retry_in_s: float | None = None  # temporary failure: when the next attempt is due


def build_views(catalog: Catalog, inventory: Inventory, context: PlanContext,
                activity: Mapping[str, Activity], pending: frozenset[str] = frozenset(),
                models_root: str = "") -> dict[str, ModelView]:
    return {name: model_view(entry, inventory.get(name), context,
                             activity.get(name, Activity()), name in pending, models_root)
            for name, entry in catalog.entries.items()}


class ViewBuilder:
    """``build_views`` with a memory of the previous pass: a model whose entry and scanned state
    are the very objects of last time, with the same activity and pending flag, keeps its view
    object, so ``Server.publish`` sees at a glance that nothing changed (``modeld.unchanged``)."""

    def __init__(self) -> None:
        self._memo: PassMemo[ModelView] = PassMemo()
        self._context: tuple | None = None

    def build(self, catalog: Catalog, inventory: Inventory, context: PlanContext,
              activity: Mapping[str, Activity], pending: frozenset[str] = frozenset(),
              models_root: str = "") -> dict[str, ModelView]:
        fixed = (context.providers, context.onnx_version, context.onnxruntime_version,
                 dict(context.simulated), models_root)
        if fixed != self._context:
            self._memo.clear()
            self._context = fixed
        memo, idle = self._memo, Activity()
        views = {}
        for name, entry in catalog.entries.items():
            state = inventory.models.get(name)
            doing = activity.get(name, idle)
            # a new count or generation of field samples is a new view
            key = (doing, name in pending, context.field_samples.get(name))
            view = memo.recall(name, (entry, state), key)
            if view is MISSING:
                view = model_view(entry, state, context, doing, key[1], models_root)
            views[name] = memo.remember(name, (entry, state), key, view)
        memo.end_pass()
        return views


def model_view(entry: ModelEntry, state: ModelState | None, context: PlanContext,
               activity: Activity, pending: bool, models_root: str) -> ModelView:
    offered = offered_variants(entry, state, context, models_root)
    busy = activity.action is not None or pending
    if activity.error and not busy:
        view_state = "error"
    elif busy:
        view_state = "pending"
    else:
        view_state = "ready"
    field_samples = context.field_samples.get(entry.name)
    # what it is doing, and until there are enough field samples, how many there are
    reason = "; ".join(r for r in (_reason(entry, state, activity, offered)
                                   or ("queued" if pending else ""),
                                   waiting_for_samples(entry, field_samples)) if r)
    detail = _detail(entry, state, activity)
    if uses_field_samples(entry):
        detail["field_samples"] = (field_samples.to_dict() if field_samples is not None
                                   else {"count": 0, "generation": None})
    return ModelView(name=entry.name, state=view_state, variants=offered, reason=reason,
                     detail=detail)


def offered_variants(entry: ModelEntry, state: ModelState | None, context: PlanContext,
                     models_root: str) -> tuple[VariantView, ...]:
    if state is None:
        return ()
    manifest = state.manifest
    out = []
    fp32 = manifest.files.get(FP32_FILE)
    if fp32 is not None and state.intact(FP32_FILE):
        out.append(_view(state, FP32_FILE, FP32, models_root))
    spec = entry.quantize
    if fp32 is not None and spec is not None and spec.enabled:
        record = served_record(manifest, desired_derivation(entry, fp32, context))
        if record is not None and state.intact(record.name):
            out.append(_view(state, record.name, variant_of(record), models_root))
    return tuple(v for v in out if v.proof is not None)


def _view(state: ModelState, file_name: str, variant: str, models_root: str) -> VariantView:
    record = state.manifest.files[file_name]
    proof = state.manifest.proofs.get(file_name)
    if proof is not None and proof.file_sha256 != record.sha256:
        proof = None
    return VariantView(variant=variant, path=f"{models_root}/{state.name}/{file_name}",
                       sha256=record.sha256, size=record.size, proof=proof,
                       revision=str(record.inode))


def _reason(entry: ModelEntry, state: ModelState | None, activity: Activity,
            offered: tuple[VariantView, ...]) -> str:
    if activity.action:
        # Only the verb: progress lives in ``detail``, so nodes are not re-told on every tick.
        return activity.action
    if activity.error:
        return activity.error
    if not offered:
        return source_problem(entry, state) or "not proven yet"
    if not any(v.proof is not None and v.proof.passed_anywhere for v in offered):
        # proven, but refused everywhere (an operator no provider has): say why at the top
        refusals = "; ".join(f"{v.variant} on {p.provider}: {p.reason}" for v in offered
                             if v.proof is not None for p in v.proof.providers if not p.passed)
        return f"refused by every provider ({refusals})"[:500]
    return ""


def _detail(entry: ModelEntry, state: ModelState | None, activity: Activity) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    if activity.action:
        detail["activity"] = {"action": activity.action, "detail": activity.detail,
                              "progress": activity.progress}
    if activity.error:
        detail["error"] = {"message": activity.error, "type": activity.error_type,
                           "retry_in_s": activity.retry_in_s}
    for label, err in (("catalog_error", entry.stale_error), ("quantize_error", entry.quantize_error)):
        if err is not None:
            detail[label] = str(err)
    if entry.quantize is not None:
        detail["quantize"] = {"enabled": entry.quantize.enabled, "method": entry.quantize.method}
    if state is not None:
        damaged = {n: f"{s.status}: {s.detail}" for n, s in state.files.items() if not s.ok}
        if damaged:
            detail["damaged"] = damaged
        if state.manifest.failures:
            detail["failures"] = dict(state.manifest.failures)
        fp32 = state.manifest.files.get(FP32_FILE)
        if fp32 is not None and fp32.provenance is not None:
            detail["source"] = {"repo": fp32.provenance.repo, "revision": fp32.provenance.revision,
                                "commit": fp32.provenance.commit}
        if state.manifest.shares:
            detail["share"] = {k: dict(v) for k, v in state.manifest.shares.items()}
        for record in state.manifest.files.values():
            if is_adopted(record):
                detail["shared"] = provenance_detail(
                    record, state.manifest.shares.get(adopt_key(record.derivation)),
                    state.manifest.proofs.get(record.name))
    return detail
