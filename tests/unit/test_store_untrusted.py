"""The pure parts of issue 11 on real files: a manifest of any JSON shape is a ManifestError
(never another exception), identity comes from the folder, and the store never follows a
symlink or a ``..`` out of models/ (scan, chmod, manifest writes)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.atomic import QUARANTINE_PREFIX, read_regular, write_atomic
from modeld.errors import DiskFullError, ManifestError, StoreError, StoreWriteError, TemporaryError
from modeld.manifest import FileRecord, Manifest, Provenance
from modeld.store import DAMAGED, OK, UNREADABLE, Store, sha256_file

SHA = "a" * 64
RECORD = {"name": "model.onnx", "sha256": SHA, "size": 3, "mtime_ns": 1, "inode": 2,
          "provenance": None, "derivation": None}


def doc(**kw):
    return json.dumps({"schema": 1, "name": "m", "files": {"model.onnx": RECORD}, **kw})


BAD = {
    "null": "null", "list": "[]", "string": '"x"', "number": "7",
    "files-list": doc(files=[]), "files-null": doc(files=None), "proofs-null": doc(proofs=None),
    "failures-list": doc(failures=[1]), "rejections-wrong": doc(rejections={"k": [1]}),
    "size-text": doc(files={"model.onnx": {**RECORD, "size": "3"}}),
    "size-bool": doc(files={"model.onnx": {**RECORD, "size": True}}),
    "missing-sha": doc(files={"model.onnx": {k: v for k, v in RECORD.items() if k != "sha256"}}),
    "record-escapes": doc(files={"../../x": {**RECORD, "name": "../../x"}}),
    "record-name-differs": doc(files={"model.onnx": {**RECORD, "name": "labels.txt"}}),
    "hidden-name": doc(files={".modeld.lock": {**RECORD, "name": ".modeld.lock"}}),
    "provenance-list": doc(files={"model.onnx": {**RECORD, "provenance": [1]}}),
    "proof-providers-dict": doc(proofs={"model.onnx": {"variant": "fp32", "file_sha256": SHA,
                                                       "key": "k", "checker_ok": True,
                                                       "providers": {"a": 1}}}),
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep-in-params": doc(files={"model.onnx": {**RECORD, "derivation": {
        "source_sha256": SHA, "method": "m", "params": json.loads("[" * 500 + "]" * 500)}}}),
    "schema-2": json.dumps({"schema": 2}),
    "not-utf8": b"\xff\xfe{",
}


@pytest.mark.parametrize("raw", list(BAD.values()), ids=list(BAD))
def test_a_manifest_of_the_wrong_shape_is_a_manifest_error(raw):
    with pytest.raises(ManifestError):
        Manifest.from_json(raw, name="m")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=30)
keys = st.sampled_from(["schema", "name", "files", "proofs", "failures", "rejections"])


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.dictionaries(keys, json_values) | json_values)
def test_any_json_parses_or_is_a_manifest_error(value):
    if isinstance(value, dict) and "schema" in value:
        value["schema"] = 1
    try:
        manifest = Manifest.from_json(json.dumps(value), name="m")
    except ManifestError:
        return
    assert manifest.name == "m"
    assert Manifest.from_json(manifest.to_json(), name="m") == manifest


def test_identity_is_the_folders_not_the_files():
    assert Manifest.from_json(doc(name="other"), name="m").name == "m"


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


def _published(store, name="m", data=b"abc"):
    folder = store.model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "model.onnx", data)
    st_ = os.stat(folder / "model.onnx")
    record = FileRecord("model.onnx", sha256_file(folder / "model.onnx"), st_.st_size,
                        st_.st_mtime_ns, st_.st_ino, provenance=Provenance("o/r", "f", None,
                                                                           "c" * 40, "e"))
    store.update_manifest(name, lambda m: m.with_file(record))
    return folder


def test_a_copied_folder_writes_its_own_manifest(store):
    _published(store, "a")
    original = (store.root / "a" / "manifest.json").read_bytes()
    os.system(f"cp -a {store.root / 'a'} {store.root / 'b'}")
    store.update_manifest("b", lambda m: m.with_failure("k", "x"))
    assert (store.root / "a" / "manifest.json").read_bytes() == original
    assert Store(store.root).read_manifest("b").failures == {"k": "x"}


@pytest.mark.parametrize("raw", ["null", "[]", '{"schema":1,"files":[]}', "[" * 50_000])
def test_a_bad_manifest_is_that_models_problem(store, raw):
    _published(store)
    (store.root / "m" / "manifest.json").write_text(raw)
    state = store.scan_model("m")
    assert state.problem and not state.manifest.files and not state.misplaced


def test_folder_replaced_by_a_file_a_link_or_a_loop_is_quarantined(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    store.root.mkdir()
    for kind in ("file", "link", "loop"):
        folder = store.root / "m"
        if kind == "file":
            folder.write_text("x")
        elif kind == "link":
            folder.symlink_to(outside)
        else:
            folder.symlink_to(folder)
        state = store.scan_model("m")
        assert state.misplaced and "not a folder" in state.problem, kind
        with pytest.raises(StoreError):
            store.write_manifest(Manifest(name="m"))
        moved = store.quarantine("m")
        assert moved.startswith(QUARANTINE_PREFIX) and not os.path.lexists(folder)
        assert store.scan_model("m") is None
    assert sorted(p.name for p in outside.iterdir()) == ["config.json"]


def test_models_dir_that_is_a_file_is_a_temporary_store_error(tmp_path):
    root = tmp_path / "models"
    root.write_text("x")
    store = Store(root)
    with pytest.raises(TemporaryError, match="not a folder"):
        store.scan(["m"])
    with pytest.raises(TemporaryError):
        store.lock()


def test_a_symlinked_file_is_damage_and_is_never_followed(store, tmp_path):
    folder = _published(store)
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc")          # same bytes: a followed link would look intact
    os.chmod(secret, 0o600)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(secret)
    state = Store(store.root).scan_model("m")
    assert state.files["model.onnx"].status == DAMAGED
    assert "symlink" in state.files["model.onnx"].detail
    with pytest.raises(StoreError):
        store.restore_mode("m", "model.onnx")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    with pytest.raises(OSError):
        sha256_file(folder / "model.onnx")


def test_restore_mode_gives_the_mode_a_new_file_gets_and_only_in_the_folder(store, tmp_path):
    folder = _published(store)
    os.chmod(folder / "model.onnx", 0)
    assert store.scan_model("m").files["model.onnx"].status == UNREADABLE
    store.restore_mode("m", "model.onnx")
    assert stat.S_IMODE(os.stat(folder / "model.onnx").st_mode) == store.file_mode
    assert Store(store.root).scan_model("m").files["model.onnx"].status == OK
    for name in ("../../x", "..", "/etc/passwd", ".modeld.lock"):
        with pytest.raises(StoreError):
            store.restore_mode("m", name)


def test_fifo_and_devices_are_never_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to("/dev/zero")
    for path in (fifo, tmp_path / "zero", tmp_path):
        with pytest.raises(OSError):
            read_regular(path, 100)


def test_a_folder_in_place_of_a_file_is_moved_aside(tmp_path):
    (tmp_path / "config.json").mkdir()
    write_atomic(tmp_path / "config.json", b"{}")
    assert (tmp_path / "config.json").read_bytes() == b"{}"
    assert any(p.name.startswith(QUARANTINE_PREFIX) for p in tmp_path.iterdir())


def test_a_refused_stat_write_back_only_logs(store, monkeypatch):
    folder = _published(store)
    os.utime(folder / "model.onnx", ns=(1, 12345))     # same bytes, new stat
    state = store.scan_model("m")
    assert state.new_stats

    def full(*a, **kw):
        raise DiskFullError("no space left writing manifest.json")
    monkeypatch.setattr("modeld.store.write_atomic", full)
    store.refresh_stats(state)      # must not raise: it only saves re-hashing


def test_disk_errors_are_temporary(tmp_path, monkeypatch):
    import errno

    from modeld import atomic
    for code, kind in ((errno.ENOSPC, DiskFullError), (errno.EIO, StoreWriteError),
                       (errno.EROFS, StoreWriteError)):
        def refuse(*a, code=code, **kw):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(atomic.os, "fsync", refuse)
        with pytest.raises(kind):
            write_atomic(tmp_path / "f", b"x")
        monkeypatch.undo()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".modeld-tmp-")]
