"""Pure: what ``status``, ``list`` and ``nodes`` show, as documents (``--json``) and as text.

The CLI builds them from the folder when no daemon runs, and ``modeld.admin`` builds the same
documents inside a running daemon (with its nodes and up-since), so both modes print one shape.
Every ratio printed beside latencies is computed from those printed latencies
(``benchtable.ratio_of``). No disk, no clock, no sockets.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Iterable, Mapping, Sequence

from .benchtable import ratio_of
from .catalog import Catalog
from .serving import Choice, ModelView, choose
from .variants import FP32, Proof

INVALID = "invalid"


def model_report(view: ModelView, providers: Sequence[str],
                 rejected: frozenset[tuple[str, str]] = frozenset()) -> dict[str, Any]:
    """One model: its state, what a node on the first provider is served, and per provider the
    variant served there with its proof's evidence (agreement, latency, FP32 in the same run)."""
    served = choose(view, providers, "fastest", rejected)
    per_provider = {}
    for provider in providers:
        choice = choose(view, [provider], "fastest", rejected)
        per_provider[provider] = (_evidence(view, choice) if isinstance(choice, Choice)
                                  else {"variant": None, "unavailable": choice.reason})
    return {
        "state": view.state, "reason": view.reason,
        "served": ({"variant": served.variant, "path": served.path, "sha256": served.sha256,
                    "provider": served.provider, "reason": served.reason}
                   if isinstance(served, Choice) else None),
        "unavailable": None if isinstance(served, Choice) else served.reason,
        "providers": per_provider,
        "variants": [{"variant": v.variant, "path": v.path, "sha256": v.sha256, "size": v.size,
                      "proof": v.proof.to_dict() if v.proof else None} for v in view.variants],
        "detail": dict(view.detail),
    }


def _evidence(view: ModelView, choice: Choice) -> dict[str, Any]:
    variant = view.variant(choice.variant)
    proof = variant.proof if variant is not None else None
    pp = proof.on(choice.provider) if proof is not None else None
    out: dict[str, Any] = {"variant": choice.variant, "sha256": choice.sha256,
                           "reason": choice.reason}
    if pp is not None:
        latency, fp32, ratio = ratio_of({"variant": choice.variant, "latency_ms": pp.latency_ms,
                                         "fp32_latency_ms": pp.fp32_latency_ms})
        task = pp.task_check
        out.update(latency_ms=latency, fp32_latency_ms=fp32,
                   vs_fp32=None if ratio is None else round(ratio, 2),
                   cosine=pp.cosine, max_abs_error=pp.max_abs_error, part_cosine=pp.part_cosine,
                   task_metric=task.metric if task else None,
                   task_value=task.value if task else None,
                   samples=proof.samples, inputs=proof.inputs,
                   evidence=proof.evidence(choice.provider), warnings=list(proof.warnings))
    return out


def invalid_entries(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Entries the catalog refused and holds no last good version of: shown as ``invalid``."""
    out = {}
    for error in catalog.errors:
        key = error.name or (f"models[{error.index}]" if error.index is not None else None)
        if key is None or key in catalog.entries or key in out:
            continue
        out[key] = {"state": INVALID, "reason": str(error), "served": None,
                    "unavailable": str(error), "providers": {}, "variants": [], "detail": {}}
    return out


def invalid_error(catalog: Catalog, name: str) -> str | None:
    """Why ``name`` is refused by the catalog (None: it is not an invalid entry)."""
    return next((str(e) for e in catalog.errors
                 if e.name == name and name not in catalog.entries), None)


def status_document(views: Mapping[str, ModelView], catalog: Catalog, *, providers: Sequence[str],
                    catalog_state: Mapping[str, Any], mode: Mapping[str, Any],
                    pending: Mapping[str, str] | None = None,
                    rejected: frozenset[tuple[str, str]] = frozenset(),
                    nodes: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    models = {name: model_report(view, providers, rejected) for name, view in views.items()}
    for name, reason in (pending or {}).items():
        if name in models:
            models[name]["pending"] = reason
    for name, sub in _nodes_by_model(nodes or ()).items():
        if name in models:
            models[name]["nodes"] = sub
    models.update(invalid_entries(catalog))
    return {"mode": dict(mode), "catalog": dict(catalog_state), "providers": list(providers),
            "models": models, "nodes": list(nodes) if nodes is not None else None}


def _nodes_by_model(nodes: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        for model, told in (node.get("models") or {}).items():
            out.setdefault(model, []).append({"node": node.get("node"), "pid": node.get("pid"),
                                              **told})
    return out


def node_rows(server_status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The connected nodes (subscribed connections) from the server's ``status`` event."""
    return [{"node": s.get("node") or "", "client": s.get("client"), "pid": s.get("pid"),
             "uid": s.get("uid"), "gid": s.get("gid"), "models": dict(s.get("models") or {})}
            for s in server_status.get("subscribers") or ()]


def list_document(catalog: Catalog, on_disk: Callable[[str], bool], *,
                  mode: Mapping[str, Any],
                  states: Mapping[str, str] | None = None) -> dict[str, Any]:
    rows = []
    for entry in catalog.entries.values():
        q = entry.quantize
        quant = f"{q.method}" if q and q.enabled else ("off" if q else "-")
        if entry.quantize_error is not None:
            quant = "error"
        rows.append({"name": entry.name, "state": (states or {}).get(entry.name, "ok"),
                     "task": entry.task or "", "repo": entry.repo, "filename": entry.filename,
                     "revision": entry.revision or "main", "quantize": quant,
                     "on_disk": on_disk(entry.name),
                     "error": str(entry.stale_error or entry.quantize_error or "") or None})
    for name, report in invalid_entries(catalog).items():
        rows.append({"name": name, "state": INVALID, "task": "", "repo": "", "filename": "",
                     "revision": "", "quantize": "", "on_disk": on_disk(name) if
                     not name.startswith("models[") else False, "error": report["reason"]})
    return {"mode": dict(mode), "catalog": catalog.path, "models": rows}


# -- text ---------------------------------------------------------------------------------------

def table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def mode_line(mode: Mapping[str, Any]) -> str:
    if mode.get("daemon"):
        since = mode.get("up_since_unix_s")
        up = f", up since {_when(since)} ({_duration(mode.get('uptime_s'))})" if since else ""
        return f"daemon: pid {mode.get('pid')} on {mode.get('socket')}{up}"
    return (f"no daemon on {mode.get('socket')}: read from the folder {mode.get('models_dir')}")


def _when(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    s = int(seconds or 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def catalog_line(state: Mapping[str, Any], served: int, daemon: bool) -> str:
    if state.get("ok", True):
        errors = len(state.get("entry_errors") or ())
        bad = f", {errors} invalid entr{'y' if errors == 1 else 'ies'}" if errors else ""
        return f"catalog: ok ({state.get('path')}{bad})"
    if not daemon:
        return f"catalog: BROKEN: {state.get('error')}"
    return (f"catalog: BROKEN: {state.get('error')}; the daemon keeps the last good catalog "
            f"and still serves {served} model{'s' if served != 1 else ''}")


def format_status(doc: Mapping[str, Any]) -> str:
    models = doc["models"]
    served = sum(1 for m in models.values() if m.get("served"))
    lines = [mode_line(doc["mode"]), catalog_line(doc["catalog"], served,
                                                  bool(doc["mode"].get("daemon"))), ""]
    rows = [("MODEL", "STATE", "SERVED", "VARIANTS", "NOTE")]
    for name, m in models.items():
        variants = ", ".join(_variant_summary(v) for v in m.get("variants", ())) or "-"
        note = m.get("reason") or m.get("pending") or (m["served"]["reason"] if m.get("served")
                                                       else m.get("unavailable") or "")
        rows.append((name, m["state"], (m.get("served") or {}).get("variant") or "-", variants,
                     note))
    lines.append(table(rows))
    evidence = [("MODEL", "PROVIDER", "SERVED", "LATENCY", "FP32 SAME RUN", "VS FP32",
                 "AGREEMENT")]
    for name, m in models.items():
        for provider, e in (m.get("providers") or {}).items():
            if not e.get("variant"):
                continue
            evidence.append((name, provider.removesuffix("ExecutionProvider"), e["variant"],
                             _ms(e.get("latency_ms")), _ms(e.get("fp32_latency_ms")),
                             "-" if e.get("vs_fp32") is None else f"{e['vs_fp32']:.2f}x",
                             _agreement(e)))
    if len(evidence) > 1:
        lines += ["", table(evidence)]
    provenance = [share_line(name, m["detail"]["shared"]) for name, m in models.items()
                  if (m.get("detail") or {}).get("shared")]
    if provenance:
        lines += ["", *provenance]
    if doc.get("nodes") is not None:
        lines += ["", format_nodes(doc["nodes"])]
    return "\n".join(lines)


def share_line(name: str, shared: Mapping[str, Any]) -> str:
    """"mlp: model-int8.onnx from the share fleet/v@1a2b3c4 (built on x86_64 ...: CPU 2.91x);
    measured here: CPU 2.75x passed"."""
    def measured(per_provider: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
        return ", ".join(
            f"{p.removesuffix('ExecutionProvider')} "
            + ("-" if m.get("speedup") is None else f"{m['speedup']:.2f}x")
            + ("" if m.get("passed") else " refused") for p, m in per_provider) or "-"
    builder = shared.get("builder") or {}
    built = measured((m.get("provider", "?"), m) for m in builder.get("providers") or ())
    here = measured((shared.get("measured_here") or {}).items())
    return (f"{name}: {shared['file']} from the share {shared['repo']}@{shared['commit'][:7]} "
            f"(built on {builder.get('host') or 'an unnamed host'}: {built}); "
            f"measured here: {here}")


def format_nodes(nodes: Sequence[Mapping[str, Any]]) -> str:
    if not nodes:
        return "no node connected"
    rows = [("NODE", "PID", "MODEL", "TOLD", "GENERATION", "ACKED")]
    for node in nodes:
        for model, told in (node.get("models") or {}).items():
            what = told.get("variant") or told.get("event") or "-"
            if told.get("provider"):
                what += f" on {str(told['provider']).removesuffix('ExecutionProvider')}"
            acked = told.get("acked_generation")
            rows.append((node.get("node") or f"client {node.get('client')}", node.get("pid") or "-",
                         model, what, told.get("generation") or "-",
                         "yes" if acked and acked == told.get("generation") else
                         (f"older ({acked})" if acked else "no")))
    return table(rows)


def format_list(doc: Mapping[str, Any]) -> str:
    rows = [("NAME", "STATE", "TASK", "SOURCE", "QUANTIZE", "ON DISK")]
    for r in doc["models"]:
        source = f"{r['repo']}/{r['filename']}@{r['revision']}" if r["repo"] else "-"
        rows.append((r["name"], r["state"], r["task"] or "-", source, r["quantize"] or "-",
                     "yes" if r["on_disk"] else "no"))
    return "\n".join([mode_line(doc["mode"]), table(rows)])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _agreement(e: Mapping[str, Any]) -> str:
    if e.get("evidence"):
        return str(e["evidence"])
    parts = []
    if e.get("task_metric") and e.get("task_value") is not None:
        parts.append(f"{e['task_metric']} {e['task_value']:.3f}")
    if e.get("cosine") is not None:
        parts.append(f"cos {e['cosine']:.4f}")
    if e.get("samples"):
        parts.append(f"{e['samples']} samples")
    return ", ".join(parts) or ("reference" if e.get("variant") == FP32 else "-")


def _variant_summary(v: Mapping[str, Any]) -> str:
    proof = v.get("proof")
    if proof is None:
        return f"{v['variant']} (unproven)"
    passed = [p for p in proof.get("providers", ()) if p.get("passed")]
    if not passed:
        return f"{v['variant']} (refused)"
    evidence = Proof.from_dict(proof).evidence(passed[0]["provider"])
    return f"{v['variant']} (ok{', ' + evidence if evidence else ''})"


__all__ = ["model_report", "status_document", "list_document", "node_rows", "format_status",
           "format_list", "format_nodes", "invalid_entries", "invalid_error"]
