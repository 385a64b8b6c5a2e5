"""Command line: argv + environment + settings file -> Settings, logging configured once, then
one command.

``run`` starts the daemon (``runner``). The other commands work in one of two modes, and say
which: when a daemon answers on the socket they ask it (the admin protocol, ``adminclient``; its
side is ``admin``) and show its progress live; when none runs they work on the folder as
before (``sync``/``pull`` drive a reconciler of their own until the store converges). ``--json``
prints the same document in both modes (``reports``). Exit codes: 0 ok, 1 some entries failed,
2 bad usage or bad catalog. Expected errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import structlog

from . import __version__, adminclient, logs
from .errors import CatalogError, ModeldError, StoreLockedError, UsageError
from .progress import ProgressDisplay
from .protocol import admin_request
from .settings import (DEFAULT_CATALOG, DEFAULT_CONFIG, DEFAULT_MODELS, DEFAULT_SOCKET, CONFIG_ENV,
                       SETTINGS_KEYS, Settings, config_path, layered_values, parse_simulated,
                       read_settings_file)
from .runtimes import parse_runtimes

# What works on the folder (a reconciler, the store, the reports) is imported by the commands
# that use it: every spawn worker of the daemon imports this module again as its __mp_main__,
# and needs none of it (measured: 0.16-0.23 s of CPU per job).
if TYPE_CHECKING:
    from .catalog import Catalog
    from .reconciler import Reconciler

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: how long a reading command (status, list, nodes, remove) waits for the daemon's answer
READ_TIMEOUT_S = 30.0
#: commands that act on one model, and what their NAME means
NAMED = {"pull": "pull (and quantize, prove) one model now",
         "remove": "delete a model's files from the store",
         "verify": "prove a model's variants again now",
         "bench": "measure every variant of a model on this host",
         "samples": "list the field samples nodes sent for a model (--clear removes them)"}


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
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")

    common.add_argument("--runtime", action="append", metavar="PROVIDER=PYTHON",
                        default=argparse.SUPPRESS,
                        help="prove PROVIDER in the node runtime whose interpreter is PYTHON "
                             "(repeatable; env MODELD_RUNTIMES, ';'-separated)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-v info, -vv debug)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        help="debug|info|warning|error (env MODELD_LOG_LEVEL)")

    parser = argparse.ArgumentParser(
        prog="mecha10-modeld", parents=[common],
        description="Pull, quantize, prove and serve ONNX models.",
        epilog=f"Settings: {DEFAULT_CONFIG} (or ${CONFIG_ENV}), then environment variables, then "
               "flags. With a daemon running on the socket, commands ask it; otherwise they "
               "work on the folder.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground (systemd ExecStart)")
    sub.add_parser("sync", parents=[common], help="bring the store in line with the catalog now")
    for name, text in NAMED.items():
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        if name == "bench":
            p.add_argument("--candidates", action="store_true",
                           help="also build and measure the standard quantization recipes")
        if name == "samples":
            p.add_argument("--clear", action="store_true",
                           help="remove every field sample of the model")
    sub.add_parser("list", parents=[common], help="list the catalog's models")
    sub.add_parser("status", parents=[common], help="what is served, proven and told to nodes")
    sub.add_parser("nodes", parents=[common], help="the nodes connected to the running daemon")
    sub.add_parser("doctor", parents=[common], help="check this host's set-up, a line each with a fix")
    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    return parser


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Built-in defaults < settings file (``MODELD_CONFIG``) < environment < flags."""
    env = dict(os.environ if env is None else env)
    values = layered_values(flags=_flags(args), env=env, file_values=_file_values(env),
                            file_name=str(config_path(env)[0]))
    runtimes = parse_runtimes(env.get("MODELD_RUNTIMES"))
    for flag in getattr(args, "runtime", None) or ():   # flags win, provider by provider
        runtimes |= parse_runtimes(flag, source="--runtime")
    return Settings(simulated_providers=parse_simulated(env.get("MODELD_SIMULATE_PROVIDERS")),
                    runtimes=runtimes, **values)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (``--catalog`` ... : each flag is named by its settings key)."""
    return {key: getattr(args, key, None) for key in SETTINGS_KEYS}


def _file_values(env: dict[str, str]) -> dict[str, Any]:
    path, required = config_path(env)
    return read_settings_file(path, required=required)


def log_level(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    """-v/--log-level > $MODELD_LOG_LEVEL > the settings file > the command's default. The
    daemon logs at info; the other commands print their own one-line results and errors, so
    their log is quiet unless asked for (-v)."""
    env = dict(os.environ if env is None else env)
    explicit = getattr(args, "log_level", None) or env.get("MODELD_LOG_LEVEL")
    if explicit:
        return explicit
    verbose = getattr(args, "verbose", 0) or 0
    if verbose:
        return "info" if verbose == 1 else "debug"
    if args.command == "run":
        return str(_file_values(env).get("log_level") or "info")
    return "critical"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "completion":
            from .completion import bash_script
            print(bash_script(parser))
            return EXIT_OK
        level = log_level(args)
        display = ProgressDisplay(sys.stderr)
        logs.configure(level, stream=display.stream)
        os.environ["MODELD_LOG_LEVEL"] = level   # worker processes log like the daemon
        settings = settings_from(args)
        return COMMANDS[args.command](settings, args, display)
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


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


# -- the two modes ------------------------------------------------------------------------------

def _daemon(settings: Settings) -> adminclient.AdminConnection | None:
    return adminclient.connect(settings.socket_path)


def _folder_mode(settings: Settings) -> dict[str, Any]:
    return {"daemon": False, "socket": str(settings.socket_path),
            "models_dir": str(settings.models_dir), "catalog": str(settings.catalog_path)}


def _ask(conn: adminclient.AdminConnection, command: str, display: ProgressDisplay,
         timeout_s: float | None, **fields: Any) -> dict[str, Any]:
    """One admin command; its progress drawn on the terminal; its result (errors raised)."""
    def on_progress(event: Mapping[str, Any]) -> None:
        display.update(str(event.get("model")), str(event.get("action") or "working"),
                       str(event.get("detail") or ""), event.get("progress"))
    try:
        with conn:
            result = conn.run(admin_request(command, **fields), timeout_s=timeout_s,
                              on_progress=on_progress)
    finally:
        display.done()
    if "error" in result and not result.get("data"):
        exit_code = int(result.get("exit", EXIT_FAILED))
        raise (UsageError if exit_code == EXIT_USAGE else ModeldError)(str(result["error"]))
    return result


# -- commands -----------------------------------------------------------------------------------

def cmd_run(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from .runner import run_daemon
    return run_daemon(settings)


def cmd_status(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from . import reports
    conn = _daemon(settings)
    if conn is not None:
        result = _ask(conn, "status", display, READ_TIMEOUT_S)
        doc, code = result["data"], int(result["exit"])
    else:
        doc, code = _status_from_folder(settings)
    if _json(args):
        _print_json(doc)
    else:
        print(reports.format_status(doc))   # the catalog's errors are in it, once
    return code


def _status_from_folder(settings: Settings) -> tuple[dict[str, Any], int]:
    import asyncio

    from . import reports
    from .catalog_file import CatalogKeeper
    from .reconciler import Reconciler
    from .store import Store
    keeper = CatalogKeeper(settings.catalog_path)
    keeper.reload()
    reconciler = Reconciler(settings, store=Store(settings.models_dir), catalog=keeper)
    actions = asyncio.run(reconciler.reconcile(dispatch=False))
    doc = reports.status_document(
        reconciler.views, keeper.current, providers=settings.providers,
        catalog_state=reconciler.status()["catalog"], mode=_folder_mode(settings),
        pending={a.name: a.reason for a in actions})
    if keeper.error is not None and not keeper.current.entries:
        return doc, EXIT_USAGE
    return doc, EXIT_FAILED if keeper.current.errors else EXIT_OK


def cmd_list(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from . import reports
    from .catalog_file import CatalogKeeper
    from .store import Store
    conn = _daemon(settings)
    if conn is not None:
        result = _ask(conn, "list", display, READ_TIMEOUT_S)
        doc, code = result["data"], int(result["exit"])
    else:
        keeper = CatalogKeeper(settings.catalog_path)
        keeper.reload()
        if keeper.error is not None:
            raise keeper.error
        store = Store(settings.models_dir)
        doc = reports.list_document(
            keeper.current, store.is_pulled,
            mode=_folder_mode(settings))
        code = EXIT_FAILED if keeper.current.errors else EXIT_OK
    if _json(args):
        _print_json(doc)
    else:
        print(reports.format_list(doc))
        if doc.get("catalog_error"):
            _say(doc["catalog_error"])
        for row in doc["models"]:
            if row.get("error"):
                _say(row["error"])
    return code


def cmd_nodes(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from . import reports
    conn = _daemon(settings)
    if conn is None:
        if _json(args):
            _print_json({"mode": _folder_mode(settings), "nodes": None})
        raise UsageError(f"no daemon on {settings.socket_path}: no node can be connected",
                         hint="start it: systemctl start mecha10-modeld")
    doc = _ask(conn, "nodes", display, READ_TIMEOUT_S)["data"]
    if _json(args):
        _print_json(doc)
    else:
        print(reports.mode_line(doc["mode"]))
        print(reports.format_nodes(doc["nodes"]))
    return EXIT_OK


def cmd_sync(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    return _converge(settings, args, display, "sync", None)


def cmd_pull(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    return _converge(settings, args, display, "pull", {args.name})


def cmd_verify(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    """Prove again now: the recorded proofs of this model go stale, then converge (no hub)."""
    return _converge(settings, args, display, "verify", {args.name})


def _converge(settings: Settings, args: argparse.Namespace, display: ProgressDisplay,
              command: str, only: set[str] | None) -> int:
    from . import reports
    conn = _daemon(settings)
    if conn is not None:
        result = _ask(conn, command, display, None, name=args.name if only else None)
        doc, code = result["data"], int(result["exit"])
    else:
        doc, code = _converge_folder(settings, display, command, only)
    if _json(args):
        _print_json(doc)
    else:
        print(reports.format_status(doc))
    for error in doc["catalog"].get("entry_errors") or () if only is None else ():
        _say(str(error))
    for name, error in sorted((doc.get("failed") or {}).items()):
        _say(error if error.startswith(f"{name}:") else f"{name}: {error}")
    return code


def _converge_folder(settings: Settings, display: ProgressDisplay, command: str,
                     only: set[str] | None) -> tuple[dict[str, Any], int]:
    import asyncio

    from . import reports
    from .admin import forget_proofs, require_entry
    from .catalog_file import CatalogKeeper
    from .reconciler import Reconciler
    from .store import Store
    keeper = CatalogKeeper(settings.catalog_path)
    keeper.reload()
    if keeper.error is not None:
        raise keeper.error
    for name in only or ():
        require_entry(keeper, name)
    store = Store(settings.models_dir)
    store.lock()
    try:
        store.clean_leftovers()
        if command == "verify":
            for name in only or ():
                forget_proofs(store, name)
        reconciler = Reconciler(settings, store=store, catalog=keeper,
                                on_change=lambda: _show_activity(reconciler, display))
        reconciler.forget_failures(only)      # an explicit sync retries what failed before
        try:
            asyncio.run(reconciler.converge(only, refresh=command != "verify"))
        finally:
            display.done()
        failed = {n: str(e) for n, e in reconciler.failed_models().items()}
    finally:
        store.unlock()
    views = {n: v for n, v in reconciler.views.items() if only is None or n in only}
    doc = reports.status_document(views, keeper.current if only is None else
                                  _without_errors(keeper.current), providers=settings.providers,
                                  catalog_state=reconciler.status()["catalog"],
                                  mode=_folder_mode(settings))
    doc["failed"] = failed
    bad = bool(failed) or (only is None and bool(keeper.current.errors))
    return doc, EXIT_FAILED if bad else EXIT_OK


def _without_errors(catalog: Catalog) -> Catalog:
    """A ``pull``/``verify`` of one model does not report the other entries' errors."""
    return replace(catalog, errors=())


def _show_activity(reconciler: Reconciler, display: ProgressDisplay) -> None:
    busy = {n: a for n, a in reconciler.activity().items() if a.action}
    for name in display.models():
        if name not in busy:
            display.update(name, None)
    for name, act in busy.items():
        display.update(name, act.action, act.detail, act.progress)


def cmd_remove(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from . import reports
    from .catalog_file import CatalogKeeper
    from .store import Store
    conn = _daemon(settings)
    if conn is not None:
        doc = _ask(conn, "remove", display, READ_TIMEOUT_S, name=args.name)["data"]
    else:
        store = Store(settings.models_dir)
        if not store.remove_model(args.name):
            raise UsageError(f"{args.name} is not in {settings.models_dir}")
        try:
            keeper = CatalogKeeper(settings.catalog_path)
            keeper.reload()
            still = args.name in keeper.current.entries
        except CatalogError:
            still = False
        doc = {"mode": _folder_mode(settings), "removed": args.name, "still_in_catalog": still}
    if _json(args):
        _print_json(doc)
    else:
        print(reports.mode_line(doc["mode"]))
        print(f"removed {args.name}")
    if doc["still_in_catalog"]:
        _say(f"{args.name} is still in {settings.catalog_path}: the daemon will pull it again "
             "(remove the entry to stop that)")
    return EXIT_OK


def cmd_samples(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    """Field samples live in the daemon's memory and models/<name>/samples: ask the daemon."""
    from . import reports
    conn = _daemon(settings)
    if conn is None:
        raise UsageError(f"no daemon on {settings.socket_path}: samples are managed by the "
                         "running daemon", hint="start it (systemctl start mecha10-modeld)")
    doc = _ask(conn, "samples", display, READ_TIMEOUT_S, name=args.name,
               clear=bool(args.clear))["data"]
    if _json(args):
        _print_json(doc)
        return EXIT_OK
    print(reports.mode_line(doc["mode"]))
    if "cleared" in doc:
        print(f"removed {doc['cleared']} field samples of {args.name}")
        return EXIT_OK
    print(f"{args.name}: {doc['count']} field samples ({doc['needed']} needed), generation "
          f"{doc['generation'] or 'none yet'} ({doc['generation_count']} samples)"
          + ("" if doc["uses_field_samples"] else "; its entry does not use field samples"))
    rows = [("SHA256", "NODE", "BYTES", "IN GENERATION")] + [
        (r["sha256"][:16], r["node"] or "-", r["bytes"], "yes" if r["in_generation"] else "no")
        for r in doc["samples"]]
    if len(rows) > 1:
        print(reports.table(rows))
    return EXIT_OK


def cmd_bench(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from . import reports
    from .admin import BENCH_SAMPLES, bench_job
    from .benchtable import format_table, run_note
    from .catalog_file import CatalogKeeper
    from .jobs import JobRunner
    from .store import Store
    conn = _daemon(settings)
    if conn is not None:
        doc = _ask(conn, "bench", display, None, name=args.name,
                   candidates=args.candidates)["data"]
    else:
        keeper = CatalogKeeper(settings.catalog_path)
        keeper.reload()
        if keeper.error is not None:
            raise keeper.error
        spec, job = bench_job(settings, Store(settings.models_dir), keeper, args.name,
                              args.candidates)
        try:
            rows = JobRunner().run(spec, job, on_progress=lambda fraction, detail: display.update(
                args.name, "benchmarking", detail, fraction))
        finally:
            display.done()
        doc = {"mode": _folder_mode(settings), "model": args.name, "samples": BENCH_SAMPLES,
               "rows": [dict(r) for r in rows]}
    if _json(args):
        _print_json(doc)
    else:
        print(reports.mode_line(doc["mode"]))
        print(format_table(doc["rows"]))
        print(run_note(doc.get("samples")))
    return EXIT_OK


def cmd_doctor(settings: Settings, args: argparse.Namespace, display: ProgressDisplay) -> int:
    from .doctor import run_checks, format_checks
    checks = run_checks(settings)
    if _json(args):
        _print_json({"checks": [c.to_dict() for c in checks]})
    else:
        print(format_checks(checks))
    return EXIT_FAILED if any(c.level == "fail" for c in checks) else EXIT_OK


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace, ProgressDisplay], int]] = {
    "run": cmd_run, "sync": cmd_sync, "pull": cmd_pull, "list": cmd_list, "status": cmd_status,
    "nodes": cmd_nodes, "remove": cmd_remove, "verify": cmd_verify, "bench": cmd_bench,
    "doctor": cmd_doctor, "samples": cmd_samples}


if __name__ == "__main__":
    sys.exit(main())
