"""Socket activation: `systemd-socket-activate` hands a listening socket to the real daemon the
way systemd's .socket unit does (LISTEN_FDS/LISTEN_PID); the daemon adopts it instead of binding."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from modeld import client
from tests.support.daemon import variant_is, wait_event
from tests.support.workspace import entry_toml

ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_daemon_adopts_a_passed_socket(workspace):
    workspace.write_catalog(entry_toml("det"))
    sock = workspace.root / "activated.sock"
    log = open(workspace.root / "activated.log", "wb")
    # Without --accept the listening socket itself is passed; the daemon starts on the first
    # connection, which then waits in the backlog until the daemon accepts it.
    proc = subprocess.Popen([ACTIVATE, "-l", str(sock), "-E", "HF_ENDPOINT", "-E", "MODELD_CATALOG",
                             "-E", "MODELD_MODELS", "-E", "MODELD_SOCKET", "-E", "PYTHONPATH",
                             sys.executable, "-m", "modeld.cli", "run", "-v"],
                            env=workspace.env(MODELD_SOCKET=str(sock)), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        inode = sock.stat().st_ino
        with client.Subscription("det", socket_path=sock) as sub:
            event = wait_event(sub, variant_is("det", "fp32"), timeout_s=90)
        assert event["path"].endswith("det/model.onnx")
        text = (workspace.root / "activated.log").read_text()
        assert '"adopted": true' in text or "adopted=True" in text
        assert sock.stat().st_ino == inode        # the passed socket, not a new one
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert sock.exists()      # a passed socket belongs to systemd: the daemon leaves it in place
