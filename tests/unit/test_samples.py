"""Field samples (issue 13), the pure parts and the samples area on a real folder: the
client's reservoir is uniform over the whole run and bounded; a sample is checked against the
model's input (format, dtype, shape, size); caps per node, per model and on disk hold; the
generation rule; a restart reads back what was kept."""

from __future__ import annotations

import io
import json
import os
import random
import stat

import numpy as np
import pytest

from modeld.client import Reservoir
from modeld.samples import (InputSignature, Limits, SampleRejected, check_sample, generation_id,
                            should_cut, signature_from_config)
from modeld.samplestore import SamplesArea

SIG = InputSignature("images", "float32", (1, 3, 8, 8))


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def sample(seed: int, shape=(1, 3, 8, 8), dtype=np.float32) -> bytes:
    return npy(np.random.default_rng(seed).random(shape).astype(dtype))


@pytest.fixture
def area(tmp_path):
    model = tmp_path / "det"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "dtype": "float32"}]}))
    return SamplesArea(tmp_path, Limits(per_model=8, per_node=4, budget_bytes=1 << 20))


# ---- the reservoir (Algorithm R) --------------------------------------------------------------

def test_reservoir_is_uniform_over_the_whole_run_not_the_first_n():
    counts = np.zeros(100)
    for trial in range(2000):
        r = Reservoir(10, rng=random.Random(trial))
        for i in range(100):
            slot = r.offer()
            if slot is not None:
                r.put(slot, i)
        for i in r.items():
            counts[i] += 1
    # each of the 100 calls is kept with probability 10/100: 200 times in 2000 trials
    assert counts.sum() == 20000
    assert counts.min() > 140 and counts.max() < 265, (counts.min(), counts.max())
    assert abs(counts[:50].sum() - counts[50:].sum()) < 0.1 * counts.sum()


def test_reservoir_is_bounded_and_counts_what_it_saw():
    r = Reservoir(5, rng=random.Random(1))
    for i in range(10_000):
        slot = r.offer()
        if slot is not None:
            r.put(slot, i)
    assert len(r.items()) == 5 and r.seen == 10_000
    # late calls still get in (a run's end is as likely as its start)
    assert max(r.items()) > 5000


# ---- validation ---------------------------------------------------------------------------------

def test_a_sample_that_fits_the_input_passes_with_or_without_its_batch_axis():
    assert check_sample(sample(0), SIG, "det") == ("<f4", (1, 3, 8, 8))
    assert check_sample(sample(0, (3, 8, 8)), SIG, "det")[1] == (1, 3, 8, 8)


@pytest.mark.parametrize("data, code", [
    (b"not numpy at all", "format"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}", "format"),
    (npy(np.zeros((1, 3, 8, 8), np.float64)), "dtype"),
    (npy(np.zeros((1, 3, 64, 64), np.float32)), "size"),
    (npy(np.zeros((1, 3, 16, 16), np.float32)), "shape"),
    (npy(np.zeros((1, 1, 8, 8), np.float32)), "shape"),
    (npy(np.zeros((1, 3, 8, 8), np.float32))[:-4], "size"),
    (npy(np.asfortranarray(np.zeros((1, 3, 8, 8), np.float32).transpose(0, 1, 3, 2))), "format"),
    (b"\x93NUMPY\x01\x00\x30\x00" + b"__import__('os').system('true')".ljust(48), "format"),
])
def test_garbage_gets_a_typed_one_line_refusal(data, code):
    with pytest.raises(SampleRejected) as caught:
        check_sample(data, SIG, "det")
    assert caught.value.code == code
    assert "\n" not in str(caught.value)


def test_the_signature_comes_from_config_json_and_multi_input_models_are_refused():
    sig = signature_from_config({"inputs": [{"name": "x", "shape": ["batch", 3, 320, 320],
                                             "dtype": "float32"}]}, "m")
    assert sig.shape == (None, 3, 320, 320) and sig.max_bytes == 3 * 320 * 320 * 4
    with pytest.raises(SampleRejected, match="2 inputs"):
        signature_from_config({"inputs": [{"name": "a"}, {"name": "b"}]}, "m")


# ---- the generation rule ------------------------------------------------------------------------

def test_a_first_generation_needs_enough_samples_then_a_quarter_new():
    pool = [f"{i:064x}" for i in range(32)]
    assert not should_cut(pool[:31], None, 32)
    assert should_cut(pool, None, 32)
    used = set(pool)
    changed = pool[8:] + [f"{i:064x}" for i in range(100, 107)]    # 7 of 31 new: < 25%
    assert not should_cut(changed, used, 32)
    changed = pool[8:] + [f"{i:064x}" for i in range(100, 108)]    # 8 of 32 new: 25%
    assert should_cut(changed, used, 32)
    assert generation_id(pool) == generation_id(reversed(pool))


# ---- the area on disk ---------------------------------------------------------------------------

def test_samples_are_kept_private_deduplicated_and_cut_into_a_generation(area, tmp_path):
    sig = area.signature("det")
    answers = [area.add("det", "cam", sample(i), signature=sig, needed=3) for i in range(3)]
    assert [a["count"] for a in answers] == [1, 2, 3]
    assert answers[-1]["generation_cut"] and answers[-1]["generation"]
    again = area.add("det", "cam", sample(0), signature=sig, needed=3)
    assert again["stored"] is False and again["count"] == 3
    files = sorted((tmp_path / "det" / "samples").glob("*.npy"))
    assert len(files) == 3
    for f in files:
        assert not stat.S_IMODE(f.stat().st_mode) & 0o007, oct(f.stat().st_mode)
    state = area.state("det", 3)
    assert state.count == 3 and state.folder and len(os.listdir(state.folder)) == 3


def test_one_node_cannot_crowd_out_another(area):
    sig = area.signature("det")
    for i in range(20):
        area.add("det", "greedy", sample(i), signature=sig, needed=100)
    for i in range(4):
        area.add("det", "quiet", sample(1000 + i), signature=sig, needed=100)
    nodes = [r["node"] for r in area.rows("det")]
    assert nodes.count("greedy") == 4 and nodes.count("quiet") == 4   # per_node = 4


def test_a_full_model_gives_way_to_a_node_below_its_share(tmp_path, area):
    area.limits = Limits(per_model=6, per_node=6, budget_bytes=1 << 20)
    sig = area.signature("det")
    for i in range(6):
        area.add("det", "a", sample(i), signature=sig, needed=100)
    for i in range(3):
        area.add("det", "b", sample(100 + i), signature=sig, needed=100)
    nodes = [r["node"] for r in area.rows("det")]
    assert nodes.count("a") == 3 and nodes.count("b") == 3
    with pytest.raises(SampleRejected) as caught:   # b holds as many as a: nobody gives way
        area.add("det", "b", sample(200), signature=sig, needed=100)
    assert caught.value.code == "full"


def test_the_disk_budget_holds(area):
    one = len(sample(0))
    area.limits = Limits(per_model=100, per_node=100, budget_bytes=3 * one + 10)
    sig = area.signature("det")
    for i in range(3):
        area.add("det", "n", sample(i), signature=sig, needed=100)
    with pytest.raises(SampleRejected) as caught:
        area.add("det", "n", sample(3), signature=sig, needed=100)
    assert caught.value.code == "budget"
    assert area.disk_bytes() <= 3 * one + 10


def test_a_restart_reads_back_the_samples_their_nodes_and_the_generation(area, tmp_path):
    sig = area.signature("det")
    for i in range(4):
        area.add("det", f"node-{i % 2}", sample(i), signature=sig, needed=4)
    before = area.state("det", 4)
    again = SamplesArea(tmp_path, area.limits)
    assert again.state("det", 4) == before
    assert [r["node"] for r in again.rows("det")] == [r["node"] for r in area.rows("det")]
    (tmp_path / "det" / "samples" / "index.json").write_text("{broken")
    third = SamplesArea(tmp_path, area.limits)
    assert third.state("det", 4).count == 4           # rebuilt from the files
    assert third.clear("det") == 4
    assert not (tmp_path / "det" / "samples").exists()
    assert third.state("det", 4).count == 0
