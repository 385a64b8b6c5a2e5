"""The scrub's schedule outlives restarts (robots are switched off every night), and a scrub
finds rot that keeps the stat. Real store, real files; the reconciler's scrub is awaited directly."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from modeld.reconciler import Reconciler
from modeld.store import DAMAGED, OK, SCRUB_STAMP_NAME
from tests.support.stores import reconciler_on_pulled_det, rot_in_place


def test_a_scrub_is_due_by_the_stamp_on_disk_not_by_uptime(tmp_path):
    reconciler, store, _ = reconciler_on_pulled_det(tmp_path)
    assert store.scrubbed_at() is None and reconciler.scrub_due()
    assert asyncio.run(reconciler.scrub()) == []
    assert abs(store.scrubbed_at() - time.time()) < 5 and not reconciler.scrub_due()
    # a restart (a new reconciler on the same store) keeps the schedule
    again = Reconciler(reconciler.settings, store=store, catalog=reconciler.catalog)
    assert not again.scrub_due()
    store.mark_scrubbed(at_s=time.time() - reconciler.settings.scrub_interval_s - 1)
    assert again.scrub_due()
    off = Reconciler(dataclasses.replace(reconciler.settings, scrub_interval_s=0), store=store,
                     catalog=reconciler.catalog)
    assert not off.scrub_due()
    assert (store.root / SCRUB_STAMP_NAME).is_file()


def test_a_scrub_marks_rot_damaged(tmp_path):
    reconciler, store, _ = reconciler_on_pulled_det(tmp_path)
    rot_in_place(store.model_dir("det") / "model.onnx")
    assert store.scan_model("det").files["model.onnx"].status == OK
    assert asyncio.run(reconciler.scrub()) == ["det/model.onnx"]
    state = store.scan_model("det")
    assert state.files["model.onnx"].status == DAMAGED
    assert state.files["config.json"].status == OK
