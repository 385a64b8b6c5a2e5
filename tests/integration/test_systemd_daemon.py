"""The real daemon under a real ``systemd --user`` manager, run by units derived from the shipped
ones (sandbox included) against a temp catalog, models folder and the loopback hub.

``start`` returns after READY=1 and the socket already answers; ``status`` shows the daemon's
STATUS= line; ``reload`` (SIGHUP) re-reads the catalog; ``kill -9`` is followed by a restart; the
.socket unit hands its socket over and keeps it across daemon restarts; ``stop`` is clean.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from modeld import client
from tests.support.systemd_user import (SHIPPED_SOCKET, UserManager, sandboxed_user_unit,
                                        user_unit_from)
from tests.support.workspace import entry_toml

pytestmark = pytest.mark.systemd

MLP = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None)
WAIT_S = 90.0


@dataclass
class DaemonUnit:
    manager: UserManager
    base: str                 # unit name without suffix
    workspace: object
    socket_path: Path

    @property
    def service(self) -> str:
        return f"{self.base}.service"

    @property
    def socket_unit(self) -> str:
        return f"{self.base}.socket"

    def show(self, *props: str) -> dict[str, str]:
        return self.manager.show(self.service, "ActiveState", "MainPID", "NRestarts",
                                 "StatusText", "Result", "ExecMainStatus", *props)

    def log(self) -> str:
        return self.manager.log_text(self.service)[-4000:]

    def status(self) -> dict:
        return client.status(socket_path=self.socket_path, timeout_s=10)

    def wait_model(self, name: str, state: str = "ready") -> dict:
        deadline = time.monotonic() + WAIT_S
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
            except client.DaemonUnavailableError:
                last = {}
            if last.get("models", {}).get(name, {}).get("state") == state:
                return last
            time.sleep(0.1)
        raise AssertionError(f"{name} not {state} in {WAIT_S:.0f} s: {last}\n{self.log()}")


@pytest.fixture
def daemon_unit(request, user_manager, workspace):
    """Installs (does not start) ``modeld-<id>.service`` and, as shipped, its ``.socket``, which
    the service's Wants= starts along with it. Indirect parameter: "self-bound" (no .socket unit,
    the daemon binds the socket itself) or "quiet-watcher" (file events never wake the daemon in
    a test's time, so only SIGHUP can make it re-read the catalog)."""
    variant = getattr(request, "param", "activated")
    user_manager.require_sandbox()
    with_socket_unit = variant != "self-bound"
    base = f"modeld-{uuid.uuid4().hex[:8]}"
    short = Path(tempfile.mkdtemp(prefix="md-"))       # AF_UNIX paths must stay under 108 bytes
    socket_path = short / "modeld.sock"
    program = Path(sys.executable).with_name("mecha10-modeld")
    log = user_manager.log_path(f"{base}.service")
    env = {"HF_ENDPOINT": workspace.hub.endpoint, "HF_HOME": str(workspace.root / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "MODELD_SOCKET": str(socket_path),
           "MODELD_LOG_FORMAT": "json", "MODELD_DEBOUNCE_STEP_MS": "20"}
    if variant == "quiet-watcher":
        env.update(MODELD_DEBOUNCE_STEP_MS="600000", MODELD_DEBOUNCE_MAX_MS="600000",
                   MODELD_RESYNC_INTERVAL_S="600")
    service_text = sandboxed_user_unit(
        f"{program} run --catalog {workspace.catalog} --models {workspace.models}",
        workspace.root, log,
        replace={"RestartSec": "100ms", "WatchdogSec": "10"},
        add=[("Unit", "StartLimitIntervalSec", "0"),
             *(("Service", "Environment", f"{k}={v}") for k, v in env.items())])
    # the shipped pair names each other; the test's pair gets its own names
    service_text = service_text.replace("mecha10-modeld.socket", f"{base}.socket")
    service_text = service_text.replace(f"ReadWritePaths={workspace.root}",
                                        f"ReadWritePaths={workspace.root} {short}")
    socket_text = user_unit_from(SHIPPED_SOCKET.read_text(), replace={
        "ListenStream": str(socket_path), "Service": f"{base}.service"})
    user_manager.install(f"{base}.service", service_text)
    if with_socket_unit:
        user_manager.install(f"{base}.socket", socket_text)
    unit = DaemonUnit(user_manager, base, workspace, socket_path)
    try:
        yield unit
    finally:
        user_manager.stop_and_forget(unit.socket_unit, unit.service)
        shutil.rmtree(short, ignore_errors=True)


def start(unit: DaemonUnit) -> None:
    done = unit.manager.systemctl("start", unit.service, check=False, timeout_s=120)
    assert done.returncode == 0, f"{done.stderr}\n{unit.show()}\n{unit.log()}"


@pytest.mark.parametrize("daemon_unit", ["quiet-watcher"], indirect=True)
def test_start_is_ready_with_status_and_reload_rereads_the_catalog(daemon_unit, workspace):
    workspace.write_catalog(entry_toml("det"))
    start(daemon_unit)
    # READY=1 came after the socket listened: it answers at once, no waiting
    assert client.ping(socket_path=daemon_unit.socket_path, timeout_s=5)
    assert daemon_unit.show()["ActiveState"] == "active"
    daemon_unit.wait_model("det")
    state = daemon_unit.manager.wait_for(
        daemon_unit.service, lambda s: s["StatusText"].startswith("1 model ready"),
        what="STATUS= saying the model is ready")
    assert f'Status: "{state["StatusText"]}"' in daemon_unit.manager.status(daemon_unit.service)

    pid = state["MainPID"]
    workspace.write_catalog(entry_toml("det") + MLP)   # the watcher is quiet: only reload sees it
    assert "mlp" not in daemon_unit.status()["models"]
    daemon_unit.manager.systemctl("reload", daemon_unit.service)
    daemon_unit.wait_model("mlp")
    after = daemon_unit.manager.wait_for(
        daemon_unit.service, lambda s: s["StatusText"].startswith("2 models ready"),
        what="STATUS= after the reload")
    assert after["MainPID"] == pid and after["ActiveState"] == "active"
    assert '"event": "reload"' in daemon_unit.manager.log_text(daemon_unit.service)


def test_kill_9_is_followed_by_a_restart_that_serves_again(daemon_unit, workspace):
    workspace.write_catalog(entry_toml("det"))
    start(daemon_unit)
    daemon_unit.wait_model("det")
    pid = daemon_unit.show()["MainPID"]
    os.kill(int(pid), signal.SIGKILL)
    state = daemon_unit.manager.wait_for(
        daemon_unit.service, lambda s: s["MainPID"] not in ("0", pid) and s["ActiveState"] == "active",
        what="the restart after SIGKILL", timeout_s=WAIT_S)
    assert int(state["NRestarts"]) == 1
    # the new process took the store's lock again and serves the model from disk
    assert daemon_unit.wait_model("det")["models"]["det"]["state"] == "ready"


def test_socket_activation_hands_the_socket_over_and_keeps_it(daemon_unit, workspace):
    workspace.write_catalog(entry_toml("det"))
    daemon_unit.manager.systemctl("start", daemon_unit.socket_unit)
    assert daemon_unit.socket_path.is_socket()
    assert daemon_unit.show()["ActiveState"] == "inactive"      # nothing started yet
    # the first connection starts the daemon, which adopts the listening socket
    assert client.ping(socket_path=daemon_unit.socket_path, timeout_s=60)
    first = daemon_unit.manager.wait_for(daemon_unit.service,
                                         lambda s: s["ActiveState"] == "active",
                                         what="activation by the first connection")
    assert '"activated": true' in daemon_unit.manager.log_text(daemon_unit.service)
    assert oct(daemon_unit.socket_path.stat().st_mode & 0o777) == "0o660"
    daemon_unit.wait_model("det")
    # the daemon stops; the socket stays (nodes keep a path to connect to) and starts it again
    daemon_unit.manager.systemctl("stop", daemon_unit.service)
    assert daemon_unit.socket_path.is_socket()
    assert client.ping(socket_path=daemon_unit.socket_path, timeout_s=60)
    second = daemon_unit.manager.wait_for(daemon_unit.service,
                                          lambda s: s["ActiveState"] == "active",
                                          what="re-activation")
    assert second["MainPID"] != first["MainPID"]


@pytest.mark.parametrize("daemon_unit", ["activated", "self-bound"], indirect=True)
def test_stop_is_clean(daemon_unit, workspace, request):
    activated = request.node.callspec.params["daemon_unit"] == "activated"
    workspace.write_catalog(entry_toml("det"))
    start(daemon_unit)
    daemon_unit.wait_model("det")
    log_text = daemon_unit.manager.log_text(daemon_unit.service)
    assert (f'"activated": {str(activated).lower()}') in log_text
    daemon_unit.manager.systemctl("stop", daemon_unit.service, timeout_s=60)
    state = daemon_unit.show()
    assert state["ActiveState"] == "inactive"
    assert state["Result"] == "success" and state["ExecMainStatus"] == "0", daemon_unit.log()
    assert '"event": "stopped"' in daemon_unit.manager.log_text(daemon_unit.service)
    assert [str(p) for p in workspace.models.rglob(".modeld-*")] == []
    if activated:
        # the socket is the .socket unit's: it outlives the daemon, goes with the socket unit
        assert daemon_unit.socket_path.is_socket()
        daemon_unit.manager.systemctl("stop", daemon_unit.socket_unit)
    assert not daemon_unit.socket_path.exists()
