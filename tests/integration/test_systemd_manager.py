"""modeld.systemd against a real ``systemd --user`` manager: a tiny Type=notify service that speaks
through our module, run by a unit derived from the shipped one (same Type=, NotifyAccess=,
ExecReload=, KillMode=, sandbox).

``start`` returns only after READY=1, ``status`` shows our STATUS=, ``reload`` goes through SIGHUP
and RELOADING=1 ... READY=1, a service that stops feeding the watchdog is restarted, so is one
killed with SIGKILL, and ``stop`` is clean.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
import uuid

import pytest

from tests.support.systemd_user import sandboxed_user_unit

pytestmark = pytest.mark.systemd

NOTIFY_SERVICE = textwrap.dedent('''
    """A stand-in daemon: the same notification sequence as modeld's runner, nothing else."""
    import asyncio, os, signal, sys, time
    from pathlib import Path
    from modeld import systemd

    work = Path(sys.argv[1])
    pid = str(os.getpid())

    async def feed_until_told(feeder) -> None:   # the test writes our PID here to make us hang
        flag = work / "stop-pinging"
        while not (flag.exists() and flag.read_text() == pid):
            await asyncio.sleep(0.05)
        feeder.cancel()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        hup, term = asyncio.Event(), asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        loop.add_signal_handler(signal.SIGTERM, term.set)
        with open(work / "starts", "a") as f:
            f.write(pid + "\\n")
        systemd.status("starting: first reconcile")
        await asyncio.sleep(0.5)              # start must not return before READY=1
        (work / f"ready-{pid}").write_text("")
        systemd.ready("serving generation 0")
        feeder = asyncio.ensure_future(systemd.keep_watchdog_fed())
        hang = asyncio.ensure_future(feed_until_told(feeder))
        while not term.is_set():
            waiter = asyncio.ensure_future(hup.wait())
            stopper = asyncio.ensure_future(term.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel(); stopper.cancel()
            if hup.is_set() and not term.is_set():
                hup.clear()
                systemd.reloading("reloading catalog")
                catalog = (work / "catalog.txt").read_text().strip()
                await asyncio.sleep(0.2)
                systemd.ready(f"reloaded: {catalog}")
        systemd.stopping("stopping: bye")
        feeder.cancel(); hang.cancel()
        (work / f"stopped-{pid}").write_text("")

    asyncio.run(main())
''')


@pytest.fixture
def service(user_manager, tmp_path):
    """A started notify service; yields (unit name, work folder)."""
    user_manager.require_sandbox()
    work = tmp_path / "work"
    work.mkdir()
    (work / "catalog.txt").write_text("v1\n")
    script = tmp_path / "notify_service.py"
    script.write_text(NOTIFY_SERVICE)
    unit = f"modeld-notify-{uuid.uuid4().hex[:8]}.service"
    log = user_manager.log_path(unit)
    text = sandboxed_user_unit(
        f"{sys.executable} {script} {work}", work, log,
        replace={"WatchdogSec": "3", "RestartSec": "100ms"},
        add=[("Unit", "StartLimitIntervalSec", "0")])   # several restarts in one test are expected
    user_manager.install(unit, text)
    done = user_manager.systemctl("start", unit, check=False, timeout_s=60)
    assert done.returncode == 0, f"{done.stderr}\n{user_manager.log_text(unit)}"
    try:
        yield unit, work
    finally:
        user_manager.stop_and_forget(unit)


def main_pid(user_manager, unit: str) -> int:
    return int(user_manager.show(unit, "MainPID")["MainPID"])


def test_start_returns_after_ready_and_status_shows_the_status_line(user_manager, service):
    unit, work = service
    pid = main_pid(user_manager, unit)
    # the service writes this file just before READY=1, half a second after it started
    assert (work / f"ready-{pid}").exists()
    state = user_manager.show(unit, "ActiveState", "SubState", "StatusText")
    assert state["ActiveState"] == "active" and state["SubState"] == "running"
    assert state["StatusText"] == "serving generation 0"
    assert 'Status: "serving generation 0"' in user_manager.status(unit)


def test_reload_goes_through_sighup_and_ready(user_manager, service):
    unit, work = service
    pid = main_pid(user_manager, unit)
    (work / "catalog.txt").write_text("v2\n")
    user_manager.systemctl("reload", unit)
    state = user_manager.wait_for(unit, lambda s: s["StatusText"] == "reloaded: v2",
                                  what="the reloaded status")
    assert state["ActiveState"] == "active"
    assert int(state["MainPID"]) == pid                     # reloaded, not restarted


def test_a_service_that_stops_feeding_the_watchdog_is_restarted(user_manager, service):
    unit, work = service
    pid = main_pid(user_manager, unit)
    # fed, it outlives its 3 s watchdog timeout: the pings arrive
    time.sleep(3.5)
    state = user_manager.show(unit, "MainPID", "NRestarts", "ActiveState")
    assert state == {"MainPID": str(pid), "NRestarts": "0", "ActiveState": "active"}
    (work / "stop-pinging").write_text(str(pid))
    state = user_manager.wait_for(
        unit, lambda s: s["MainPID"] not in ("0", str(pid)) and s["ActiveState"] == "active"
        and s["StatusText"] == "serving generation 0", what="a restart after the watchdog fired")
    assert int(state["NRestarts"]) >= 1
    assert (work / "starts").read_text().split()[:2] == [str(pid), state["MainPID"]]


def test_kill_9_is_followed_by_a_restart(user_manager, service):
    unit, work = service
    pid = main_pid(user_manager, unit)
    os.kill(pid, signal.SIGKILL)
    state = user_manager.wait_for(
        unit, lambda s: s["MainPID"] not in ("0", str(pid)) and s["ActiveState"] == "active",
        what="a restart after SIGKILL")
    assert int(state["NRestarts"]) == 1
    assert (work / f"ready-{state['MainPID']}").exists()    # active again only after READY=1


def test_stop_is_clean(user_manager, service):
    unit, work = service
    pid = main_pid(user_manager, unit)
    user_manager.systemctl("stop", unit)
    state = user_manager.show(unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state["ActiveState"] == "inactive"
    assert state["Result"] == "success" and state["ExecMainStatus"] == "0"
    assert (work / f"stopped-{pid}").exists()               # SIGTERM handled, STOPPING=1 sent
