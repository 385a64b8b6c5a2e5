"""What may be served: the model views the reconciler publishes, and the pure per-node choice.

The reconciler builds a ``ModelView`` per catalog entry and the runner hands them to
``server.publish``; the server calls ``choose`` for every subscriber (node providers + preference,
minus variants some node rejected). Pure data and a pure function: no disk, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .methods import METHODS
from .variants import FP16, FP32, INT8, Proof, ProviderProof

#: a tie in speed goes to the smaller risk of a wrong answer
_RISK = {FP32: 0, FP16: 1, INT8: 2}


@dataclass(frozen=True)
class VariantView:
    variant: str            # "fp32" | "int8" | "fp16"
    path: str               # absolute path of the published file
    sha256: str
    size: int
    proof: Proof | None     # None = not proven (yet): never served
    #: which published copy (its inode): a node's rejection names the copy it was given
    revision: str = ""


@dataclass(frozen=True)
class ModelView:
    name: str
    state: str              # "ready" | "pending" | "error"  (what the daemon is doing with it)
    #: only OFFERED variants: intact files of the current derivation, quantized ones only while
    #: quantize is enabled (the reconciler filters)
    variants: tuple[VariantView, ...]
    reason: str = ""        # human text: what is going on / why nothing can be served
    detail: Mapping[str, Any] = field(default_factory=dict)  # free-form status for `status`

    def variant(self, name: str) -> VariantView | None:
        return next((v for v in self.variants if v.variant == name), None)


@dataclass(frozen=True)
class Choice:
    variant: str
    path: str
    sha256: str
    provider: str
    reason: str


@dataclass(frozen=True)
class Unavailable:
    reason: str


def choose(view: ModelView, providers: Sequence[str], prefer: str,
           rejected: frozenset[tuple[str, str]] = frozenset()) -> Choice | Unavailable:
    """The variant one node should load: first provider (in the node's order) with a candidate.

    ``rejected`` holds the ``(sha256, provider)`` pairs this node nacked: not chosen for it again.
    """
    problems = []
    for provider in providers:
        candidates = {}
        refusals = {}
        for vv in sorted(view.variants, key=lambda v: _RISK.get(v.variant, 9)):
            speedup, why_not = _candidate(vv, provider, rejected)
            if why_not:
                refusals[vv.variant] = why_not
            else:
                candidates[vv.variant] = (vv, speedup)
        if not candidates:
            problems.append(f"{provider}: {_summary(view, refusals)}")
            continue
        fastest = max(candidates.values(),
                      key=lambda c: (c[1], -_RISK.get(c[0].variant, 9)))
        if prefer in candidates:
            vv, speedup = candidates[prefer]
            reason = f"{prefer} as preferred, {speedup:.2f}x fp32 on {provider}"
        else:
            vv, speedup = fastest
            reason = f"fastest proven on {provider}: {vv.variant} {speedup:.2f}x fp32"
            if prefer != "fastest":
                why = refusals.get(prefer) or _not_offered(view, prefer)
                reason = f"{prefer} not served ({why}); {reason}"
        evidence = vv.proof.evidence(provider) if vv.proof else ""
        if evidence:
            reason += f" ({evidence})"
        if problems:
            reason += "; skipped " + "; ".join(problems)
        return Choice(variant=vv.variant, path=vv.path, sha256=vv.sha256, provider=provider,
                      reason=reason)
    head = f"{view.reason}; " if view.reason else ""
    return Unavailable(reason=head + "no proven variant: " + "; ".join(problems))


def _candidate(vv: VariantView, provider: str,
               rejected: frozenset[tuple[str, str]]) -> tuple[float, str]:
    """(speedup, "") for a servable variant on ``provider``, else (0, why not)."""
    proof = vv.proof
    if proof is None:
        return 0.0, f"{vv.variant} not proven yet"
    if not proof.checker_ok:
        return 0.0, f"{vv.variant} failed the onnx checker: {proof.checker_error}".rstrip(": ")
    pp: ProviderProof | None = proof.on(provider)
    if pp is None:
        return 0.0, f"{vv.variant} not proven on {provider}"
    # FP32 is the reference: it only has to load and run; derived variants must pass the gates.
    if not (pp.passed or (vv.variant == FP32 and pp.usable)):
        return 0.0, f"{vv.variant}: {pp.reason or 'failed its proof'}"
    if (vv.sha256, provider) in rejected:
        return 0.0, f"{vv.variant} rejected by this node on {provider}"
    if vv.variant == FP32:
        return 1.0, ""
    return (pp.speedup if pp.speedup is not None else 1.0), ""


def _not_offered(view: ModelView, variant: str) -> str:
    why = _why_not_offered(view, variant)
    return f"{variant} not built: {why}" if why else f"{variant} not built"


def _why_not_offered(view: ModelView, variant: str) -> str:
    """Why ``variant`` is not among the offered ones, from what the view's detail tells."""
    detail = view.detail or {}
    if variant == FP32:
        return view.reason or "no proven fp32 file"
    quantize = detail.get("quantize")  # views.py: {"enabled": bool, "method": str}
    if isinstance(quantize, Mapping):
        if quantize.get("enabled") is False:
            return "quantization disabled"
        method = METHODS.get(quantize.get("method"))
        makes = method.variant if method is not None else None
        if makes not in (None, variant):
            return f"quantize method {quantize['method']} makes {makes}"
    if detail.get("quantize_error"):
        return f"quantize failed: {detail['quantize_error']}"
    return view.reason


def _summary(view: ModelView, refusals: Mapping[str, str]) -> str:
    if not view.variants:
        return "no file yet"
    return ", ".join(refusals.values())


__all__ = ["VariantView", "ModelView", "Choice", "Unavailable", "choose",
           "FP32", "INT8", "FP16"]
