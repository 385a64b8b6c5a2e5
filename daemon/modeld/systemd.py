"""Speaking to systemd: readiness and status (sd_notify), the watchdog, inherited listening sockets,
and whether stderr is connected to the journal.

The runner calls ``ready``/``reloading``/``stopping``/``status``/``keep_watchdog_fed`` and
``listen_sockets``; ``modeld.logs`` calls ``stderr_is_journal``. Outside systemd every call is a
silent no-op. Uses systemd-python where it is installed, else a few lines of stdlib that speak the
same datagram protocol (sd_notify(3), sd_listen_fds(3)).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from typing import TextIO

import structlog

try:  # optional extra `systemd`; the stdlib fallback below speaks the same protocol
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the install
    _sd_daemon = None

log = structlog.get_logger(__name__)

#: first inherited descriptor (sd_listen_fds(3): SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def under_systemd() -> bool:
    """True when a service manager listens for our notifications."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` assignments in one datagram; False (and nothing raised) outside systemd."""
    if not under_systemd():
        return False
    message = "\n".join(assignments)
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(message))
    return notify_via_socket(message)


def notify_via_socket(message: str, socket_path: str | None = None) -> bool:
    """The stdlib sd_notify: one datagram to ``$NOTIFY_SOCKET`` (``@`` = abstract namespace)."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        # systemd going away must never take the daemon down; the next notification may work
        log.warning("sd_notify_failed", socket=path, error=str(e))
        return False
    return True


def _status_line(text: str) -> str:
    # one STATUS= line: a newline would start a new assignment in the datagram
    return "STATUS=" + " ".join(text.split())


def status(text: str) -> bool:
    """``STATUS=``: what the daemon is doing, in words; shown by ``systemctl status``."""
    return notify(_status_line(text))


def ready(status_text: str | None = None) -> bool:
    """``READY=1``: the socket listens and the first reconcile is done."""
    return notify("READY=1", *([_status_line(status_text)] if status_text else []))


def reloading(status_text: str | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by Type=notify-reload since systemd 253,
    harmless before); send ``ready()`` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}",
                  *([_status_line(status_text)] if status_text else []))


def stopping(status_text: str | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun."""
    return notify("STOPPING=1", *([_status_line(status_text)] if status_text else []))


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC``: ask for more time to start or stop (a slow first reconcile)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: proof of life; call it from the event loop so a stuck loop stops it."""
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """How often to ping: half of ``WATCHDOG_USEC`` (sd_watchdog_enabled(3)), or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


async def keep_watchdog_fed() -> None:
    """Ping the watchdog at half its timeout; returns at once when the watchdog is off. Run it
    as a task on the daemon's loop: a blocked loop then misses pings and systemd restarts the
    daemon, which is the point."""
    interval_s = watchdog_interval_s()
    if interval_s is None:
        return
    while True:
        watchdog_ping()
        await asyncio.sleep(interval_s)


def listen_sockets(*, unset_environment: bool = True) -> list[socket.socket]:
    """Sockets handed over by socket activation (``LISTEN_FDS``), in order; [] when there are none.

    Each is adopted with ``socket.socket(fileno=fd)``, which reads the family and type from the
    descriptor instead of assuming them (uvicorn #295). The environment is unset by default so
    worker processes do not think they were activated too.
    """
    if _sd_daemon is not None:
        fds = _sd_daemon.listen_fds(unset_environment)
        if unset_environment:
            # libsystemd's unsetenv() does not reach os.environ, which subprocesses inherit
            for name in _ACTIVATION_VARS:
                os.environ.pop(name, None)
    else:
        fds = _listen_fds_stdlib(unset_environment)
    sockets = []
    for fd in fds:
        os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC; be sure on either path
        sockets.append(socket.socket(fileno=fd))
    if sockets:
        log.info("sockets_inherited", count=len(sockets),
                 addresses=[str(s.getsockname()) for s in sockets])
    return sockets


def _listen_fds_stdlib(unset_environment: bool) -> list[int]:
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for name in _ACTIVATION_VARS:
                os.environ.pop(name, None)
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(0, count)))


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd connected us to:
    ``$JOURNAL_STREAM`` holds its ``device:inode`` (systemd.exec(5)). A redirected stderr fails."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # no real descriptor (a test capture, a closed stream)
    return expected == f"{st.st_dev}:{st.st_ino}"
