"""The shipped systemd units: ``systemd-analyze verify`` is clean, ``security`` exposure <= 2.0, the
promised settings are there, and the hardening still lets Python + onnxruntime + a spawn worker run
(a probe service under a real ``systemd --user`` manager, with the unit derived from the shipped one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modeld.settings import DEFAULT_CONFIG, read_settings_file
from tests.support.systemd_user import (SHIPPED_SERVICE, SHIPPED_SOCKET, parse_unit,
                                        remove_run_systemd_leftovers, sandboxed_user_unit,
                                        user_unit_from)

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
SHIPPED_SETTINGS = SHIPPED_SERVICE.with_name("modeld.toml")


@pytest.fixture(scope="module", autouse=True)
def no_leftovers_in_run_systemd():
    """systemd-analyze touches /run/systemd/systemd-units-load; leave /run/systemd as found."""
    run_systemd = Path("/run/systemd")
    before = set(os.listdir(run_systemd)) if run_systemd.is_dir() else set()
    yield
    if run_systemd.is_dir():
        remove_run_systemd_leftovers(before)


def settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, key, value in parse_unit(path.read_text()):
        out.setdefault(key, []).append(value)
    return out


def test_service_promises():
    s = settings(SHIPPED_SERVICE)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"][0].split()[:2] == ["/usr/local/bin/mecha10-modeld", "run"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30"] and s["Restart"] == ["on-failure"]
    assert s["KillMode"] == ["mixed"] and s["TimeoutStopSec"] == ["30"]
    assert s["MemoryDenyWriteExecute"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/mecha10-modeld"]
    # no flags: paths come from the settings file every command reads (issue 16)
    assert s["ExecStart"] == ["/usr/local/bin/mecha10-modeld run"]


def test_shipped_settings_file_agrees_with_the_units():
    """systemd/modeld.toml (installed as /etc/mecha10/modeld.toml) names the folder the service
    may write, the socket the .socket unit listens on, and is what the README installs."""
    values = read_settings_file(SHIPPED_SETTINGS, required=True)
    service, sock = settings(SHIPPED_SERVICE), settings(SHIPPED_SOCKET)
    assert Path(values["models"]).is_relative_to(service["ReadWritePaths"][0])
    assert [values["socket"]] == sock["ListenStream"]
    assert values["catalog"] == "/etc/mecha10/model_catalog.toml"
    assert str(DEFAULT_CONFIG) == "/etc/mecha10/modeld.toml"
    readme = (SHIPPED_SERVICE.parents[1] / "README.md").read_text()
    for step in ("install -D -m 0644 systemd/modeld.toml /etc/mecha10/modeld.toml",
                 "python3-venv", "python3-dev", "usermod -aG mecha10",
                 "/opt/mecha10-modeld/bin/pip install '.[systemd]'"):
        assert step in readme and step in SHIPPED_SERVICE.read_text(), step


def test_descriptors_and_modes_the_unit_promises_match_the_daemon():
    """LimitNOFILE leaves the daemon's reserve beside max_clients (idle connections must not take
    the descriptors models need), and a restored file gets what UMask makes: 0640 (issue 11)."""
    from modeld.runner import FD_RESERVE
    from modeld.settings import Settings
    from modeld.store import Store

    s = settings(SHIPPED_SERVICE)
    assert int(s["LimitNOFILE"][0]) >= Settings().max_clients + FD_RESERVE
    umask = int(s["UMask"][0], 8)
    old = os.umask(umask)
    try:
        assert Store(Path("/nonexistent-models")).file_mode == 0o640
    finally:
        os.umask(old)


def test_socket_promises():
    s = settings(SHIPPED_SOCKET)
    assert s["ListenStream"] == ["/run/mecha10-modeld/modeld.sock"]
    assert s["SocketMode"] == ["0660"]
    assert s["Service"] == ["mecha10-modeld.service"]
    service = settings(SHIPPED_SERVICE)
    # the socket's folder is the service's RuntimeDirectory, kept across restarts
    assert service["RuntimeDirectory"] == ["mecha10-modeld"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory) -> Path:
    """A file-system root for ``systemd-analyze verify --root``: the distribution's units, a stand-in
    for the installed CLI at its shipped path, and the shipped units as if installed."""
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} is missing")
    root = tmp_path_factory.mktemp("unitroot")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    cli = root / "usr/local/bin/mecha10-modeld"
    cli.parent.mkdir(parents=True)
    cli.write_text("#!/bin/sh\nexit 0\n")
    cli.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    return root


def verify(root: Path, *units: Path) -> subprocess.CompletedProcess:
    installed = root / "etc/systemd/system"
    for unit in units:
        shutil.copy(unit, installed / unit.name)
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                           *(u.name for u in units)], capture_output=True, text=True, timeout=60)


@needs_analyze
def test_units_verify_clean(scratch_root):
    done = verify(scratch_root, SHIPPED_SERVICE, SHIPPED_SOCKET)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@needs_analyze
def test_verify_would_catch_a_broken_unit(scratch_root, tmp_path):
    """The check above can fail: a typo and a missing binary are reported."""
    broken = tmp_path / "mecha10-modeld.service"
    broken.write_text(SHIPPED_SERVICE.read_text()
                      .replace("NotifyAccess=main", "NotifyAcess=main")
                      .replace("/usr/local/bin/mecha10-modeld", "/usr/local/bin/not-there"))
    done = verify(scratch_root, broken)
    output = done.stdout + done.stderr
    assert "NotifyAcess" in output and "not-there" in output
    shutil.copy(SHIPPED_SERVICE, scratch_root / "etc/systemd/system" / SHIPPED_SERVICE.name)


@needs_analyze
def test_security_exposure_at_most_2(tmp_path):
    unit = tmp_path / SHIPPED_SERVICE.name
    shutil.copy(SHIPPED_SERVICE, unit)
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                           "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 2.0
    assert done.returncode == 0   # --threshold=20 means 2.0


# -- the converter --------------------------------------------------------------------------

def test_user_unit_is_derived_not_copied():
    shipped = SHIPPED_SERVICE.read_text().replace(
        "mecha10-modeld run\n", "mecha10-modeld run --catalog /c.toml --models /m\n")
    text = user_unit_from(shipped, program="/venv/bin/mecha10-modeld",
                          exec_options={"--catalog": "/t/cat.toml", "--models": "/t/models"},
                          replace={"ReadWritePaths": "/t"},
                          add=[("Service", "Environment", "HF_ENDPOINT=http://127.0.0.1:1")])
    s = {k: v for _, k, v in parse_unit(text)}
    assert s["ExecStart"] == ("/venv/bin/mecha10-modeld run --catalog /t/cat.toml "
                              "--models /t/models")
    assert "User" not in s and "Group" not in s and "StateDirectory" not in s
    assert s["ReadWritePaths"] == "/t" and s["WantedBy"] == "default.target"
    assert s["MemoryDenyWriteExecute"] == "yes"           # hardening kept
    assert "HF_ENDPOINT=http://127.0.0.1:1" in text
    with pytest.raises(ValueError, match="--nope"):
        user_unit_from(SHIPPED_SERVICE.read_text(), exec_options={"--nope": "x"})
    with pytest.raises(ValueError, match="Missing"):
        user_unit_from(SHIPPED_SERVICE.read_text(), replace={"Missing": "x"})


PROBE = textwrap.dedent('''
    """Runs what the daemon runs, under the shipped unit's sandbox; READY=1 only if all works."""
    import mmap, sys, traceback
    from pathlib import Path

    def run_session(path, progress):
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return float(session.run(None, {"images": np.ones((1, 3, 32, 32), np.float32)})[0].sum())

    def main():
        from modeld import systemd
        from modeld.jobs import JobRunner, JobSpec
        from modeld.testing.onnx_models import tiny_cnn
        from onnxruntime.quantization import quantize_dynamic
        work = Path(sys.argv[1])
        (work / "m.onnx").write_bytes(tiny_cnn())
        quantize_dynamic(str(work / "m.onnx"), str(work / "m-int8.onnx"))
        here = run_session(str(work / "m.onnx"), None)
        int8 = run_session(str(work / "m-int8.onnx"), None)
        spec = JobSpec("hardening_probe:run_session", timeout_s=120, memory_mb=4096)
        there = JobRunner().run(spec, str(work / "m.onnx"))
        assert abs(here - there) < 1e-3, (here, there)
        try:   # proves the sandbox is really on: W+X memory must be refused
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            wx = "allowed"
        except PermissionError:
            wx = "refused"
        import socket
        socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)   # name lookups still work
        try:
            Path("/var/tmp/modeld-probe").write_text("x")
            outside = "writable"
        except OSError:
            outside = "read-only"
        systemd.ready(f"probe ok int8={int8 == int8} worker=ok wx={wx} outside={outside}")

    if __name__ == "__main__":
        try:
            main()
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
''')


@pytest.mark.systemd
def test_hardened_unit_still_runs_onnxruntime_and_workers(user_manager, tmp_path):
    """MemoryDenyWriteExecute, the syscall filter, ProtectSystem=strict ... with real onnxruntime
    (in-process and in a spawn worker with RLIMIT_AS): the probe only says READY if all ran."""
    user_manager.require_sandbox()
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "hardening_probe.py").write_text(PROBE)
    unit = "modeld-hardening-probe.service"
    log = user_manager.log_path(unit)
    user_manager.install(unit, sandboxed_user_unit(
        f"{sys.executable} {tmp_path / 'hardening_probe.py'} {work}", work, log,
        replace={"Restart": "no"}))
    try:
        done = user_manager.systemctl("start", unit, check=False, timeout_s=180)
        state = user_manager.show(unit, "ActiveState", "StatusText", "MemoryDenyWriteExecute")
        assert done.returncode == 0, f"{state}\n{log.read_text() if log.exists() else ''}"
        assert state["ActiveState"] == "active"
        assert state["MemoryDenyWriteExecute"] == "yes"
        assert state["StatusText"] == "probe ok int8=True worker=ok wx=refused outside=read-only"
    finally:
        user_manager.stop_and_forget(unit)
