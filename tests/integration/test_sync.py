"""`mecha10-modeld sync|pull|list|status|remove` end to end: the real CLI process, the real
huggingface_hub client against the loopback hub, real worker processes and onnxruntime."""

from __future__ import annotations

import json
import os

import pytest

from modeld.testing.onnx_models import tiny_cnn
from tests.support.workspace import calibrated_mlp_toml, entry_toml, write_mlp_calibration


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_sync_pulls_proves_and_reports(workspace):
    commit = workspace.hub.store.resolve("acme/detector", "main")
    workspace.write_catalog(entry_toml("det", revision=commit))
    result = workspace.cli("sync")
    assert result.returncode == 0, result.stderr
    assert files_in(workspace.models / "det") == ["config.json", "labels.txt", "manifest.json",
                                                  "model.onnx"]
    manifest = workspace.manifest("det")
    model = manifest["files"]["model.onnx"]
    assert model["provenance"]["commit"] == commit
    assert model["provenance"]["revision"] == commit
    assert manifest["proofs"]["model.onnx"]["checker_ok"] is True
    config = json.loads((workspace.models / "det" / "config.json").read_text())
    assert config["labels_count"] == 4
    assert config["inputs"][0]["name"] == "images"
    status = workspace.status()
    served = status["models"]["det"]["served"]
    assert served["variant"] == "fp32" and served["sha256"] == model["sha256"]


def test_unchanged_upstream_is_not_downloaded_again(workspace):
    workspace.write_catalog(entry_toml("det"))
    assert workspace.cli("sync").returncode == 0
    before = (workspace.models / "det" / "model.onnx").stat()
    gets = workspace.hub.log.count("GET")
    result = workspace.cli("sync")
    assert result.returncode == 0, result.stderr
    assert workspace.hub.log.count("GET") == gets          # only HEADs asked the hub
    after = (workspace.models / "det" / "model.onnx").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_new_upstream_commit_is_pulled_again(workspace):
    workspace.write_catalog(entry_toml("det"))
    assert workspace.cli("sync").returncode == 0
    old = workspace.manifest("det")["files"]["model.onnx"]
    new_commit = workspace.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=7)})
    assert workspace.cli("sync").returncode == 0
    new = workspace.manifest("det")["files"]["model.onnx"]
    assert new["provenance"]["commit"] == new_commit
    assert new["sha256"] != old["sha256"]
    assert workspace.status()["models"]["det"]["served"]["sha256"] == new["sha256"]


def test_quantized_variant_is_built_proven_and_recorded(workspace):
    workspace.write_catalog(entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                                       quantize="dynamic_int8", extra="") +
                            "allow_slower = true\n")
    result = workspace.cli("sync")
    assert result.returncode == 0, result.stderr
    manifest = workspace.manifest("mlp")
    int8 = manifest["files"]["model-int8.onnx"]
    assert int8["derivation"]["method"] == "dynamic_int8"
    assert int8["derivation"]["source_sha256"] == manifest["files"]["model.onnx"]["sha256"]
    proof = manifest["proofs"]["model-int8.onnx"]
    cpu = proof["providers"][0]
    assert cpu["usable"] and cpu["cosine"] is not None and cpu["cosine"] > 0.9
    variants = {v["variant"] for v in workspace.status()["models"]["mlp"]["variants"]}
    assert variants == {"fp32", "int8"}


def test_bad_catalog_is_one_line_exit_2(workspace):
    workspace.write_catalog('[[models]]\nname = "det"\nrepo = "acme/detector"\nfilename = 5\n'
                            '[models.quantize]\nenabled = true\nmethod = "int4"\n')
    result = workspace.cli("sync")
    # an entry-level error: the entry is refused, the run says so and exits 1
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "filename" in result.stderr
    workspace.write_catalog("[[models]\nname = ")
    result = workspace.cli("sync")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "model_catalog.toml" in result.stderr


def test_unknown_method_fails_the_entry_only(workspace):
    workspace.write_catalog(entry_toml("det", quantize="int4") + entry_toml(
        "mlp", repo="acme/mlp", filename="mlp.onnx", labels=None))
    result = workspace.cli("sync")
    assert result.returncode == 1
    assert "int4" in result.stderr and "Traceback" not in result.stderr
    assert (workspace.models / "det" / "model.onnx").exists()     # FP32 still pulled
    assert (workspace.models / "mlp" / "model.onnx").exists()


def test_missing_repo_is_a_permanent_clear_error(workspace):
    workspace.write_catalog(entry_toml("ghost", repo="acme/nothing-here"))
    result = workspace.cli("sync")
    assert result.returncode == 1
    assert "ghost" in result.stderr and "acme/nothing-here" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, filename", [
    ("../escape", "det/model.onnx"),
    ("det", "../../etc/passwd"),
    ("det", "/etc/passwd"),
    ("Det", "det/model.onnx"),
])
def test_hostile_entries_are_refused_and_nothing_is_written_outside(workspace, name, filename):
    workspace.write_catalog(f'[[models]]\nname = "{name}"\nrepo = "acme/detector"\n'
                            f'filename = "{filename}"\n')
    before = set(os.listdir(workspace.root))
    result = workspace.cli("sync")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert set(os.listdir(workspace.root)) <= before | {"models"}
    if (workspace.models).exists():
        assert [p for p in os.listdir(workspace.models) if not p.startswith(".")] == []


def test_interrupted_pull_leaves_old_files_serving(workspace):
    workspace.write_catalog(entry_toml("det"))
    assert workspace.cli("sync").returncode == 0
    old_bytes = (workspace.models / "det" / "model.onnx").read_bytes()
    workspace.hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(seed=3)})
    workspace.hub.faults.add("cut", "*model.onnx", times=50, method="GET")
    result = workspace.cli("sync", MODELD_PULL_ATTEMPTS="2")
    assert result.returncode == 1
    assert (workspace.models / "det" / "model.onnx").read_bytes() == old_bytes
    leftovers = [p for p in os.listdir(workspace.models / "det") if p.startswith(".modeld-")]
    assert leftovers == []
    assert workspace.status()["models"]["det"]["served"]["variant"] == "fp32"


def test_pull_list_remove(workspace):
    workspace.write_catalog(entry_toml("det") + entry_toml("mlp", repo="acme/mlp",
                                                           filename="mlp.onnx", labels=None))
    result = workspace.cli("pull", "mlp")
    assert result.returncode == 0, result.stderr
    assert (workspace.models / "mlp" / "model.onnx").exists()
    assert not (workspace.models / "det").exists()
    listing = workspace.cli("list").stdout
    assert "mlp" in listing and "det" in listing
    removed = workspace.cli("remove", "mlp")
    assert removed.returncode == 0
    assert "still in" in removed.stderr
    assert not (workspace.models / "mlp").exists()
    assert workspace.cli("remove", "mlp").returncode == 2
    assert workspace.cli("pull", "nope").returncode == 2


def test_hub_outage_keeps_serving_and_verify_needs_no_hub(workspace):
    workspace.write_catalog(entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                                       quantize="dynamic_int8") + "allow_slower = true\n")
    assert workspace.cli("sync").returncode == 0
    workspace.hub.stop()
    down = workspace.cli("sync", MODELD_PULL_ATTEMPTS="1")
    assert down.returncode == 1                      # the upstream check failed, and says so
    assert "mlp" in down.stderr and "Traceback" not in down.stderr
    served = workspace.status()["models"]["mlp"]
    assert {v["variant"] for v in served["variants"]} == {"fp32", "int8"}
    assert served["served"] is not None
    verified = workspace.cli("verify", "mlp")        # proves again from local files only
    assert verified.returncode == 0, verified.stderr
    proofs = workspace.manifest("mlp")["proofs"]
    assert set(proofs) == {"model.onnx", "model-int8.onnx"}
    assert workspace.cli("verify", "nope").returncode == 2


def test_bench_command_prints_every_variant(workspace):
    workspace.write_catalog(entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                                       quantize="dynamic_int8") + "allow_slower = true\n")
    assert workspace.cli("bench", "mlp").returncode == 2      # not pulled yet: says so
    assert workspace.cli("sync").returncode == 0
    result = workspace.cli("bench", "mlp")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    variants = {row.split("|")[1].strip() for row in rows[1:]}
    assert {"fp32", "int8"} <= variants
    assert "vs FP32" in rows[0]


def test_sync_retries_a_quantization_that_failed_once_its_calibration_is_fixed(workspace):
    """A permanent failure is remembered for the same inputs (no endless re-quantizing), but
    the calibration folder's content is not one of them: an explicit sync tries again."""
    calibration = workspace.root / "cal"
    calibration.mkdir()
    workspace.write_catalog(calibrated_mlp_toml())
    failed = workspace.cli("sync")
    assert failed.returncode == 1 and "holds no usable files" in failed.stderr, failed.stderr
    assert list(workspace.manifest("mlp")["failures"].values()) != [], failed.stderr
    assert not (workspace.models / "mlp" / "model-int8.onnx").exists()
    # FP32's own proof never reads the calibration folder: it stays served
    assert workspace.status()["models"]["mlp"]["served"]["variant"] == "fp32"
    write_mlp_calibration(calibration)
    fixed = workspace.cli("sync")
    assert fixed.returncode == 0, fixed.stderr
    manifest = workspace.manifest("mlp")
    assert manifest["failures"] == {}
    assert "model-int8.onnx" in manifest["files"] and "model-int8.onnx" in manifest["proofs"]
