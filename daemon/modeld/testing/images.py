"""Write small image files (PNG with any row filter, Netpbm) with numpy and the standard library.

For tests and benchmarks of calibration folders (``workers.inputs`` decodes them); never imported
by the daemon. The PNG writer can force each of the five row filters, so a decoder meets them all.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..workers.pages import text_like_image  # noqa: F401 - one generator for tests and workers

_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}   # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def write_png(path: str | Path, pixels: np.ndarray, *, filters: tuple[int, ...] = (0,),
              palette: np.ndarray | None = None) -> Path:
    """Write ``pixels`` (HxW or HxWxC, uint8 or uint16) as a PNG; row ``y`` uses filter
    ``filters[y % len(filters)]``. With ``palette`` (Nx3 uint8), ``pixels`` are HxW indices."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width, channels = pixels.shape
    depth = 16 if pixels.dtype == np.uint16 else 8
    color = 3 if palette is not None else _COLOR_TYPES[channels]
    raw = pixels.astype(">u2").tobytes() if depth == 16 else pixels.astype(np.uint8).tobytes()
    bpp = channels * depth // 8
    stride = width * bpp
    rows = [np.frombuffer(raw[y * stride:(y + 1) * stride], np.uint8).astype(np.int32)
            for y in range(height)]
    out = bytearray()
    previous = np.zeros(stride, np.int32)
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        out.append(kind)
        out += _filter_row(kind, row, previous, bpp).astype(np.uint8).tobytes()
        previous = row
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))]
    if palette is not None:
        chunks.append((b"PLTE", np.asarray(palette, np.uint8).tobytes()))
    chunks += [(b"IDAT", zlib.compress(bytes(out))), (b"IEND", b"")]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF) for kind, body in chunks)
    path = Path(path)
    path.write_bytes(data)
    return path


def _filter_row(kind: int, row: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    up_left = np.concatenate([np.zeros(bpp, np.int32), previous[:-bpp]])
    if kind == 0:
        return row
    if kind == 1:
        return (row - left) & 0xFF
    if kind == 2:
        return (row - previous) & 0xFF
    if kind == 3:
        return (row - (left + previous) // 2) & 0xFF
    p = left + previous - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - previous), np.abs(p - up_left)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
    return (row - pred) & 0xFF


def write_pnm(path: str | Path, pixels: np.ndarray, *, ascii_format: bool = False,
              comment: str | None = None) -> Path:
    """Write HxWx3 (PPM) or HxW (PGM) uint8 pixels, binary or ASCII, with an optional comment."""
    pixels = np.asarray(pixels, np.uint8)
    colour = pixels.ndim == 3
    magic = {(True, False): b"P6", (True, True): b"P3", (False, False): b"P5",
             (False, True): b"P2"}[(colour, ascii_format)]
    header = magic + b"\n" + (f"# {comment}\n".encode() if comment else b"")
    header += f"{pixels.shape[1]} {pixels.shape[0]}\n255\n".encode()
    body = (" ".join(map(str, pixels.ravel())).encode() + b"\n") if ascii_format else pixels.tobytes()
    path = Path(path)
    path.write_bytes(header + body)
    return path
