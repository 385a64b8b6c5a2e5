"""Field samples (issue 13), the pure parts and the samples area on a real folder: the
client's reservoir is uniform over the whole run and bounded; a sample is checked against the
model's input (format, dtype, shape, size); caps per node, per model and on disk hold; the
generation rule; a restart reads back what was kept. A model of several inputs takes one .npz
per call, read with the standard library and bounded before it is inflated; a dynamic-size input
takes the sides calibration would size it to. The .npy/.npz bytes are built here with the
standard library (the unit tier imports no numpy)."""

from __future__ import annotations

import io
import json
import math
import os
import random
import stat
import struct
import warnings
import zipfile

import pytest

from modeld.client import Reservoir
from modeld.protocol import pack_npz
from modeld.samples import (MAX_SAMPLE_BYTES, InputSignature, Limits, SampleRejected, Signature,
                            check_sample, generation_id, should_cut, signature_from_config)
from modeld.samplestore import SamplesArea

SIG = Signature((InputSignature("images", "float32", (1, 3, 8, 8)),))
#: a model of two inputs, the first of dynamic size (the catalog's input_size is 16)
PAIR = {"input_size": 16, "inputs": [
    {"name": "image", "shape": [1, 3, "height", "width"], "dtype": "float32"},
    {"name": "prior", "shape": ["batch", 8], "dtype": "int64"}]}
ITEM_BYTES = {"<f4": 4, "<f8": 8, "<i8": 8, "|u1": 1}


def npy(shape, descr="<f4", *, seed=0, fortran=False, version=1) -> bytes:
    """numpy's .npy format, written as numpy.save writes it (header padded to 64 bytes)."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    prefix = 10 if version == 1 else 12
    header += b" " * (-(prefix + len(header) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    data = random.Random(seed).randbytes(math.prod(shape) * ITEM_BYTES[descr])
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def sample(seed: int, shape=(1, 3, 8, 8), descr="<f4") -> bytes:
    return npy(shape, descr, seed=seed)


def npz(members: dict[str, bytes], *, compression=zipfile.ZIP_STORED, comment=b"") -> bytes:
    """An .npz as numpy.savez/savez_compressed would write it (names ``<key>.npy``)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a duplicate name is one of the cases
        for name, data in members.items():
            archive.writestr(name if name.endswith(".npy") else f"{name}.npy", data)
        archive.comment = comment
    return out.getvalue()


def pair(seed: int, side: int = 16) -> dict[str, bytes]:
    return {"image": npy((1, 3, side, side), seed=seed), "prior": npy((1, 8), "<i8", seed=seed)}


@pytest.fixture
def area(tmp_path):
    model = tmp_path / "det"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"inputs": [{"name": "images", "shape": [1, 3, 8, 8], "dtype": "float32"}]}))
    return SamplesArea(tmp_path, Limits(per_model=8, per_node=4, budget_bytes=1 << 20))


# ---- the reservoir (Algorithm R) --------------------------------------------------------------

def test_reservoir_is_uniform_over_the_whole_run_not_the_first_n():
    counts = [0] * 100
    for trial in range(2000):
        r = Reservoir(10, rng=random.Random(trial))
        for i in range(100):
            slot = r.offer()
            if slot is not None:
                r.put(slot, i)
        for i in r.items():
            counts[i] += 1
    # each of the 100 calls is kept with probability 10/100: 200 times in 2000 trials
    assert sum(counts) == 20000
    assert min(counts) > 140 and max(counts) < 265, (min(counts), max(counts))
    assert abs(sum(counts[:50]) - sum(counts[50:])) < 0.1 * sum(counts)


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
    kept = check_sample(sample(0), SIG, "det")
    assert kept.suffix == ".npy" and kept.data == sample(0)
    assert check_sample(sample(0, (3, 8, 8)), SIG, "det").suffix == ".npy"
    assert check_sample(npy((1, 3, 8, 8), version=2), SIG, "det").suffix == ".npy"


@pytest.mark.parametrize("data, code", [
    (b"not numpy at all", "format"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}", "format"),
    (npy((1, 3, 8, 8), "<f8"), "dtype"),
    (npy((1, 3, 64, 64)), "size"),
    (npy((1, 3, 16, 16)), "shape"),
    (npy((1, 1, 8, 8)), "shape"),
    (npy((1, 3, 8, 8))[:-4], "size"),
    (npy((1, 3, 8, 8), fortran=True), "format"),
    (b"\x93NUMPY\x01\x00\x30\x00" + b"__import__('os').system('true')".ljust(48), "format"),
])
def test_garbage_gets_a_typed_one_line_refusal(data, code):
    with pytest.raises(SampleRejected) as caught:
        check_sample(data, SIG, "det")
    assert caught.value.code == code
    assert "\n" not in str(caught.value)


def test_the_signature_comes_from_config_json_with_every_input():
    sig = signature_from_config({"inputs": [{"name": "x", "shape": ["batch", 3, 320, 320],
                                             "dtype": "float32"}]}, "m").inputs[0]
    assert sig.shape == (None, 3, 320, 320) and sig.max_bytes == 3 * 320 * 320 * 4
    two = signature_from_config(PAIR, "m")
    assert two.names == ("image", "prior")
    # a dynamic side is the catalog's input_size: the size of a sample is known again
    assert two.inputs[0].symbolic_sides == (2, 3) and two.inputs[0].max_bytes == 3 * 16 * 16 * 4
    for bad in ({"inputs": [{"name": "a", "shape": [1], "dtype": "float32"}] * 2},
                {"inputs": [{"shape": [1], "dtype": "float32"}]},
                {"inputs": [{"name": "a", "shape": None, "dtype": "float32"}]}):
        with pytest.raises(SampleRejected) as caught:
            signature_from_config(bad, "m")
        assert caught.value.code == "model"


# ---- several inputs: one .npz per call ---------------------------------------------------------

def test_a_multi_input_sample_is_one_npz_of_every_input_repacked_the_same_whatever_zipped_it():
    sig = signature_from_config(PAIR, "m")
    stored = check_sample(npz(pair(0)), sig, "m")
    deflated = check_sample(npz(pair(0), compression=zipfile.ZIP_DEFLATED), sig, "m")
    reordered = check_sample(pack_npz(dict(reversed(pair(0).items()))), sig, "m")
    assert stored.suffix == ".npz" and stored == deflated == reordered
    with zipfile.ZipFile(io.BytesIO(stored.data)) as archive:
        assert archive.namelist() == ["image.npy", "prior.npy"]
        assert archive.read("prior.npy") == pair(0)["prior"]
    # the batch axis may be left out, as with .npy
    assert check_sample(npz({"image": npy((3, 16, 16)), "prior": npy((8,), "<i8")}), sig, "m")


def test_a_one_input_model_takes_a_one_member_npz_and_keeps_it_as_its_npy():
    kept = check_sample(npz({"images": sample(3)}), SIG, "det")
    assert kept.suffix == ".npy" and kept.data == sample(3)


def _stored_member_declaring(size: int) -> bytes:
    """An archive whose first member's headers declare ``size`` bytes (a bomb's shape)."""
    data = bytearray(npz(pair(0)))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + offset:at + offset + 4] = struct.pack("<I", size)
    return bytes(data)


@pytest.mark.parametrize("build, code, words", [
    (lambda: npy((1, 3, 16, 16)), "format", "send one .npz"),
    (lambda: npz({"image": pair(0)["image"]}), "format", "1 members"),
    (lambda: npz({"image": pair(0)["image"], "other": pair(0)["prior"]}), "format", "other.npy"),
    (lambda: npz({**pair(0), "extra": npy((1,))}), "format", "3 members"),
    (lambda: npz({"image.npy": pair(0)["image"], "image": pair(0)["prior"]}), "format", "image"),
    (lambda: npz({"image": npy((1, 3, 8, 8)), "prior": pair(0)["prior"]}), "shape", "16"),
    (lambda: npz({"image": pair(0)["image"], "prior": npy((1, 8))}), "dtype", "int64"),
    (lambda: npz({"image": pair(0)["image"], "prior": b"not an array"}), "format", ".npy"),
    (lambda: npz({"image": b"\0" * (20 << 20), "prior": pair(0)["prior"]},
                 compression=zipfile.ZIP_DEFLATED), "size", "declares"),
    (lambda: _stored_member_declaring(MAX_SAMPLE_BYTES), "size", "declares"),
    (lambda: npz(pair(0), compression=zipfile.ZIP_BZIP2), "format", "deflate"),
    (lambda: npz({str(i): npy((1,)) for i in range(5000)}), "format", "5000 members"),
    (lambda: npz(pair(0), comment=b"hello"), "format", "end record"),
    (lambda: npz(pair(0))[:-30] + npz(pair(0))[-22:], "format", "does not read"),
    (lambda: b"PK\x03\x04" + b"\0" * 40, "format", "end record"),
])
def test_a_bad_npz_is_refused_in_one_line_before_it_is_inflated(build, code, words):
    with pytest.raises(SampleRejected) as caught:
        check_sample(build(), signature_from_config(PAIR, "m"), "m")
    assert caught.value.code == code, str(caught.value)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def _with_zip64_end(data: bytes, *, entries: int | None = None) -> bytes:
    """The same archive ended as a zip64 writer ends it: a zip64 end record and its locator
    before an end record that defers to them (``entries`` overrides the count they state)."""
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack("<4sHHHHIIH", data[-22:])
    count = count if entries is None else entries
    body = data[:-22]
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                         cd_size, cd_offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(body), 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                      0xFFFFFFFF, 0)
    return body + record + locator + end


def test_a_zip64_ended_npz_is_read_by_the_count_its_zip64_record_states():
    sig = signature_from_config(PAIR, "m")
    assert check_sample(_with_zip64_end(npz(pair(0))), sig, "m") == check_sample(
        npz(pair(0)), sig, "m")
    with pytest.raises(SampleRejected, match="5000 members") as caught:
        check_sample(_with_zip64_end(npz(pair(0)), entries=5000), sig, "m")
    assert caught.value.code == "format"


def test_a_dynamic_size_input_takes_the_sides_calibration_sizes_it_to():
    dynamic = {"inputs": [{"name": "x", "shape": ["b", 3, "h", "w"], "dtype": "float32"}]}
    sized = signature_from_config({**dynamic, "input_size": 64}, "m")
    assert check_sample(npy((1, 3, 64, 64)), sized, "m").suffix == ".npy"
    for shape in ((1, 3, 8, 8), (1, 3, 64, 32), (1, 3, 128, 128)):
        with pytest.raises(SampleRejected) as caught:
            check_sample(npy(shape), sized, "m")
        assert caught.value.code in ("shape", "size")
    with pytest.raises(SampleRejected, match="must be 64 .the catalog's input_size") as caught:
        check_sample(npy((1, 3, 8, 8)), sized, "m")
    assert caught.value.code == "shape"
    # no input_size: an image's own side at a stride of 32, as a calibration image is sized
    free = signature_from_config(dynamic, "m")
    assert check_sample(npy((1, 3, 96, 64)), free, "m").suffix == ".npy"
    for shape in ((1, 3, 8, 8), (1, 3, 100, 64)):
        with pytest.raises(SampleRejected, match="multiple of 32") as caught:
            check_sample(npy(shape), free, "m")
        assert caught.value.code == "shape"
    # NHWC too; a symbolic dim that is not a side is not a side
    nhwc = signature_from_config({"inputs": [{"name": "x", "shape": [1, "h", "w", 3],
                                              "dtype": "uint8"}], "input_size": 32}, "m")
    assert check_sample(npy((1, 32, 32, 3), "|u1"), nhwc, "m")
    with pytest.raises(SampleRejected, match="must be 32"):
        check_sample(npy((1, 8, 8, 3), "|u1"), nhwc, "m")
    tokens = signature_from_config({"inputs": [{"name": "ids", "shape": [1, "seq"],
                                                "dtype": "int64"}], "input_size": 32}, "m")
    assert check_sample(npy((1, 7), "<i8"), tokens, "m")


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


def test_npz_samples_are_kept_counted_and_cut_into_generations_like_npy(tmp_path):
    model = tmp_path / "pair"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(PAIR))
    area = SamplesArea(tmp_path, Limits(per_model=8, per_node=3, budget_bytes=1 << 20))
    sig = area.signature("pair")
    answers = [area.add("pair", "cam", npz(pair(i)), signature=sig, needed=3) for i in range(3)]
    assert answers[-1]["generation_cut"] and answers[-1]["count"] == 3
    # the same arrays deflated are the same sample
    again = area.add("pair", "cam", npz(pair(1), compression=zipfile.ZIP_DEFLATED),
                     signature=sig, needed=3)
    assert again["stored"] is False
    folder = tmp_path / "pair" / "samples"
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 3 and not list(folder.glob("*.npy"))
    assert {r["bytes"] for r in area.rows("pair")} == {files[0].stat().st_size}
    snapshot = area.state("pair", 3).folder
    assert sorted(os.listdir(snapshot)) == sorted(f.name for f in files)   # a calibration folder
    for f in files:
        assert not stat.S_IMODE(f.stat().st_mode) & 0o007
    # per node cap: the newest replaces the oldest, whose file goes (the snapshot keeps its link)
    area.add("pair", "cam", npz(pair(9)), signature=sig, needed=3)
    assert len(list(folder.glob("*.npz"))) == 3 and len(os.listdir(snapshot)) == 3
    assert area.disk_bytes() == 4 * files[0].stat().st_size
    # a restart reads the .npz pool and its generation back, the index lost or not
    again = SamplesArea(tmp_path, area.limits)
    assert again.state("pair", 3) == area.state("pair", 3)
    (folder / "index.json").unlink()
    assert SamplesArea(tmp_path, area.limits).state("pair", 3).count == 3
