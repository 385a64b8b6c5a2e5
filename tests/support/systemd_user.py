"""A real ``systemd --user`` manager for tests, and the converter that derives a user unit from the
shipped system unit.

The ``user_manager`` fixture is registered by tests/conftest.py; the systemd integration tests
import the converter and helpers from here. The manager runs as an ordinary process with a private runtime and config folder (so parallel test
sessions never meet), is started once per session and stopped by its PID at the end. Where systemd
is missing or the manager does not come up, the tests that use it skip and say why.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SERVICE = REPO_ROOT / "systemd" / "mecha10-modeld.service"
SHIPPED_SOCKET = REPO_ROOT / "systemd" / "mecha10-modeld.socket"
SYSTEMD_BINARY = Path("/usr/lib/systemd/systemd")
#: systemd --user refuses to start without it (it takes it as "booted with systemd")
BOOTED_MARKER = Path("/run/systemd/system")
#: PID 1 creates these nodes; a root user manager bind-mounts them over what ProtectHome=,
#: ProtectKernelTunables= ... hide, and fails with 226/NAMESPACE where they are missing
INACCESSIBLE = Path("/run/systemd/inaccessible")
MANAGER_START_TIMEOUT_S = 20.0

#: options only the system manager can honour (a user manager cannot switch users or use the
#: system's state folders); the rest of the hardening is kept so the tests exercise it
SYSTEM_ONLY_OPTIONS = frozenset({
    "User", "Group", "DynamicUser", "SupplementaryGroups", "StateDirectory", "StateDirectoryMode",
    "SocketUser", "SocketGroup", "PrivateTmp",
})


@dataclass
class UserManager:
    """Handle on the running manager: run ``systemctl --user``, link units, read state."""

    pid: int
    root: Path                      # private folder holding runtime, config and log folders
    env: Mapping[str, str]
    logs_dir: Path = field(init=False)
    _sandbox_error: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.logs_dir = self.root / "logs"
        self.logs_dir.mkdir(exist_ok=True)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"])

    def systemctl(self, *args: str, check: bool = True, timeout_s: float = 60.0
                  ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this manager; output as text."""
        done = subprocess.run(["systemctl", "--user", "--no-pager", *args], env=dict(self.env),
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"systemctl --user {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def link(self, unit_path: Path) -> None:
        """Make a unit file known to the manager (it may live anywhere) and reload."""
        self.systemctl("link", str(unit_path))
        self.systemctl("daemon-reload")

    def install(self, name: str, text: str) -> Path:
        """Write a unit under the manager's private folder and link it."""
        path = self.root / "units" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        self.link(path)
        return path

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        args = [f"--property={p}" for p in properties]
        out = self.systemctl("show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status(self, unit: str) -> str:
        """``systemctl status`` text (exit code 3 = inactive is not an error here)."""
        return self.systemctl("status", unit, check=False).stdout

    def wait_for(self, unit: str, predicate: Callable[[dict[str, str]], bool], *properties: str,
                 timeout_s: float = 30.0, what: str = "") -> dict[str, str]:
        """Poll ``show`` until ``predicate(props)``; fail naming what was awaited and the last state."""
        props = ("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result",
                 *properties)
        deadline = time.monotonic() + timeout_s
        state = self.show(unit, *props)
        while not predicate(state):
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: waited {timeout_s:.0f} s for {what or 'a state'}; "
                                     f"last state {state}\n{self.log_text(unit)[-2000:]}")
            time.sleep(0.1)
            state = self.show(unit, *props)
        return state

    def log_path(self, unit: str) -> Path:
        """Where the unit's stdout/stderr go (no journald here: units append to a file)."""
        return self.logs_dir / f"{unit}.log"

    def log_text(self, unit: str) -> str:
        path = self.log_path(unit)
        return path.read_text(errors="replace") if path.exists() else ""

    def require_sandbox(self) -> None:
        """Skip the calling test where this host cannot set up the shipped unit's sandbox at all
        (a container without mount namespaces): ``/bin/true`` under the same options fails with
        226/NAMESPACE there. Checked once per manager."""
        if self._sandbox_error is None:
            unit = "modeld-sandbox-check.service"
            log = self.log_path(unit)
            scratch = self.root / "sandbox-check"
            scratch.mkdir(exist_ok=True)
            self.install(unit, sandboxed_user_unit(
                "/bin/true", scratch, log,
                replace={"Type": "oneshot", "Restart": "no", "WatchdogSec": "0"}))
            done = self.systemctl("start", unit, check=False)
            status = self.show(unit, "ExecMainStatus")["ExecMainStatus"]
            self.stop_and_forget(unit)
            self._sandbox_error = "" if done.returncode == 0 else f"exit status {status}"
        if self._sandbox_error:
            pytest.skip(f"this host cannot set up the shipped unit's sandbox under a user "
                        f"manager ({self._sandbox_error}, 226 = NAMESPACE)")

    def stop_and_forget(self, *units: str) -> None:
        """Test teardown: stop units, clear failed state, so the next test starts clean."""
        for unit in units:
            self.systemctl("stop", unit, check=False)
            self.systemctl("reset-failed", unit, check=False)


def _manager_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "DBUS_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_",
                                "INVOCATION_ID", "JOURNAL_STREAM"))}
    for name in ("RUNTIME", "CONFIG", "STATE", "CACHE", "DATA"):
        folder = root / name.lower()
        folder.mkdir(mode=0o700, exist_ok=True)
        env[f"XDG_{name}_{'DIR' if name == 'RUNTIME' else 'HOME'}"] = str(folder)
    return env


def why_no_user_manager() -> str | None:
    """The reason the real-systemd tests cannot run here, or None."""
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    if not SYSTEMD_BINARY.exists():
        return f"{SYSTEMD_BINARY} is missing"
    if not BOOTED_MARKER.exists() and os.geteuid() != 0:
        return f"{BOOTED_MARKER} is missing and only root may create it"
    return None


@pytest.fixture(scope="session")
def user_manager() -> Iterator[UserManager]:
    """A ``systemd --user`` manager for the whole session (skips with a reason where impossible)."""
    reason = why_no_user_manager()
    if reason:
        pytest.skip(f"no real systemd --user manager: {reason}")
    created_marker = False
    if not BOOTED_MARKER.exists():
        BOOTED_MARKER.mkdir(parents=True)
        created_marker = True
    run_systemd_before = set(os.listdir(BOOTED_MARKER.parent))
    created_inaccessible = _make_inaccessible_nodes()
    root = Path(tempfile.mkdtemp(prefix="modeld-systemd-"))
    env = _manager_env(root)
    log_file = open(root / "manager.log", "wb")
    process = subprocess.Popen([str(SYSTEMD_BINARY), "--user"], env=env, stdin=subprocess.DEVNULL,
                               stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    manager = UserManager(pid=process.pid, root=root, env=env)
    try:
        state = _wait_running(manager, process)
        if state not in ("running", "degraded"):
            pytest.skip(f"systemd --user did not come up (state {state!r}): "
                        f"{(root / 'manager.log').read_text(errors='replace')[-500:]}")
        yield manager
    finally:
        _stop_manager(process)
        log_file.close()
        if created_marker:
            # other tools take this folder as a sign that systemd is PID 1
            shutil.rmtree(BOOTED_MARKER, ignore_errors=True)
        if created_inaccessible:
            shutil.rmtree(INACCESSIBLE, ignore_errors=True)
        remove_run_systemd_leftovers(run_systemd_before)
        shutil.rmtree(root, ignore_errors=True)


def _make_inaccessible_nodes() -> bool:
    """Create /run/systemd/inaccessible/{reg,dir,fifo,sock,chr,blk} (mode 0000) as PID 1 would;
    False if it already exists (then it is not ours to remove)."""
    if INACCESSIBLE.exists():
        return False
    INACCESSIBLE.mkdir(mode=0o755)
    (INACCESSIBLE / "reg").touch()
    (INACCESSIBLE / "dir").mkdir()
    os.mkfifo(INACCESSIBLE / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(INACCESSIBLE / "sock"))
    for name, kind in (("chr", stat.S_IFCHR), ("blk", stat.S_IFBLK)):
        try:
            os.mknod(INACCESSIBLE / name, kind, os.makedev(0, 0))
        except OSError:
            pass   # systemd falls back to other nodes where device nodes are not allowed
    for child in INACCESSIBLE.iterdir():
        os.chmod(child, 0)
    return True


def remove_run_systemd_leftovers(before: set[str]) -> None:
    """A root user manager (sandboxed services) and ``systemd-analyze`` leave an empty
    ``unit-root`` folder and ``systemd-units-load`` file in /run/systemd; remove them if they are
    new since ``before`` (a listing of /run/systemd) and empty."""
    for name in {"unit-root", "systemd-units-load"} - before:
        path = BOOTED_MARKER.parent / name
        try:
            if path.is_dir():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass   # not empty, or already gone: leave it


def _wait_running(manager: UserManager, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + MANAGER_START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        state = manager.systemctl("is-system-running", check=False, timeout_s=5).stdout.strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(0.1)
    return state or "no answer"


def _stop_manager(process: subprocess.Popen) -> None:
    # SIGTERM makes a user manager stop its units and exit; SIGKILL only if it hangs
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# shipped system unit -> user unit

_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\]\s*$")
_ASSIGNMENT = re.compile(r"^(?P<key>[A-Za-z][A-Za-z0-9]*)\s*=\s*(?P<value>.*)$")


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` in file order; comments, blank lines and continuations folded."""
    out: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if m := _SECTION.match(line):
            section = m["name"]
        elif m := _ASSIGNMENT.match(line):
            out.append((section, m["key"], m["value"]))
    return out


def render_unit(assignments: Sequence[tuple[str, str, str]]) -> str:
    sections: dict[str, list[str]] = {}
    for section, key, value in assignments:
        sections.setdefault(section, []).append(f"{key}={value}")
    return "\n".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


def rewrite_command(command: str, *, program: str, options: Mapping[str, str]) -> str:
    """Replace the program and the values of ``--option value`` pairs in an ExecStart line."""
    argv = shlex.split(command)
    argv[0] = program
    for i, arg in enumerate(argv[:-1]):
        if arg in options:
            argv[i + 1] = options[arg]
    missing = set(options) - set(argv)
    if missing:
        raise ValueError(f"ExecStart has no {sorted(missing)}: {command}")
    return shlex.join(argv)


def user_unit_from(shipped_text: str, *, exec_options: Mapping[str, str] | None = None,
                   program: str | None = None, replace: Mapping[str, str] | None = None,
                   add: Sequence[tuple[str, str, str]] = (),
                   drop: frozenset[str] = SYSTEM_ONLY_OPTIONS) -> str:
    """Derive a ``systemd --user`` unit from the shipped system unit (never a second copy).

    ``exec_options`` rewrite argument values of ExecStart (``{"--catalog": "/tmp/x.toml"}``) and
    ``program`` its binary; ``replace`` sets other keys' values (``{"ListenStream": path}``);
    ``drop`` removes system-manager-only options; ``add`` appends ``(section, key, value)``.
    ``WantedBy=multi-user.target`` becomes ``default.target`` (a user manager has no such target).
    """
    replace = dict(replace or {})
    out = []
    for section, key, value in parse_unit(shipped_text):
        if key in drop:
            continue
        if key in replace:
            value = replace.pop(key)
        elif key == "ExecStart" and (exec_options or program):
            value = rewrite_command(value, program=program or shlex.split(value)[0],
                                    options=exec_options or {})
        elif key == "WantedBy" and value == "multi-user.target":
            value = "default.target"
        out.append((section, key, value))
    if replace:
        raise ValueError(f"the shipped unit has no {sorted(replace)} to replace")
    return render_unit([*out, *add])


def interpreter_under_home() -> bool:
    return os.path.realpath(sys.executable).startswith(("/root/", "/home/"))


def sandboxed_user_unit(exec_start: str, read_write: Path, log: Path, *,
                        replace: Mapping[str, str] | None = None,
                        add: Sequence[tuple[str, str, str]] = ()) -> str:
    """The shipped service, sandbox and all, running ``exec_start`` under the user manager.

    Output goes to ``log`` (no journald here). ProtectHome=yes would hide an interpreter
    installed under a home folder (pyenv): it becomes read-only then, which still keeps the
    service from writing to any home. Test folders live under /tmp, so PrivateTmp= (dropped) is
    stood in for by TMPDIR=``read_write``. ``Restart=`` stays as shipped unless replaced.
    """
    replace = {"ExecStart": exec_start, "ReadWritePaths": str(read_write), **(replace or {})}
    if interpreter_under_home():
        replace.setdefault("ProtectHome", "read-only")
    return user_unit_from(SHIPPED_SERVICE.read_text(), replace=replace, add=[
        ("Service", "StandardOutput", f"append:{log}"),
        ("Service", "StandardError", f"append:{log}"),
        ("Service", "Environment", f"TMPDIR={read_write}"),
        *add])
