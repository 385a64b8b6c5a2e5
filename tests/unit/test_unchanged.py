"""The identity contract (modeld.unchanged): an unchanged model is the very same object from the
catalog and the store through the planner and the views, and is skipped; a changed one is a
new object, and is planned and viewed again."""

from __future__ import annotations

import dataclasses
import os

from modeld.catalog import parse_catalog
from modeld.inventory import Inventory
from modeld.layout import FP32_FILE
from modeld.manifest import FileRecord, Manifest, Provenance
from modeld.planning import PlanContext, Planner, plan_model
from modeld.store import Store, sha256_file
from modeld.unchanged import MISSING, PassMemo, differs, same
from modeld.views import ViewBuilder

CTX = PlanContext(providers=("CPUExecutionProvider",), onnx_version="1.0", onnxruntime_version="1.2")
CATALOG = parse_catalog('[[models]]\nname = "det"\nrepo = "acme/det"\nfilename = "model.onnx"\n')


def test_a_pass_memo_answers_for_the_same_objects_only():
    memo: PassMemo[str] = PassMemo()
    entry, state = object(), object()
    assert memo.recall("det", (entry, state)) is MISSING
    memo.remember("det", (entry, state), (), "planned")
    memo.end_pass()
    assert memo.recall("det", (entry, state)) == "planned"           # same objects: skipped
    assert memo.recall("det", (entry, object())) is MISSING          # a new state: recomputed
    assert memo.recall("det", (entry, state), ("refresh",)) is MISSING   # another key
    memo.end_pass()                                                  # "det" not seen this pass
    assert memo.recall("det", (entry, state)) is MISSING


def test_differs_is_identity_first_then_equality():
    a = Manifest(name="det")
    assert not differs(a, a) and same(a, a)
    assert not differs(a, Manifest(name="det")) and not same(a, Manifest(name="det"))
    assert differs(a, Manifest(name="other")) and differs(None, a)


def _pulled(tmp_path) -> Store:
    store = Store(tmp_path / "models")
    folder = store.model_dir("det")
    folder.mkdir(parents=True)
    (folder / FP32_FILE).write_bytes(b"fp32 bytes")
    st = os.stat(folder / FP32_FILE)
    record = FileRecord(FP32_FILE, sha256_file(folder / FP32_FILE), st.st_size, st.st_mtime_ns,
                        st.st_ino, provenance=Provenance("acme/det", "model.onnx", None,
                                                         "a" * 40, '"etag"'))
    store.write_manifest(Manifest(name="det", files={FP32_FILE: record}))
    return store


def test_unchanged_objects_are_skipped_and_changed_ones_recomputed(tmp_path):
    store = _pulled(tmp_path)
    planner, builder = Planner(), ViewBuilder()

    def one_pass():
        inventory = store.scan(CATALOG.entries)
        actions = planner.plan(CATALOG, inventory, CTX)
        views = builder.build(CATALOG, inventory, CTX, {}, frozenset(), str(store.root))
        return inventory.models["det"], actions[0], views["det"]

    state, action, view = one_pass()
    assert action.reason == "config.json not written yet"
    # Nothing changed: the store returns the same state, so plan and view are the same objects.
    again = one_pass()
    assert again[0] is state and again[1] is action and again[2] is view

    # The file's bytes change under the same size: a new state, planned and viewed again.
    (store.model_dir("det") / FP32_FILE).write_bytes(b"FP32 BYTES")
    changed, replanned, reviewed = one_pass()
    assert changed is not state and not changed.intact(FP32_FILE)
    assert replanned is not action and replanned.reason == "model.onnx: sha256 differs from the manifest"
    assert reviewed is not view and differs(view, reviewed)


def test_an_equal_but_new_state_is_planned_again_never_wrongly_skipped(tmp_path):
    store = _pulled(tmp_path)
    planner = Planner()
    inventory = store.scan(CATALOG.entries)
    first = planner.plan(CATALOG, inventory, CTX)[0]
    copy = dataclasses.replace(inventory.models["det"])
    second = planner.plan(CATALOG, Inventory(models={"det": copy}), CTX)[0]
    assert second is not first and second == first == plan_model(CATALOG.entries["det"], copy, CTX)
