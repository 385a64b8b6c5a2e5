"""Campaign 8: everything under models/ is untrusted input (issue 11).

One real daemon for the module serves ``good`` and ``victim``; each case damages ``victim`` on
disk as a person, a bad copy or a hostile user could (manifests of every JSON shape, records
naming paths outside the folder, the folder replaced by a file, a symlink or a loop, files
replaced by links out of models/, FIFOs, /dev/zero, folders, mode 000) and asserts: the daemon
process is alive, ``good`` keeps being served with the same bytes, nothing in a canary tree
beside models/ changed, descriptors and memory stay bounded, and ``victim`` converges to a
healthy folder once the damage is gone (the daemon heals or quarantines it itself).
A hypothesis campaign then fuzzes the same on-disk state.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeld.atomic import QUARANTINE_PREFIX
from tests.support.daemon import DaemonProcess
from tests.support.faults import (FAST_RETRY_ENV, EventAuditor, fd_count, log_events, make_canary,
                                  model_status, rss_kb, store_converged, tree_digest, wait_ready,
                                  wait_until)
from tests.support.workspace import Workspace, demo_workspace, entry_toml

pytestmark = pytest.mark.faults

CATALOG = entry_toml("good") + entry_toml("victim")


class Campaign:
    def __init__(self, ws: Workspace, daemon: DaemonProcess, canary: Path) -> None:
        self.ws, self.daemon, self.canary = ws, daemon, canary
        self.models = ws.models
        self.canary_digest = tree_digest(canary)
        self.good_sha = model_status(daemon, "good")["variants"][0]["sha256"]
        self.fds = fd_count(daemon.proc.pid)
        self.rss_kb = rss_kb(daemon.proc.pid)

    def check_harmless(self) -> None:
        """The invariants every case ends with."""
        assert self.daemon.proc.poll() is None, self.daemon.log()
        good = wait_ready(self.daemon, "good", {"fp32"}, timeout_s=60)
        assert good["variants"][0]["sha256"] == self.good_sha
        assert tree_digest(self.canary) == self.canary_digest, "something outside models/ changed"
        assert fd_count(self.daemon.proc.pid) <= self.fds + 24
        assert rss_kb(self.daemon.proc.pid) <= self.rss_kb + 150_000

    def converge(self, name: str = "victim", timeout_s: float = 90) -> dict:
        wait_until(lambda: store_converged(self.models, name), timeout_s,
                   f"{name} healed on disk", self.daemon)
        return wait_ready(self.daemon, name, {"fp32"}, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    with demo_workspace(tmp_path_factory.mktemp("untrusted")) as ws:
        canary = make_canary(ws.root / "canary")
        ws.write_catalog(CATALOG)
        daemon = DaemonProcess(ws, env={**FAST_RETRY_ENV, "MODELD_RESYNC_INTERVAL_S": "20"}).start()
        try:
            wait_ready(daemon, "good", {"fp32"})
            wait_ready(daemon, "victim", {"fp32"})
            c = Campaign(ws, daemon, canary)
            with EventAuditor(daemon.socket, ["good"]) as node:
                c.node = node
                yield c
            assert node.mismatches == []
            assert {e["sha256"] for e in node.variants if e["model"] == "good"} == {c.good_sha}
        finally:
            code = daemon.stop()
        assert code == 0


# -- damage, one kind per case ----------------------------------------------------------------

def _manifest(c: Campaign) -> dict:
    return json.loads((c.models / "victim" / "manifest.json").read_text())


def _write_manifest(c: Campaign, doc) -> None:
    raw = doc if isinstance(doc, str) else json.dumps(doc)
    (c.models / "victim" / "manifest.json").write_text(raw)


def _edit_manifest(change):
    def damage(c: Campaign) -> None:
        doc = _manifest(c)
        change(doc)
        _write_manifest(c, doc)
    return damage


def _replace(file_name: str, how: str):
    def damage(c: Campaign) -> None:
        path = c.models / "victim" / file_name
        path.unlink()
        if how == "fifo":
            os.mkfifo(path)
        elif how == "devzero":
            path.symlink_to("/dev/zero")
        elif how == "canary":
            path.symlink_to(c.canary / "secret.bin")
        elif how == "dir":
            path.mkdir()
            (path / "inside").write_bytes(b"x")
    return damage


def _folder(how: str):
    def damage(c: Campaign) -> None:
        folder = c.models / "victim"
        shutil.rmtree(folder)
        if how == "file":
            folder.write_bytes(b"not a folder")
        elif how == "canary":
            folder.symlink_to(c.canary)
        elif how == "loop":
            folder.symlink_to(folder)
    return damage


def _chmod(file_name: str, mode: int):
    def damage(c: Campaign) -> None:
        os.chmod(c.models / "victim" / file_name, mode)
    return damage


def _escape_record(c: Campaign) -> None:
    doc = _manifest(c)
    record = dict(doc["files"]["model.onnx"], name="../../canary/secret.bin")
    doc["files"]["../../canary/secret.bin"] = record
    _write_manifest(c, doc)
    os.chmod(c.models / "victim" / "model.onnx", 0)   # invites a chmod: of what?


DAMAGE = {
    "manifest-null": lambda c: _write_manifest(c, "null"),
    "manifest-list": lambda c: _write_manifest(c, "[]"),
    "manifest-string": lambda c: _write_manifest(c, '"manifest"'),
    "files-is-a-list": lambda c: _write_manifest(c, {"schema": 1, "files": []}),
    "proofs-null": _edit_manifest(lambda d: d.update(proofs=None)),
    "size-is-text": _edit_manifest(lambda d: d["files"]["model.onnx"].update(size="big")),
    "record-without-sha": _edit_manifest(lambda d: d["files"]["model.onnx"].pop("sha256")),
    "providers-not-a-list": _edit_manifest(
        lambda d: d["proofs"]["model.onnx"].update(providers={"a": 1})),
    "rejections-wrong": _edit_manifest(lambda d: d.update(rejections={"x": [1, 2]})),
    "nested-past-recursion": lambda c: _write_manifest(c, "[" * 200_000 + "]" * 200_000),
    "not-json": lambda c: _write_manifest(c, "{\x00\xff"),
    "record-escapes-folder": _escape_record,
    "manifest-is-a-folder": _replace("manifest.json", "dir"),
    "manifest-is-a-fifo": _replace("manifest.json", "fifo"),
    "model-links-outside": _replace("model.onnx", "canary"),
    "model-is-a-folder": _replace("model.onnx", "dir"),
    "model-is-a-fifo": _replace("model.onnx", "fifo"),
    "config-is-a-fifo": _replace("config.json", "fifo"),
    "config-links-dev-zero": _replace("config.json", "devzero"),
    "labels-links-dev-zero": _replace("labels.txt", "devzero"),
    "model-mode-000": _chmod("model.onnx", 0),
    "folder-is-a-file": _folder("file"),
    "folder-links-outside": _folder("canary"),
    "folder-is-a-symlink-loop": _folder("loop"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_to_one_model_is_that_models_error_and_heals(campaign, kind):
    c = campaign
    good_manifest = (c.models / "good" / "manifest.json").read_bytes()
    DAMAGE[kind](c)
    c.converge()
    c.check_harmless()
    assert (c.models / "good" / "manifest.json").read_bytes() == good_manifest
    if kind == "model-mode-000":
        # the mode a new file gets here (the unit's UMask=0027 makes it 0640: test_units)
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(os.stat(c.models / "victim" / "model.onnx").st_mode) == 0o666 & ~umask
    if kind.startswith("folder-"):
        aside = [p.name for p in c.models.iterdir() if p.name.startswith(QUARANTINE_PREFIX)]
        assert any(n.endswith("-victim") for n in aside), aside
    if kind.startswith("manifest-") or kind in ("proofs-null", "size-is-text", "not-json"):
        assert log_events(c.daemon, "store_problem", model="victim"), "the problem is logged"


def test_a_manifest_naming_another_model_never_writes_that_model(campaign):
    """Identity is the folder's: a hand-edited name, or `cp -a models/good models/copy`, never
    rewrites good's manifest or makes work for good."""
    c = campaign
    good_manifest = (c.models / "good" / "manifest.json").read_bytes()
    def work_for_good() -> int:
        # the periodic upstream check is due on its own schedule: it is not work the copy made
        return sum(1 for e in log_events(c.daemon, "job_started", model="good")
                   if e.get("reason") != "check upstream for a new commit")
    started = work_for_good()
    _edit_manifest(lambda d: d.update(name="good"))(c)
    shutil.copytree(c.models / "good", c.models / "copy", symlinks=True)
    c.ws.write_catalog(CATALOG + entry_toml("copy"))
    try:
        wait_ready(c.daemon, "copy", {"fp32"}, timeout_s=90)
        c.converge()
        c.converge("copy")
        time.sleep(1)   # give a wrong write the time to happen
        assert (c.models / "good" / "manifest.json").read_bytes() == good_manifest
        assert work_for_good() == started
        c.check_harmless()
    finally:
        c.ws.write_catalog(CATALOG)


def test_models_folder_replaced_by_a_file_then_restored(campaign):
    """models/ itself a file: the daemon and `status` stay up and say why; once it is a folder
    again, everything is served as before."""
    c = campaign
    aside = c.models.with_name("models.aside")
    os.replace(c.models, aside)
    c.models.write_bytes(b"oops")
    try:
        def says_why():
            status = c.daemon.status()
            return status if status.get("store_error") and "not a folder" in status["store_error"] \
                else None
        status = wait_until(says_why, 30, "status to say models/ is not a folder", c.daemon)
        assert "models error" in status["summary"]
        cli = c.ws.cli("status")
        assert "Traceback" not in cli.stderr and cli.returncode in (0, 1), cli.stderr
        assert c.daemon.proc.poll() is None
    finally:
        c.models.unlink()
        os.replace(aside, c.models)
    wait_until(lambda: not c.daemon.status().get("store_error"), 30, "the store back", c.daemon)
    c.converge()
    c.check_harmless()


def test_failed_entry_leaves_no_empty_folder(campaign):
    c = campaign
    c.ws.write_catalog(CATALOG + entry_toml("ghost", repo="acme/nothing-here"))
    try:
        wait_until(lambda: (model_status(c.daemon, "ghost")["detail"].get("error") or {})
                   .get("type"), 60, "ghost to fail", c.daemon)
        wait_until(lambda: not (c.models / "ghost").exists(), 10, "no ghost folder", c.daemon)
    finally:
        c.ws.write_catalog(CATALOG)
    c.check_harmless()


# -- fuzzing the on-disk state ----------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
             | st.floats(allow_nan=False) | st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                          max_leaves=20)
FILES = ("manifest.json", "model.onnx", "labels.txt", "config.json")
file_damage = st.sampled_from(["fifo", "devzero", "canary", "dir", "missing", "mode-000",
                               "garbage", "truncate"])
field_damage = st.tuples(st.sampled_from(["files", "proofs", "failures", "rejections", "schema",
                                          "name"]), json_value)


def _apply(c: Campaign, folder_kind, manifest_fields, files) -> None:
    folder = c.models / "victim"
    if folder_kind is not None:
        _folder(folder_kind)(c)
        return
    if manifest_fields:
        try:
            doc = _manifest(c)
        except (OSError, ValueError):
            doc = {}
        for key, value in manifest_fields:
            doc[key] = value
        _write_manifest(c, doc)
    for file_name, how in files.items():
        path = folder / file_name
        if not os.path.lexists(path):
            continue
        if how == "mode-000":
            os.chmod(path, 0)
        elif how == "garbage":
            path.unlink()
            path.write_bytes(os.urandom(64))
        elif how == "truncate":
            with open(path, "r+b") as f:
                f.truncate(3)
        elif how == "missing":
            path.unlink()
        else:
            _replace(file_name, how)(c)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(folder_kind=st.none() | st.sampled_from(["file", "canary", "loop"]),
       manifest_fields=st.lists(field_damage, max_size=3),
       files=st.dictionaries(st.sampled_from(FILES), file_damage, max_size=3))
def test_fuzzed_on_disk_state_never_harms_the_daemon(campaign, folder_kind, manifest_fields,
                                                      files):
    c = campaign
    _apply(c, folder_kind, manifest_fields, files)
    c.converge(timeout_s=120)
    c.check_harmless()
