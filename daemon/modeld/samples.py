"""Field samples: the inputs nodes really ran, kept per model and used as a calibration folder.

A node that asks for it (``HotSession(contribute_samples=True)``, or the ``sample`` message of
docs/protocol.md) sends now and then the inputs of one call it ran: ``.npy`` bytes for a model of
one input, one ``.npz`` (one ``<input>.npy`` per input, ``protocol.pack_npz``) for a model of
several. ``SamplesArea.add`` checks it against the model's input signature (read from the
model's ``config.json``, which the fetch worker wrote: the daemon never imports onnx or numpy;
an .npz is read with ``zipfile``, bounded before anything is inflated; a symbolic side of an
image input must be what calibration sizes it to, ``inputshape.fitted_side``: the catalog's
``input_size``), enforces the caps and writes it atomically as
``models/<name>/samples/<sha256>.npy`` or ``.npz`` (mode 0640 or stricter, deduplicated by
digest; an .npz is kept as ``pack_npz`` repacks the checked arrays). An index beside the files
(``index.json``) says which node sent each one, so that caps hold per node:

- a sample larger than the model's input (or than ``MAX_DATA_BYTES``) is refused unread;
- a node holds at most ``per_node`` samples of a model: its newest replaces its oldest, so the
  daemon mirrors the node's own reservoir;
- a model holds at most ``per_model``: a node below its share then replaces the oldest sample of
  the node holding the most, never one of a node holding fewer than itself;
- every model's samples together stay within ``budget_bytes`` on disk (snapshots included).

**Generations.** Planning never reads the pool itself, which changes at every sample: it reads a
*generation*, a frozen snapshot of the pool (hard links in ``samples/gen-<id>/``, ``id`` a digest
of its members). A first generation is cut once the pool holds ``needed`` samples (the catalog's
``field_samples``); a new one once at least ``NEW_SHARE`` (25%) of the pool's samples are not in
the generation in use (``should_cut``). The generation's folder is the calibration folder of the
derivation, so a new generation re-derives and re-proves the variant, and a restart that finds
the same generation rebuilds nothing. The current and the previous snapshots are kept, and the
one the serving variant was calibrated on (``SamplesArea.proven``). A rebuild from a newer
generation replaces the serving variant only if it passes wherever that one passes
(``planning.serving_on``); otherwise it is withheld and the proven variant keeps serving.

Everything here is untrusted input from nodes or from disk: a bad sample is a
``SampleRejected`` with a ``code`` and one line, a bad index is rebuilt from the files.
Pure (standard library only): the rules, the validation and what planning reads; the area on
disk is ``modeld.samplestore``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import PermanentError
from .inputshape import fitted_side, side_rule, spatial_axes
from .protocol import MAX_SAMPLE_BYTES, pack_npz

SAMPLES_DIR = "samples"
INDEX_NAME = "index.json"
GENERATION_PREFIX = "gen-"
#: what kept samples are: .npy for a model of one input, .npz (one .npy per input) for several
SUFFIXES = (".npy", ".npz")
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: a model of more inputs cannot contribute; an .npz's central directory is at most this long
MAX_INPUTS = 64
MAX_DIRECTORY_BYTES = 64 * 1024
#: the catalog's default of ``field_samples``: samples needed before a first generation
DEFAULT_NEEDED = 32
#: a new generation once this share of the pool is not in the generation in use
NEW_SHARE = 0.25
#: an .npy header is at most this long (numpy writes 128 bytes for any shape we accept)
MAX_HEADER_BYTES = 4096
#: a sample's data is never larger than this, whatever the model's input (a symbolic dimension)
MAX_DATA_BYTES = MAX_SAMPLE_BYTES - MAX_HEADER_BYTES
MAX_INDEX_BYTES = 4 * 1024 * 1024
MAX_NODE_CHARS = 256
#: the .npy dtype descriptors of the input dtypes config.json names (little-endian, no objects)
DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "uint8": "|u1", "int8": "|i1",
          "int16": "<i2", "uint16": "<u2", "int32": "<i4", "int64": "<i8", "bool": "|b1"}
FILE_MODE = 0o640
#: methods that calibrate, and so can use field samples when the catalog names no folder
FIELD_METHODS = ("static_int8", "auto")


class SampleRejected(PermanentError):
    """A sample the daemon does not keep; ``code`` says which rule refused it (docs/protocol.md):
    ``format``, ``dtype``, ``shape``, ``size``, ``model``, ``unused``, ``full``, ``budget``."""

    def __init__(self, message: str, *, code: str, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.code = code


@dataclass(frozen=True)
class Limits:
    per_model: int = 256
    per_node: int = 64
    budget_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class InputSignature:
    """One input of a model, as config.json says: name, dtype name, dims (int or None), and the
    catalog's ``input_size``, which a symbolic side of an image input must be (``inputshape``)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    input_size: int | None = None

    @property
    def symbolic_sides(self) -> tuple[int, ...]:
        """The axes of this input's height and width that the model leaves symbolic."""
        return tuple(a for a in spatial_axes(self.shape) if self.shape[a] is None)

    @property
    def max_bytes(self) -> int:
        """The data bytes of one sample (batch 1 where the batch is symbolic, ``input_size``
        for a symbolic side when the catalog gives one), capped."""
        dims = [d if d is not None else 0 for d in self.shape]
        if self.shape and self.shape[0] is None:
            dims[0] = 1
        for axis in self.symbolic_sides:
            dims[axis] = self.input_size or 0
        if any(d == 0 for d in dims):
            return MAX_DATA_BYTES
        return min(MAX_DATA_BYTES, math.prod(dims) * int(DTYPES[self.dtype][-1]))


@dataclass(frozen=True)
class Signature:
    """Every input of a model: a sample of one input is ``.npy``, of several one ``.npz``."""

    inputs: tuple[InputSignature, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)


@dataclass(frozen=True)
class Checked:
    """A sample that passed ``check_sample``: the bytes to keep and their file suffix."""

    data: bytes
    suffix: str            # ".npy" (one input) or ".npz" (several), one of SUFFIXES


@dataclass(frozen=True)
class FieldSamples:
    """What planning knows of one model's samples: how many, and the generation to use."""

    count: int
    needed: int
    generation: str | None = None        # id of the generation in use, None before the first
    folder: str | None = None            # its snapshot folder: the calibration folder
    generation_count: int = 0            # samples in that generation

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "needed": self.needed, "generation": self.generation,
                "generation_count": self.generation_count}


# ---- pure rules ---------------------------------------------------------------------------------

def should_cut(pool: Iterable[str], used: Iterable[str] | None, needed: int) -> bool:
    """Whether the pool makes a new generation: ``needed`` samples for a first one; then once at
    least ``NEW_SHARE`` of the pool's samples are not in the generation ``used``."""
    pool = set(pool)
    if len(pool) < max(1, needed):
        return False
    if used is None:
        return True
    new = len(pool - set(used))
    return new > 0 and new >= math.ceil(NEW_SHARE * len(pool))


def generation_id(members: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()[:16]


def signature_from_config(config: Mapping[str, Any], model: str) -> Signature:
    """The model's inputs from its config.json (and its ``input_size``, for a symbolic side);
    ``SampleRejected`` when it cannot take samples."""
    inputs = config.get("inputs") if isinstance(config, Mapping) else None
    if not isinstance(inputs, list) or not inputs:
        raise SampleRejected("its config.json lists no inputs", code="model")
    if len(inputs) > MAX_INPUTS:
        raise SampleRejected(f"the model has {len(inputs)} inputs; field samples are for models "
                             f"of at most {MAX_INPUTS}", code="model")
    size = config.get("input_size")
    size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    found = []
    for spec in inputs:
        spec = spec if isinstance(spec, Mapping) else {}
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or not name or len(name) > MAX_NODE_CHARS:
            raise SampleRejected("its config.json lists an input without a name", code="model")
        if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > 8:
            raise SampleRejected(f"input {name!r} has no fixed tensor type", code="model")
        dims = tuple(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None
                     for d in shape)
        found.append(InputSignature(name, dtype, dims, size))
    if len({i.name for i in found}) != len(found):
        raise SampleRejected("its config.json names an input twice", code="model")
    return Signature(tuple(found))


def check_sample(data: bytes, signature: Signature | InputSignature, model: str) -> Checked:
    """Validate one sample against the model's inputs: ``.npy`` data for a model of one input;
    an ``.npz`` (``protocol.pack_npz``, or numpy's ``savez``) of one ``<input>.npy`` per input
    for a model of several, or of one. What is kept is a ``Checked``: an .npz of a one-input
    model is kept as its .npy, a model's .npz as ``pack_npz`` repacks the checked arrays (so the
    same arrays dedupe, whatever zip packed them). ``SampleRejected`` otherwise."""
    if isinstance(signature, InputSignature):   # a model of one input
        signature = Signature((signature,))
    if data[:6] == NPY_MAGIC:
        if len(signature.inputs) != 1:
            raise SampleRejected(f"the model has {len(signature.inputs)} inputs "
                                 f"({_listed(signature.names)}): send one .npz holding each by "
                                 "name", code="format")
        check_npy(data, signature.inputs[0], model)
        return Checked(data, ".npy")
    if data[:4] != ZIP_MAGIC:
        raise SampleRejected("sample is neither .npy nor .npz data (no \\x93NUMPY or PK magic)",
                             code="format")
    members = _npz_members(data, signature)
    for spec in signature.inputs:
        check_npy(members[spec.name], spec, model)
    if len(signature.inputs) == 1:
        return Checked(members[signature.inputs[0].name], ".npy")
    return Checked(pack_npz({name: members[name] for name in signature.names}), ".npz")


def _listed(names: Iterable[str]) -> str:
    text = ", ".join(names)
    return text if len(text) <= 200 else text[:200] + "..."


def _npz_members(data: bytes, signature: Signature) -> dict[str, bytes]:
    """Read an .npz with the standard library only, bounded before anything is parsed or
    inflated: the end record (no archive comment) must count exactly one member per input in a
    small central directory; members are named ``<input>.npy``, stored or deflated, unencrypted,
    each declaring at most its input's size (inflating stops at the declared size, whose CRC
    zipfile checks), all together at most ``MAX_SAMPLE_BYTES``."""
    want = {f"{spec.name}.npy": spec for spec in signature.inputs}
    entries, directory_bytes = _zip_directory(data)
    if entries != len(want) or directory_bytes > MAX_DIRECTORY_BYTES:
        raise SampleRejected(f"sample's .npz holds {entries} members; the model has "
                             f"{len(want)} input(s): {_listed(signature.names)}", code="format")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len(names) != len(want) or set(names) != set(want):
                raise SampleRejected(f"sample's .npz holds {_listed(sorted(set(names)))}; the "
                                     f"model's inputs are {_listed(signature.names)} (one "
                                     "<input>.npy each)", code="format")
            for info in infos:
                if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED,
                                                                      zipfile.ZIP_DEFLATED):
                    raise SampleRejected(f"sample's .npz member {info.filename[:60]!r} is "
                                         "encrypted or compressed other than by deflate",
                                         code="format")
                if info.file_size > want[info.filename].max_bytes + MAX_HEADER_BYTES:
                    raise SampleRejected(f"sample's .npz member {info.filename[:60]!r} declares "
                                         f"{info.file_size} bytes; the input takes at most "
                                         f"{want[info.filename].max_bytes}", code="size")
            if sum(info.file_size for info in infos) > MAX_SAMPLE_BYTES:
                raise SampleRejected(f"sample's .npz declares more than {MAX_SAMPLE_BYTES} bytes",
                                     code="size")
            return {want[info.filename].name: archive.read(info) for info in infos}
    except SampleRejected:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
            struct.error, RuntimeError, MemoryError) as e:
        raise SampleRejected(f"sample's .npz does not read: {str(e)[:120]}", code="format") from None


def _zip_directory(data: bytes) -> tuple[int, int]:
    """(members, central directory bytes) as the end record says, read where ``zipfile`` reads
    it (the last 22 bytes; a zip64 end record just before its locator), so that nothing larger
    is parsed than was checked. An archive comment is refused."""
    end = data[-22:]
    if len(data) < 22 or end[:4] != b"PK\x05\x06":
        raise SampleRejected("sample's .npz has no zip end record (or a comment after it)",
                             code="format")
    _, _, _, _, entries, directory_bytes, _, comment = struct.unpack("<4sHHHHIIH", end)
    if comment:
        raise SampleRejected("sample's .npz has an archive comment", code="format")
    if len(data) >= 98 and data[-42:-38] == b"PK\x06\x07":   # zip64: its record decides
        record = data[-98:-42]
        if record[:4] != b"PK\x06\x06":
            raise SampleRejected("sample's .npz has a broken zip64 end record", code="format")
        entries, directory_bytes = struct.unpack("<4sQHHIIQQQQ", record)[6:8]
    return entries, directory_bytes


def check_npy(data: bytes, signature: InputSignature, model: str) -> tuple[str, tuple[int, ...]]:
    """Validate one ``.npy`` array against one input; (descr, shape) or ``SampleRejected``.
    Parsed with the standard library: magic, version, a header that is a literal dict, the
    dtype, C order, the shape (a missing batch axis is allowed; a symbolic side must be what
    calibration would size it to, ``inputshape.fitted_side``) and the exact data length."""
    if len(data) > signature.max_bytes + MAX_HEADER_BYTES:
        raise SampleRejected(f"sample is {len(data)} bytes; the input takes at most "
                             f"{signature.max_bytes}", code="size")
    if data[:6] != NPY_MAGIC or len(data) < 10:
        raise SampleRejected("sample is not .npy data (no \\x93NUMPY magic)", code="format")
    major = data[6]
    if major == 1:
        (header_len,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3) and len(data) >= 12:
        (header_len,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise SampleRejected(f"sample has .npy version {major}; expected 1, 2 or 3",
                             code="format")
    if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
        raise SampleRejected("sample's .npy header is truncated or too long", code="format")
    try:
        header = ast.literal_eval(data[start:start + header_len].decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
        raise SampleRejected("sample's .npy header does not parse", code="format") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise SampleRejected("sample's .npy header lacks descr/fortran_order/shape",
                             code="format")
    descr, shape = header["descr"], header["shape"]
    want = DTYPES[signature.dtype]
    if descr != want and not (want[0] == "|" and descr == want[1:]):
        raise SampleRejected(f"sample dtype {str(descr)[:20]!r} does not match input "
                             f"{signature.name!r} ({signature.dtype})", code="dtype")
    if header["fortran_order"] is not False:
        raise SampleRejected("sample is in Fortran order; send a C-ordered array",
                             code="format")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool)
                                               and d >= 0 for d in shape):
        raise SampleRejected("sample's shape is not a tuple of sizes", code="format")
    if len(shape) == len(signature.shape) - 1:
        shape = (1, *shape)
    if len(shape) != len(signature.shape) or any(
            want_dim is not None and want_dim != got for want_dim, got in zip(signature.shape, shape)):
        raise SampleRejected(f"sample shape {list(shape)} does not fit input {signature.name!r} "
                             f"{_dims(signature.shape)}", code="shape")
    sides = [shape[a] for a in signature.symbolic_sides]
    if any(fitted_side(signature.input_size, side) != side for side in sides):
        raise SampleRejected(f"sample shape {list(shape)} does not fit input {signature.name!r} "
                             f"{_dims(signature.shape)}: its sides must be "
                             f"{side_rule(signature.input_size)}", code="shape")
    expected = math.prod(shape) * int(want[-1])
    if expected > signature.max_bytes or len(data) - start - header_len != expected:
        raise SampleRejected(f"sample holds {len(data) - start - header_len} data bytes; shape "
                             f"{list(shape)} needs {expected}", code="size")
    return descr, tuple(shape)


def _dims(shape: tuple[int | None, ...]) -> list[int | str]:
    return [d if d is not None else "?" for d in shape]


def uses_field_samples(entry: Any) -> bool:
    """Whether a catalog entry calibrates on field samples: a calibrating method, enabled, and
    no calibration folder of its own."""
    spec = getattr(entry, "quantize", None)
    return bool(spec is not None and spec.enabled and spec.method in FIELD_METHODS
                and spec.calibration is None)


def needed_for(entry: Any) -> int:
    spec = getattr(entry, "quantize", None)
    return int(spec.params.get("field_samples", DEFAULT_NEEDED)) if spec is not None \
        else DEFAULT_NEEDED


def field_calibration(entry: Any, field: FieldSamples | None) -> str | None:
    """The calibration folder of ``entry``: its own, else its field samples' generation."""
    spec = entry.quantize
    if spec.calibration is not None or not uses_field_samples(entry) or field is None:
        return spec.calibration
    return field.folder


def waiting_for_samples(entry: Any, field: FieldSamples | None) -> str:
    """Why a variant waits for field samples ('' when it does not): static_int8 without a
    calibration folder is built only from a generation of them."""
    if not uses_field_samples(entry) or (field is not None and field.folder):
        return ""
    count = field.count if field is not None else 0
    return f"field samples: {count} of {needed_for(entry)} needed"


def same_but_samples(a: Any, b: Any) -> bool:
    """Two derivations that differ only in which generation of field samples (or none yet)
    calibrated them: the old file keeps serving while the new one is built and proven."""
    if a is None or b is None or a.method != b.method or a.source_sha256 != b.source_sha256:
        return False
    pa, pb = dict(a.params), dict(b.params)
    ca, cb = pa.pop("calibration", None), pb.pop("calibration", None)
    return pa == pb and ca != cb and _none_or_generation(ca) and _none_or_generation(cb) \
        and (a.onnx, a.onnxruntime) == (b.onnx, b.onnxruntime)


def _none_or_generation(folder: Any) -> bool:
    """None (no calibration data: synthetic inputs) or a generation's snapshot folder."""
    return folder is None or isinstance(folder, str) and is_generation_folder(folder)


def is_generation_folder(folder: str | Path) -> bool:
    """A generation's snapshot folder (``models/<name>/samples/gen-<id>``): the daemon's own, so
    whoever reads it takes only regular files, never a symlink out of models/."""
    path = Path(folder)
    return path.parent.name == SAMPLES_DIR and path.name.startswith(GENERATION_PREFIX)
