"""The watcher with real inotify (through watchdog): every editor style wakes it for the catalog,
damage in models/ wakes it for that model, the daemon's own files never do, bursts are debounced.

Assertions are about which wake-ups arrive and in what order, never about how long they took. To
show that something did NOT wake the watcher, a sentinel change follows it: inotify delivers in
order, so if the ignored change had counted it would show up in a wake-up at or before the
sentinel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from modeld.atomic import WORK_PREFIX, temp_path_for, write_atomic
from modeld.manifest import MANIFEST_NAME
from modeld.settings import Settings
from modeld.watcher import Debouncer, WakeReason, Watcher

WAIT_S = 10.0
CATALOG_TEXT = '[[models]]\nname = "yolo"\nrepo = "a/b"\nfilename = "m.onnx"\n'


class Wakes:
    """Collects wake-ups from the watcher's thread; tests wait on it."""

    def __init__(self) -> None:
        self.reasons: list[WakeReason] = []
        self.cond = threading.Condition()

    def __call__(self, reason: WakeReason) -> None:
        with self.cond:
            self.reasons.append(reason)
            self.cond.notify_all()

    def wait_for(self, predicate, what: str) -> list[WakeReason]:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.merged()), WAIT_S):
                raise AssertionError(f"no wake-up for {what}; got {self.reasons}")
            return list(self.reasons)

    def merged(self) -> WakeReason:
        out = WakeReason()
        for r in self.reasons:
            out |= r
        return out

    def clear(self) -> None:
        with self.cond:
            self.reasons.clear()


@pytest.fixture
def tree(tmp_path):
    etc = tmp_path / "etc"
    models = tmp_path / "models"
    etc.mkdir()
    models.mkdir()
    catalog = etc / "model_catalog.toml"
    catalog.write_text(CATALOG_TEXT)
    yolo = models / "yolo"
    yolo.mkdir()
    (yolo / "model.onnx").write_bytes(b"\x08\x07" * 4096)
    (yolo / MANIFEST_NAME).write_text("{}")
    (models / "sentinel").mkdir()
    return catalog, models


@pytest.fixture
def watched(tree):
    catalog, models = tree
    wakes = Wakes()
    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=wakes, step_ms=30, max_ms=300)
    watcher.start()
    yield catalog, models, wakes
    watcher.stop()


def sentinel_model(models: Path, wakes: Wakes) -> list[WakeReason]:
    """A real change in models/sentinel; returns every wake-up up to and including its own."""
    (models / "sentinel" / "model.onnx").write_bytes(os.urandom(16))
    return wakes.wait_for(lambda m: "sentinel" in m.models, "the sentinel model")


def sentinel_catalog(catalog: Path, wakes: Wakes) -> list[WakeReason]:
    with open(catalog, "a") as f:
        f.write("# sentinel\n")
    return wakes.wait_for(lambda m: m.catalog_changed, "the sentinel catalog write")


# -- the catalog: every way an editor or a tool saves it ---------------------------------------

def write_in_place(catalog: Path) -> None:
    with open(catalog, "r+") as f:
        f.seek(0)
        f.write(CATALOG_TEXT.replace("yolo", "yolx"))


def rewrite_with_redirect(catalog: Path) -> None:   # `>` and tomlkit.dump: truncate, then write
    catalog.write_text(CATALOG_TEXT + "# rewritten\n")


def truncate(catalog: Path) -> None:
    os.truncate(catalog, 0)


def rename_over(catalog: Path) -> None:   # most editors and atomic writers
    temp = catalog.with_name(".model_catalog.toml.new")
    temp.write_text(CATALOG_TEXT + "# renamed over\n")
    os.replace(temp, catalog)


def sed_in_place(catalog: Path) -> None:   # sed -i writes a new inode and renames it
    subprocess.run(["sed", "-i", "s/yolo/yolz/", str(catalog)], check=True)


def vim_backup_then_write(catalog: Path) -> None:   # vim with backupcopy=no
    backup = catalog.with_name(catalog.name + "~")
    swap = catalog.with_name("." + catalog.name + ".swp")
    swap.write_bytes(b"vim swap")
    os.rename(catalog, backup)
    catalog.write_text(CATALOG_TEXT + "# vim\n")
    backup.unlink()
    swap.unlink()


def delete_and_recreate(catalog: Path) -> None:
    catalog.unlink()
    catalog.write_text(CATALOG_TEXT)


def moved_in_from_elsewhere(catalog: Path) -> None:   # moved_to from a folder we do not watch
    elsewhere = catalog.parent.parent / "staging"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "new.toml").write_text(CATALOG_TEXT + "# staged\n")
    os.replace(elsewhere / "new.toml", catalog)


def chmod_unreadable(catalog: Path) -> None:
    catalog.chmod(0)


@pytest.mark.parametrize("edit", [write_in_place, rewrite_with_redirect, truncate, rename_over,
                                  sed_in_place, vim_backup_then_write, delete_and_recreate,
                                  moved_in_from_elsewhere, chmod_unreadable],
                         ids=lambda f: f.__name__)
def test_every_way_of_saving_the_catalog_wakes_it(watched, edit):
    catalog, models, wakes = watched
    edit(catalog)
    reasons = wakes.wait_for(lambda m: m.catalog_changed, edit.__name__)
    assert all(not r.models for r in reasons)   # nothing in models/ was touched


def test_other_files_beside_the_catalog_do_not_wake_it(watched):
    catalog, models, wakes = watched
    folder = catalog.parent
    (folder / "other.toml").write_text("x = 1\n")
    (folder / "model_catalog.toml.orig").write_text("x")
    (folder / ".model_catalog.toml.swp").write_bytes(b"swap")
    os.replace(folder / "other.toml", folder / "renamed.toml")
    (folder / "sub").mkdir()
    catalog.read_text()                      # our own read must not wake us either
    assert sentinel_catalog(catalog, wakes) == [WakeReason(catalog_changed=True)]


def test_a_symlinked_catalog_is_followed_to_its_target_and_re_pointed(tree):
    """Configuration tools link /etc files elsewhere: an edit of the target counts, and so does
    re-pointing the link (ln -sfn), after which the new target's edits count."""
    catalog, models = tree
    real_v1 = catalog.parent.parent / "store-v1" / "catalog.toml"
    real_v2 = catalog.parent.parent / "store-v2" / "catalog.toml"
    for real in (real_v1, real_v2):
        real.parent.mkdir()
        real.write_text(CATALOG_TEXT)
    catalog.unlink()
    catalog.symlink_to(real_v1)
    wakes = Wakes()
    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=wakes, step_ms=10, max_ms=50)
    watcher.start()
    try:
        with open(real_v1, "a") as f:                 # edit the target in place
            f.write("# v1 edited\n")
        wakes.wait_for(lambda m: m.catalog_changed, "an edit of the link's target")
        wakes.clear()
        link_tmp = catalog.with_name(".catalog-link-tmp")   # ln -sfn: new link, rename over
        link_tmp.symlink_to(real_v2)
        os.replace(link_tmp, catalog)
        wakes.wait_for(lambda m: m.catalog_changed, "the link re-pointed")
        wakes.clear()
        (real_v1.parent / "catalog.toml").write_text("# the old target: no longer ours\n")
        # the old target's edit no longer counts (one inotify queue: the sentinel comes after)
        assert sentinel_model(models, wakes) == [WakeReason(models=frozenset({"sentinel"}))]
        wakes.clear()
        with open(real_v2, "a") as f:                 # the new target's edits count
            f.write("# v2 edited\n")
        wakes.wait_for(lambda m: m.catalog_changed, "an edit of the new target")
    finally:
        watcher.stop()


# -- models/: damage and changes wake the reconciler for that model -----------------------------

def truncate_model(model: Path) -> None:
    os.truncate(model / "model.onnx", 10)


def flip_a_byte(model: Path) -> None:
    with open(model / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def delete_file(model: Path) -> None:
    (model / "model.onnx").unlink()


def chmod_000(model: Path) -> None:
    (model / "model.onnx").chmod(0)


def chmod_000_folder(model: Path) -> None:
    model.chmod(0)


def replace_from_outside(model: Path) -> None:
    outside = model.parent.parent / "elsewhere.onnx"
    outside.write_bytes(b"other model")
    os.replace(outside, model / "model.onnx")


def delete_manifest(model: Path) -> None:   # the daemon never deletes it: this is damage
    (model / MANIFEST_NAME).unlink()


def delete_folder(model: Path) -> None:
    shutil.rmtree(model)


def touch_mtime(model: Path) -> None:
    os.utime(model / "model.onnx", (1, 1))


@pytest.mark.parametrize("damage", [truncate_model, flip_a_byte, delete_file, chmod_000,
                                    chmod_000_folder, replace_from_outside, delete_manifest,
                                    delete_folder, touch_mtime],
                         ids=lambda f: f.__name__)
def test_damage_in_models_wakes_it_for_that_model(watched, damage):
    catalog, models, wakes = watched
    damage(models / "yolo")
    reasons = wakes.wait_for(lambda m: "yolo" in m.models, damage.__name__)
    assert wakes.merged() == WakeReason(models=frozenset({"yolo"}))
    assert not any(r.catalog_changed for r in reasons)


def test_a_new_model_folder_wakes_it(watched):
    catalog, models, wakes = watched
    (models / "newcomer").mkdir()
    (models / "newcomer" / "model.onnx").write_bytes(b"x")
    wakes.wait_for(lambda m: "newcomer" in m.models, "a new folder")


def test_the_daemons_own_files_never_wake_it(watched):
    catalog, models, wakes = watched
    yolo = models / "yolo"
    # atomic publish of the manifest: a temp file, then a rename over manifest.json
    write_atomic(yolo / MANIFEST_NAME, b'{"name": "yolo"}')
    # a temp file beside a final name, written and removed
    temp = temp_path_for(yolo / "model-int8.onnx")
    temp.write_bytes(b"half a variant")
    temp.unlink()
    # a scratch folder, with a nested tree, removed again
    scratch = yolo / f"{WORK_PREFIX}0123abcd"
    (scratch / "blobs").mkdir(parents=True)
    (scratch / "blobs" / "etag.incomplete").write_bytes(b"x" * 1000)
    os.rename(scratch / "blobs" / "etag.incomplete", scratch / "blobs" / "etag")
    shutil.rmtree(scratch)
    # the lock file
    lock = Settings(models_dir=models).lock_path
    lock.write_text(str(os.getpid()))
    lock.chmod(0o600)
    # reading model files (verify, hashing) must not wake it
    (yolo / "model.onnx").read_bytes()
    assert sentinel_model(models, wakes) == [WakeReason(models=frozenset({"sentinel"}))]


def test_a_published_variant_wakes_it_once_it_lands(watched):
    """publish = rename temp -> final: the final name is a real change (the reconciler then finds
    the variant already done; level-triggered, so this costs one cheap pass)."""
    catalog, models, wakes = watched
    final = models / "yolo" / "model-int8.onnx"
    temp = temp_path_for(final)
    temp.write_bytes(b"variant")
    os.replace(temp, final)
    wakes.wait_for(lambda m: "yolo" in m.models, "a published variant")


# -- debouncing ------------------------------------------------------------------------------

def test_a_burst_is_merged_into_few_wake_ups(tree):
    catalog, models = tree
    wakes = Wakes()
    # a long quiet step: a busy CI host may pause the writer, which must not split the burst
    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=wakes, step_ms=500, max_ms=5000)
    watcher.start()
    try:
        events = 0
        for i in range(60):
            for name in ("a", "b", "c"):
                folder = models / name
                folder.mkdir(exist_ok=True)
                (folder / "model.onnx").write_bytes(os.urandom(64))   # create/modify/close: 3+ events
                events += 3
        catalog.write_text(CATALOG_TEXT)
        wakes.wait_for(lambda m: {"a", "b", "c"} <= m.models and m.catalog_changed, "the burst")
    finally:
        watcher.stop()
    assert wakes.merged() == WakeReason(catalog_changed=True, models=frozenset({"a", "b", "c"}))
    assert len(wakes.reasons) <= 4 < events


def test_max_hold_fires_during_an_endless_burst(tree):
    """Writes every few ms for much longer than max_ms: the quiet step never elapses, so only
    the maximum hold can produce wake-ups while the writer is still going."""
    catalog, models = tree
    writing = threading.Event()
    writing.set()
    during_burst: list[bool] = []
    wakes = Wakes()

    def wake(reason: WakeReason) -> None:
        during_burst.append(writing.is_set())
        wakes(reason)

    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=wake, step_ms=500, max_ms=600)
    watcher.start()
    try:
        target = models / "yolo" / "model.onnx"
        for _ in range(1000):                 # at most a few seconds of writing
            target.write_bytes(os.urandom(32))
            time.sleep(0.005)
            if sum(during_burst) >= 2:
                break
        writing.clear()
        wakes.wait_for(lambda m: "yolo" in m.models, "the burst")
    finally:
        watcher.stop()
    assert sum(during_burst) >= 2, f"wake-ups during the burst: {during_burst}"


def test_no_wake_up_after_stop(tree):
    catalog, models = tree
    wakes = Wakes()
    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=wakes, step_ms=10, max_ms=50)
    watcher.start()
    (models / "yolo" / "model.onnx").write_bytes(b"1")
    wakes.wait_for(lambda m: "yolo" in m.models, "the first change")
    watcher.stop()
    count = len(wakes.reasons)
    (models / "yolo" / "model.onnx").write_bytes(b"2")
    catalog.write_text(CATALOG_TEXT)
    # start a second watcher and see its wake-up arrive: the first one stayed silent meanwhile
    second = Wakes()
    again = Watcher(catalog_path=catalog, models_dir=models, wake=second, step_ms=10, max_ms=50)
    again.start()
    try:
        sentinel_model(models, second)
    finally:
        again.stop()
    assert len(wakes.reasons) == count


def test_a_failing_wake_callback_does_not_stop_the_watching(tree):
    catalog, models = tree
    wakes = Wakes()
    calls = []

    def flaky(reason: WakeReason) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise RuntimeError("reconciler hiccup")
        wakes(reason)

    watcher = Watcher(catalog_path=catalog, models_dir=models, wake=flaky, step_ms=10, max_ms=50)
    watcher.start()
    try:
        (models / "yolo" / "model.onnx").write_bytes(b"1")
        while not calls:
            time.sleep(0.01)
        sentinel_model(models, wakes)
    finally:
        watcher.stop()


def test_models_folder_deleted_and_recreated_is_watched_again(watched):
    """inotify drops the watch of a deleted folder; the watcher sets it again when it returns."""
    catalog, models, wakes = watched
    shutil.rmtree(models)
    wakes.wait_for(lambda m: {"yolo", "sentinel"} <= m.models, "the deleted tree")
    models.mkdir()
    (models / "early").mkdir()          # may land before the new watch: reported by the rescan
    wakes.wait_for(lambda m: m.rescan and "early" in m.models, "the rescan after re-watching")
    wakes.clear()
    (models / "sentinel").mkdir()
    sentinel_model(models, wakes)        # events flow again from the new watch


def test_missing_folders_are_reported_as_typed_errors(tmp_path):
    from modeld.errors import CatalogError, StoreError
    (tmp_path / "models").mkdir()
    with pytest.raises(CatalogError, match="folder does not exist"):
        Watcher(catalog_path=tmp_path / "nope" / "c.toml", models_dir=tmp_path / "models",
                wake=print).start()
    with pytest.raises(StoreError, match="does not exist"):
        Watcher(catalog_path=tmp_path / "c.toml", models_dir=tmp_path / "absent",
                wake=print).start()


def test_inotify_limits_become_a_store_error_with_a_hint():
    import errno
    from modeld.watcher import _watch_error
    err = _watch_error(Path("/m"), OSError(errno.ENOSPC, "No space left on device"))
    assert "inotify limit" in str(err) and "max_user_watches" in str(err)
    assert "\n" not in str(err)


# -- the debouncer itself, on a hand-driven clock (pure logic, no timing) ----------------------

A = WakeReason(models=frozenset({"a"}))
B = WakeReason(models=frozenset({"b"}))
CAT = WakeReason(catalog_changed=True)


def test_debouncer_fires_after_the_quiet_step():
    d = Debouncer(step_ms=125, max_ms=1000)   # binary-exact times keep the arithmetic exact
    assert d.due_at() is None and d.take(5.0) is None
    d(A, 0.0)
    d(B, 0.0625)
    assert d.due_at() == 0.1875
    assert d.take(0.1874) is None
    assert d.take(0.1875) == A | B
    assert d.due_at() is None and d.take(10.0) is None


def test_debouncer_max_hold_bounds_an_endless_burst():
    d = Debouncer(step_ms=125, max_ms=250)
    fired = []
    for i in range(100):                      # an event every 62.5 ms, never quiet for 125 ms
        now = i * 0.0625
        d(A if i % 2 else CAT, now)
        got = d.take(now)
        if got:
            fired.append((now, got))
    assert len(fired) >= 18                   # about every 250-312 ms, never starved by the burst
    assert all(reason == A | CAT for _, reason in fired)
    gaps = [b - a for (a, _), (b, _) in zip(fired, fired[1:])]
    assert max(gaps) <= 0.25 + 0.0625


def test_debouncer_rejects_knobs_that_make_no_sense():
    with pytest.raises(ValueError):
        Debouncer(step_ms=500, max_ms=100)
    with pytest.raises(ValueError):
        Debouncer(step_ms=-1, max_ms=100)


def test_wake_reason_merges():
    assert (A | B | CAT) == WakeReason(True, frozenset({"a", "b"}))
    assert (A | WakeReason(rescan=True)) == WakeReason(False, frozenset({"a"}), True)
    assert not WakeReason()
    assert CAT and A and WakeReason(rescan=True)


def test_a_manifest_edited_in_place_wakes_it(watched):
    """Only the daemon's own atomic writes are filtered out: a person (or a bad copy) writing
    manifest.json in place is damage to heal now, not at the next resync (issue 11)."""
    catalog, models, wakes = watched
    (models / "yolo" / MANIFEST_NAME).write_text("null")
    wakes.wait_for(lambda m: "yolo" in m.models, "an edited manifest")
