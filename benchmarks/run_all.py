"""The one-command benchmark report (``./dev bench``): runs every ``benchmarks/bench_*.py`` as a
subprocess, collects the rows each writes to ``$MODELD_BENCH_JSON`` (see ``common.py``), quotes
the output of a script that writes none, prints the markdown report and writes it to
``bench-results/report.md`` (logs of each script beside it).

    ./dev bench [--quick] [--only daemon,pull] [--timeout-s 600]

Exit code 0 when every script ran to its end (a missed target is a figure in the report, not a
failure of the run), 1 when a script failed or timed out.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from common import ROOT, ROWS_ENV, Row, markdown_table, read_rows

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "bench-results"
#: how much of a script's output the report quotes when it wrote no rows, or failed
QUOTE_LINES = 60


@dataclass
class ScriptRun:
    """One script's run: how it ended, what it printed, the rows it wrote."""

    script: Path
    seconds: float = 0.0
    exit_code: int | None = None       # None: killed at the timeout
    output: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    rows_error: str = ""

    @property
    def name(self) -> str:
        return self.script.name

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def outcome(self) -> str:
        if self.exit_code is None:
            return "timed out"
        return "ok" if self.exit_code == 0 else f"exit {self.exit_code}"


def discover(only: set[str] | None) -> list[Path]:
    """``bench_*.py`` in file-name order; ``only`` names them without prefix/suffix ("daemon")."""
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in only or s.stem in only]
    return scripts


def supports_quick(script: Path) -> bool:
    """Scripts are asked for ``--quick`` only if they take it (argparse refuses unknown flags)."""
    text = script.read_text(errors="replace")
    return '"--quick"' in text or "'--quick'" in text


def script_timeout(script: Path, default_s: float) -> float:
    """A script that needs longer than the default says so with a top-level line
    ``RUN_ALL_TIMEOUT_S = <seconds>`` (read as text: scripts are not imported here)."""
    for line in script.read_text(errors="replace").splitlines():
        if line.startswith("RUN_ALL_TIMEOUT_S ="):
            try:
                return max(default_s, float(line.split("=", 1)[1].split("#")[0]))
            except ValueError:
                break
    return default_s


def run_script(script: Path, *, out_dir: Path, quick: bool, timeout_s: float) -> ScriptRun:
    rows_path = out_dir / "rows" / f"{script.stem}.json"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.unlink(missing_ok=True)
    command = [sys.executable, str(script)]
    if quick and supports_quick(script):
        command.append("--quick")
    env = dict(os.environ, **{ROWS_ENV: str(rows_path), "PYTHONUNBUFFERED": "1"})
    if quick:
        env["MODELD_BENCH_QUICK"] = "1"
    run = ScriptRun(script)
    started = time.monotonic()
    # Its own session: at a timeout the whole group (daemon, workers, hub) is stopped, not only
    # the script.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    reader = threading.Thread(target=_follow, args=(proc, run.output, script.stem), daemon=True)
    reader.start()
    try:
        run.exit_code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        run.exit_code = None
    reader.join(timeout=10)
    run.seconds = time.monotonic() - started
    if rows_path.exists():
        try:
            run.rows = read_rows(rows_path)
        except ValueError as e:
            run.rows_error = str(e)
    return run


def _follow(proc: subprocess.Popen, sink: list[str], label: str) -> None:
    """Keep the script's output and show it live on stderr (the report goes to stdout)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))
        print(f"[{label}] {line}", end="", file=sys.stderr, flush=True)


def _stop_group(proc: subprocess.Popen) -> None:
    for signum, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def host_lines(quick: bool) -> list[str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return [f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; mode: "
            f"{'quick (smoke run: few repetitions, figures are rough)' if quick else 'full'}",
            f"- host: {cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}; "
            f"onnxruntime {version('onnxruntime')}, onnx {version('onnx')}, "
            f"huggingface_hub {version('huggingface_hub')}",
            f"- commit: {commit}"]


def report(runs: list[ScriptRun], quick: bool) -> str:
    lines = ["# mecha10-modeld benchmark report", "", *host_lines(quick), "",
             "Figures come from one run each; the target stands beside each figure. A missed "
             "target is marked MISSED, with a note on where the time goes.", "",
             "## Scripts", "", "| script | outcome | seconds | rows | missed |",
             "| --- | --- | --- | --- | --- |"]
    for run in runs:
        missed = sum(1 for r in run.rows if r.ok is False)
        lines.append(f"| {run.name} | {run.outcome()} | {run.seconds:.0f} | "
                     f"{len(run.rows) or '-'} | {missed if run.rows else '-'} |")
    with_rows = [r for run in runs for r in run.rows]
    if with_rows:
        lines += ["", "## Figures", "", markdown_table(with_rows)]
    for run in runs:
        if run.rows and run.ok:
            continue
        why = ("wrote no rows yet; its output" if run.ok else
               f"{run.outcome()}; the end of its output")
        if run.rows_error:
            why += f" (its rows file was unreadable: {run.rows_error})"
        lines += ["", f"## {run.name}", "", f"{why}:", "", "```",
                  *run.output[-QUOTE_LINES:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ask each script for a smoke run (few repetitions)")
    parser.add_argument("--only", default="",
                        help="comma-separated scripts without prefix/suffix, e.g. daemon,pull")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="per script (default 600, quick 240; a full run gives a script "
                        "that declares RUN_ALL_TIMEOUT_S that much)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    scripts = discover(only)
    if not scripts:
        parser.error(f"no benchmark script matches {args.only!r} in {BENCH_DIR}")
    default_timeout_s = args.timeout_s or (240.0 if args.quick else 600.0)
    out_dir = args.out.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for script in scripts:
        print(f"== {script.name}", file=sys.stderr, flush=True)
        timeout_s = default_timeout_s if args.timeout_s or args.quick else script_timeout(
            script, default_timeout_s)
        run = run_script(script, out_dir=out_dir, quick=args.quick, timeout_s=timeout_s)
        (out_dir / "logs").mkdir(exist_ok=True)
        (out_dir / "logs" / f"{script.stem}.log").write_text("\n".join(run.output) + "\n")
        print(f"== {script.name}: {run.outcome()} in {run.seconds:.0f} s, {len(run.rows)} rows",
              file=sys.stderr, flush=True)
        runs.append(run)
    text = report(runs, args.quick)
    (out_dir / "report.md").write_text(text)
    print(text)
    print(f"written to {out_dir / 'report.md'}", file=sys.stderr)
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
