"""A real daemon process for integration tests: ``mecha10-modeld run`` on a workspace, with
helpers to wait for what subscribed nodes are told."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from modeld import client


class DaemonProcess:
    def __init__(self, workspace, *, env: dict[str, str] | None = None) -> None:
        self.ws = workspace
        self.socket = workspace.root / "modeld.sock"
        self.log_path = workspace.root / f"daemon-{time.monotonic_ns()}.log"
        self.env = workspace.env(MODELD_SOCKET=str(self.socket), MODELD_DEBOUNCE_STEP_MS="20",
                                 **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "modeld.cli", "run", "-v"],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if client.request({"op": "ping"}, socket_path=self.socket, timeout_s=1)["event"] == "pong":
                    return
            except (OSError, client.DaemonUnavailableError, KeyError, ValueError):
                time.sleep(0.05)
        raise AssertionError(f"daemon did not listen in {timeout_s} s:\n{self.log()}")

    def subscribe(self, *models: str, **options) -> client.Subscription:
        return client.Subscription(models, socket_path=self.socket, **options)

    def status(self) -> dict:
        return client.status(socket_path=self.socket, timeout_s=10)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{self.log()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def wait_event(sub: client.Subscription, predicate, timeout_s: float = 60, daemon=None) -> dict:
    """The first event satisfying ``predicate`` (others are skipped), acked like a node would."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        event = sub.next_event(timeout_s=max(0.01, deadline - time.monotonic()))
        if event is None:
            break
        seen.append(event)
        if event.get("event") == "variant" and "generation" in event:
            sub.ack(event["model"], event["generation"], ok=True)
        if predicate(event):
            return event
    log = daemon.log() if daemon is not None else ""
    raise AssertionError(f"no matching event in {timeout_s} s; saw {seen}\n{log}")


def variant_is(model: str, variant: str):
    return lambda e: e.get("event") == "variant" and e.get("model") == model \
        and e.get("variant") == variant
