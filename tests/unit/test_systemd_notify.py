"""modeld.systemd against real sockets: sd_notify datagrams (systemd-python and the stdlib fallback),
the watchdog interval, socket activation via systemd-socket-activate, journal stream detection.

The real service manager is exercised in tests/integration/test_systemd_manager.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from modeld import systemd

BACKENDS = ["systemd-python", "stdlib"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once through systemd-python and once through the stdlib fallback."""
    if request.param == "stdlib":
        monkeypatch.setattr(systemd, "_sd_daemon", None)
    elif systemd._sd_daemon is None:
        pytest.skip("systemd-python is not installed")
    return request.param


class NotifyListener:
    """A datagram socket standing in for the manager's NOTIFY_SOCKET (a real socket, not a mock)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> list[str]:
        return self.sock.recv(65536).decode().split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def listener(monkeypatch):
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    folder = tempfile.mkdtemp(prefix="notify-")
    path = os.path.join(folder, "notify.sock")
    sink = NotifyListener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sink
    sink.sock.close()
    shutil.rmtree(folder)


def test_outside_systemd_everything_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.under_systemd() is False
    assert systemd.ready("up") is False
    assert systemd.status("x") is False
    assert systemd.watchdog_ping() is False
    assert systemd.watchdog_interval_s() is None
    asyncio.run(asyncio.wait_for(systemd.keep_watchdog_fed(), 1))  # returns at once


def test_ready_with_status_arrives_as_one_datagram(backend, listener):
    assert systemd.ready("serving 3 models") is True
    assert listener.receive() == ["READY=1", "STATUS=serving 3 models"]


def test_status_is_kept_on_one_line(backend, listener):
    systemd.status("pulling yolov8n\nREADY=1")  # a newline must not smuggle in an assignment
    assert listener.receive() == ["STATUS=pulling yolov8n READY=1"]


def test_reloading_carries_the_monotonic_clock(backend, listener):
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.reloading("re-reading the catalog")
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.receive()
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before_us <= int(lines[1].split("=")[1]) <= after_us
    assert lines[2] == "STATUS=re-reading the catalog"


def test_stopping_watchdog_and_extend_timeout(backend, listener):
    systemd.stopping()
    assert listener.receive() == ["STOPPING=1"]
    systemd.watchdog_ping()
    assert listener.receive() == ["WATCHDOG=1"]
    systemd.extend_timeout(2.5)
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_abstract_namespace_socket(backend, monkeypatch):
    name = f"modeld-test-{os.getpid()}-{time.monotonic_ns()}"
    sink = NotifyListener("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.ready() is True
        assert sink.receive() == ["READY=1"]
    finally:
        sink.sock.close()


def test_stdlib_sender_survives_a_vanished_manager(monkeypatch, tmp_path):
    monkeypatch.setattr(systemd, "_sd_daemon", None)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.status("still alive") is False  # logged, not raised


@pytest.mark.parametrize("usec, pid, expected_s", [
    ("30000000", "self", 15.0),
    ("30000000", "", 15.0),          # no WATCHDOG_PID: meant for us
    ("30000000", "1", None),         # meant for another process
    ("0", "self", None),
    ("junk", "self", None),
    ("", "", None),
])
def test_watchdog_interval_is_half_the_timeout_for_this_process(monkeypatch, usec, pid, expected_s):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval_s() == expected_s


def test_watchdog_feeder_pings_every_interval_until_cancelled(listener, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # 10 ms interval
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def feed_two_rounds() -> list[list[str]]:
        task = asyncio.ensure_future(systemd.keep_watchdog_fed())
        pings = [await asyncio.to_thread(listener.receive) for _ in range(2)]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return pings

    assert asyncio.run(asyncio.wait_for(feed_two_rounds(), 5)) == [["WATCHDOG=1"]] * 2


# -- socket activation: a real listening socket handed over by systemd-socket-activate ---------

CHILD = """
import json, os, socket, sys
from modeld import systemd
if os.environ.get("FORCE_STDLIB"):
    systemd._sd_daemon = None
sockets = systemd.listen_sockets()
print("REPORT " + json.dumps({
    "backend": "stdlib" if systemd._sd_daemon is None else "systemd-python",
    "count": len(sockets),
    "families": [s.family.name for s in sockets],
    "types": [s.type.name for s in sockets],
    "names": [s.getsockname() for s in sockets],
    "env_left": [k for k in ("LISTEN_PID", "LISTEN_FDS") if k in os.environ],
    "inheritable": [os.get_inheritable(s.fileno()) for s in sockets],
}), flush=True)
if sockets:
    conn, _ = sockets[0].accept()
    conn.sendall(b"hello from the adopted socket\\n")
    conn.close()
"""


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
@pytest.mark.parametrize("force_stdlib", [False, True], ids=BACKENDS)
def test_listen_sockets_adopts_a_unix_socket_from_socket_activation(force_stdlib):
    folder = tempfile.mkdtemp(prefix="activate-")
    path = os.path.join(folder, "modeld.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    setenv = ["-E", "FORCE_STDLIB=1"] if force_stdlib else []
    child = subprocess.Popen(["systemd-socket-activate", "-l", path, *setenv,
                              sys.executable, "-c", CHILD],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # systemd-socket-activate binds at once but starts the child on the first connection
        client = _connect_when_bound(path)
        reply = client.makefile().readline()
        report = next(json.loads(line.removeprefix("REPORT "))
                      for line in child.stdout if line.startswith("REPORT "))
    finally:
        child.kill()
        child.wait(5)
        shutil.rmtree(folder)
    assert reply == "hello from the adopted socket\n"
    assert report["backend"] == ("stdlib" if force_stdlib else "systemd-python")
    assert report["count"] == 1
    assert report["families"] == ["AF_UNIX"] and report["types"] == ["SOCK_STREAM"]
    assert report["names"] == [path]
    assert report["env_left"] == []          # workers must not think they were activated
    assert report["inheritable"] == [False]


def _connect_when_bound(path: str) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(path)
            client.settimeout(10)
            return client
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_listen_sockets_ignores_fds_meant_for_another_process(monkeypatch):
    monkeypatch.setattr(systemd, "_sd_daemon", None)
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_sockets() == []
    assert "LISTEN_FDS" not in os.environ


def test_no_activation_means_no_sockets(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_sockets() == []


# -- journal stream detection ----------------------------------------------------------------

def test_stderr_is_journal_compares_device_and_inode(monkeypatch, tmp_path):
    stream_file = open(tmp_path / "stream", "w")
    other = open(tmp_path / "other", "w")
    st = os.fstat(stream_file.fileno())
    try:
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert systemd.stderr_is_journal(stream_file) is True
        assert systemd.stderr_is_journal(other) is False   # stderr redirected elsewhere
        monkeypatch.delenv("JOURNAL_STREAM")
        assert systemd.stderr_is_journal(stream_file) is False
    finally:
        stream_file.close()
        other.close()


def test_stderr_is_journal_without_a_descriptor(monkeypatch):
    import io
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert systemd.stderr_is_journal(io.StringIO()) is False
