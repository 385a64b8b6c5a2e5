"""workers.inputs: image decoding (PNG filters, Netpbm), presets, calibration folders of images,
.npy and .npz files, and seeded synthetic inputs from a model's signature."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from modeld.errors import PermanentError, QuantizeError
from modeld.testing import onnx_models
from modeld.testing.images import write_png, write_pnm
from modeld.workers.inputs import (PRESETS, CalibrationError, model_inputs, read_image,
                                   sample_inputs)


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(onnx_models.tiny_cnn(input_size=32))
    return path


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(onnx_models.matmul_mlp(features=64))
    return path


def _model(tmp_path, inputs, name="m.onnx"):
    """A model whose graph inputs are ``inputs`` [(name, elem_type, shape)], each passed through."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


# ---- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4)])
def test_png_decodes_every_filter_and_colour_type(tmp_path, channels, filters):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (7, 9, channels), dtype=np.uint8)
    got = read_image(write_png(tmp_path / "i.png", pixels, filters=filters))
    rgb = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    np.testing.assert_array_equal(got, rgb)


def test_png_16_bit_and_palette(tmp_path):
    deep = np.arange(5 * 6 * 3, dtype=np.uint16).reshape(5, 6, 3) * 1000
    got = read_image(write_png(tmp_path / "deep.png", deep, filters=(4, 1)))
    np.testing.assert_array_equal(got, (deep >> 8).astype(np.uint8))
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    got = read_image(write_png(tmp_path / "pal.png", index, palette=palette, filters=(2,)))
    np.testing.assert_array_equal(got, palette[index])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 12), width=st.integers(1, 12), channels=st.sampled_from([1, 3, 4]),
       filters=st.lists(st.integers(0, 4), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_png_round_trip_property(tmp_path, height, width, channels, filters, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    got = read_image(write_png(tmp_path / "p.png", pixels, filters=tuple(filters)))
    expected = pixels[..., :3] if channels >= 3 else np.repeat(pixels, 3, axis=2)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("ascii_format", [False, True])
def test_netpbm_colour_and_grey_with_comments(tmp_path, ascii_format):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    got = read_image(write_pnm(tmp_path / "c.ppm", rgb, ascii_format=ascii_format, comment="hi"))
    np.testing.assert_array_equal(got, rgb)
    grey = rgb[..., 0]
    got = read_image(write_pnm(tmp_path / "g.pgm", grey, ascii_format=ascii_format))
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, axis=2))


def test_jpeg_without_pillow_is_a_clear_error(tmp_path, cnn):
    pytest.importorskip("numpy")
    try:
        import PIL  # noqa: F401
        pytest.skip("Pillow is installed here: JPEG decodes through it")
    except ImportError:
        pass
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    with pytest.raises(CalibrationError, match="a.jpg: only PNG and PPM/PGM") as info:
        sample_inputs(cnn, calibration=str(folder), preset="yolo", input_size=None, count=1)
    assert "convert the images to PNG" in str(info.value)


def test_a_corrupt_image_names_the_file(tmp_path, cnn):
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\x0dIHDR" + b"\1" * 8)
    with pytest.raises(CalibrationError, match="broken.png"):
        sample_inputs(cnn, calibration=str(folder), preset=None, input_size=None, count=1)


# ---- calibration folders ----------------------------------------------------------------------

def test_images_are_resized_and_normalised_by_the_preset(tmp_path, cnn):
    folder = tmp_path / "cal"
    folder.mkdir()
    colour = np.array([200, 100, 50], np.uint8)
    write_png(folder / "a.png", np.tile(colour, (50, 70, 1)), filters=(1, 4))
    write_pnm(folder / "b.ppm", np.tile(colour, (20, 20, 1)))
    (folder / "notes.txt").write_text("ignored")
    feeds, synthetic = sample_inputs(cnn, calibration=str(folder), preset="imagenet",
                                     input_size=None, count=8)
    assert synthetic is False and len(feeds) == 2
    preset = PRESETS["imagenet"]
    expected = (colour / 255.0 - np.array(preset.mean)) / np.array(preset.std)
    for feed in feeds:
        x = feed["images"]
        assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32  # the model's fixed size
        np.testing.assert_allclose(x[0, :, 16, 16], expected, atol=1e-5)


def test_yolo_preset_letterboxes_with_grey_padding(tmp_path, cnn):
    folder = tmp_path / "cal"
    folder.mkdir()
    write_png(folder / "wide.png", np.zeros((10, 40, 3), np.uint8))  # 4:1 -> 8 rows of image
    (feed,), _ = sample_inputs(cnn, calibration=str(folder), preset="yolo", input_size=None, count=1)
    x = feed["images"][0]
    np.testing.assert_allclose(x[:, 0, :], 114 / 255, atol=1e-6)    # padding band on top
    np.testing.assert_allclose(x[:, 16, :], 0.0, atol=1e-6)         # the (black) picture
    ocr, _ = sample_inputs(cnn, calibration=str(folder), preset="ocr", input_size=None, count=1)
    np.testing.assert_allclose(ocr[0]["images"][0], -1.0, atol=1e-6)  # stretched, (0-0.5)/0.5


def test_symbolic_size_model_takes_input_size_or_the_image_size(tmp_path):
    path = _model(tmp_path, [("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    folder = tmp_path / "cal"
    folder.mkdir()
    write_pnm(folder / "a.ppm", np.full((100, 70, 3), 9, np.uint8))
    (feed,), _ = sample_inputs(path, calibration=str(folder), preset="none", input_size=64, count=1)
    assert feed["x"].shape == (1, 3, 64, 64)
    np.testing.assert_allclose(feed["x"], 9 / 255, rtol=1e-6)  # "none": only scaled to [0, 1]
    (feed,), _ = sample_inputs(path, calibration=str(folder), preset="none", input_size=None, count=1)
    assert feed["x"].shape == (1, 3, 96, 96)  # the image's longer side, down to a stride of 32


def test_nhwc_uint8_and_grey_inputs(tmp_path):
    path = _model(tmp_path, [("img", TensorProto.UINT8, [1, 16, 16, 3])])
    folder = tmp_path / "cal"
    folder.mkdir()
    write_pnm(folder / "a.ppm", np.full((8, 8, 3), [10, 20, 30], np.uint8))
    (feed,), _ = sample_inputs(path, calibration=str(folder), preset="imagenet", input_size=None,
                               count=1)
    assert feed["img"].shape == (1, 16, 16, 3) and feed["img"].dtype == np.uint8
    np.testing.assert_array_equal(feed["img"][0, 3, 3], [10, 20, 30])  # raw pixels, no normalising
    grey = _model(tmp_path, [("g", TensorProto.FLOAT, [1, 1, 8, 8])], name="grey.onnx")
    (feed,), _ = sample_inputs(grey, calibration=str(folder), preset="none", input_size=None, count=1)
    assert feed["g"].shape == (1, 1, 8, 8)
    np.testing.assert_allclose(feed["g"] * 255, round(0.299 * 10 + 0.587 * 20 + 0.114 * 30),
                               atol=1)


def test_npy_and_npz_files(tmp_path, mlp):
    folder = tmp_path / "cal"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "a.npy", rng.standard_normal(64).astype(np.float32))        # no batch axis
    np.save(folder / "b.npy", rng.standard_normal((3, 64)).astype(np.float64))   # a batch of 3
    np.savez(folder / "c.npz", input=rng.standard_normal((1, 64)).astype(np.float32))
    feeds, synthetic = sample_inputs(mlp, calibration=str(folder), preset=None, input_size=None,
                                     count=10)
    assert synthetic is False
    assert [f["input"].shape for f in feeds] == [(1, 64), (3, 64), (1, 64)]
    assert all(f["input"].dtype == np.float32 for f in feeds)


@pytest.mark.parametrize("write, message", [
    (lambda d: np.save(d / "a.npy", np.zeros((1, 63), np.float32)), "does not fit input 'input'"),
    (lambda d: np.savez(d / "a.npz", other=np.zeros((1, 64), np.float32)), "lacks input"),
    (lambda d: (d / "a.npy").write_bytes(b"not numpy"), "cannot read calibration file a.npy"),
])
def test_bad_tensor_files_name_the_problem(tmp_path, mlp, write, message):
    folder = tmp_path / "cal"
    folder.mkdir()
    write(folder)
    with pytest.raises(CalibrationError, match=message):
        sample_inputs(mlp, calibration=str(folder), preset=None, input_size=None, count=1)


def test_images_for_a_model_that_takes_no_images(tmp_path, mlp):
    folder = tmp_path / "cal"
    folder.mkdir()
    write_pnm(folder / "a.ppm", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CalibrationError, match="not an image batch"):
        sample_inputs(mlp, calibration=str(folder), preset=None, input_size=None, count=1)


def test_npy_for_a_multi_input_model_asks_for_npz(tmp_path):
    path = _model(tmp_path, [("a", TensorProto.FLOAT, [1, 2]), ("b", TensorProto.FLOAT, [1, 2])])
    folder = tmp_path / "cal"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(CalibrationError, match="has 2 inputs") as info:
        sample_inputs(path, calibration=str(folder), preset=None, input_size=None, count=1)
    assert ".npz" in str(info.value)
    np.savez(folder / "x.npz", a=np.ones((1, 2), np.float32), b=np.zeros((1, 2), np.float32))
    (folder / "x.npy").unlink()
    (feed,), _ = sample_inputs(path, calibration=str(folder), preset=None, input_size=None, count=1)
    assert set(feed) == {"a", "b"}


def test_missing_or_empty_folder_and_unknown_preset(tmp_path, cnn):
    with pytest.raises(CalibrationError, match="does not exist"):
        sample_inputs(cnn, calibration=str(tmp_path / "nope"), preset=None, input_size=None, count=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no usable files"):
        sample_inputs(cnn, calibration=str(tmp_path / "empty"), preset=None, input_size=None, count=1)
    with pytest.raises(CalibrationError, match="unknown preprocessing preset 'coco'") as info:
        sample_inputs(cnn, calibration=None, preset="coco", input_size=None, count=1)
    assert "imagenet" in str(info.value)


def test_calibration_error_is_a_permanent_quantize_error_and_pickles():
    err = CalibrationError("bad file", entry="yolo", hint="fix it")
    assert isinstance(err, QuantizeError) and isinstance(err, PermanentError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CalibrationError and str(again) == str(err) == "yolo: bad file (fix it)"


def test_a_seeded_subset_of_a_large_folder(tmp_path, mlp):
    folder = tmp_path / "cal"
    folder.mkdir()
    for i in range(20):
        np.save(folder / f"{i:02d}.npy", np.full((1, 64), i, np.float32))
    pick = lambda seed: [int(f["input"][0, 0]) for f in sample_inputs(  # noqa: E731
        mlp, calibration=str(folder), preset=None, input_size=None, count=5, seed=seed)[0]]
    assert pick(0) == pick(0) and len(set(pick(0))) == 5 and pick(0) == sorted(pick(0))
    assert pick(0) != pick(1)


# ---- synthetic inputs -------------------------------------------------------------------------

def test_synthetic_inputs_follow_the_signature_and_the_seed(tmp_path):
    path = _model(tmp_path, [("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                             ("ids", TensorProto.INT64, ["N", "T"]),
                             ("mask", TensorProto.BOOL, [1, 4])])
    feeds, synthetic = sample_inputs(path, calibration=None, preset="yolo", input_size=96, count=3)
    assert synthetic is True and len(feeds) == 3
    assert feeds[0]["x"].shape == (1, 3, 96, 96) and feeds[0]["x"].dtype == np.float32
    assert 0.0 <= feeds[0]["x"].min() and feeds[0]["x"].max() <= 1.0   # the preset's range
    assert feeds[0]["ids"].shape == (1, 96) and feeds[0]["ids"].dtype == np.int64
    assert feeds[0]["mask"].dtype == np.bool_
    again, _ = sample_inputs(path, calibration=None, preset="yolo", input_size=96, count=3)
    other, _ = sample_inputs(path, calibration=None, preset="yolo", input_size=96, count=3, seed=7)
    np.testing.assert_array_equal(feeds[2]["x"], again[2]["x"])
    assert not np.array_equal(feeds[0]["x"], other[0]["x"])
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])
    small, _ = sample_inputs(path, calibration=None, preset=None, input_size=None, count=1)
    assert small[0]["x"].shape == (1, 3, 64, 64) and small[0]["ids"].shape == (1, 1)


def test_model_inputs_skip_initializers(tmp_path, mlp):
    specs = model_inputs(mlp)
    assert [(s.name, s.dtype, s.shape) for s in specs] == [("input", np.dtype(np.float32), ("N", 64))]
    with pytest.raises(CalibrationError, match="count must be >= 1"):
        sample_inputs(mlp, calibration=None, preset=None, input_size=None, count=0)


# ---- held-out samples -------------------------------------------------------------------------

@pytest.mark.parametrize("files", [1, 2, 5, 16, 60])
def test_variants_are_proven_on_samples_they_were_not_calibrated_on(tmp_path, mlp, files):
    """A calibration folder is split: calibration never sees the held-out files, the agreement
    check only sees them (both deterministic). A single file has to serve as both."""
    folder = tmp_path / "cal"
    folder.mkdir()
    for i in range(files):
        np.save(folder / f"sample-{i}.npy", np.full((1, 64), float(i), np.float32))

    def ids(split, count=100, seed=0):
        feeds, synthetic = sample_inputs(mlp, calibration=str(folder), preset=None,
                                         input_size=None, count=count, seed=seed, split=split)
        assert not synthetic
        return {int(next(iter(f.values()))[0, 0]) for f in feeds}

    calibration, holdout = ids("calibration"), ids("holdout")
    assert calibration | holdout == set(range(files)) == ids("all")
    if files == 1:
        assert calibration == holdout == {0}
    else:
        assert calibration.isdisjoint(holdout)
        assert 1 <= len(holdout) <= max(1, min(8, files // 5))
    assert ids("holdout", count=2, seed=7) <= holdout
    assert ids("calibration", count=3, seed=7) <= calibration


def test_synthetic_inputs_for_an_ocr_model_are_text_like_pages(cnn):
    """Without calibration data an OCR detector gets pages of dark strokes on light paper (it
    answers ~0 to colour fields, which would prove nothing); other presets get colour fields."""
    feeds, synthetic = sample_inputs(cnn, calibration=None, preset="ocr", input_size=32, count=2)
    assert synthetic
    page = feeds[0]["images"][0]                     # CHW, (x/255 - 0.5) / 0.5
    assert page.shape == (3, 32, 32)
    assert np.median(page) > 0.5                     # mostly light paper
    assert (page < -0.3).mean() > 0.02               # with dark ink on it
    assert not np.array_equal(feeds[0]["images"], feeds[1]["images"])
    colour, _ = sample_inputs(cnn, calibration=None, preset="yolo", input_size=32, count=1)
    assert np.median(colour[0]["images"]) < 0.75      # colour fields, not paper (in [0, 1])


def test_a_field_samples_generation_is_read_without_following_symlinks_out(tmp_path, mlp):
    """A generation folder is the daemon's own (models/<name>/samples/gen-<id>): a symlink
    planted in it, or in its place, never makes a worker read outside models/."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.npy"
    np.save(secret, np.full((1, 64), 7.0, np.float32))
    gen = tmp_path / "models" / "mlp" / "samples" / "gen-0123456789abcdef"
    gen.mkdir(parents=True)
    np.save(gen / "a.npy", np.zeros((1, 64), np.float32))
    (gen / "b.npy").symlink_to(secret)
    feeds, synthetic = read_all(mlp, gen)
    assert not synthetic and len(feeds) == 1 and not feeds[0]["input"].any()
    # the same symlink in an operator's own calibration folder is followed (their choice)
    own = tmp_path / "cal"
    own.mkdir()
    (own / "b.npy").symlink_to(secret)
    assert read_all(mlp, own)[0][0]["input"].max() == 7
    swapped = tmp_path / "models" / "mlp" / "samples" / "gen-fedcba9876543210"
    swapped.symlink_to(outside)
    with pytest.raises(CalibrationError, match="is a symlink: not read"):
        read_all(mlp, swapped)


def read_all(model, folder):
    return sample_inputs(model, calibration=str(folder), preset=None, input_size=None, count=8,
                         split="all")
