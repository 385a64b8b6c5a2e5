"""Pull overhead: ``mecha10-modeld pull`` of a ~64 MiB ONNX file against a plain
``huggingface_hub.hf_hub_download`` of the same file from the same loopback hub.

Both start cold (a fresh process, an empty Hugging Face cache / an empty models folder) and are
run in interleaved rounds (timing noise on this machine reaches 30% between passes), over
loopback (where fixed costs weigh most) and over a throttled 100 Mbit/s link. The pull
command does more than download: sha256 check, ONNX checker, config.json, and proving FP32 in
onnxruntime; the log's ``pulled``/``proven`` events say how its time splits.

    .venv/bin/python benchmarks/bench_pull.py [--quick] [--rounds 3] [--size-mib 64]
                                              [--link-mbit 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import Results, Row

from modeld.testing.hub import LocalHub

REPO, FILENAME = "acme/big", "big/model.onnx"
PLAIN_DOWNLOAD = ("import sys\n"
                  "from huggingface_hub import hf_hub_download\n"
                  "print(hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3]))\n")


def big_model(size_mib: int, seed: int = 0) -> bytes:
    """One MatMul with a square float32 weight of about ``size_mib`` MiB (random, so
    incompressible)."""
    side = int((size_mib * 2**20 / 4) ** 0.5)
    weight = np.random.default_rng(seed).normal(0, 0.02, (side, side)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])], "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, side])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def base_env(endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "MODELD_BENCH_JSON"):
        env.pop(var, None)
    return env


def plain_download(endpoint: str, folder: Path) -> float:
    """Seconds for a fresh process to hf_hub_download the file into an empty cache."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN_DOWNLOAD, REPO, FILENAME, str(folder / "hf-cache")],
                   env=base_env(endpoint), check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


#: the pull command's phases, each ending at the first log event named (JSON logs carry ISO
#: timestamps): where a pull spends its time beyond the download itself
PHASES = (("CLI start", "job_started"), ("worker start + imports + HEAD", "fetch_resolved"),
          ("download + sha256 + ONNX checker + publish", "fetch_published"),
          ("config.json + manifest", "pulled"), ("proving FP32", "proven"))


def phase_seconds(log_lines: list[str], started_epoch: float, ended_epoch: float
                  ) -> dict[str, float]:
    """Seconds per ``PHASES`` entry (and ``exit``) from the pull command's JSON log lines."""
    first_at: dict[str, float] = {}
    for line in log_lines:
        try:
            event = json.loads(line)
            at = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        first_at.setdefault(str(event.get("event")), at)
    out, previous = {}, started_epoch
    for label, event_name in PHASES:
        if event_name in first_at:
            out[label] = first_at[event_name] - previous
            previous = first_at[event_name]
    out["exit"] = ended_epoch - previous
    return out


def modeld_pull(endpoint: str, folder: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    """Seconds of ``mecha10-modeld pull big`` into an empty models folder, the seconds its log
    gives per job (``pulled``, ``proven``) and per phase (``PHASES``)."""
    folder.mkdir(parents=True)
    catalog = folder / "model_catalog.toml"
    catalog.write_text(f'[[models]]\nname = "big"\nrepo = "{REPO}"\nfilename = "{FILENAME}"\n')
    env = base_env(endpoint) | {"MODELD_CATALOG": str(catalog),
                                "MODELD_MODELS": str(folder / "models"),
                                "MODELD_SOCKET": str(folder / "modeld.sock"),
                                "MODELD_LOG_LEVEL": "info"}
    started, started_epoch = time.perf_counter(), time.time()
    done = subprocess.run([sys.executable, "-m", "modeld.cli", "pull", "big"], env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    phases = phase_seconds(done.stderr.splitlines(), started_epoch, time.time())
    if done.returncode != 0:
        raise RuntimeError(f"pull exited {done.returncode}: {done.stderr[-2000:]}")
    if not (folder / "models" / "big" / "model.onnx").is_file():
        raise RuntimeError("pull succeeded but models/big/model.onnx is missing")
    jobs: dict[str, float] = {}
    for line in done.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("pulled", "proven"):
            jobs[event["event"]] = jobs.get(event["event"], 0.0) + float(event.get("seconds", 0))
    return seconds, jobs, phases


class ThrottledLink:
    """A TCP relay on 127.0.0.1 that passes the hub's answers at ``bytes_per_s`` (all
    connections together), as a robot's network would; requests pass unthrottled."""

    def __init__(self, upstream: tuple[str, int], bytes_per_s: float) -> None:
        self.upstream = upstream
        self.bytes_per_s = bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._next_free = 0.0
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> "ThrottledLink":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while chunk := source.recv(64 * 1024):
                if throttled:
                    self._wait_for_slot(len(chunk))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def _wait_for_slot(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + size / self.bytes_per_s
            done_at = self._next_free
        time.sleep(max(0.0, done_at - time.monotonic()))


@dataclass
class Comparison:
    """Interleaved rounds of the plain download and the pull command over one link."""

    plain_s: list[float] = field(default_factory=list)
    pull_s: list[float] = field(default_factory=list)
    fetch_s: list[float] = field(default_factory=list)
    prove_s: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)

    def run(self, endpoint: str, folder: Path, rounds: int, label: str) -> "Comparison":
        for r in range(rounds):
            # interleaved, order alternating: neither side always gets a warmer machine
            for which in (("plain", "pull") if r % 2 == 0 else ("pull", "plain")):
                if which == "plain":
                    self.plain_s.append(plain_download(endpoint, folder / f"plain-{r}"))
                    continue
                seconds, jobs, split = modeld_pull(endpoint, folder / f"pull-{r}")
                self.pull_s.append(seconds)
                self.phases.append(split)
                self.fetch_s.append(jobs.get("pulled", float("nan")))
                self.prove_s.append(jobs.get("proven", float("nan")))
            print(f"{label} round {r}: plain {self.plain_s[-1]:.2f} s, "
                  f"pull {self.pull_s[-1]:.2f} s "
                  f"(fetch job {self.fetch_s[-1]:.2f} s, prove {self.prove_s[-1]:.2f} s)",
                  flush=True)
        return self

    def ratio(self, times: list[float]) -> float:
        return statistics.median(t / p for t, p in zip(times, self.plain_s))

    def split(self) -> str:
        labels = [label for label, _ in PHASES] + ["exit"]
        def median_s(label: str) -> float:
            return statistics.median(p.get(label, 0.0) for p in self.phases)
        return "; ".join(f"{label} {median_s(label):.2f} s" for label in labels)

    def rows(self, name: str, what: str) -> list[Row]:
        ratio, rounds = self.ratio(self.pull_s), len(self.pull_s)
        return [
            Row(name, f"`pull` / hf_hub_download, {what} (median of {rounds})", f"{ratio:.2f}x",
                "<= 1.10x", ratio <= 1.10,
                note=f"{what}: wall seconds, fresh processes, cold: hf_hub_download median "
                     f"{statistics.median(self.plain_s):.2f} s, `mecha10-modeld pull` median "
                     f"{statistics.median(self.pull_s):.2f} s (+"
                     f"{statistics.median(self.pull_s) - statistics.median(self.plain_s):.2f} s), "
                     f"of which the fetch job {statistics.median(self.fetch_s):.2f} s and proving "
                     f"FP32 {statistics.median(self.prove_s):.2f} s. Median split of the pull: "
                     f"{self.split()}"),
            Row(name, f"fetch job alone / hf_hub_download, {what}",
                f"{self.ratio(self.fetch_s):.2f}x")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one round of a 16 MiB file, loopback only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--link-mbit", type=float, default=100.0,
                        help="also compare over a link of this many Mbit/s (0: skip)")
    args = parser.parse_args(argv)
    rounds, size_mib, link_mbit = ((1, 16, 0.0) if args.quick else
                                   (args.rounds, args.size_mib, args.link_mbit))
    results = Results()
    name = "pull overhead"
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        root = Path(tmp)
        data = big_model(size_mib)
        onnx.checker.check_model(onnx.load_from_string(data))
        size = f"{len(data) / 2**20:.0f} MiB"
        with LocalHub(root / "hub") as hub:
            hub.store.create_repo(REPO)
            hub.store.commit(REPO, {FILENAME: data})
            try:
                loopback = Comparison().run(hub.endpoint, root / "loopback", rounds, "loopback")
                results.add(*loopback.rows(name, f"{size} over loopback"))
            except Exception as e:  # noqa: BLE001 - reported as a row, not a traceback
                results.failed(name, e)
            if link_mbit > 0:
                try:
                    address = urlsplit(hub.endpoint)
                    with ThrottledLink((address.hostname, address.port),
                                       link_mbit * 1e6 / 8) as link:
                        linked = Comparison().run(link.endpoint, root / "link", max(1, rounds - 1),
                                                  f"{link_mbit:g} Mbit/s")
                    results.add(*linked.rows(name, f"{size} over {link_mbit:g} Mbit/s"))
                except Exception as e:  # noqa: BLE001 - reported as a row, not a traceback
                    results.failed(f"{name} ({link_mbit:g} Mbit/s)", e)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
