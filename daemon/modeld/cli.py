"""Command line: argv + environment -> Settings, logging configured once, then one command.

``run`` starts the daemon (``runner``); ``sync``/``pull`` drive the same reconciler until the store
converges and exit; ``list``/``status`` read the catalog and the store; ``remove``, ``verify`` and
``bench`` act on one model. Exit codes: 0 ok, 1 some entries failed, 2 bad usage or bad catalog.
Expected errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import structlog

from . import __version__, logs
from .catalog import CatalogKeeper, load_catalog
from .errors import CatalogError, ModeldError, StoreLockedError, UsageError
from .jobs import JobRunner, JobSpec
from .reconciler import Reconciler
from .serving import Choice, choose
from .runtimes import parse_runtimes
from .settings import (DEFAULT_CATALOG, DEFAULT_MODELS, DEFAULT_SOCKET, Settings, env_flag,
                       parse_simulated)
from .store import Store
from .variants import DEFAULT_PROVIDERS, FP32, VARIANT_FILES

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--catalog", type=Path, default=argparse.SUPPRESS,
                        help=f"catalog file (env MODELD_CATALOG; default {DEFAULT_CATALOG})")
    common.add_argument("--models", type=Path, default=argparse.SUPPRESS,
                        help=f"models directory (env MODELD_MODELS; default {DEFAULT_MODELS})")
    common.add_argument("--socket", type=Path, default=argparse.SUPPRESS,
                        help=f"Unix socket for nodes (env MODELD_SOCKET; default {DEFAULT_SOCKET})")
    common.add_argument("--providers", default=argparse.SUPPRESS,
                        help="execution providers the nodes use, comma-separated "
                             "(env MODELD_PROVIDERS; default CPUExecutionProvider)")
    common.add_argument("--runtime", action="append", metavar="PROVIDER=PYTHON",
                        default=argparse.SUPPRESS,
                        help="prove PROVIDER in the node runtime whose interpreter is PYTHON "
                             "(repeatable; env MODELD_RUNTIMES, ';'-separated)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-v info, -vv debug)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        help="debug|info|warning|error (env MODELD_LOG_LEVEL)")

    parser = argparse.ArgumentParser(prog="mecha10-modeld", parents=[common],
                                     description="Pull, quantize, prove and serve ONNX models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground (systemd ExecStart)")
    sub.add_parser("sync", parents=[common], help="bring the store in line with the catalog once, then exit")
    p = sub.add_parser("pull", parents=[common], help="pull (and quantize, prove) one model now")
    p.add_argument("name")
    sub.add_parser("list", parents=[common], help="list the catalog's models")
    p = sub.add_parser("status", parents=[common], help="what is on disk, proven and served")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("remove", parents=[common], help="delete a model's files from the store")
    p.add_argument("name")
    p = sub.add_parser("verify", parents=[common], help="prove a model's variants again now")
    p.add_argument("name")
    p = sub.add_parser("bench", parents=[common], help="measure every variant of a model on this host")
    p.add_argument("name")
    p.add_argument("--candidates", action="store_true",
                   help="also build and measure the standard quantization recipes")
    return parser


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)

    def pick(attr: str, var: str, default: Any) -> Any:
        value = getattr(args, attr, None)
        return value if value is not None else (env.get(var) or default)

    providers = pick("providers", "MODELD_PROVIDERS", ",".join(DEFAULT_PROVIDERS))
    runtimes = parse_runtimes(env.get("MODELD_RUNTIMES"))
    for flag in getattr(args, "runtime", None) or ():   # flags win, provider by provider
        runtimes |= parse_runtimes(flag, source="--runtime")
    return Settings(
        catalog_path=Path(pick("catalog", "MODELD_CATALOG", DEFAULT_CATALOG)).absolute(),
        models_dir=Path(pick("models", "MODELD_MODELS", DEFAULT_MODELS)).absolute(),
        socket_path=Path(pick("socket", "MODELD_SOCKET", DEFAULT_SOCKET)).absolute(),
        providers=tuple(p.strip() for p in str(providers).split(",") if p.strip()),
        simulated_providers=parse_simulated(env.get("MODELD_SIMULATE_PROVIDERS")),
        runtimes=runtimes,
        socket_group=env.get("MODELD_SOCKET_GROUP") or None,
        hub_endpoint=env.get("HF_ENDPOINT") or None,
        hub_offline=env_flag("HF_HUB_OFFLINE"),
        **_numbers_from_env(env),
    )


def _numbers_from_env(env: dict[str, str]) -> dict[str, Any]:
    """Tunables for tests and operators: MODELD_RESYNC_INTERVAL_S=60 -> resync_interval_s=60.0."""
    out: dict[str, Any] = {}
    for name, kind in (("max_workers", int), ("debounce_step_ms", int), ("debounce_max_ms", int),
                       ("resync_interval_s", float), ("scrub_interval_s", float),
                       ("pull_timeout_s", float),
                       ("pull_attempts", int), ("quantize_timeout_s", float),
                       ("verify_timeout_s", float), ("worker_memory_mb", int),
                       ("retry_backoff_base_s", float), ("retry_backoff_cap_s", float)):
        raw = env.get(f"MODELD_{name.upper()}")
        if raw:
            try:
                out[name] = kind(raw)
            except ValueError as e:
                raise UsageError(f"MODELD_{name.upper()}={raw!r} is not a valid {kind.__name__}") from e
    return out


def log_level(args: argparse.Namespace) -> str:
    explicit = getattr(args, "log_level", None) or os.environ.get("MODELD_LOG_LEVEL")
    if explicit:
        return explicit
    verbose = getattr(args, "verbose", 0) or 0
    default = "info" if args.command == "run" else "warning"
    return {0: default, 1: "info"}.get(verbose, "debug")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = log_level(args)
        logs.configure(level)
        os.environ["MODELD_LOG_LEVEL"] = level   # worker processes log like the daemon
        settings = settings_from(args)
        return COMMANDS[args.command](settings, args)
    except CatalogError as e:
        _say(str(e))
        return EXIT_USAGE
    except (UsageError, StoreLockedError) as e:
        _say(str(e))
        return EXIT_USAGE
    except ModeldError as e:
        _say(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _say(text: str) -> None:
    print(f"mecha10-modeld: {text}", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------

def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from .runner import run_daemon
    return run_daemon(settings)


def cmd_sync(settings: Settings, args: argparse.Namespace, only: set[str] | None = None,
             *, refresh: bool = True) -> int:
    keeper = CatalogKeeper(settings.catalog_path)
    keeper.reload()
    if keeper.error is not None:
        raise keeper.error
    if only is not None:
        missing = only - set(keeper.current.entries)
        if missing:
            raise UsageError(f"{', '.join(sorted(missing))} is not in {settings.catalog_path}",
                             hint="see `mecha10-modeld list`")
    store = Store(settings.models_dir)
    store.lock()
    try:
        store.clean_leftovers()
        progress = _ProgressLine() if sys.stderr.isatty() else None
        reconciler = Reconciler(settings, store=store, catalog=keeper,
                                on_change=(lambda: progress.update(reconciler)) if progress else None)
        reconciler.forget_failures(only)      # an explicit sync retries what failed before
        asyncio.run(reconciler.converge(only, refresh=refresh))
        if progress:
            progress.clear()
        failed = reconciler.failed_models()
    finally:
        store.unlock()
    _print_views({n: v for n, v in reconciler.views.items() if only is None or n in only},
                 settings)
    for error in keeper.current.errors:
        _say(str(error))
    for name, error in sorted(failed.items()):
        _say(str(error) if error.entry else f"{name}: {error}")
    bad_entries = bool(keeper.current.errors) or bool(failed)
    return EXIT_FAILED if bad_entries else EXIT_OK


def cmd_pull(settings: Settings, args: argparse.Namespace) -> int:
    return cmd_sync(settings, args, only={args.name})


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    catalog = load_catalog(settings.catalog_path)
    store = Store(settings.models_dir)
    rows = [("NAME", "TASK", "SOURCE", "QUANTIZE", "ON DISK")]
    for entry in catalog.entries.values():
        q = entry.quantize
        quant = f"{q.method}" if q and q.enabled else ("off" if q else "-")
        if entry.quantize_error is not None:
            quant = "error"
        on_disk = "yes" if (store.model_dir(entry.name) / VARIANT_FILES[FP32]).exists() else "no"
        rows.append((entry.name, entry.task or "-",
                     f"{entry.repo}/{entry.filename}@{entry.revision or 'main'}", quant, on_disk))
    print(_table(rows))
    for error in catalog.errors:
        _say(str(error))
    return EXIT_FAILED if catalog.errors else EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    keeper = CatalogKeeper(settings.catalog_path)
    keeper.reload()
    reconciler = Reconciler(settings, store=Store(settings.models_dir), catalog=keeper)
    actions = asyncio.run(reconciler.reconcile(dispatch=False))
    doc = status_document(reconciler, actions, settings)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_views(reconciler.views, settings, pending={a.name: a.reason for a in actions})
        if keeper.error is not None:
            _say(str(keeper.error))
        for error in keeper.current.errors:
            _say(str(error))
    if keeper.error is not None and not keeper.current.entries:
        return EXIT_USAGE
    return EXIT_FAILED if keeper.current.errors else EXIT_OK


def status_document(reconciler: Reconciler, actions, settings: Settings) -> dict[str, Any]:
    models = {}
    for name, view in reconciler.views.items():
        served = choose(view, settings.providers, "fastest")
        models[name] = {
            "state": view.state, "reason": view.reason,
            "served": ({"variant": served.variant, "path": served.path, "sha256": served.sha256,
                        "provider": served.provider, "reason": served.reason}
                       if isinstance(served, Choice) else None),
            "unavailable": None if isinstance(served, Choice) else served.reason,
            "variants": [{"variant": v.variant, "path": v.path, "sha256": v.sha256, "size": v.size,
                          "proof": v.proof.to_dict() if v.proof else None} for v in view.variants],
            "detail": dict(view.detail),
        }
    pending = {a.name: a.reason for a in actions}
    for name, reason in pending.items():
        models[name]["pending"] = reason
    return {"catalog": reconciler.status()["catalog"], "models_dir": str(settings.models_dir),
            "providers": list(settings.providers),
            "runtimes": reconciler.status()["runtimes"], "models": models}


def cmd_remove(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.models_dir)
    if not store.remove_model(args.name):
        raise UsageError(f"{args.name} is not in {settings.models_dir}")
    print(f"removed {args.name}")
    try:
        catalog = load_catalog(settings.catalog_path)
    except CatalogError:
        return EXIT_OK
    if args.name in catalog.entries:
        _say(f"{args.name} is still in {settings.catalog_path}: the daemon will pull it again "
             "(remove the entry to stop that)")
    return EXIT_OK


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Prove again now: forget the recorded proofs of this model, then converge (no hub)."""
    if args.name not in load_catalog(settings.catalog_path).entries:
        raise UsageError(f"{args.name} is not in {settings.catalog_path}")
    store = Store(settings.models_dir)
    store.lock()
    try:
        manifest = store.read_manifest(args.name)
        store.write_manifest(replace(manifest, proofs={}))
    finally:
        store.unlock()
    return cmd_sync(settings, args, only={args.name}, refresh=False)


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from .benchtable import format_table
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.entries.get(args.name)
    if entry is None:
        raise UsageError(f"{args.name} is not in {settings.catalog_path}")
    store = Store(settings.models_dir)
    folder = store.model_dir(args.name)
    if not (folder / VARIANT_FILES[FP32]).exists():
        raise UsageError(f"{args.name} is not pulled yet", hint="run `mecha10-modeld pull "
                         f"{args.name}` first")
    q = entry.quantize
    request = dict(model_dir=str(folder), providers=tuple(entry.providers or settings.providers),
                   calibration=q.calibration if q else None,
                   preprocessing_preset=entry.preprocessing_preset, input_size=entry.input_size,
                   gates=q.gates if q else None, candidates=args.candidates,
                   simulated=dict(settings.simulated_providers), name=args.name,
                   task=entry.task or None,
                   runtimes={p: py for p, py in settings.runtimes.items()
                             if p in (entry.providers or settings.providers)})
    spec = JobSpec("modeld.workers.bench:bench_model", settings.quantize_timeout_s,
                   settings.worker_memory_mb, "modeld.workers.bench:BenchRequest")
    rows = JobRunner().run(spec, request)
    print(format_table(rows))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "sync": cmd_sync, "pull": cmd_pull, "list": cmd_list,
            "status": cmd_status, "remove": cmd_remove, "verify": cmd_verify, "bench": cmd_bench}


# -- output -----------------------------------------------------------------------------------

def _print_views(views, settings: Settings, pending: dict[str, str] | None = None) -> None:
    rows = [("MODEL", "STATE", "SERVED", "VARIANTS", "NOTE")]
    for name, view in views.items():
        served = choose(view, settings.providers, "fastest")
        variants = ", ".join(_variant_summary(v) for v in view.variants) or "-"
        note = view.reason or (pending or {}).get(name, "")
        if isinstance(served, Choice):
            served_text = served.variant
            note = note or served.reason
        else:
            served_text = "-"
            note = note or served.reason
        rows.append((name, view.state, served_text, variants, note))
    print(_table(rows))


def _variant_summary(v) -> str:
    if v.proof is None:
        return f"{v.variant} (unproven)"
    passed = [p for p in v.proof.providers if p.passed]
    if not passed:
        return f"{v.variant} (refused)"
    best = max(passed, key=lambda p: p.speedup or 1.0)
    speed = f" {best.speedup:.2f}x" if best.speedup and v.variant != FP32 else ""
    evidence = v.proof.evidence(best.provider)
    return f"{v.variant} (ok{speed}{', ' + evidence if evidence else ''})"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


class _ProgressLine:
    """A one-line progress display on a terminal (downloads, quantization)."""

    def __init__(self) -> None:
        self._last = ""

    def update(self, reconciler: Reconciler) -> None:
        busy = [(n, a) for n, a in reconciler.activity().items() if a.action]
        if not busy:
            self.clear()
            return
        parts = []
        for name, act in busy:
            bar = ""
            if act.progress is not None:
                filled = int(act.progress * 20)
                bar = f" [{'#' * filled}{'.' * (20 - filled)}] {act.progress:4.0%}"
            parts.append(f"{act.action} {name}{bar}")
        line = " | ".join(parts)[:150]
        if line != self._last:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
            self._last = line

    def clear(self) -> None:
        if self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._last = ""


if __name__ == "__main__":
    sys.exit(main())
