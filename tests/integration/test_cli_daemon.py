"""The CLI against a running daemon (issue 16): every command asks the daemon over the admin
protocol, says so, and shows what the daemon knows (nodes, up-since, a broken catalog still
served). One real daemon, one loopback hub and real workers for the whole module."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from modeld.testing.onnx_models import tiny_cnn
from tests.support.daemon import DaemonProcess, wait_event
from tests.support.workspace import demo_workspace, entry_toml

MLP = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                 quantize="dynamic_int8") + "allow_slower = true\n"
DET = entry_toml("det")
CATALOG = MLP + DET
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    """A workspace with ``mlp`` (and its INT8) and ``det`` served by one daemon whose socket any
    user may connect to (mode 0666 in a 0755 folder), so the admin check is what refuses."""
    with demo_workspace(tmp_path_factory.mktemp("cli-daemon")) as ws:
        ws.write_catalog(CATALOG)
        sock_dir = tempfile.mkdtemp(prefix="modeld16-", dir="/tmp")
        os.chmod(sock_dir, 0o755)
        sock = os.path.join(sock_dir, "modeld.sock")
        daemon = DaemonProcess(ws, env={"MODELD_SOCKET_MODE": "0666"})
        daemon.socket = daemon.env["MODELD_SOCKET"] = sock
        daemon.start()
        ws.socket = sock
        try:
            # which of mlp's variants is served is the host's timing (fastest proven): not assumed
            wait_until(lambda: proven(ws, "mlp") == {"fp32", "int8"} and served(ws, "det") == "fp32",
                       daemon, "both models served, mlp's INT8 proven")
            yield ws, daemon
        finally:
            daemon.stop()
            shutil.rmtree(sock_dir, ignore_errors=True)


def cli(ws, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return ws.cli(*args, timeout=timeout, MODELD_SOCKET=ws.socket)


def cli_json(ws, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    result = cli(ws, *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout), result


def served(ws, name: str) -> str | None:
    doc, _ = cli_json(ws, "status")
    return ((doc["models"].get(name) or {}).get("served") or {}).get("variant")


def proven(ws, name: str) -> set[str]:
    doc, _ = cli_json(ws, "status")
    return {v["variant"] for v in (doc["models"].get(name) or {}).get("variants", ())
            if v["proof"] is not None}


def wait_until(predicate, daemon, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{daemon.log()}")


def test_status_is_the_daemons_view(robot):
    ws, daemon = robot
    with daemon.subscribe("mlp", node="arm-camera") as sub:
        wait_event(sub, lambda e: e.get("event") == "variant", daemon=daemon)
        doc, result = cli_json(ws, "status")
        assert result.returncode == 0, result.stderr
        assert doc["mode"]["daemon"] is True and doc["mode"]["pid"] == daemon.proc.pid
        assert doc["mode"]["up_since_unix_s"] <= time.time()
        assert doc["catalog"]["ok"] is True
        mlp = doc["models"]["mlp"]
        cpu = mlp["providers"]["CPUExecutionProvider"]
        assert cpu["variant"] == mlp["served"]["variant"] in ("fp32", "int8")
        # the ratio beside the latencies is computed from those very latencies
        assert cpu["vs_fp32"] == round(cpu["fp32_latency_ms"] / cpu["latency_ms"], 2)
        [node] = mlp["nodes"]
        assert node["node"] == "arm-camera" and node["variant"] == mlp["served"]["variant"]
        assert node["acked_generation"] == node["generation"]
        text = cli(ws, "status")
        assert text.returncode == 0
        first = text.stdout.splitlines()[0]
        assert first.startswith(f"daemon: pid {daemon.proc.pid} on {ws.socket}, up since ")
        assert "arm-camera" in text.stdout
        nodes, _ = cli_json(ws, "nodes")
        assert [n["node"] for n in nodes["nodes"]] == ["arm-camera"]
        assert "arm-camera" in cli(ws, "nodes").stdout


def test_list_shows_daemon_mode_and_states(robot):
    ws, _ = robot
    doc, result = cli_json(ws, "list")
    assert result.returncode == 0 and doc["mode"]["daemon"] is True
    assert {r["name"]: r["state"] for r in doc["models"]} == {"mlp": "ready", "det": "ready"}
    assert cli(ws, "list").stdout.startswith("daemon: pid")


def test_pull_tells_a_connected_node_about_the_new_file(robot):
    ws, daemon = robot
    with daemon.subscribe("det", node="front-camera") as sub:
        first = wait_event(sub, lambda e: e.get("event") == "variant", daemon=daemon)
        ws.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=11)})
        doc, result = cli_json(ws, "pull", "det")     # the daemon asks the hub again now
        assert result.returncode == 0, result.stderr
        assert doc["mode"]["daemon"] is True and set(doc["models"]) == {"det"}
        new_sha = ws.manifest("det")["files"]["model.onnx"]["sha256"]
        assert new_sha != first["sha256"]
        assert doc["models"]["det"]["served"]["sha256"] == new_sha
        told = wait_event(sub, lambda e: e.get("event") == "variant"
                          and e.get("sha256") == new_sha, daemon=daemon)
        assert told["generation"] > first["generation"]


def test_sync_and_verify_go_through_the_daemon(robot):
    ws, daemon = robot
    before = ws.manifest("mlp")["proofs"]
    synced = cli(ws, "sync")
    assert synced.returncode == 0, synced.stderr
    assert synced.stdout.startswith("daemon: pid")
    with daemon.subscribe("mlp", node="verifier") as sub:
        wait_event(sub, lambda e: e.get("event") == "variant", daemon=daemon)
        doc, verified = cli_json(ws, "verify", "mlp")
        assert verified.returncode == 0, verified.stderr
        assert doc["models"]["mlp"]["served"]["variant"] in ("fp32", "int8")
        # proven again (a new record), and the node was never left without a file meanwhile
        seen = []
        while (event := sub.next_event(timeout_s=0.5)) is not None:
            seen.append(event)
        assert not [e for e in seen if e.get("event") in ("unavailable", "removed")], seen
    after = ws.manifest("mlp")["proofs"]
    assert set(after) == set(before)
    assert all(not p["key"].startswith("stale:") for p in after.values())
    assert after["model-int8.onnx"] != before["model-int8.onnx"]


def test_bench_ratios_are_computed_from_the_printed_latencies(robot):
    ws, _ = robot
    result = cli(ws, "bench", "mlp")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("daemon: pid")
    rows = [line for line in lines if line.startswith("| ")]
    headers = [c.strip() for c in rows[0].strip("|").split("|")]
    col = {h: i for i, h in enumerate(headers)}
    checked = 0
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        latency, fp32, ratio = cells[col["latency"]], cells[col["FP32 same run"]], cells[col["vs FP32"]]
        if "-" in (latency, fp32, ratio):
            continue
        ms = float(latency.removesuffix(" ms"))
        fp32_ms = float(fp32.removesuffix(" ms"))
        assert float(ratio.removesuffix("x")) == pytest.approx(round(fp32_ms / ms, 2), abs=0.006)
        checked += 1
    assert checked >= 2                     # fp32 and int8
    assert re.search(r"on \d+ held-out samples", result.stdout)
    doc, _ = cli_json(ws, "bench", "mlp")
    for row in doc["rows"]:
        if row["latency_ms"] and row["fp32_latency_ms"]:
            assert row["speedup"] == pytest.approx(row["fp32_latency_ms"] / row["latency_ms"])


def test_status_while_the_catalog_is_broken_says_so_and_still_serves(robot):
    ws, daemon = robot
    try:
        ws.write_catalog(CATALOG + '[[models]\nname = "x\n')
        wait_until(lambda: not cli_json(ws, "status")[0]["catalog"]["ok"], daemon,
                   "the daemon sees the broken catalog")
        doc, result = cli_json(ws, "status")
        assert result.returncode == 1
        assert "line" in doc["catalog"]["error"] and "column" in doc["catalog"]["error"]
        assert doc["models"]["mlp"]["served"] is not None            # still served
        text = cli(ws, "status").stdout
        assert "catalog: BROKEN" in text and "still serves 2 models" in text
    finally:
        ws.write_catalog(CATALOG)
        wait_until(lambda: cli_json(ws, "status")[0]["catalog"]["ok"], daemon, "catalog ok")


def test_invalid_entries_stay_visible_and_pull_says_why(robot):
    ws, daemon = robot
    try:
        ws.write_catalog(CATALOG + '[[models]]\nname = "bad"\nrepo = "acme/mlp"\nfilename = 5\n')
        wait_until(lambda: "bad" in cli_json(ws, "status")[0]["models"], daemon, "bad listed")
        doc, _ = cli_json(ws, "status")
        assert doc["models"]["bad"]["state"] == "invalid"
        assert "filename" in doc["models"]["bad"]["reason"]
        listing, _ = cli_json(ws, "list")
        assert {r["name"]: r["state"] for r in listing["models"]}["bad"] == "invalid"
        pulled = cli(ws, "pull", "bad")
        assert pulled.returncode == 2
        [line] = pulled.stderr.strip().splitlines()
        assert "bad is invalid" in line and "filename" in line
    finally:
        ws.write_catalog(CATALOG)


def test_remove_goes_through_the_daemon(robot):
    ws, daemon = robot
    doc, result = cli_json(ws, "remove", "det")
    assert result.returncode == 0 and doc["mode"]["daemon"] is True
    assert doc["still_in_catalog"] is True and "still in" in result.stderr
    # the daemon sees the folder gone and pulls it again (it is still in the catalog)
    wait_until(lambda: served(ws, "det") == "fp32", daemon, "det pulled again")
    assert cli(ws, "remove", "nope").returncode == 2


PEER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    f.readline()                                    # hello
    for op in ({"op": "ping"}, {"op": "admin", "command": "status"}):
        f.write((json.dumps(op) + "\\n").encode()); f.flush()
        print(f.readline().decode().strip())
""")


def as_peer(ws, uid: int, gid: int) -> list[dict]:
    """What another user (set with setresgid/setresuid before connecting) is answered."""
    def drop() -> None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", PEER, ws.socket], preexec_fn=drop,
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root to run a peer as another user")
def test_admin_is_refused_outside_the_group_and_allowed_inside(robot):
    ws, _ = robot
    nobody, nogroup = 65534, 65534
    pong, refused = as_peer(ws, nobody, nogroup)
    assert pong["event"] == "pong"                       # a node's requests still work
    assert refused["event"] == "error" and refused["refused"] is True
    assert "uid 65534" in refused["error"]
    socket_gid = os.stat(ws.socket).st_gid
    _, allowed = as_peer(ws, nobody, socket_gid)         # the socket's group may
    assert allowed["event"] == "result" and allowed["ok"] is True


def test_cli_says_refused_in_one_line():
    from modeld.adminclient import AdminRefusedError
    err = AdminRefusedError("admin: status refused for uid 1 gid 1", hint="join the group")
    assert "\n" not in str(err) and "join the group" in str(err)


def test_doctor_sees_the_daemon_and_an_open_socket(robot):
    ws, daemon = robot
    doc, result = cli_json(ws, "doctor")
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["daemon"]["level"] == "ok" and str(daemon.proc.pid) in checks["daemon"]["text"]
    assert checks["socket"]["level"] == "warn" and "0666" in checks["socket"]["text"]
    assert "socket_mode" in checks["socket"]["fix"]
    text = cli(ws, "doctor").stdout.splitlines()
    assert len(text) == len(checks) and all(line.split()[0] in ("ok", "warn", "fail")
                                            for line in text)
