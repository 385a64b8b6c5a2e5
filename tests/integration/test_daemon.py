"""The daemon as a person meets it: a real `mecha10-modeld run` process, real inotify on the
catalog and models/, real Unix-socket subscribers, real workers and onnxruntime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from modeld.store import sha256_file
from tests.support.daemon import DaemonProcess, variant_is, wait_event
from tests.support.stores import rot_in_place
from tests.support.workspace import calibrated_mlp_toml, entry_toml, write_mlp_calibration

MLP_QUANT = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                       quantize="dynamic_int8") + "allow_slower = true\n"
MLP_PLAIN = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None)


@pytest.fixture
def daemon(workspace):
    d = DaemonProcess(workspace)
    yield d
    d.stop()


def no_temp_files(models):
    return [str(p) for p in models.rglob(".modeld-*")]


def test_new_entry_is_pulled_and_node_told(workspace, daemon):
    workspace.write_catalog("")
    daemon.start()
    with daemon.subscribe("det", node="detector") as sub:
        first = wait_event(sub, lambda e: e.get("model") == "det", daemon=daemon)
        assert first["event"] == "unavailable"
        workspace.write_catalog(entry_toml("det"))   # an edit in place
        told = wait_event(sub, variant_is("det", "fp32"), daemon=daemon)
    assert told["path"] == str(workspace.models / "det" / "model.onnx")
    assert told["sha256"] == workspace.manifest("det")["files"]["model.onnx"]["sha256"]
    assert daemon.status()["models"]["det"]["state"] == "ready"


@pytest.mark.parametrize("editor", ["rename_over", "sed_i", "in_place"])
def test_every_editor_style_is_seen(workspace, daemon, editor):
    workspace.write_catalog(entry_toml("det"))
    daemon.start()
    with daemon.subscribe("mlp") as sub:
        wait_event(sub, lambda e: e.get("model") == "mlp" and e["event"] == "unavailable")
        new_text = entry_toml("det") + MLP_PLAIN
        if editor == "rename_over":          # how vim/VS Code save: write aside, rename over
            tmp = workspace.catalog.with_name(".model_catalog.toml.swp")
            tmp.write_text(new_text)
            os.replace(tmp, workspace.catalog)
        elif editor == "sed_i":              # sed -i replaces the inode
            workspace.write_catalog(entry_toml("det") + MLP_PLAIN.replace("mlp.onnx", "XX"))
            subprocess.run(["sed", "-i", "s/XX/mlp.onnx/", str(workspace.catalog)], check=True)
        else:
            with open(workspace.catalog, "r+") as f:
                f.seek(0, os.SEEK_END)
                f.write(MLP_PLAIN)
        wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)


def test_quantize_flip_and_int8_heal(workspace, daemon):
    workspace.write_catalog(MLP_QUANT)
    daemon.start()
    with daemon.subscribe("mlp", prefer="int8", node="n1") as sub:
        int8 = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
        int8_path = int8["path"]
        # Disable quantization: the node is moved to FP32 at once; the INT8 file stays on disk.
        workspace.write_catalog(MLP_QUANT.replace("enabled = true", "enabled = false"))
        wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)
        assert os.path.exists(int8_path)
        # Enable again: the proven INT8 is served without rebuilding it.
        mtime = os.stat(int8_path).st_mtime_ns
        workspace.write_catalog(MLP_QUANT)
        again = wait_event(sub, variant_is("mlp", "int8"), daemon=daemon)
        assert again["sha256"] == int8["sha256"] and os.stat(int8_path).st_mtime_ns == mtime
        # Truncate the INT8 file: the node is moved to FP32, then back to a rebuilt, proven INT8.
        os.truncate(int8_path, 100)
        wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)
        healed = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
        assert healed["sha256"] == int8["sha256"]   # deterministic rebuild, proven again
        assert os.path.getsize(int8_path) > 100


def test_the_scrub_heals_bit_rot_that_keeps_size_and_mtime(workspace):
    """Rot is invisible to scans (they trust an unchanged stat): the periodic scrub re-hashes,
    the node is moved off the rotten INT8, INT8 is rebuilt; a rotten FP32 is downloaded again."""
    daemon = DaemonProcess(workspace, env={"MODELD_RESYNC_INTERVAL_S": "0.5",
                                           "MODELD_SCRUB_INTERVAL_S": "0.5"})
    workspace.write_catalog(MLP_QUANT)
    daemon.start()
    try:
        with daemon.subscribe("mlp", prefer="int8", node="n1") as sub:
            int8 = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
            rot_in_place(int8["path"])
            wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)
            healed = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
            assert healed["sha256"] == int8["sha256"]
            gets = workspace.hub.log.count("GET")
            rot_in_place(workspace.models / "mlp" / "model.onnx")
            deadline = time.monotonic() + 60
            while workspace.hub.log.count("GET") == gets:
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.1)
        deadline = time.monotonic() + 60
        while sha256_file(workspace.models / "mlp" / "model.onnx") != \
                workspace.manifest("mlp")["files"]["model.onnx"]["sha256"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("damage", ["flip", "delete", "replace", "chmod000"])
def test_damaged_fp32_moves_node_then_heals(workspace, daemon, damage):
    workspace.write_catalog(MLP_QUANT)
    daemon.start()
    fp32_path = workspace.models / "mlp" / "model.onnx"
    with daemon.subscribe("mlp", prefer="fp32") as sub:
        good = wait_event(sub, variant_is("mlp", "fp32"), timeout_s=120, daemon=daemon)
        wait_int8 = time.monotonic() + 120
        while "model-int8.onnx" not in workspace.manifest("mlp")["proofs"]:
            assert time.monotonic() < wait_int8, daemon.log()
            time.sleep(0.2)
        if damage == "flip":
            data = bytearray(fp32_path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            fp32_path.write_bytes(bytes(data))
        elif damage == "delete":
            fp32_path.unlink()
        elif damage == "replace":
            from modeld.testing.onnx_models import tiny_cnn
            fp32_path.write_bytes(tiny_cnn())
        else:
            fp32_path.chmod(0)
        if damage != "chmod000":
            moved = wait_event(sub, lambda e: e.get("model") == "mlp" and e.get("variant") == "int8",
                               daemon=daemon)
            assert moved["path"].endswith("model-int8.onnx")
        healed = wait_event(sub, variant_is("mlp", "fp32"), timeout_s=120, daemon=daemon)
    assert healed["sha256"] == good["sha256"]
    assert fp32_path.stat().st_mode & 0o444
    assert daemon.stop() == 0       # a running daemon may be mid-publish: check once it stopped
    assert no_temp_files(workspace.models) == []


def test_bad_catalog_keeps_last_good_and_says_so(workspace, daemon):
    workspace.write_catalog(entry_toml("det"))
    daemon.start()
    with daemon.subscribe("det") as sub:
        wait_event(sub, variant_is("det", "fp32"), daemon=daemon)
        workspace.write_catalog("[[models]\nbroken")
        deadline = time.monotonic() + 20
        while daemon.status()["catalog"]["ok"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        status = daemon.status()
        assert "model_catalog.toml" in status["catalog"]["error"]
        assert status["models"]["det"]["state"] == "ready"
        assert sub.next_event(timeout_s=0.5) is None      # nodes were not disturbed
        # removing the entry tells its subscribers; the files stay
        workspace.write_catalog("")
        wait_event(sub, lambda e: e.get("event") == "removed" and e.get("model") == "det")
    assert (workspace.models / "det" / "model.onnx").exists()


def test_sighup_sigterm_and_restart_after_kill9(workspace, daemon):
    workspace.write_catalog(entry_toml("det"))
    daemon.start()
    with daemon.subscribe("det") as sub:
        wait_event(sub, variant_is("det", "fp32"), daemon=daemon)
    # SIGHUP asks the hub again: a new upstream commit is pulled
    commit = workspace.hub.store.commit("acme/detector", {"det/labels.txt": b"a\nb\n"})
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while workspace.manifest("det")["files"]["labels.txt"]["provenance"]["commit"] != commit:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    # kill -9, leave a half-written temp file behind, restart: leftovers go, state converges
    daemon.kill9()
    stale = workspace.models / "det" / ".modeld-tmp-deadbeef-model.onnx"
    stale.write_bytes(b"half")
    restarted = DaemonProcess(workspace).start()
    try:
        with restarted.subscribe("det") as sub:
            wait_event(sub, variant_is("det", "fp32"), daemon=restarted)
        assert not stale.exists()
    finally:
        assert restarted.stop() == 0
    assert no_temp_files(workspace.models) == []
    assert not restarted.socket.exists()


def test_sighup_retries_a_quantization_that_failed_for_its_calibration(workspace, daemon):
    """A failed quantization waits for an input to change; the calibration folder's files are
    not an input, so fixing them takes an operator's `systemctl reload` (SIGHUP)."""
    calibration = workspace.root / "cal"
    calibration.mkdir()
    workspace.write_catalog(calibrated_mlp_toml())
    daemon.start()
    with daemon.subscribe("mlp", prefer="int8") as sub:
        wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)
        deadline = time.monotonic() + 60
        while not workspace.manifest("mlp")["failures"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        write_mlp_calibration(calibration)
        daemon.signal(signal.SIGHUP)
        wait_event(sub, variant_is("mlp", "int8"), daemon=daemon)
    assert workspace.manifest("mlp")["failures"] == {}


def test_a_nodes_rejection_survives_a_restart_until_a_reload(workspace):
    """A node that cannot load the INT8 file (a runtime without its kernels) nacks it: that node
    is not offered it again, after a daemon restart too (other nodes are); `systemctl reload`
    retries."""
    workspace.write_catalog(MLP_QUANT)
    daemon = DaemonProcess(workspace).start()
    try:
        with daemon.subscribe("mlp", prefer="int8", node="n1") as sub:
            int8 = wait_event(sub, variant_is("mlp", "int8"), timeout_s=120, daemon=daemon)
            sub.ack("mlp", int8["generation"], ok=False, error="ConvInteger: not implemented")
            wait_event(sub, variant_is("mlp", "fp32"), daemon=daemon)
        rejections = workspace.manifest("mlp")["rejections"]
        assert [r["sha256"] for r in rejections.values()] == [int8["sha256"]]
    finally:
        assert daemon.stop() == 0
    restarted = DaemonProcess(workspace).start()
    try:
        with restarted.subscribe("mlp", prefer="int8", node="n2") as other:
            assert wait_event(other, lambda e: e.get("event") == "variant",
                              daemon=restarted)["variant"] == "int8"
        with restarted.subscribe("mlp", prefer="int8", node="n1") as sub:
            first = wait_event(sub, lambda e: e.get("event") == "variant", daemon=restarted)
            assert first["variant"] == "fp32"
            assert restarted.status()["rejected"][0]["error"] == "ConvInteger: not implemented"
            restarted.signal(signal.SIGHUP)
            again = wait_event(sub, variant_is("mlp", "int8"), daemon=restarted)
            assert again["sha256"] == int8["sha256"]
        assert workspace.manifest("mlp")["rejections"] == {}
    finally:
        assert restarted.stop() == 0


def test_second_daemon_on_the_same_store_refuses(workspace, daemon):
    workspace.write_catalog("")
    daemon.start()
    env = workspace.env(MODELD_SOCKET=str(workspace.root / "other.sock"))
    result = subprocess.run([sys.executable, "-m", "modeld.cli", "run"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "already managed" in result.stderr and str(daemon.proc.pid) in result.stderr
    assert "Traceback" not in result.stderr
