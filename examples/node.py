"""A small inference node: runs a model in a loop on random input and hot-swaps it when the daemon
says so, printing one line per swap (and a rate line every few seconds).

    python examples/node.py yolov8n --socket /run/mecha10-modeld/modeld.sock --prefer int8

Needs onnxruntime and numpy (the node's own dependencies); modeld.client needs neither.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time

import numpy as np

from modeld.client import HotSession, Loaded

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def random_feeds(session, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random input for every model input; symbolic dimensions become 1."""
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _NUMPY_TYPES.get(spec.type, np.float32)
        feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def print_swap(loaded: Loaded) -> None:
    print(f"{time.strftime('%H:%M:%S')} swap model={loaded.model} variant={loaded.variant} "
          f"provider={loaded.provider} generation={loaded.generation} "
          f"sha256={loaded.sha256[:12]} path={loaded.path}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--socket", default=None, help="default: $MODELD_SOCKET or the daemon's")
    parser.add_argument("--provider", action="append", dest="providers",
                        help="execution provider, in order of preference (repeatable)")
    parser.add_argument("--prefer", default="fastest", choices=["fastest", "int8", "fp16", "fp32"])
    parser.add_argument("--node", default="example-node")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + args.seconds if args.seconds else None
    rng = np.random.default_rng(0)
    calls = failures = 0
    with HotSession(models=args.model, socket_path=args.socket,
                    providers=args.providers or ["CPUExecutionProvider"], prefer=args.prefer,
                    node=args.node, on_swap=print_swap,
                    on_event=lambda e: e["event"] != "variant" and print(
                        f"{time.strftime('%H:%M:%S')} {e['event']} model={e['model']} "
                        f"reason={e.get('reason', '')}", flush=True)) as hot:
        print(f"waiting for {args.model} from the daemon ...", flush=True)
        while not stop.is_set() and not hot.wait_ready(0.5):
            if deadline and time.monotonic() > deadline:
                return 1
        feeds, feeds_for, report_at = None, None, time.monotonic() + 5
        while not stop.is_set() and not (deadline and time.monotonic() > deadline):
            if feeds_for != hot.current.sha256:  # a swapped model may want other inputs
                feeds, feeds_for = random_feeds(hot.session, rng), hot.current.sha256
            try:
                hot.run(None, feeds)
                calls += 1
            except Exception as e:  # a node keeps going; the count shows up in the rate line
                failures += 1
                print(f"run failed: {e}", flush=True)
            if time.monotonic() >= report_at:
                print(f"{time.strftime('%H:%M:%S')} calls={calls} failures={failures} "
                      f"variant={hot.current.variant}", flush=True)
                report_at += 5
    print(f"stopped: calls={calls} failures={failures} swaps={hot.swaps}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
