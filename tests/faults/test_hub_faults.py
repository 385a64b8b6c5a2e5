"""Campaign 2: hub faults during pulls, through `sync` and through the running daemon.

5xx bursts, stalls past the timeout, bodies cut short, a wrong length, a corrupt body, 404: the
retries are bounded (counted in the hub's request log), permanent errors are stated clearly in
`status`, nothing corrupt lands under a final name, and the files already here keep serving.
Real parts: the loopback hub with injected faults, huggingface_hub, the CLI and daemon processes.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from modeld.testing.onnx_models import tiny_cnn
from tests.support.daemon import DaemonProcess
from tests.support.faults import (FAST_RETRY_ENV, EventAuditor, check_manifest_matches_files,
                                  leftovers, sha256_of, wait_error, wait_ready, wait_until)
from tests.support.workspace import entry_toml

pytestmark = pytest.mark.faults

MODEL_GLOB = "*det/model.onnx"
ATTEMPTS = 3
#: per file: ATTEMPTS HEADs of ours, then ATTEMPTS downloads of at most 6 HEADs and 6 GETs each
#: (workers/fetch.py docstring, measured)
MAX_REQUESTS_PER_FILE = ATTEMPTS + ATTEMPTS * 12
#: the campaigns' quick backoff for `sync` too: what is counted is the retries, not their pauses
#: (the default, 2 s doubling with full jitter, is seconds of sleep per failing attempt)
FAST_BACKOFF = {k: v for k, v in FAST_RETRY_ENV.items() if "BACKOFF" in k}


def _served_sha(status: dict, name: str = "det") -> str | None:
    served = status["models"][name]["served"]
    return served["sha256"] if served else None


def test_sync_rides_out_a_5xx_burst(workspace):
    workspace.write_catalog(entry_toml("det"))
    workspace.hub.faults.add("status_503", MODEL_GLOB, times=1, method="HEAD")
    workspace.hub.faults.add("status_500", MODEL_GLOB, times=1, method="HEAD")
    result = workspace.cli("sync", MODELD_PULL_ATTEMPTS=str(ATTEMPTS), **FAST_BACKOFF)
    assert result.returncode == 0, result.stderr
    heads = workspace.hub.log.records("HEAD", MODEL_GLOB)
    assert [r.status for r in heads[:3]] == [503, 500, 200]
    assert len(workspace.hub.log.records(None, MODEL_GLOB)) <= MAX_REQUESTS_PER_FILE
    check_manifest_matches_files(workspace.models, "det")


def test_sync_under_persistent_body_faults_keeps_the_old_files(workspace):
    """A new upstream commit whose body keeps arriving cut short, too short for its announced
    length, corrupt, or 404: each sync fails in one line after bounded requests; the previous
    model stays under its name, byte for byte, and `status` still serves it."""
    workspace.write_catalog(entry_toml("det"))
    assert workspace.cli("sync").returncode == 0
    old_sha = sha256_of(workspace.models / "det" / "model.onnx")
    workspace.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=5)})

    for kind, method, says in (("cut", "GET", "message body"), ("wrong_size", "GET", "message body"),
                               ("corrupt", "GET", "does not match its ETag"),
                               ("not_found", "HEAD", "not found"),
                               ("status_500", None, "HTTP 500")):
        workspace.hub.faults.clear()
        workspace.hub.log.clear()
        workspace.hub.faults.add(kind, MODEL_GLOB, times=10_000, method=method)
        # huggingface_hub itself re-GETs a short body ~5 times, 1 s apart: one attempt of ours
        attempts = 1 if kind in ("cut", "wrong_size") else ATTEMPTS
        result = workspace.cli("sync", MODELD_PULL_ATTEMPTS=str(attempts), **FAST_BACKOFF)
        assert result.returncode == 1, (kind, result.stderr)
        # logs are JSON lines on a non-terminal; what the user is told is one plain line
        said = [line for line in result.stderr.splitlines() if line.startswith("mecha10-modeld:")]
        assert len(said) == 1 and "det" in said[0] and says in said[0], (kind, said)
        assert "Traceback" not in result.stderr
        assert len(workspace.hub.log.records(None, MODEL_GLOB)) <= MAX_REQUESTS_PER_FILE, kind
        if kind == "not_found":   # permanent: asked once, never retried
            assert workspace.hub.log.count("HEAD", MODEL_GLOB) == 1
        assert sha256_of(workspace.models / "det" / "model.onnx") == old_sha, kind
        assert leftovers(workspace.models) == [], kind
        check_manifest_matches_files(workspace.models, "det")
        assert _served_sha(workspace.status()) == old_sha, kind

    workspace.hub.faults.clear()
    assert workspace.cli("sync").returncode == 0
    new_sha = sha256_of(workspace.models / "det" / "model.onnx")
    assert new_sha != old_sha
    assert _served_sha(workspace.status()) == new_sha


def test_daemon_404_is_permanent_clear_and_old_model_serves(workspace):
    workspace.write_catalog(entry_toml("det"))
    daemon = DaemonProcess(workspace, env=dict(FAST_RETRY_ENV)).start()
    try:
        with EventAuditor(daemon.socket, ["det"]) as auditor:
            old = wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"]
            workspace.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=6)})
            workspace.hub.log.clear()
            workspace.hub.faults.add("not_found", MODEL_GLOB, times=10_000, method="HEAD")
            daemon.signal(signal.SIGHUP)     # ask the hub again: the file is now gone upstream
            status = wait_error(daemon, "det", "not found")
            error = status["detail"]["error"]
            assert error["type"] == "HubNotFoundError" and error["retry_in_s"] is None
            assert "model_catalog.toml" in error["message"]   # says what to fix
            time.sleep(2.5)                  # many fast-backoff periods: still no retry
            assert workspace.hub.log.count("HEAD", MODEL_GLOB) == 1
            status = daemon.status()["models"]["det"]
            assert [v["sha256"] for v in status["variants"]] == [old]
        assert auditor.mismatches == [] and auditor.variants
        assert all(e["sha256"] == old for e in auditor.variants)
    finally:
        daemon.stop()


def test_daemon_stall_past_the_timeout_is_retried_boundedly_then_recovers(workspace):
    """A hub that accepts and never answers: the pull job hits its time limit, the error says
    so, retries come with backoff (bounded count), the old model keeps serving; once the hub
    answers again the new commit arrives."""
    workspace.write_catalog(entry_toml("det"))
    env = dict(FAST_RETRY_ENV, MODELD_PULL_TIMEOUT_S="3")
    daemon = DaemonProcess(workspace, env=env).start()
    try:
        old = wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"]
        workspace.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=8)})
        workspace.hub.log.clear()
        workspace.hub.faults.add("stall", MODEL_GLOB, times=10_000, method="HEAD", seconds=60)
        started = time.monotonic()
        daemon.signal(signal.SIGHUP)
        status = wait_error(daemon, "det", "time limit", timeout_s=30)
        assert status["detail"]["error"]["type"] == "WorkerTimeoutError"
        assert [v["sha256"] for v in status["variants"]] == [old]
        time.sleep(3)
        elapsed_s = time.monotonic() - started
        # each try costs the 3 s time limit plus a backoff: never a tight loop
        assert 1 <= workspace.hub.log.count("HEAD", MODEL_GLOB) <= elapsed_s / 3 + 1
        workspace.hub.faults.clear()
        new = wait_until(lambda: [v["sha256"] for v in daemon.status()["models"]["det"]["variants"]
                                  if v["sha256"] != old], 60, "the new commit", daemon)
        assert new == [sha256_of(workspace.models / "det" / "model.onnx")]
        check_manifest_matches_files(workspace.models, "det")
    finally:
        daemon.stop()
    assert leftovers(workspace.models) == []
    assert json.loads((workspace.models / "det" / "manifest.json").read_text())


def test_status_says_a_slow_pull_is_running(workspace):
    """While a download crawls, `status` says the model is being pulled (with progress), not
    only that it is pending: an operator must see what the daemon is doing now."""
    workspace.hub.store.commit("acme/slow", {"m.onnx": tiny_cnn(seed=9)})
    workspace.hub.faults.add("stall", "*m.onnx", method="GET", at_byte=1024, seconds=4)
    workspace.write_catalog(entry_toml("slow", repo="acme/slow", filename="m.onnx", labels=None))
    daemon = DaemonProcess(workspace).start()
    try:
        wait_until(lambda: workspace.hub.log.count("GET", "*m.onnx"), 30, "the download", daemon)
        status = wait_until(lambda: (lambda m: m if m["detail"].get("activity") else None)(
            daemon.status()["models"]["slow"]), 3, "status to show the running pull", daemon)
        assert status["detail"]["activity"]["action"] == "pulling"
        assert status["reason"].startswith("pulling")
        wait_ready(daemon, "slow", {"fp32"}, timeout_s=30)
    finally:
        daemon.stop()


def test_sync_gives_up_on_a_stalled_hub_in_one_line(workspace):
    """`sync` against a hub that never answers: the pull hits its time limit, the command exits 1
    with one line naming the model, and no worker is left behind."""
    workspace.write_catalog(entry_toml("det"))
    workspace.hub.faults.add("stall", MODEL_GLOB, times=10_000, method="HEAD", seconds=60)
    started = time.monotonic()
    result = workspace.cli("sync", MODELD_PULL_TIMEOUT_S="3", timeout=60)
    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("mecha10-modeld:")]
    assert len(said) == 1 and "det" in said[0] and "time limit" in said[0], said
    assert time.monotonic() - started < 30
    assert workspace.hub.log.count("HEAD", MODEL_GLOB) == 1
    assert not (workspace.models / "det" / "model.onnx").exists()
    assert leftovers(workspace.models) == []
