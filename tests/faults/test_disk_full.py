"""Campaign 3: the models folder fills up during a pull and during a quantization.

``models/`` is a real 8 MB tmpfs (we are root here; the test skips where mounting is not
allowed). The FP32 already served keeps serving, ``status`` says why the new work failed (the
DiskFullError text), and the daemon retries with backoff until a filler file is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from modeld.testing.onnx_models import matmul_mlp
from tests.support.daemon import DaemonProcess
from tests.support.faults import (FAST_RETRY_ENV, EventAuditor, check_manifest_matches_files,
                                  leftovers, log_events, wait_error, wait_ready, wait_until)
from tests.support.workspace import entry_toml

pytestmark = pytest.mark.faults

DISK_BYTES = 8 * 1024 * 1024
MID = entry_toml("mid", repo="acme/mid", filename="mid.onnx", labels=None,
                 quantize="dynamic_int8") + "allow_slower = true\n"


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted at ``path`` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                              "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on ``folder``'s filesystem."""
    filler = folder / "filler.bin"
    size = shutil.disk_usage(folder).free - leave_bytes
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def test_disk_full_during_pull_and_quantize_then_recovery(workspace):
    workspace.hub.store.commit("acme/mid", {"mid.onnx": matmul_mlp(features=128, hidden=512)})
    mid_disabled = MID.replace("enabled = true", "enabled = false")
    workspace.write_catalog(entry_toml("det"))
    with small_disk(workspace.models, DISK_BYTES):
        daemon = DaemonProcess(workspace, env=dict(FAST_RETRY_ENV)).start()
        try:
            det_sha = wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"]
            with EventAuditor(daemon.socket, ["det", "mid"], prefer="int8") as auditor:
                # 1. a pull that does not fit: refused before a byte is written
                filler = fill(workspace.models, leave_bytes=300_000)
                workspace.write_catalog(entry_toml("det") + mid_disabled)
                status = wait_error(daemon, "mid", "free")
                assert status["detail"]["error"]["type"] == "DiskFullError"
                assert status["detail"]["error"]["retry_in_s"] is not None   # temporary
                assert "needs" in status["detail"]["error"]["message"]
                assert wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"] == det_sha
                filler.unlink()                   # space returns: the backoff retry pulls it
                wait_ready(daemon, "mid", {"fp32"}, timeout_s=60)

                # 2. a quantization that does not fit: FP32 keeps serving, int8 once space returns
                filler = fill(workspace.models, leave_bytes=60_000)
                workspace.write_catalog(entry_toml("det") + MID)
                status = wait_error(daemon, "mid", "space")
                assert status["detail"]["error"]["type"] == "DiskFullError", status
                assert [v["variant"] for v in status["variants"]] == ["fp32"]
                assert not status["detail"].get("failures"), "a full disk is not a permanent failure"
                filler.unlink()
                wait_ready(daemon, "mid", {"fp32", "int8"}, timeout_s=60)
            assert auditor.mismatches == []
            told = {(e["model"], e["variant"]) for e in auditor.variants}
            assert {("det", "fp32"), ("mid", "fp32"), ("mid", "int8")} <= told
            for name in ("det", "mid"):
                check_manifest_matches_files(workspace.models, name)
        finally:
            daemon.stop()
        assert leftovers(workspace.models) == []


def test_disk_full_in_the_middle_of_a_download(workspace):
    """Room for the model's bytes and not one page more: the free-space pre-check passes, and
    the download itself hits ENOSPC (the client's cache needs a little beside the body). No
    half-written model appears under its final name; once space returns the pull completes."""
    data = matmul_mlp(features=128, hidden=512)
    workspace.hub.store.commit("acme/mid", {"mid.onnx": data})
    workspace.write_catalog(entry_toml("det"))
    with small_disk(workspace.models, DISK_BYTES):
        daemon = DaemonProcess(workspace, env=dict(FAST_RETRY_ENV)).start()
        try:
            wait_ready(daemon, "det", {"fp32"})
            (workspace.models / "mid").mkdir()
            page = os.statvfs(workspace.models).f_frsize
            filler = fill(workspace.models, leave_bytes=-(-len(data) // page) * page)
            with EventAuditor(daemon.socket, ["mid"]) as auditor:
                workspace.write_catalog(entry_toml("det") + MID.replace("enabled = true",
                                                                        "enabled = false"))
                status = wait_error(daemon, "mid", "no space left downloading")
                assert status["detail"]["error"]["type"] == "DiskFullError", status
                assert status["variants"] == []
                assert workspace.hub.log.count("GET", "*mid.onnx") >= 1   # it did start
                assert not (workspace.models / "mid" / "model.onnx").exists()
                filler.unlink()
                wait_ready(daemon, "mid", {"fp32"}, timeout_s=60)
            assert auditor.mismatches == [] and len(auditor.variants) >= 1
            check_manifest_matches_files(workspace.models, "mid")
        finally:
            daemon.stop()
        assert leftovers(workspace.models) == []


def test_full_disk_while_a_new_stat_is_written_back(workspace):
    """Issue 11: a full disk while a touched file's new stat is written back crashed the daemon
    (and every restart). The model keeps serving, the daemon keeps running, and the stat is
    recorded once the disk has room. (A read-only remount is refused while the daemon holds its
    lock open: EROFS is covered by tests/unit/test_store_untrusted.py.)"""
    workspace.write_catalog(entry_toml("det"))
    with small_disk(workspace.models, DISK_BYTES):
        daemon = DaemonProcess(workspace, env=dict(FAST_RETRY_ENV)).start()
        try:
            det_sha = wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"]
            model = workspace.models / "det" / "model.onnx"
            filler = fill(workspace.models, leave_bytes=0)
            os.utime(model, ns=(1, 1_000_000_000))          # same bytes, a new stat
            wait_until(lambda: log_events(daemon, "store_problem", model="det"), 30,
                       "the refused write-back to be logged", daemon)
            assert daemon.proc.poll() is None
            assert wait_ready(daemon, "det", {"fp32"})["variants"][0]["sha256"] == det_sha
            filler.unlink()
            os.utime(model, ns=(1, 2_000_000_000))          # wakes it: now it is recorded
            wait_until(lambda: workspace.manifest("det")["files"]["model.onnx"]["mtime_ns"]
                       == 2_000_000_000, 30, "the new stat recorded", daemon)

            check_manifest_matches_files(workspace.models, "det")
        finally:
            daemon.stop()
        assert leftovers(workspace.models) == []
