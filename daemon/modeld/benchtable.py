"""Formats the rows of the ``bench`` job (``workers.bench.bench_model``) as a table for a person.

The CLI prints ``format_table(rows)`` on a terminal and ``format_markdown(rows)`` for a report.
Plain Python: the daemon side never imports onnx or onnxruntime.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

Row = Mapping[str, Any]

HEADERS = ("variant", "provider", "size", "latency", "FP32 same run", "vs FP32", "agreement",
           "served", "why")
WHY_CHARS = 120


def ratio_of(row: Row) -> tuple[float | None, float | None, float | None]:
    """(latency, FP32 latency, ratio) as printed: milliseconds rounded to 2 decimals, the ratio
    computed from those two printed numbers (FP32 timed interleaved with the row's file, in one
    run), so a reader can check it. FP32's own row is its own reference (1.00x)."""
    latency = _rounded(row.get("latency_ms"))
    fp32 = _rounded(row.get("fp32_latency_ms"))
    if row.get("variant") == "fp32" and fp32 is None:
        fp32 = latency
    ratio = fp32 / latency if latency and fp32 is not None else None
    return latency, fp32, ratio


def _rounded(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


def run_note(samples: int | None) -> str:
    """What the latencies are, and the run's size."""
    size = f" on {samples} held-out samples" if samples else ""
    return (f"note: latency is the median over interleaved rounds{size}; each row's FP32 was "
            "timed in the same rounds, and vs FP32 = FP32 same run / latency")


def format_table(rows: Iterable[Row]) -> str:
    """An aligned text table: ``| variant | size | latency | vs FP32 | agreement | served | why |``,
    then one ``note:`` line per distinct warning of the proofs (synthetic inputs, ~0 outputs)."""
    rows = list(rows)
    headers, body = table_cells(rows)
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|-" + "-|-".join("-" * w for w in widths) + "-|"
    return "\n".join([line(headers), rule, *(line(r) for r in body), *_notes(rows)])


def format_markdown(rows: Iterable[Row]) -> str:
    """The same table as GitHub-flavoured Markdown (``|`` in cells escaped), notes below it."""
    rows = list(rows)
    headers, body = table_cells(rows)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    notes = _notes(rows)
    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|",
                      *(line(r) for r in body), *([""] + notes if notes else [])])


def table_cells(rows: Iterable[Row]) -> tuple[tuple[str, ...], list[list[str]]]:
    """(headers, cell texts); the provider column only when the rows span several providers."""
    rows = list(rows)
    fp32_size = next((r.get("size_bytes") for r in rows if r.get("variant") == "fp32"
                      and r.get("size_bytes")), None)
    with_provider = len({r.get("provider") for r in rows}) > 1
    # rows measured in several runtimes (a node runtime per provider): say which ran each
    runtimes = len({r.get("runtime") for r in rows if r.get("runtime")}) > 1
    body = []
    for r in rows:
        latency, fp32, ratio = ratio_of(r)
        cells = [_variant(r), _provider(r.get("provider"), r.get("runtime") if runtimes else None), _size(r.get("size_bytes"), fp32_size),
                 _number(latency, "{:.2f} ms"), _number(fp32, "{:.2f} ms"),
                 _number(ratio, "{:.2f}x"), _agreement(r), _served(r), _why(r.get("why"))]
        body.append(cells if with_provider else cells[:1] + cells[2:])
    headers = HEADERS if with_provider else HEADERS[:1] + HEADERS[2:]
    return headers, body


def _notes(rows: Sequence[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for warning in row.get("warnings") or ():
            seen.setdefault(warning)
    return [f"note: {w}" for w in seen]


def _variant(row: Row) -> str:
    variant, recipe, file = row.get("variant", ""), row.get("recipe", ""), row.get("file")
    label = variant if file and recipe == file else f"{variant} {recipe}".strip()
    return label + (" (chosen)" if row.get("chosen") else "")


def _provider(name: str | None, runtime: str | None = None) -> str:
    short = (name or "").removesuffix("ExecutionProvider") or "-"
    return f"{short} in {runtime}" if runtime else short


def _size(size_bytes: int | None, fp32_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    value, unit = float(size_bytes), "B"
    for next_unit in ("KB", "MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    text = f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
    if fp32_bytes and size_bytes != fp32_bytes:
        text += f" ({size_bytes / fp32_bytes:.0%})"
    return text


def _number(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _agreement(row: Row) -> str:
    parts = []
    if row.get("task_metric"):
        value = row.get("task_value")
        parts.append(f"{row['task_metric']} " + ("unmeasured" if value is None else f"{value:.3f}"))
    if row.get("cosine") is not None:
        parts.append(f"cos {row['cosine']:.4f}")
    if row.get("max_abs_error") is not None:
        parts.append(f"max err {row['max_abs_error']:.3g}")
    if row.get("part_cosine") is not None and row["part_cosine"] < 0.9999:
        parts.append(f"worst part {row['part_cosine']:.3f}")
    return ", ".join(parts) or "-"


def _served(row: Row) -> str:
    if row.get("passed"):
        return "yes"
    return "refused" if row.get("usable", True) else "unusable"


def _why(reason: str | None) -> str:
    text = " ".join((reason or "").split())
    return text if len(text) <= WHY_CHARS else text[: WHY_CHARS - 3] + "..."
