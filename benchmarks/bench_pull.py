"""Pull overhead: ``mecha10-modeld pull`` of a ~64 MiB ONNX file against a plain
``huggingface_hub.hf_hub_download`` of the same file from the same loopback hub.

Both start cold (a fresh process, an empty Hugging Face cache / an empty models folder) and are
run in interleaved rounds (timing noise on this machine reaches 30% between passes). The pull
command does more than download: sha256 check, ONNX checker, config.json, and proving FP32 in
onnxruntime; the log's ``pulled``/``proven`` events say how its time splits.

    .venv/bin/python benchmarks/bench_pull.py [--quick] [--rounds 3] [--size-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

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
    """One MatMul with a square float32 weight of about ``size_mib`` MiB (random: incompressible)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of a 16 MiB file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args(argv)
    rounds, size_mib = (1, 16) if args.quick else (args.rounds, args.size_mib)
    results = Results()
    name = "pull overhead"
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        root = Path(tmp)
        data = big_model(size_mib)
        onnx.checker.check_model(onnx.load_from_string(data))
        with LocalHub(root / "hub") as hub:
            hub.store.create_repo(REPO)
            hub.store.commit(REPO, {FILENAME: data})
            plain_s: list[float] = []
            pull_s: list[float] = []
            fetch_s: list[float] = []
            prove_s: list[float] = []
            phases: list[dict[str, float]] = []
            try:
                for r in range(rounds):
                    # interleaved, order alternating: neither side always gets a warmer machine
                    order = ("plain", "pull") if r % 2 == 0 else ("pull", "plain")
                    for which in order:
                        if which == "plain":
                            plain_s.append(plain_download(hub.endpoint, root / f"plain-{r}"))
                        else:
                            seconds, jobs, split = modeld_pull(hub.endpoint, root / f"pull-{r}")
                            pull_s.append(seconds)
                            phases.append(split)
                            fetch_s.append(jobs.get("pulled", float("nan")))
                            prove_s.append(jobs.get("proven", float("nan")))
                    print(f"round {r}: plain {plain_s[-1]:.2f} s, pull {pull_s[-1]:.2f} s "
                          f"(fetch job {fetch_s[-1]:.2f} s, prove {prove_s[-1]:.2f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 - reported as a row, not a traceback
                results.failed(name, e)
                return results.finish()
    ratio = statistics.median(p / q for p, q in zip(pull_s, plain_s))
    fetch_ratio = statistics.median(f / q for f, q in zip(fetch_s, plain_s))
    size = f"{len(data) / 2**20:.0f} MiB"
    split = "; ".join(f"{label} {statistics.median(p.get(label, 0.0) for p in phases):.2f} s"
                      for label in [label for label, _ in PHASES] + ["exit"])
    results.add(
        Row(name, f"`pull` / hf_hub_download, {size} cold (median of {rounds})",
            f"{ratio:.2f}x", "<= 1.10x", ratio <= 1.10,
            note=f"wall seconds, fresh processes: hf_hub_download median "
                 f"{statistics.median(plain_s):.2f} s, `mecha10-modeld pull` median "
                 f"{statistics.median(pull_s):.2f} s, of which the fetch job (worker start, HEAD, "
                 f"download, sha256, ONNX checker, config.json) "
                 f"{statistics.median(fetch_s):.2f} s and proving FP32 "
                 f"{statistics.median(prove_s):.2f} s. Median split of the pull: {split}"),
        Row(name, f"fetch job alone / hf_hub_download, {size} (median of {rounds})",
            f"{fetch_ratio:.2f}x"))
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
