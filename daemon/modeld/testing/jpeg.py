"""A baseline JPEG decoder in numpy and the standard library, for the photographs that wheels ship.

``modeld.testing.realdata`` turns those photographs into PNG frames (``workers.inputs`` decodes PNG
and PPM, JPEG only when Pillow is installed, and Pillow is no dependency). Baseline and extended
Huffman (SOF0/SOF1), 8-bit, grey or YCbCr with any sampling factors, restart intervals; not
progressive or arithmetic coding. Never imported by the daemon.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])


def _idct_matrix() -> np.ndarray:
    x = np.arange(8)
    c = np.cos((2 * x[None, :] + 1) * x[:, None] * np.pi / 16)   # [u, x]
    c[0] *= 1 / np.sqrt(2)
    return c / 2


_IDCT = _idct_matrix()


def read_jpeg(path: str | Path) -> np.ndarray:
    """Decode a baseline JPEG file to HWC uint8 RGB (grey images are repeated to 3 channels)."""
    return decode_jpeg(Path(path).read_bytes())


def decode_jpeg(data: bytes) -> np.ndarray:
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file (no SOI marker)")
    quant: dict[int, np.ndarray] = {}
    huffman: dict[tuple[int, int], list] = {}
    frame = None
    restart = 0
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:       # fill byte
            pos += 1
            continue
        if marker == 0xD9:       # EOI before any scan
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body = data[pos + 4:pos + 2 + length]
        pos += 2 + length
        if marker == 0xDB:
            _read_dqt(body, quant)
        elif marker == 0xC4:
            _read_dht(body, huffman)
        elif marker in (0xC0, 0xC1):
            frame = _read_sof(body)
        elif marker in (0xC2, 0xC3) or 0xC5 <= marker <= 0xCF and marker != 0xC8 and marker != 0xCC:
            raise ValueError(f"JPEG frame type 0x{marker:02X} (progressive/lossless/arithmetic) "
                             "is not supported")
        elif marker == 0xDD:
            restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            if frame is None:
                raise ValueError("JPEG scan before its frame header")
            end = _scan_end(data, pos)
            _decode_scan(body, data[pos:end], frame, huffman, restart)
            pos = end
            if len(frame["scanned"]) == len(frame["components"]):
                break
    if frame is None or len(frame["scanned"]) != len(frame["components"]):
        raise ValueError("JPEG without a complete baseline scan")
    return _to_rgb(frame, quant)


def _read_dqt(body: bytes, quant: dict[int, np.ndarray]) -> None:
    pos = 0
    while pos < len(body):
        precision, table = body[pos] >> 4, body[pos] & 15
        size = 128 if precision else 64
        raw = np.frombuffer(body[pos + 1:pos + 1 + size], ">u2" if precision else np.uint8)
        values = np.zeros(64, np.float32)
        values[_ZIGZAG] = raw.astype(np.float32)   # stored in zigzag order
        quant[table] = values
        pos += 1 + size


def _read_dht(body: bytes, huffman: dict[tuple[int, int], list]) -> None:
    """Each table becomes a 16-bit lookup: the next 16 bits of the stream -> (symbol, length)."""
    pos = 0
    while pos < len(body):
        kind, table = body[pos] >> 4, body[pos] & 15
        counts = body[pos + 1:pos + 17]
        symbols = body[pos + 17:pos + 17 + sum(counts)]
        pos += 17 + sum(counts)
        lookup = [(0, 0)] * 65536
        code, index = 0, 0
        for length in range(1, 17):
            for _ in range(counts[length - 1]):
                first = code << (16 - length)
                entry = (symbols[index], length)
                lookup[first:first + (1 << (16 - length))] = [entry] * (1 << (16 - length))
                code += 1
                index += 1
            code <<= 1
        huffman[(kind, table)] = lookup


def _read_sof(body: bytes) -> dict:
    if body[0] != 8:
        raise ValueError(f"JPEG sample precision {body[0]} is not supported")
    height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    components = []
    for i in range(count):
        ident, sampling, table = body[6 + 3 * i], body[7 + 3 * i], body[8 + 3 * i]
        components.append({"id": ident, "h": sampling >> 4, "v": sampling & 15, "tq": table})
    hmax = max(c["h"] for c in components)
    vmax = max(c["v"] for c in components)
    mcux, mcuy = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    for c in components:
        c["bx"], c["by"] = mcux * c["h"], mcuy * c["v"]
        c["coef"] = [0] * (c["bx"] * c["by"] * 64)
    return {"height": height, "width": width, "components": components, "hmax": hmax,
            "vmax": vmax, "mcux": mcux, "mcuy": mcuy, "scanned": set()}


def _scan_end(data: bytes, pos: int) -> int:
    """Index of the first marker after the entropy-coded data (not a stuffed 0xFF00, not RSTn)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1
            continue
        return pos


def _decode_scan(header: bytes, entropy: bytes, frame: dict, huffman: dict, restart: int) -> None:
    count = header[0]
    by_id = {c["id"]: c for c in frame["components"]}
    scan = []
    for i in range(count):
        comp = by_id[header[1 + 2 * i]]
        tables = header[2 + 2 * i]
        scan.append((comp, huffman[(0, tables >> 4)], huffman[(1, tables & 15)]))
    # restart intervals: segments between RSTn markers, each with stuffing removed
    segments = [s.replace(b"\xff\x00", b"\xff") for s in _split_restarts(entropy)]
    if count == 1:   # a non-interleaved scan walks the component's own blocks, no MCU padding
        comp = scan[0][0]
        cols = -(-frame["width"] * comp["h"] // (8 * frame["hmax"]))
        rows = -(-frame["height"] * comp["v"] // (8 * frame["vmax"]))
        units = [[(scan[0], (r * comp["bx"] + c) * 64)] for r in range(rows) for c in range(cols)]
    else:
        units = []
        for my in range(frame["mcuy"]):
            for mx in range(frame["mcux"]):
                unit = []
                for entry in scan:
                    comp = entry[0]
                    for v in range(comp["v"]):
                        for h in range(comp["h"]):
                            row, col = my * comp["v"] + v, mx * comp["h"] + h
                            unit.append((entry, (row * comp["bx"] + col) * 64))
                units.append(unit)
    per_segment = restart or len(units)
    for s in range(0, len(units), per_segment):
        segment = segments[min(s // per_segment, len(segments) - 1)] + b"\x00\x00\x00\x00"
        _decode_units(units[s:s + per_segment], segment)
    frame["scanned"].update(entry[0]["id"] for entry in scan)


def _split_restarts(entropy: bytes) -> list[bytes]:
    segments, start, pos = [], 0, 0
    while True:
        pos = entropy.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(entropy):
            break
        if 0xD0 <= entropy[pos + 1] <= 0xD7:
            segments.append(entropy[start:pos])
            start = pos + 2
        pos += 2 if entropy[pos + 1] == 0 or 0xD0 <= entropy[pos + 1] <= 0xD7 else 1
    segments.append(entropy[start:])
    return segments


def _decode_units(units: list, segment: bytes) -> None:
    """Huffman-decode one restart interval into the components' coefficient lists (zigzag
    order). The hot loop of the decoder: plain Python on ints, a 16-bit peek per symbol."""
    bitpos = 0
    predictors: dict[int, int] = {}
    from_bytes = int.from_bytes
    for unit in units:
        for (comp, dc_table, ac_table), base in unit:
            coef = comp["coef"]
            byte = bitpos >> 3
            peek = (from_bytes(segment[byte:byte + 3], "big") >> (8 - (bitpos & 7))) & 0xFFFF
            size, length = dc_table[peek]
            bitpos += length
            diff = 0
            if size:
                byte = bitpos >> 3
                bits = (from_bytes(segment[byte:byte + 4], "big") >> (32 - (bitpos & 7) - size)
                        ) & ((1 << size) - 1)
                bitpos += size
                diff = bits if bits >> (size - 1) else bits - (1 << size) + 1
            dc = predictors.get(comp["id"], 0) + diff
            predictors[comp["id"]] = dc
            coef[base] = dc
            k = 1
            while k < 64:
                byte = bitpos >> 3
                peek = (from_bytes(segment[byte:byte + 3], "big") >> (8 - (bitpos & 7))) & 0xFFFF
                rs, length = ac_table[peek]
                bitpos += length
                size = rs & 15
                if not size:
                    if rs != 0xF0:
                        break           # end of block
                    k += 16
                    continue
                k += rs >> 4
                byte = bitpos >> 3
                bits = (from_bytes(segment[byte:byte + 4], "big") >> (32 - (bitpos & 7) - size)
                        ) & ((1 << size) - 1)
                bitpos += size
                if k < 64:
                    coef[base + k] = bits if bits >> (size - 1) else bits - (1 << size) + 1
                k += 1


def _to_rgb(frame: dict, quant: dict[int, np.ndarray]) -> np.ndarray:
    height, width = frame["height"], frame["width"]
    planes = []
    for comp in frame["components"]:
        blocks = np.asarray(comp["coef"], np.float32).reshape(-1, 64) * quant[comp["tq"]][_ZIGZAG]
        natural = np.zeros_like(blocks)
        natural[:, _ZIGZAG] = blocks
        natural = natural.reshape(comp["by"], comp["bx"], 8, 8)
        pixels = np.einsum("ux,abuv,vy->abxy", _IDCT, natural, _IDCT) + 128
        plane = pixels.transpose(0, 2, 1, 3).reshape(comp["by"] * 8, comp["bx"] * 8)
        plane = np.repeat(np.repeat(plane, frame["vmax"] // comp["v"], axis=0),
                          frame["hmax"] // comp["h"], axis=1)
        planes.append(plane[:height, :width])
    if len(planes) == 1:
        rgb = np.repeat(planes[0][..., None], 3, axis=2)
    else:
        y, cb, cr = planes[0], planes[1] - 128, planes[2] - 128
        rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=2)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
