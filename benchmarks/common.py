"""Shared pieces of the benchmark scripts: percentiles, the result ``Row``, the markdown table and
the JSON rows that ``benchmarks/run_all.py`` collects (it sets ``MODELD_BENCH_JSON=<file>``).

Imported by ``bench_daemon.py``, ``bench_pull.py`` and ``run_all.py``; any ``bench_*.py`` may use
it: ``Results.add(rows)`` writes the rows for the report under run_all, ``Results.finish()``
prints the table.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: where run_all asks a script to write its rows (a JSON list); unset when run by hand
ROWS_ENV = "MODELD_BENCH_JSON"


def use_test_helpers() -> None:
    """Make the test helpers (``tests.support``: ``workspace.Workspace``, ``daemon.DaemonProcess``,
    ``serve.ServerThread``) importable: the benchmarks drive the daemon exactly as the
    integration tests do. A script's own folder is what Python puts first on its path; the
    repository root, where ``tests`` lives, is added here, in this one place."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample: always a measured value,
    never an interpolation (with fewer than 100 samples the p99 is the worst one)."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Row:
    """One figure of one benchmark beside its target. ``ok`` is None when there is no target
    to meet (a figure given for context)."""

    benchmark: str
    metric: str
    figure: str
    target: str = ""
    ok: bool | None = None
    #: optional: where the time went, what the figure leaves out (printed under the table)
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["note"]:
            del d["note"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        return cls(benchmark=str(d.get("benchmark", "")), metric=str(d.get("metric", "")),
                   figure=str(d.get("figure", "")), target=str(d.get("target", "") or ""),
                   ok=d.get("ok") if isinstance(d.get("ok"), bool) else None,
                   note=str(d.get("note", "") or ""))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def latency_rows(benchmark: str, what: str, samples_s: Sequence[float], target_p99_s: float
                 ) -> list[Row]:
    """p50 (context) and p99 (against the target) of a latency sample, in milliseconds."""
    p50, p99 = percentile(samples_s, 50), percentile(samples_s, 99)
    return [Row(benchmark, f"{what} p50 (n={len(samples_s)})", ms(p50)),
            Row(benchmark, f"{what} p99 (n={len(samples_s)})", ms(p99),
                f"<= {target_p99_s * 1e3:.0f} ms", p99 <= target_p99_s)]


def verdict(ok: bool | None) -> str:
    return {True: "ok", False: "MISSED", None: ""}[ok]


def markdown_table(rows: Iterable[Row]) -> str:
    """The rows as a markdown table, their notes as a numbered list under it."""
    lines = ["| benchmark | metric | figure | target | ok |", "| --- | --- | --- | --- | --- |"]
    notes: list[str] = []
    for r in rows:
        metric = r.metric
        if r.note:
            notes.append(r.note)
            metric = f"{metric} [{len(notes)}]"
        cells = (r.benchmark, metric, r.figure, r.target, verdict(r.ok))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {_cell(n)}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_rows(rows: Sequence[Row], path: str | os.PathLike[str] | None = None) -> Path | None:
    """Write ``rows`` as a JSON list to ``path`` (default ``$MODELD_BENCH_JSON``); None if
    neither is set."""
    target = path or os.environ.get(ROWS_ENV)
    if not target:
        return None
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    os.replace(tmp, out)
    return out


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Rows a script wrote; raises ValueError when the file is not a list of row objects."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise ValueError(f"{path}: expected a JSON list of row objects")
    return [Row.from_dict(d) for d in doc]


class Results:
    """The rows of one script run: ``add`` writes all rows so far for run_all at once (a later
    part that fails or hangs does not lose them); ``finish`` prints the table."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.errors = 0

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        write_rows(self.rows)
        for r in rows:
            print(f"  {r.benchmark}: {r.metric} = {r.figure}"
                  + (f" (target {r.target}: {verdict(r.ok)})" if r.target else ""), flush=True)

    def failed(self, benchmark: str, error: BaseException) -> None:
        """A part that could not be measured is a row too: the report must not hide it."""
        self.errors += 1
        self.add(Row(benchmark, "could not be measured", f"{type(error).__name__}: {error}"[:300],
                     "a figure", False))

    def finish(self) -> int:
        """Print the table; the exit code says whether every part ran (a missed target is a
        figure, not a failure of the script)."""
        print()
        print(markdown_table(self.rows), flush=True)
        return 1 if self.errors or not self.rows else 0
