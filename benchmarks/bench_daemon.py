"""Benchmarks of the daemon as a robot meets it: a real ``mecha10-modeld run`` process with default
settings, the loopback hub, real subscribers on the Unix socket, real files and inotify.

1. notify: catalog save -> a subscribed node is told the other (already proven) variant;
   ``quantize.enabled`` flipped on a model whose INT8 is proven (p50/p99; target p99 <= 100 ms).
2. corrupt: INT8 file truncated -> its node told to load FP32 (p50/p99; target p99 <= 250 ms);
   the daemon rebuilds and re-proves INT8 between rounds.
3. noop: one reconcile pass of a 1,000-entry catalog with nothing to do, in-process, on a store
   written directly to disk (p50/p99; target p99 <= 50 ms and no file hashed), with a profile.
4. scale: edit -> notify as in 1, on the store of 3 under a real daemon (1,000 models): what
   the catalog's size adds (same target).
5. idle: RSS and context switches of the settled daemon with 3 models (targets <= 60 MB and no
   periodic wake-ups).

    .venv/bin/python benchmarks/bench_daemon.py [--quick] [--only notify,corrupt,noop,scale,idle]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import json
import os
import pstats
import sys
import tempfile
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from common import Results, Row, latency_rows, ms, percentile, use_test_helpers

use_test_helpers()

from modeld.catalog_file import CatalogKeeper  # noqa: E402
from modeld.manifest import FileRecord, Manifest, Provenance  # noqa: E402
from modeld.planning import (CONFIG_FILE, FP32_FILE, config_derivation,  # noqa: E402
                             derived_proof_key, desired_derivation, providers_for)
from modeld.reconciler import Reconciler  # noqa: E402
from modeld.server import Server  # noqa: E402
from modeld.settings import Settings  # noqa: E402
from modeld.store import Store  # noqa: E402
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn  # noqa: E402
from modeld.variants import (FP32, INT8, VARIANT_FILES, Gates, Proof,  # noqa: E402
                             ProviderProof, proof_key)
from tests.support.daemon import DaemonProcess, variant_is, wait_event  # noqa: E402
from tests.support.workspace import Workspace, demo_workspace, entry_toml  # noqa: E402

PARTS = ("notify", "corrupt", "noop", "scale", "idle")
#: allow_slower: INT8 is served whatever its measured speed (noise must not decide whether a
#: flip changes what the node is told)
MLP_INT8 = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                      quantize="dynamic_int8") + "allow_slower = true\n"
MLP_FP32 = MLP_INT8.replace("enabled = true", "enabled = false")
#: the third model of the idle daemon: the same detector under a second name
DET2 = entry_toml("det2")
SETTLE_TIMEOUT_S = 240


@contextlib.contextmanager
def running_daemon(ws: Workspace) -> Iterator[DaemonProcess]:
    """``mecha10-modeld run`` with the shipped defaults (the test fixture shortens the debounce
    step; a benchmark measures what users get)."""
    daemon = DaemonProcess(ws)
    daemon.env.pop("MODELD_DEBOUNCE_STEP_MS", None)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


# -- 1 and 2: what a node is told, and how fast -------------------------------------------------

def measure_notify(ws: Workspace, daemon: DaemonProcess, flips: int) -> list[float]:
    """Seconds from the start of a catalog save to the node's event, over ``flips`` saves."""
    samples = []
    with daemon.subscribe("mlp", prefer="int8", node="bench-notify") as sub:
        wait_event(sub, variant_is("mlp", INT8), timeout_s=SETTLE_TIMEOUT_S, daemon=daemon)
        for i in range(flips):
            want, text = (FP32, MLP_FP32) if i % 2 == 0 else (INT8, MLP_INT8)
            started = time.perf_counter()
            if (i // 2) % 2 == 0:
                ws.write_catalog(text)       # saved in place (nano, VS Code's default)
            else:                            # written aside and renamed over (vim, sed -i)
                aside = ws.catalog.with_name(".model_catalog.toml.swp")
                aside.write_text(text)
                os.replace(aside, ws.catalog)
            wait_event(sub, variant_is("mlp", want), timeout_s=10, daemon=daemon)
            samples.append(time.perf_counter() - started)
            time.sleep(0.02)                 # let the node's ack land: one save per round
    return samples


def measure_corrupt(ws: Workspace, daemon: DaemonProcess, rounds: int) -> list[float]:
    """Seconds from truncating the served INT8 file to the node being told FP32; the daemon
    rebuilds and re-proves INT8 before the next round."""
    samples = []
    with daemon.subscribe("mlp", prefer="int8", node="bench-corrupt") as sub:
        served = wait_event(sub, variant_is("mlp", INT8), timeout_s=SETTLE_TIMEOUT_S,
                            daemon=daemon)
        for _ in range(rounds):
            started = time.perf_counter()
            os.truncate(served["path"], 100)
            wait_event(sub, variant_is("mlp", FP32), timeout_s=10, daemon=daemon)
            samples.append(time.perf_counter() - started)
            served = wait_event(sub, variant_is("mlp", INT8), timeout_s=SETTLE_TIMEOUT_S,
                                daemon=daemon)
    return samples


# -- 3: the no-op pass of a large catalog -------------------------------------------------------

#: the quantized model a node follows while the 1,000-entry catalog is edited
SCALE_MODEL = "m0001"


def large_catalog_text(count: int, *, disabled: frozenset[str] = frozenset()) -> str:
    """``count`` entries; every second one with a dynamic INT8 variant, enabled unless named in
    ``disabled``."""
    parts = []
    for i in range(count):
        name = f"m{i:04d}"
        if i % 2:
            text = entry_toml(name, repo="acme/mlp", filename="mlp.onnx", labels=None,
                              quantize="dynamic_int8") + "allow_slower = true\n"
            parts.append(text.replace("enabled = true", "enabled = false")
                         if name in disabled else text)
        else:
            parts.append(entry_toml(name, labels=None))
    return "".join(parts)


def _write(path: Path, data: bytes) -> FileRecord:
    path.write_bytes(data)
    st = path.stat()
    return FileRecord(path.name, hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns,
                      st.st_ino)


def _passed(variant: str, sha256: str, key: str, providers: tuple[str, ...]) -> Proof:
    return Proof(variant=variant, file_sha256=sha256, key=key, checker_ok=True,
                 providers=tuple(ProviderProof(p, usable=True, passed=True, latency_ms=1.0,
                                               fp32_latency_ms=1.0, speedup=1.0, cosine=1.0)
                                 for p in providers))


def populate_store(store: Store, reconciler: Reconciler) -> int:
    """Write every catalog entry's files and a manifest that says they are pulled, derived and
    proven for exactly this catalog and runtime, as the workers would have left them. Real
    files and manifests on disk; no worker runs. Returns the number of files written."""
    context = reconciler.context()
    fp32_bytes = {"acme/detector": tiny_cnn(), "acme/mlp": matmul_mlp()}
    int8_bytes = matmul_mlp(seed=1)     # stands in for the quantized file: only its digest matters
    written = 0
    for entry in reconciler.catalog.current.entries.values():
        folder = store.model_dir(entry.name)
        folder.mkdir(parents=True, exist_ok=True)
        data = fp32_bytes[entry.repo]
        fp32 = _write(folder / FP32_FILE, data)
        fp32 = replace(fp32, provenance=Provenance(entry.repo, entry.filename, entry.revision,
                                                   "0" * 40, fp32.sha256))
        config = _write(folder / CONFIG_FILE, json.dumps({"name": entry.name}).encode())
        config = replace(config, derivation=config_derivation(entry, fp32, None))
        providers = providers_for(entry, context)
        fp32_key = proof_key(file_sha256=fp32.sha256, reference_sha256=None, providers=providers,
                             gates=Gates(), onnxruntime=context.onnxruntime_version,
                             simulated=context.simulated)
        manifest = Manifest(name=entry.name).with_file(fp32).with_file(config)
        manifest = manifest.with_proof(FP32_FILE, _passed(FP32, fp32.sha256, fp32_key, providers))
        written += 2
        if entry.quantize is not None and entry.quantize.enabled:
            int8 = _write(folder / VARIANT_FILES[INT8], int8_bytes)
            int8 = replace(int8, derivation=desired_derivation(entry, fp32, context))
            key = derived_proof_key(entry, int8, fp32, context)
            proof = _passed(INT8, int8.sha256, key, providers)
            manifest = manifest.with_file(int8).with_proof(int8.name, proof)
            written += 1
        store.write_manifest(manifest)
    return written


async def _timed_passes(reconciler: Reconciler, passes: int) -> list[float]:
    samples = []
    for _ in range(passes):
        started = time.perf_counter()
        actions = await reconciler.reconcile()
        samples.append(time.perf_counter() - started)
        if actions:
            raise AssertionError(f"a no-op pass planned {len(actions)} actions, e.g. {actions[0]}")
    return samples


#: what one reconcile pass is made of (file, function), and the hot spots seen inside them
PASS_PHASES = (("catalog_file.py", "reload", "CatalogKeeper.reload"), ("store.py", "scan", "Store.scan"),
               ("store.py", "refresh_stats", "Store.refresh_stats"),
               ("planning.py", "plan", "Planner.plan"), ("views.py", "build", "ViewBuilder.build"),
               ("server.py", "publish", "Server.publish"))
HOT_SPOTS = (("variants.py", "key", "Derivation.key"), ("variants.py", "proof_key", "proof_key"),
             ("variants.py", "digest_of", "digest_of"), ("dataclasses.py", "asdict", "asdict"),
             ("store.py", "_check", "Store._check (a changed file)"),
             ("planning.py", "plan_model", "plan_model (a changed model)"),
             ("views.py", "model_view", "model_view (a changed model)"),
             ("store.py", "read_manifest", "Store.read_manifest"))


def profile_summary(profile: cProfile.Profile, passes: int) -> str:
    """Where a pass spends its time: each phase's and hot spot's share of the pass (cumulative
    time under the profiler, which inflates pure-Python parts) and its calls per pass."""
    stats = pstats.Stats(profile).stats
    total_s = sum(cum for (f, _, fn), (_, _, _, cum, _) in stats.items()
                  if f.endswith("reconciler.py") and fn == "reconcile") or 1.0

    def share(wanted: tuple[tuple[str, str, str], ...]) -> str:
        parts = []
        for file_name, func, label in wanted:
            found = [(calls, cum) for (f, _, fn), (_, calls, _, cum, _) in stats.items()
                     if fn == func and Path(f).name == file_name]
            if found:
                calls = sum(c for c, _ in found)
                cum = sum(t for _, t in found)
                parts.append(f"{label} {cum / total_s:.0%} "
                             f"({calls // passes}/pass)")
        return ", ".join(parts)

    return f"phases: {share(PASS_PHASES)}; inside them: {share(HOT_SPOTS)}"


class GcPauses:
    """Time spent in the cyclic garbage collector while in the ``with`` block: the profiler does
    not see it, yet a gen-2 collection over a large catalog's objects lands on some pass."""

    def __init__(self) -> None:
        self.pauses_s: list[float] = []
        self._started = 0.0

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._event)

    def _event(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.pauses_s.append(time.perf_counter() - self._started)

    def __str__(self) -> str:
        if not self.pauses_s:
            return "no garbage collection during the timed passes"
        return (f"garbage collector during the timed passes: {len(self.pauses_s)} collections, "
                f"{ms(sum(self.pauses_s))} in all, longest {ms(max(self.pauses_s))}")


def measure_noop(folder: Path, entries: int, passes: int) -> tuple[list[float], int, int, str]:
    """(pass seconds, files written, files hashed, profile) for the no-op reconcile."""
    folder.mkdir(parents=True, exist_ok=True)
    catalog = folder / "model_catalog.toml"
    catalog.write_text(large_catalog_text(entries))
    settings = Settings(catalog_path=catalog, models_dir=folder / "models",
                        socket_path=folder / "noop.sock")
    store = Store(settings.models_dir)
    keeper = CatalogKeeper(catalog)
    keeper.reload()
    if keeper.error is not None or len(keeper.current.entries) != entries:
        raise AssertionError(f"catalog of {entries} entries did not load: {keeper.error}")
    # the daemon's real publish path (views compared, generations bumped), without subscribers
    server = Server(socket_path=settings.socket_path)
    reconciler = Reconciler(settings, store=store, catalog=keeper, publish=server.publish)
    written = populate_store(store, reconciler)

    async def run() -> tuple[list[float], str]:
        await _timed_passes(reconciler, 2)      # warm: manifest caches, first publish
        with GcPauses() as pauses:
            samples = await _timed_passes(reconciler, passes)
        profile = cProfile.Profile()
        profiled = max(3, passes // 3)
        profile.enable()
        await _timed_passes(reconciler, profiled)
        profile.disable()
        return samples, f"{pauses}; {profile_summary(profile, profiled)}"

    samples, profile = asyncio.run(run())
    return samples, written, store.hash_count, profile


def measure_notify_at_scale(ws: Workspace, entries: int, flips: int
                            ) -> tuple[list[float], float]:
    """Edit -> notify on the no-op part's store: a real daemon on ``entries`` models, one node
    following ``SCALE_MODEL`` while its quantize.enabled is flipped. Also the seconds one parse
    of the changed catalog takes in-process (the part of the latency the catalog size adds)."""
    texts = {FP32: large_catalog_text(entries, disabled=frozenset({SCALE_MODEL})),
             INT8: large_catalog_text(entries)}
    keeper = CatalogKeeper(ws.root / "parse-probe.toml")
    parse_s = []
    for want in (FP32, INT8, FP32):
        keeper.path.write_text(texts[want])
        started = time.perf_counter()
        keeper.reload()
        parse_s.append(time.perf_counter() - started)
    samples = []
    with running_daemon(ws) as daemon:
        with daemon.subscribe(SCALE_MODEL, prefer="int8", node="bench-scale") as sub:
            wait_event(sub, variant_is(SCALE_MODEL, INT8), timeout_s=120, daemon=daemon)
            for i in range(flips):
                want = FP32 if i % 2 == 0 else INT8
                started = time.perf_counter()
                ws.write_catalog(texts[want])
                wait_event(sub, variant_is(SCALE_MODEL, want), timeout_s=60, daemon=daemon)
                samples.append(time.perf_counter() - started)
                time.sleep(0.05)
    return samples, sorted(parse_s)[1]


# -- 4: the idle daemon -------------------------------------------------------------------------

def wait_settled(daemon: DaemonProcess, models: set[str], timeout_s: float) -> None:
    """Every model ready, INT8 of mlp proven, no worker running, no action pending."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        status = daemon.status()
        views = status.get("models", {})
        ready = all(views.get(m, {}).get("state") == "ready" for m in models)
        int8 = any(v["variant"] == INT8 and v.get("proof")
                   for v in views.get("mlp", {}).get("variants", []))
        if ready and int8 and status.get("workers") == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"daemon did not settle in {timeout_s} s: {status.get('summary')}\n"
                         f"{daemon.log()}")


def proc_status(pid: int | str, task: str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches per thread (``name/tid``): each one is a wake-up or a preemption."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = proc_status(pid, tid)
        except FileNotFoundError:
            continue     # a thread that ended between the listing and the read
        out[f"{st['Name']}/{tid}"] = (int(st["voluntary_ctxt_switches"])
                                      + int(st["nonvoluntary_ctxt_switches"]))
    return out


def children_of(pid: int) -> list[tuple[str, float]]:
    """(command line, shortened; RSS in MiB) of each of ``pid``'s child processes."""
    kids: list[tuple[str, float]] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                with contextlib.suppress(FileNotFoundError, KeyError):
                    raw = Path(f"/proc/{child}/cmdline").read_bytes()
                    command = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:70]
                    rss_kib = int(proc_status(child)["VmRSS"].split()[0])
                    kids.append((command, rss_kib / 1024))
    return kids


def measure_idle(daemon: DaemonProcess, idle_s: float
                 ) -> tuple[float, dict[str, int], list[tuple[str, float]]]:
    """(RSS in MiB, switches per thread over ``idle_s``, child processes) of the settled daemon,
    with one subscribed node connected and nobody asking anything."""
    pid = daemon.proc.pid
    with daemon.subscribe("det", "det2", "mlp", node="bench-idle") as sub:
        sub.next_event(timeout_s=5)
        time.sleep(1.0)                      # the subscribe's own replies are done
        before = thread_switches(pid)
        time.sleep(idle_s)
        after = thread_switches(pid)
        rss_kib = int(proc_status(pid)["VmRSS"].split()[0])
        kids = children_of(pid)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    return rss_kib / 1024, delta, kids


# -- the run ------------------------------------------------------------------------------------

def part(results: Results, name: str, only: set[str], fn: Callable[[], None]) -> None:
    if name not in only:
        return
    started = time.monotonic()
    print(f"{name} ...", flush=True)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a part that fails is a row; the other parts still run
        results.failed(name, e)
    print(f"{name}: {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    flips, rounds, passes, idle_s, scale_flips = ((6, 2, 5, 3.0, 2) if args.quick
                                                  else (60, 20, 100, 10.0, 10))
    entries = 1000      # also when quick: the target is for this size
    results = Results()
    step_ms = Settings().debounce_step_ms

    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        root = Path(tmp)
        with demo_workspace(root) as ws:
            ws.write_catalog(MLP_INT8)
            if only & {"notify", "corrupt"}:
                with running_daemon(ws) as daemon:
                    def notify() -> None:
                        samples = measure_notify(ws, daemon, flips)
                        rows = latency_rows("edit -> notify", "catalog save -> node told",
                                            samples, 0.100)
                        rows[1] = replace(rows[1], note=(
                            f"saves of model_catalog.toml flipping quantize.enabled, half in "
                            f"place, half renamed over; "
                            f"default debounce step {step_ms} ms is the floor, the rest (p50 "
                            f"{ms(percentile(samples, 50) - step_ms / 1e3)}) is inotify, catalog "
                            f"parse, the pass and the fan-out; best {ms(min(samples))}. TF "
                            f"Serving polls every 1 s, Triton every 15 s"))
                        results.add(*rows)

                    def corrupt() -> None:
                        samples = measure_corrupt(ws, daemon, rounds)
                        results.add(*latency_rows("corrupt INT8 -> FP32",
                                                  "truncate -> node told FP32", samples, 0.250))

                    part(results, "notify", only, notify)
                    part(results, "corrupt", only, corrupt)

            def idle() -> None:
                ws.write_catalog(entry_toml("det") + DET2 + MLP_INT8)
                with running_daemon(ws) as daemon:
                    wait_settled(daemon, {"det", "det2", "mlp"}, SETTLE_TIMEOUT_S)
                    time.sleep(1.0)
                    rss_mib, switches, kids = measure_idle(daemon, idle_s)
                total = sum(switches.values())
                woke = sorted(((c, n) for n, c in switches.items() if c), reverse=True)
                busiest = (", ".join(f"{n}: {c}" for c, n in woke[:4]) if woke else
                           f"none of its {len(switches)} threads woke up")
                results.add(
                    Row("idle daemon", "RSS after settling with 3 models", f"{rss_mib:.1f} MiB",
                        "<= 60 MB", rss_mib <= 60 * 1e6 / 2**20,
                        note="VmRSS of the daemon process alone; its child processes: " + (
                            "; ".join(f"{c} ({r:.1f} MiB)" for c, r in kids) or "none")),
                    Row("idle daemon", f"context switches in {idle_s:.0f} s idle (all threads)",
                        f"{total} ({total / idle_s:.1f}/s)",
                        "no periodic wake-ups (<= 1/s)", total / idle_s <= 1.0,
                        note=f"not under systemd: no watchdog ping; resync every "
                             f"{Settings().resync_interval_s:.0f} s; threads that woke: {busiest}"))

            part(results, "idle", only, idle)

            noop_dir = root / "noop"

            def noop() -> None:
                samples, written, hashed, profile = measure_noop(noop_dir, entries, passes)
                rows = latency_rows("no-op reconcile", f"pass over {entries} entries", samples,
                                    0.050)
                rows[1] = replace(rows[1], note=(
                    f"in-process Reconciler.reconcile() with the real Store ({written} files on "
                    f"disk), CatalogKeeper (file unchanged) and Server.publish (no subscribers); "
                    f"{profile}"))
                results.add(*rows, Row("no-op reconcile", "files hashed during the passes",
                                       str(hashed), "0", hashed == 0))

            def scale() -> None:
                samples, parse_s = measure_notify_at_scale(Workspace(root=noop_dir, hub=ws.hub),
                                                           entries, scale_flips)
                text = large_catalog_text(entries)
                started = time.perf_counter()
                tomllib.loads(text)
                stdlib_s = time.perf_counter() - started
                rows = latency_rows(f"edit -> notify, {entries} models",
                                    "catalog save -> node told", samples, 0.100)
                rows[1] = replace(rows[1], note=(
                    f"the no-op part's store under a real daemon; one entry's quantize.enabled "
                    f"flipped in a {len(text) // 1024} KiB catalog. Parsing and validating it "
                    f"(CatalogKeeper.reload, which parses only the [[models]] block that changed) "
                    f"takes {ms(parse_s)} in-process (a whole-file tomllib.loads: "
                    f"{ms(stdlib_s)}), then a full pass (see the "
                    f"no-op rows), after the {step_ms} ms debounce step"))
                results.add(*rows)

            if only & {"noop", "scale"}:
                part(results, "noop", {"noop"}, noop)     # scale runs on the store it writes
            part(results, "scale", only, scale)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
