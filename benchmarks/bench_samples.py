"""What ``HotSession(contribute_samples=True)`` adds to each ``run()`` (issue 13).

Two HotSessions on the same real 320x320 detector (the YOLOv8n of ``modeld.testing.realdata``),
served by a real socket server that accepts the samples: one contributes (reservoir of 64, a
send of up to 4 every ``--interval-s``, 10 s as by default), one does not. They run real
frames at 30 calls/s, interleaved in rounds of 30 calls in one process, so the ratio of their
per-call times is measured under the same load. Target: <= 1.02x (2%).

    .venv/bin/python benchmarks/bench_samples.py [--seconds 40] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import Results, Row, use_test_helpers

use_test_helpers()

from tests.support.serve import serving, view, write_variant  # noqa: E402
from modeld.client import HotSession  # noqa: E402
from modeld.testing import realdata  # noqa: E402

RATE_HZ = 30.0
ROUND = 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--interval-s", type=float, default=10.0,
                        help="seconds between sends (the HotSession default is 10)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 8.0 if args.quick or os.environ.get("MODELD_BENCH_QUICK") else args.seconds
    results = Results()
    try:
        plain, contributing, sent = measure(seconds, args.interval_s)
    except (realdata.RealDataMissing, OSError) as e:
        results.failed("contribute_samples", e)
        return results.finish()
    ratio = statistics.fmean(contributing) / statistics.fmean(plain)
    p50 = statistics.median(contributing) / statistics.median(plain)
    results.add(
        Row("contribute_samples", "run() time, contributing / not (mean, 30 calls/s, 320x320)",
            f"{ratio:.3f}x", "<= 1.02x", ratio <= 1.02,
            note=f"{len(plain)} + {len(contributing)} calls interleaved in rounds of {ROUND}; "
                 f"means {statistics.fmean(plain) * 1e3:.2f} ms vs "
                 f"{statistics.fmean(contributing) * 1e3:.2f} ms; p50 ratio {p50:.3f}x; "
                 f"{sent} samples sent meanwhile (a send every {args.interval_s:g} s)"),
        Row("contribute_samples", "run() time, p50 ratio", f"{p50:.3f}x"))
    return results.finish()


def measure(seconds: float, interval_s: float) -> tuple[list[float], list[float], int]:
    model = realdata.model("yolov8n-nudenet")
    import numpy as np
    from modeld.workers.inputs import sample_inputs

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        realdata.write_frames(folder / "frames", model.name, "calibration")
        feeds, _ = sample_inputs(model.path, calibration=str(folder / "frames"), preset="yolo",
                                 input_size=320, count=64)
        fp32 = write_variant(folder / "models", "fp32", model.path.read_bytes())
        with serving(folder / "modeld.sock", [view("yolo", fp32)],
                     on_sample=lambda m, n, d: {"model": m, "stored": True}) as server:
            with HotSession(models="yolo", socket_path=server.socket_path) as plain, \
                    HotSession(models="yolo", socket_path=server.socket_path,
                               contribute_samples=True, sample_interval_s=interval_s) as contributing:
                assert plain.wait_ready(30) and contributing.wait_ready(30)
                for hot in (plain, contributing):    # warm both sessions up
                    for feed in feeds[:5]:
                        hot.run(None, feed)
                times: dict[str, list[float]] = {"plain": [], "contributing": []}
                deadline = time.monotonic() + seconds
                i = 0
                while time.monotonic() < deadline:
                    for name, hot in (("plain", plain), ("contributing", contributing)):
                        for _ in range(ROUND):
                            feed = {k: np.array(v) for k, v in feeds[i % len(feeds)].items()}
                            i += 1
                            start = time.perf_counter()
                            hot.run(None, feed)
                            took = time.perf_counter() - start
                            times[name].append(took)
                            time.sleep(max(0.0, 1 / RATE_HZ - took))
                sent = contributing.samples_sent
    return times["plain"], times["contributing"], sent


if __name__ == "__main__":
    sys.exit(main())
