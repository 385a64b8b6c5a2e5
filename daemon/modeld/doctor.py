"""``mecha10-modeld doctor``: is this host set up to run the daemon? One line per check, a fix each.

Checks: execution providers (asked of onnxruntime in a worker process: the CLI never imports it),
hub reachable (or offline mode), socket and group permissions, disk space, catalog valid, daemon
up, unit installed. Each returns a ``Check``; none raises.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import adminclient
from .catalog_file import load_catalog
from .errors import ModeldError
from .jobs import JobRunner, JobSpec
from .settings import Settings

OK, WARN, FAIL = "ok", "warn", "fail"
UNIT_PATHS = (Path("/etc/systemd/system/mecha10-modeld.service"),
              Path("/lib/systemd/system/mecha10-modeld.service"),
              Path("/usr/lib/systemd/system/mecha10-modeld.service"))
#: a model and its variants take a few hundred MB; warn below this
MIN_FREE_BYTES = 1 << 30
HUB_TIMEOUT_S = 5.0
DEFAULT_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Check:
    name: str
    level: str          # ok | warn | fail
    text: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def run_checks(settings: Settings, *, unit_paths=UNIT_PATHS) -> list[Check]:
    checks: list[Callable[[], Check]] = [
        lambda: check_providers(settings), lambda: check_hub(settings),
        lambda: check_socket(settings), lambda: check_disk(settings),
        lambda: check_catalog(settings), lambda: check_daemon(settings),
        lambda: check_unit(unit_paths)]
    out = []
    for check in checks:
        try:
            out.append(check())
        except Exception as e:  # noqa: BLE001 - a check that breaks is itself a finding
            out.append(Check("internal", FAIL, f"a check failed: {type(e).__name__}: {e}"))
    return out


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        fix = f"  -> {c.fix}" if c.fix and c.level != OK else ""
        lines.append(f"{c.level:4}  {c.name:<{width}}  {c.text}{fix}")
    return "\n".join(lines)


def check_providers(settings: Settings) -> Check:
    spec = JobSpec("modeld.workers.probe:available_providers", 60.0, 2048)
    try:
        available = tuple(JobRunner().run(spec, None))
    except ModeldError as e:
        return Check("providers", FAIL, f"onnxruntime does not load: {e}",
                     "reinstall: pip install --force-reinstall onnxruntime")
    missing = [p for p in settings.providers if p not in available
               and p not in settings.simulated_providers]
    if missing:
        return Check("providers", FAIL, f"{', '.join(missing)} not available (onnxruntime has "
                     f"{', '.join(available)})",
                     "install the onnxruntime build for it, or set providers in the settings file")
    return Check("providers", OK, f"{', '.join(settings.providers)} available "
                                  f"(onnxruntime has {', '.join(available)})")


def check_hub(settings: Settings) -> Check:
    if settings.hub_offline:
        return Check("hub", WARN, "offline mode (HF_HUB_OFFLINE): only models already here are "
                                  "served", "unset HF_HUB_OFFLINE to pull new models")
    endpoint = settings.hub_endpoint or DEFAULT_HUB
    try:
        request = urllib.request.Request(endpoint.rstrip("/") + "/", method="HEAD")
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass   # it answered: reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Check("hub", FAIL, f"{endpoint} not reachable: {reason}",
                     "check the network or proxy, HF_ENDPOINT, or set HF_HUB_OFFLINE=1")
    return Check("hub", OK, f"{endpoint} reachable")


def check_socket(settings: Settings) -> Check:
    path = settings.socket_path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder = path.parent
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            return Check("socket", FAIL, f"{path} absent and {folder} not writable by this user",
                         f"run the daemon as its user, or choose another socket path")
        return Check("socket", WARN, f"{path} does not exist (the daemon creates it)",
                     "start the daemon: systemctl start mecha10-modeld")
    except OSError as e:
        return Check("socket", FAIL, f"{path}: {e.strerror}", "check the folder's permissions")
    if not stat.S_ISSOCK(st.st_mode):
        return Check("socket", FAIL, f"{path} is not a socket", "remove it; the daemon binds it")
    group = _group_name(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return Check("socket", WARN, f"{path} is mode {mode:04o}: any user may connect",
                     "set socket_mode = \"0660\" in the settings file")
    if os.geteuid() not in (0, st.st_uid) and st.st_gid not in os.getgroups():
        return Check("socket", FAIL, f"this user is not in the socket's group {group}: nodes "
                     "and the CLI run as this user cannot connect",
                     f"sudo usermod -aG {group} $USER, then log in again")
    return Check("socket", OK, f"{path} mode {mode:04o} group {group}; this user may connect")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_disk(settings: Settings) -> Check:
    folder = settings.models_dir
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = f"{usage.free / (1 << 30):.1f} GB free on {probe}"
    if usage.free < MIN_FREE_BYTES:
        return Check("disk", FAIL, free, f"free space under {folder}")
    return Check("disk", OK, free)


def check_catalog(settings: Settings) -> Check:
    try:
        catalog = load_catalog(settings.catalog_path)
    except ModeldError as e:
        return Check("catalog", FAIL, str(e), f"fix {settings.catalog_path} (or pass --catalog)")
    if catalog.errors:
        return Check("catalog", WARN, f"{len(catalog.errors)} invalid entr"
                     f"{'y' if len(catalog.errors) == 1 else 'ies'}: {catalog.errors[0]}",
                     "mecha10-modeld list shows each with its error")
    return Check("catalog", OK, f"{settings.catalog_path}: {len(catalog.entries)} models")


def check_daemon(settings: Settings) -> Check:
    try:
        conn = adminclient.connect(settings.socket_path)
    except ModeldError as e:
        return Check("daemon", FAIL, str(e), e.hint or "")
    if conn is None:
        return Check("daemon", WARN, f"no daemon on {settings.socket_path}",
                     "systemctl enable --now mecha10-modeld")
    with conn:
        return Check("daemon", OK, f"pid {conn.hello.get('pid')} version "
                                   f"{conn.hello.get('version')} on {settings.socket_path}")


def check_unit(unit_paths) -> Check:
    for path in unit_paths:
        if Path(path).exists():
            return Check("unit", OK, f"{path} installed")
    return Check("unit", WARN, "mecha10-modeld.service is not installed",
                 "cp systemd/mecha10-modeld.service systemd/mecha10-modeld.socket "
                 "/etc/systemd/system/ && systemctl daemon-reload")


__all__ = ["Check", "run_checks", "format_checks", "socket"]
