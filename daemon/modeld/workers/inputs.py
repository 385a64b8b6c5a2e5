"""Model inputs for calibration and agreement checks, built in worker processes.

``sample_inputs`` reads a calibration folder (images, ``.npy`` tensors, ``.npz`` feeds) and shapes
it to the model's input signature through a preprocessing preset, or makes seeded synthetic inputs
when there is no folder. Called by ``workers.quantize`` (calibration) and ``workers.verify``
(agreement feeds). Images are decoded with numpy and the standard library (PNG, PPM/PGM); JPEG
and other formats only when Pillow happens to be installed (it is not a dependency).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import QuantizeError
from ..inputshape import fitted_side, image_layout, spatial_axes
from ..samples import is_generation_folder
from .pages import text_like_image

#: batch and spatial size used when neither the model nor the caller fixes a dimension
DEFAULT_IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".png", ".ppm", ".pgm", ".pnm", ".jpg", ".jpeg", ".bmp", ".webp")
TENSOR_SUFFIXES = (".npy", ".npz")
#: share of a calibration folder proven on and never calibrated on (``held_out``)
HOLDOUT_SHARE = 0.2
HOLDOUT_MAX = 8


class CalibrationError(QuantizeError, ValueError):
    """The calibration data cannot be used for this model (unreadable, wrong shape, empty)."""


@dataclass(frozen=True)
class Preset:
    """How an image becomes a model input: resize rule, channel order, scaling, normalisation."""

    name: str
    size: int                                  # default square side when the model's is symbolic
    letterbox: bool                            # keep aspect ratio and pad (YOLO) or stretch
    bgr: bool                                  # channel order the model was trained with
    scale: float                               # applied to 0..255 pixel values first
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_value: int = 114

    def normalise(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> HWC float32 as the model expects."""
        img = rgb_uint8[..., ::-1] if self.bgr else rgb_uint8
        out = img.astype(np.float32) * np.float32(self.scale)
        return (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


PRESETS: dict[str, Preset] = {
    # Ultralytics YOLO: letterbox to 640 with grey 114 padding, RGB in [0, 1]
    "yolo": Preset("yolo", 640, True, False, 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # torchvision classifiers
    "imagenet": Preset("imagenet", 224, False, False, 1 / 255, (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225)),
    # PP-OCR detector (RapidOCR's det config): BGR, (x/255 - 0.5) / 0.5
    "ocr": Preset("ocr", 640, False, True, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # resize only: RGB scaled to [0, 1], no mean/std (also the rule when no preset is named)
    "none": Preset("none", 224, False, False, 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (a str or None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def image_layout(self) -> str | None:
        """"NCHW" / "NHWC" when this looks like an image batch (``inputshape.image_layout``)."""
        return image_layout(self.shape)


def model_inputs(model_path: str | Path) -> list[InputSpec]:
    """The real inputs of a model (graph inputs that are not initializers), weights not loaded."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                     else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)),
                               dims))
    return specs


def sample_inputs(model_path: str | Path, *, calibration: str | None, preset: str | None,
                  input_size: int | None, count: int, seed: int = 0, split: str = "all"
                  ) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Inputs for calibration and agreement checks.

    From ``calibration`` (a folder of PNG/PPM/PGM images — JPEG only with Pillow installed —,
    ``.npy`` tensors or ``.npz`` feeds keyed by input name), resized and normalised by ``preset``;
    else seeded synthetic inputs from the model's signature (batch 1; symbolic image sides ->
    ``input_size``, the preset's size or 64; other symbolic dims -> ``input_size`` or 1).
    ``split``: "calibration" or "holdout" draw from the two disjoint parts of a folder (see
    ``held_out``), so a variant is proven on samples it was not calibrated on; "all" from every file.
    Returns ``(feeds, synthetic_fallback)``.
    """
    if count < 1:
        raise CalibrationError(f"sample count must be >= 1, got {count}")
    if preset is not None and preset not in PRESETS:
        raise CalibrationError(f"unknown preprocessing preset {preset!r}",
                               hint=f"use one of {', '.join(sorted(PRESETS))}")
    specs = model_inputs(model_path)
    if not specs:
        raise CalibrationError(f"{Path(model_path).name} has no inputs to feed")
    rng = np.random.default_rng(seed)
    chosen = PRESETS[preset] if preset else None
    if calibration is None:
        return [_synthetic_feed(specs, chosen, input_size, rng) for _ in range(count)], True
    files = _calibration_files(Path(calibration))
    if split != "all":
        held = held_out(files)
        files = held if split == "holdout" else [f for f in files if f not in held] or files
    if len(files) > count:  # a seeded spread over the folder, in a stable order
        picks = sorted(rng.choice(len(files), size=count, replace=False))
        files = [files[i] for i in picks]
    return [_feed_from_file(f, specs, chosen, input_size) for f in files], False


def held_out(files: list[Path]) -> list[Path]:
    """The files of a calibration folder kept for agreement checks and never calibrated on:
    HOLDOUT_SHARE of them, at least one, at most HOLDOUT_MAX, chosen by a hash of the name (the
    same files whatever is added later, unless they are displaced by a lower hash). A folder of one
    file is both."""
    if len(files) < 2:
        return list(files)
    count = max(1, min(HOLDOUT_MAX, int(len(files) * HOLDOUT_SHARE)))
    ranked = sorted(files, key=lambda f: hashlib.sha256(f.name.encode("utf-8", "surrogateescape"))
                    .hexdigest())
    return sorted(ranked[:count])


def _calibration_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist",
                               hint="create it or remove 'calibration' from the entry")
    own = is_generation_folder(folder)   # field samples: regular files only, no symlink out
    if own and (folder.is_symlink() or folder.parent.is_symlink()):
        raise CalibrationError(f"field samples folder {folder} is a symlink: not read",
                               hint="the daemon cuts a new generation from the samples it keeps")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not (own and p.is_symlink())
                   and p.suffix.lower() in IMAGE_SUFFIXES + TENSOR_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration folder {folder} holds no usable files",
                               hint="add PNG/PPM images, .npy tensors or .npz feeds")
    return files


# ---- synthetic inputs ---------------------------------------------------------------------

def _synthetic_feed(specs: list[InputSpec], preset: Preset | None, input_size: int | None,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for spec in specs:
        shape = _concrete_shape(spec, preset, input_size)
        if spec.image_layout and spec.dtype in (np.float32, np.float16, np.uint8):
            feed[spec.name] = _synthetic_image(spec, shape, preset, rng)
        elif np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = np.zeros(shape, np.bool_)
        else:  # ids, lengths, masks: small non-negative integers stay in range for most models
            feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feed


def _concrete_shape(spec: InputSpec, preset: Preset | None, input_size: int | None) -> tuple[int, ...]:
    side = input_size or (preset.size if preset else DEFAULT_IMAGE_SIZE)
    spatial = spatial_axes(spec.shape)
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(1)
        elif axis in spatial:
            shape.append(side)
        else:
            shape.append(input_size or 1)
    return tuple(shape)


def _synthetic_image(spec: InputSpec, shape: tuple[int, ...], preset: Preset | None,
                     rng: np.random.Generator) -> np.ndarray:
    """Smooth random pictures (blocks of colour plus grain): closer to real activation ranges
    than white noise, so a calibration on them is less wrong. For the OCR preset, text-like
    pages: a text detector maps colour fields to ~0, which proves nothing."""
    height, width = (shape[2], shape[3]) if spec.image_layout == "NCHW" else (shape[1], shape[2])
    if preset is not None and preset.name == "ocr":
        rgb = text_like_image(height, width, seed=int(rng.integers(0, 2**31)))
        return _to_input(rgb, spec, shape, preset, letterbox_ok=False)
    coarse = rng.uniform(0, 255, (max(1, height // 8), max(1, width // 8), 3))
    img = _resize_bilinear(coarse, height, width) + rng.normal(0, 12, (height, width, 3))
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return _to_input(rgb, spec, shape, preset, letterbox_ok=False)


# ---- calibration files --------------------------------------------------------------------

def _feed_from_file(path: Path, specs: list[InputSpec], preset: Preset | None,
                    input_size: int | None) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
            missing = [s.name for s in specs if s.name not in arrays]
            if missing:
                raise CalibrationError(f"{path.name} lacks input(s) {', '.join(missing)}",
                                       hint="key each array of an .npz by the model's input name")
            return {s.name: _fit_tensor(arrays[s.name], s, path) for s in specs}
        if suffix == ".npy":
            spec = _single_input(specs, path)
            return {spec.name: _fit_tensor(np.load(path, allow_pickle=False), spec, path)}
        spec = _single_input(specs, path)
        if not spec.image_layout:
            raise CalibrationError(f"{path.name}: input {spec.name!r} {list(spec.shape)} is not an "
                                   "image batch", hint="use .npy/.npz calibration data for this model")
        rgb = read_image(path)
        # a symbolic-size model sees the image at its own size (``inputshape.fitted_side``)
        shape = _concrete_shape(spec, preset, fitted_side(input_size, max(rgb.shape[:2])))
        return {spec.name: _to_input(rgb, spec, shape, preset, letterbox_ok=True)}
    except CalibrationError:
        raise
    except (OSError, ValueError, zlib.error, struct.error, EOFError) as e:
        raise CalibrationError(f"cannot read calibration file {path.name}: {e}",
                               hint="replace or remove the file") from e


def _single_input(specs: list[InputSpec], path: Path) -> InputSpec:
    if len(specs) != 1:
        raise CalibrationError(f"{path.name}: the model has {len(specs)} inputs "
                               f"({', '.join(s.name for s in specs)})",
                               hint="use .npz files keyed by input name")
    return specs[0]


def _fit_tensor(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    if array.ndim == len(spec.shape) - 1:
        array = array[None]  # one sample without its batch axis
    if array.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)):
        raise CalibrationError(f"{path.name}: shape {list(array.shape)} does not fit input "
                               f"{spec.name!r} {list(spec.shape)}")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))


def _to_input(rgb: np.ndarray, spec: InputSpec, shape: tuple[int, ...], preset: Preset | None,
              *, letterbox_ok: bool) -> np.ndarray:
    """HWC uint8 RGB -> one batch of the input's layout, size and dtype."""
    nchw = spec.image_layout == "NCHW"
    channels, height, width = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
    rule = preset or PRESETS["none"]
    if rule.letterbox and letterbox_ok:
        img = _letterbox(rgb, height, width, rule.pad_value)
    else:
        img = np.clip(_resize_bilinear(rgb.astype(np.float32), height, width) + 0.5, 0, 255
                      ).astype(np.uint8)
    if channels == 1:
        img = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if spec.dtype == np.uint8:  # the model normalises inside: feed raw pixels
        values = img
    elif channels == 3:
        values = rule.normalise(img)
    else:
        values = (img.astype(np.float32) * rule.scale - rule.mean[0]) / rule.std[0]
    values = values.transpose(2, 0, 1) if nchw else values
    return np.ascontiguousarray(values[None].astype(spec.dtype))


def _resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """HWC float bilinear resize (pixel centres aligned, like cv2.INTER_LINEAR)."""
    src_h, src_w = img.shape[:2]
    if (src_h, src_w) == (height, width):
        return img.astype(np.float32)
    ys = np.clip((np.arange(height) + 0.5) * src_h / height - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(width) + 0.5) * src_w / width - 0.5, 0, src_w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, src_h - 1), np.minimum(x0 + 1, src_w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = img.astype(np.float32)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _letterbox(rgb: np.ndarray, height: int, width: int, pad_value: int) -> np.ndarray:
    ratio = min(height / rgb.shape[0], width / rgb.shape[1])
    new_h, new_w = max(1, round(rgb.shape[0] * ratio)), max(1, round(rgb.shape[1] * ratio))
    resized = np.clip(_resize_bilinear(rgb.astype(np.float32), new_h, new_w) + 0.5, 0, 255)
    canvas = np.full((height, width, 3), pad_value, np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized.astype(np.uint8)
    return canvas


# ---- image decoding (numpy + stdlib) ------------------------------------------------------

def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to HWC uint8 RGB."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _decode_png(data)
    if data[:2] in (b"P2", b"P3", b"P5", b"P6"):
        return _decode_pnm(data)
    return _decode_with_pillow(path)


def _decode_with_pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image  # optional: used only when already installed
    except ImportError as e:
        raise CalibrationError(f"{path.name}: only PNG and PPM/PGM are decoded without Pillow",
                               hint="convert the images to PNG, or store .npy tensors") from e
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _decode_pnm(data: bytes) -> np.ndarray:
    """Netpbm P2/P3 (ASCII) and P5/P6 (binary) grey and colour images."""
    magic = data[:2]
    tokens: list[bytes] = []
    pos = 2
    while len(tokens) < 3:  # width, height, maxval; '#' comments may sit between them
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while not data[pos:pos + 1].isspace():
            pos += 1
        tokens.append(data[start:pos])
    width, height, maxval = (int(t) for t in tokens)
    channels = 3 if magic in (b"P3", b"P6") else 1
    count = width * height * channels
    if magic in (b"P5", b"P6"):
        dtype = np.dtype(">u2") if maxval > 255 else np.uint8
        raw = np.frombuffer(data, dtype, count, pos + 1)
    else:
        raw = np.array(data[pos:].split()[:count], dtype=np.int64)
        if raw.size != count:
            raise ValueError("truncated ASCII image")
    pixels = (raw.astype(np.float64) * (255.0 / maxval)).round().astype(np.uint8)
    return _as_rgb(pixels.reshape(height, width, channels))


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _decode_png(data: bytes) -> np.ndarray:
    """Non-interlaced PNG of 8 or 16 bits (grey, grey+alpha, RGB, RGBA, palette)."""
    pos, idat, palette = 8, [], None
    width = height = depth = color = interlace = None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if width is None or color not in _PNG_CHANNELS:
        raise ValueError("not a PNG image this reader understands")
    if interlace or depth not in (8, 16) or (color == 3 and depth != 8):
        raise ValueError(f"PNG with bit depth {depth} / interlace {interlace} is not supported")
    samples = _PNG_CHANNELS[color]
    bpp = samples * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    rows = _png_unfilter(raw.reshape(height, width * bpp + 1), bpp)
    if depth == 16:
        pixels = (rows.view(">u2").astype(np.uint32) >> 8).astype(np.uint8)
    else:
        pixels = rows
    pixels = pixels.reshape(height, width, samples)
    if color == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        return palette[pixels[..., 0]]
    return _as_rgb(pixels[..., :3] if samples == 4 else pixels[..., :1] if samples == 2 else pixels)


def _png_unfilter(scanlines: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters (None, Sub, Up, Average, Paeth) of RFC 2083 section 6."""
    height, stride = scanlines.shape[0], scanlines.shape[1] - 1
    kinds = scanlines[:, 0]
    if kinds.size and int(kinds.max()) > 4:
        raise ValueError(f"bad PNG filter type {int(kinds.max())}")
    if np.isin(kinds, (3, 4)).any():
        return _unfilter_wavefront(scanlines, bpp)
    out = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = scanlines[y, 0], scanlines[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # Sub: running sum per byte position modulo 256
            row = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        else:  # Up
            row = line + previous
        out[y] = row
        previous = row
    return out


def _unfilter_wavefront(scanlines: np.ndarray, bpp: int) -> np.ndarray:
    """All five filters at once, one anti-diagonal of pixels per step.

    Average and Paeth predict a pixel from its left, upper and upper-left neighbours, so a row
    cannot be undone in one vector operation; but every pixel of an anti-diagonal (x + y = t)
    depends only on the two diagonals before it. Stored skewed (``diag[t, y + 1]`` is pixel
    ``(y, t - y)``), each step is a few operations on contiguous slices: height + width steps
    instead of one Python iteration per pixel (measured: 0.9 s -> 0.1 s for a 640x640 RGB
    page, which made PNG decoding half of a quantize job's time)."""
    height, width = scanlines.shape[0], (scanlines.shape[1] - 1) // bpp
    raw = scanlines[:, 1:].reshape(height, width, bpp)
    ys, xs = np.indices((height, width))
    steps = height + width - 1
    skewed = np.zeros((steps, height, bpp), np.uint8)  # pixels outside the image stay 0
    skewed[ys + xs, ys] = raw
    # row y + 1 of ``diag``; row 0 is the zero line above the image, and the zero entries left
    # of each row decode to 0 (every predictor of zeros is zero), so no step needs a bounds test
    diag = np.zeros((steps + 1, height + 1, bpp), np.uint8)
    kinds = scanlines[:, 0].astype(np.int16)[:, None]
    sub, up, average, paeth = (kinds == 1), (kinds == 2), (kinds == 3), (kinds == 4)
    for t in range(steps):
        left = diag[t, 1:].astype(np.int16)            # (y, x - 1): diagonal t - 1
        above = diag[t, :-1].astype(np.int16)          # (y - 1, x): diagonal t - 1
        corner = diag[t - 1, :-1].astype(np.int16) if t else np.zeros_like(left)
        pa, pb = np.abs(above - corner), np.abs(left - corner)
        pc = np.abs(left + above - 2 * corner)
        best = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, corner))
        pred = np.where(paeth, best, np.where(average, (left + above) >> 1,
                                              np.where(up, above, np.where(sub, left, 0))))
        diag[t + 1, 1:] = (skewed[t] + pred) & 0xFF
    return diag[ys + xs + 1, ys + 1].reshape(height, width * bpp)


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def describe(feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Log fields for a list of feeds (count, each input's shape and dtype)."""
    first = feeds[0] if feeds else {}
    return {"count": len(feeds),
            "inputs": {k: f"{v.dtype}{list(v.shape)}" for k, v in first.items()}}
