"""The CLI with no daemon on the socket (issue 16): every command works on the folder, says so,
and prints the same ``--json`` documents as in daemon mode (tests/integration/test_cli_daemon.py)."""

from __future__ import annotations

import json

from tests.support.workspace import entry_toml

MLP = entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                 quantize="dynamic_int8") + "allow_slower = true\n"
BAD = '[[models]]\nname = "bad"\nrepo = "acme/mlp"\nfilename = 5\n'


def as_json(result) -> dict:
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_every_command_works_on_the_folder_and_says_so(workspace):
    workspace.write_catalog(MLP + BAD)
    folder = {"daemon": False, "socket": str(workspace.root / "modeld.sock"),
              "models_dir": str(workspace.models), "catalog": str(workspace.catalog)}

    pulled = workspace.cli("pull", "mlp", "--json")
    assert pulled.returncode == 0, pulled.stderr
    doc = as_json(pulled)
    assert doc["mode"] == folder and doc["models"]["mlp"]["served"]["variant"] in ("fp32", "int8")

    invalid = workspace.cli("pull", "bad")
    assert invalid.returncode == 2
    [line] = invalid.stderr.strip().splitlines()          # one line: it is invalid, and why
    assert "bad is invalid" in line and "filename" in line

    status = workspace.cli("status", "--json")
    assert status.returncode == 1                          # an invalid entry
    doc = as_json(status)
    assert doc["mode"] == folder and doc["nodes"] is None
    assert doc["models"]["bad"]["state"] == "invalid"
    cpu = doc["models"]["mlp"]["providers"]["CPUExecutionProvider"]
    assert cpu["vs_fp32"] == round(cpu["fp32_latency_ms"] / cpu["latency_ms"], 2)
    text = workspace.cli("status").stdout
    assert text.splitlines()[0] == (f"no daemon on {folder['socket']}: read from the folder "
                                    f"{workspace.models}")

    listing = as_json(workspace.cli("list", "--json"))
    assert {r["name"]: r["state"] for r in listing["models"]} == {"mlp": "ok", "bad": "invalid"}

    verified = workspace.cli("verify", "mlp", "--json")
    assert verified.returncode == 0, verified.stderr
    assert as_json(verified)["mode"]["daemon"] is False

    bench = workspace.cli("bench", "mlp", "--json")
    assert bench.returncode == 0, bench.stderr
    rows = as_json(bench)["rows"]
    assert {r["variant"] for r in rows} >= {"fp32", "int8"}

    nodes = workspace.cli("nodes")
    assert nodes.returncode == 2 and "no daemon on" in nodes.stderr

    synced = workspace.cli("sync", "--json")
    assert synced.returncode == 1 and "bad" in synced.stderr          # the invalid entry
    assert as_json(synced)["mode"]["daemon"] is False

    removed = workspace.cli("remove", "mlp", "--json")
    assert removed.returncode == 0 and as_json(removed)["still_in_catalog"] is True

    doctor = workspace.cli("doctor", "--json")
    checks = {c["name"]: c for c in as_json(doctor)["checks"]}
    assert set(checks) == {"providers", "hub", "socket", "disk", "catalog", "daemon", "unit"}
    assert checks["providers"]["level"] == "ok" and checks["hub"]["level"] == "ok"
    assert checks["daemon"]["level"] == "warn" and checks["catalog"]["level"] == "warn"
    assert all(c["fix"] for c in checks.values() if c["level"] != "ok")
