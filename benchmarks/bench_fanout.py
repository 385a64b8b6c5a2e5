"""Fan-out and hot-swap benchmark of the socket server and the client's HotSession.

1. One change fanned out to N subscribers (default 200 raw socket clients): time from
   ``publish`` until the last subscriber has the event, as percentiles over rounds, and the
   last/first ratio (how much the tail waits behind the head).
2. A node in a tight inference loop while the daemon swaps its variant every few milliseconds:
   calls and failures (must be 0), and call latency/throughput with swaps as a ratio of without.

    .venv/bin/python benchmarks/bench_fanout.py [--subscribers 200] [--rounds 30] [--seconds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import selectors
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import structlog

from common import Results, Row, latency_rows, use_test_helpers

use_test_helpers()
from modeld.client import HotSession  # noqa: E402
from modeld.testing.onnx_models import tiny_cnn  # noqa: E402
from tests.support.serve import (LineClient, ServerThread, serving, view,  # noqa: E402
                                 write_variant, yolo_files)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (f"p50={pick(0.5) * 1e3:.2f}ms p95={pick(0.95) * 1e3:.2f}ms "
            f"max={ordered[-1] * 1e3:.2f}ms")


def bench_fanout(folder: Path, subscribers: int, rounds: int, results: Results) -> None:
    files = yolo_files(folder / "models")
    views = [[view("yolo", files["fp32"])], [view("yolo", files["fp32"], files["int8"])]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = subscribers * 2 + 100
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    with serving(folder / "modeld.sock", views[0]) as server:
        clients = []
        for i in range(subscribers):
            c = LineClient(server.socket_path)
            c.read()
            c.send({"op": "subscribe", "models": ["yolo"], "node": f"n{i}"})
            c.read()
            c.sock.setblocking(False)
            clients.append(c)
        selector = selectors.DefaultSelector()
        for c in clients:
            selector.register(c.sock, selectors.EVENT_READ, c)
        last_s, first_s = [], []
        for r in range(rounds):
            pending = set(range(subscribers))
            arrival = {}
            start = time.perf_counter()
            server.publish(views[(r + 1) % 2])
            while pending:
                for key, _ in selector.select(timeout=10):
                    c = key.data
                    data = c.sock.recv(1 << 16)
                    if b"\n" in data:
                        idx = clients.index(c)
                        if idx in pending:
                            pending.discard(idx)
                            arrival[idx] = time.perf_counter() - start
            last_s.append(max(arrival.values()))
            first_s.append(min(arrival.values()))
        ratio = statistics.median(l / f for l, f in zip(last_s, first_s))
        print(f"fanout subscribers={subscribers} rounds={rounds} "
              f"last_subscriber {percentiles(last_s)} first_subscriber {percentiles(first_s)} "
              f"median_last_over_first={ratio:.1f}")
        rows = latency_rows(f"fan-out to {subscribers}", "publish -> last subscriber has it",
                            last_s, 0.050)
        rows[1] = replace(rows[1], note=(
            f"one Server.publish of a changed view, raw Unix-socket subscribers in one process; "
            f"the last subscriber waits a median {ratio:.1f}x the first"))
        results.add(*rows)
        for c in clients:
            c.close()


def bench_hot_swap(folder: Path, seconds: float, swap_every_s: float, results: Results) -> None:
    fp32 = write_variant(folder / "swap", "fp32", tiny_cnn(seed=0, input_size=64, channels=16))
    int8 = write_variant(folder / "swap", "int8", tiny_cnn(seed=1, input_size=64, channels=16),
                         providers={"CPUExecutionProvider": {"speedup": 1.5}})
    images = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    with serving(folder / "swap.sock", [view("yolo", fp32)]) as server:
        with HotSession(models="yolo", socket_path=server.socket_path) as hot:
            hot.wait_ready(10)
            quiet = _loop(hot, images, seconds, None, None)
            swapping = _loop(hot, images, seconds, server, [[view("yolo", fp32)],
                                                            [view("yolo", fp32, int8)]],
                             swap_every_s=swap_every_s)
    (q_calls, q_fail, q_lat, _), (s_calls, s_fail, s_lat, swaps) = quiet, swapping
    print(f"hot_swap seconds={seconds} swaps={swaps} calls_quiet={q_calls} "
          f"calls_swapping={s_calls} failures={q_fail + s_fail} "
          f"throughput_ratio={s_calls / max(q_calls, 1):.2f} "
          f"p50_ratio={statistics.median(s_lat) / statistics.median(q_lat):.2f} "
          f"p99_ratio={_p99(s_lat) / _p99(q_lat):.2f}")
    failures = q_fail + s_fail
    results.add(Row("hot swap under load", f"inference calls failed during {swaps} swaps",
                    f"{failures} of {q_calls + s_calls}", "0", failures == 0,
                    note=(f"a HotSession in a tight loop for {seconds:.0f} s while its variant is "
                          f"swapped every {swap_every_s * 1e3:.0f} ms, against {seconds:.0f} s "
                          f"without swaps")),
                Row("hot swap under load", "throughput with swaps / without",
                    f"{s_calls / max(q_calls, 1):.2f}x"),
                Row("hot swap under load", "call p99 with swaps / without",
                    f"{_p99(s_lat) / _p99(q_lat):.2f}x"))


def _p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))]


def _loop(hot: HotSession, images, seconds: float, server: ServerThread | None, views,
          swap_every_s: float = 0.05) -> tuple[int, int, list[float], int]:
    stop = threading.Event()
    swaps = [0]

    def swapper():
        i = 0
        while not stop.wait(swap_every_s):
            i += 1
            server.publish(views[i % 2])
            swaps[0] += 1

    thread = threading.Thread(target=swapper) if server else None
    if thread:
        thread.start()
    calls = failures = 0
    latencies = []
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        try:
            hot.run(None, {"images": images})
            calls += 1
        except Exception:
            failures += 1
        latencies.append(time.perf_counter() - now)
    stop.set()
    if thread:
        thread.join()
    return calls, failures, latencies, swaps[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--swap-every-ms", type=float, default=50.0)
    args = parser.parse_args()
    # Per-connection info logs would measure the console, not the fan-out.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # Short socket paths: sockaddr_un holds 107 bytes.
    results = Results()
    with tempfile.TemporaryDirectory(prefix="modeld-bench-", dir="/tmp") as tmp:
        print(f"host cpus={os.cpu_count()} python={sys.version.split()[0]}")
        bench_fanout(Path(tmp), args.subscribers, args.rounds, results)
        bench_hot_swap(Path(tmp), args.seconds, args.swap_every_ms / 1000, results)
    return results.finish()


if __name__ == "__main__":
    raise SystemExit(main())
