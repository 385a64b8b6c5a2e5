"""The store on real files: manifest round trip, scan states, no re-hash of unchanged files,
atomic writes, clean-up of leftovers, one daemon per store."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import pytest

from modeld.atomic import TEMP_PREFIX, WORK_PREFIX, temp_path_for, write_atomic
from modeld.errors import DiskFullError, StoreError, StoreLockedError
from modeld.manifest import MAX_REJECTIONS, FileRecord, Manifest, Provenance
from modeld.store import DAMAGED, MISSING, OK, UNREADABLE, Store, sha256_file
from tests.support.stores import rot_in_place


def publish(store: Store, name: str, file_name: str, data: bytes) -> FileRecord:
    folder = store.model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / file_name, data)
    st = (folder / file_name).stat()
    record = FileRecord(file_name, sha256_file(folder / file_name), st.st_size, st.st_mtime_ns,
                        st.st_ino, provenance=Provenance("o/r", file_name, "main", "c" * 40, "e"))
    store.update_manifest(name, lambda m: m.with_file(record))
    return record


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models")


def test_manifest_round_trip(store):
    record = publish(store, "m", "model.onnx", b"abc")
    fresh = Store(store.root)
    assert fresh.read_manifest("m").files["model.onnx"] == record
    assert Manifest.from_json(fresh.read_manifest("m").to_json(), name="m") == fresh.read_manifest("m")


def test_unchanged_store_is_not_rehashed(store):
    publish(store, "m", "model.onnx", b"x" * 1000)
    publish(store, "m", "labels.txt", b"a\nb\n")
    before = store.hash_count
    for _ in range(3):
        state = store.scan_model("m")
        assert all(s.status == OK for s in state.files.values())
    assert store.hash_count == before


@pytest.mark.parametrize("damage, expected", [
    ("delete", MISSING),
    ("truncate", DAMAGED),
    ("flip", DAMAGED),
    ("replace", DAMAGED),
    ("chmod000", UNREADABLE),
])
def test_damage_is_detected(store, damage, expected):
    publish(store, "m", "model.onnx", b"0123456789" * 100)
    path = store.model_dir("m") / "model.onnx"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        os.truncate(path, 10)
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[500] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "replace":
        other = path.with_name("other")
        other.write_bytes(b"9876543210" * 100)
        os.replace(other, path)
    elif damage == "chmod000":
        path.chmod(0)
    assert store.scan_model("m").files["model.onnx"].status == expected


def test_touched_file_with_same_content_is_trusted_and_hashed_once(store):
    publish(store, "m", "model.onnx", b"z" * 100)
    path = store.model_dir("m") / "model.onnx"
    os.utime(path, ns=(1, 1))
    state = store.scan_model("m")
    assert state.files["model.onnx"].status == OK
    store.refresh_stats(state)
    count = store.hash_count
    assert store.scan_model("m").files["model.onnx"].status == OK
    assert store.hash_count == count


def test_model_dir_refuses_escapes(store):
    for bad in ("..", "../x", "a/b", "", ".hidden", "x\0y"):
        with pytest.raises(StoreError):
            store.model_dir(bad)


def test_clean_leftovers_removes_only_our_temp_files(store):
    publish(store, "m", "model.onnx", b"keep")
    folder = store.model_dir("m")
    (folder / f"{TEMP_PREFIX}abc-model.onnx").write_bytes(b"half")
    (folder / f"{WORK_PREFIX}123").mkdir()
    (folder / f"{WORK_PREFIX}123" / "blob.incomplete").write_bytes(b"x")
    removed = store.clean_leftovers()
    assert len(removed) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]


def test_write_atomic_never_exposes_partial_file(tmp_path):
    final = tmp_path / "f.bin"
    write_atomic(final, b"old")
    temp = temp_path_for(final)
    assert temp.parent == final.parent and temp.name.startswith(TEMP_PREFIX)
    write_atomic(final, b"new" * 1000)
    assert final.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _write_with_fsize_limit(path: str, queue) -> None:
    import resource
    import signal
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    try:
        write_atomic(Path(path), b"x" * 5000)
        queue.put("written")
    except DiskFullError as e:
        queue.put(pickle.dumps(e))


def test_disk_full_keeps_old_file_and_leaves_no_temp(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old content")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_write_with_fsize_limit, args=(str(final), queue))
    child.start()
    child.join(30)
    outcome = queue.get(timeout=5)
    assert outcome != "written"
    error = pickle.loads(outcome)
    assert isinstance(error, DiskFullError) and "no space" in str(error)
    assert final.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_second_lock_is_refused_with_the_holder(store):
    store.lock()
    try:
        other = Store(store.root)
        with pytest.raises(StoreLockedError) as info:
            other.lock()
        assert str(os.getpid()) in str(info.value)
    finally:
        store.unlock()
    again = Store(store.root)
    again.lock()
    again.unlock()


def test_remove_model_leaves_nothing(store):
    publish(store, "m", "model.onnx", b"abc")
    assert store.remove_model("m")
    assert not store.model_dir("m").exists()
    assert [p.name for p in store.root.iterdir()] == []
    assert not store.remove_model("m")


def test_corrupt_manifest_reads_as_empty(store):
    publish(store, "m", "model.onnx", b"abc")
    (store.model_dir("m") / "manifest.json").write_text("{not json")
    assert Store(store.root).read_manifest("m").files == {}


def test_an_unchanged_model_scans_to_the_very_same_state(store):
    """The planner and the views skip a model whose state is the object they saw last pass."""
    publish(store, "m", "model.onnx", b"x" * 1000)
    first = store.scan_model("m")
    assert store.scan_model("m") is first
    path = store.model_dir("m") / "model.onnx"
    path.write_bytes(b"y" * 10)                      # damage: a new state, saying so
    damaged = store.scan_model("m")
    assert damaged is not first and damaged.files["model.onnx"].status == DAMAGED
    publish(store, "m", "model.onnx", b"x" * 1000)   # healed: a new record, a new state
    healed = store.scan_model("m")
    assert healed.files["model.onnx"].status == OK and healed is store.scan_model("m")
    publish(store, "m", "labels.txt", b"a\n")        # a new manifest: a new state
    assert store.scan_model("m") is not healed


def test_a_vanished_folder_scans_to_nothing_and_back(store):
    publish(store, "m", "model.onnx", b"x")
    assert store.scan_model("m") is not None
    store.remove_model("m")
    assert store.scan_model("m") is None
    store.model_dir("m").mkdir()
    state = store.scan_model("m")
    assert state is not None and state.files == {}


def test_the_scrub_finds_rot_that_scans_cannot_see(store):
    publish(store, "m", "model.onnx", b"x" * 1000)
    publish(store, "m", "labels.txt", b"a\n")
    rot_in_place(store.model_dir("m") / "model.onnx")
    assert store.scan_model("m").files["model.onnx"].status == OK      # the stat vouches for it
    targets = store.scrub_targets("m")
    assert sorted(record.name for _, record, _ in targets) == ["labels.txt", "model.onnx"]
    for path, record, st in targets:
        if sha256_file(path) != record.sha256:
            store.mark_rotten("m", path, st)
    state = store.scan_model("m")
    assert state.files["model.onnx"].status == DAMAGED and "scrub" in state.files["model.onnx"].detail
    assert state.files["labels.txt"].status == OK
    assert store.scrub_targets("m") == [t for t in targets if t[1].name == "labels.txt"]
    publish(store, "m", "model.onnx", b"x" * 1000)                     # healed: a new file
    assert store.scan_model("m").files["model.onnx"].status == OK


def test_rejections_round_trip_and_go_with_the_file_they_name(store):
    record = publish(store, "m", "model-int8.onnx", b"int8 v1")
    rejection = {"model": "m", "variant": "int8", "sha256": record.sha256,
                 "provider": "CoreMLExecutionProvider", "node": "n1", "error": "ConvInteger",
                 "revision": str(record.inode), "at_unix_s": 1.5}
    store.update_manifest("m", lambda m: m.with_rejection(rejection))
    fresh = Store(store.root).read_manifest("m")
    assert list(fresh.rejections.values()) == [rejection]
    publish(store, "m", "labels.txt", b"a\n")                  # another file: kept
    assert len(store.read_manifest("m").rejections) == 1
    publish(store, "m", "model-int8.onnx", b"int8 v2")         # rebuilt: a new file, no rejection
    assert store.read_manifest("m").rejections == {}


def test_a_rejection_does_not_survive_a_heal_with_the_same_bytes(store):
    """A re-published copy (same sha256, a new inode: a heal) is offered again (issue 11)."""
    record = publish(store, "m", "model.onnx", b"fp32")
    rejection = {"model": "m", "variant": "fp32", "sha256": record.sha256, "provider": "CPU",
                 "node": "n1", "error": "bad", "revision": str(record.inode), "at_unix_s": 1.0}
    store.update_manifest("m", lambda m: m.with_rejection(rejection))
    assert len(store.read_manifest("m").rejections) == 1
    healed = publish(store, "m", "model.onnx", b"fp32")
    assert healed.sha256 == record.sha256 and healed.inode != record.inode
    assert store.read_manifest("m").rejections == {}


def test_rejections_are_bounded_per_model(store):
    record = publish(store, "m", "model.onnx", b"fp32")
    for i in range(200):
        rejection = {"model": "m", "variant": "fp32", "sha256": record.sha256, "provider": "CPU",
                     "node": f"n{i}", "error": "bad", "revision": "", "at_unix_s": float(i)}
        store.update_manifest("m", lambda m: m.with_rejection(rejection))
    kept = store.read_manifest("m").rejections
    assert len(kept) == MAX_REJECTIONS and "n199|" + record.sha256 + ":CPU" in kept
