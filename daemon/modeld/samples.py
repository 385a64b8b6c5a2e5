"""Field samples: the inputs nodes really ran, kept per model and used as a calibration folder.

A node that asks for it (``HotSession(contribute_samples=True)``, or the ``sample`` message of
docs/protocol.md) sends now and then one input it ran, as ``.npy`` bytes. ``SamplesArea.add``
checks it against the model's input signature (read from the model's ``config.json``, which the
fetch worker wrote: the daemon never imports onnx), enforces the caps and writes it atomically
as ``models/<name>/samples/<sha256>.npy`` (mode 0640 or stricter, deduplicated by digest). An
index beside the files (``index.json``) says which node sent each one, so that caps hold per node:

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
the same generation rebuilds nothing. The current and the previous snapshots are kept.

Everything here is untrusted input from nodes or from disk: a bad sample is a
``SampleRejected`` with a ``code`` and one line, a bad index is rebuilt from the files.
Standard library only (the daemon's process): thread-safe, called off the event loop.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .atomic import TEMP_PREFIX, disk_error, fsync_dir, read_regular, remove_leftovers, temp_path_for
from .errors import PermanentError
from .protocol import MAX_SAMPLE_BYTES

SAMPLES_DIR = "samples"
INDEX_NAME = "index.json"
GENERATION_PREFIX = "gen-"
SUFFIX = ".npy"
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
    """The one input of a model, as config.json says: name, dtype name, dims (int or None)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    @property
    def max_bytes(self) -> int:
        """The data bytes of one sample (batch 1 where the batch is symbolic), capped."""
        dims = [d if d is not None else 0 for d in self.shape]
        if self.shape and self.shape[0] is None:
            dims[0] = 1
        if any(d == 0 for d in dims):
            return MAX_DATA_BYTES
        return min(MAX_DATA_BYTES, math.prod(dims) * int(DTYPES[self.dtype][-1]))


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


@dataclass
class _Sample:
    digest: str
    node: str
    at_unix_s: float
    size: int


@dataclass
class _Model:
    samples: dict[str, _Sample] = field(default_factory=dict)     # digest -> sample, oldest first
    generation: str | None = None
    members: frozenset[str] = frozenset()
    previous: str | None = None
    previous_members: frozenset[str] = frozenset()

    def disk_bytes(self, sizes: Mapping[str, int]) -> int:
        held = set(self.samples) | self.members | self.previous_members
        return sum(sizes.get(d, 0) for d in held)


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


def signature_from_config(config: Mapping[str, Any], model: str) -> InputSignature:
    """The model's one input from its config.json; ``SampleRejected`` when it cannot take samples."""
    inputs = config.get("inputs") if isinstance(config, Mapping) else None
    if not isinstance(inputs, list) or not inputs:
        raise SampleRejected("its config.json lists no inputs", code="model")
    if len(inputs) != 1:
        raise SampleRejected(f"the model has {len(inputs)} inputs; field samples are for "
                             "single-input models", code="model")
    spec = inputs[0] if isinstance(inputs[0], Mapping) else {}
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > 8:
        raise SampleRejected(f"input {spec.get('name')!r} has no fixed tensor type",
                             code="model")
    dims = tuple(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None
                 for d in shape)
    return InputSignature(str(spec.get("name", "")), dtype, dims)


def check_sample(data: bytes, signature: InputSignature, model: str) -> tuple[str, tuple[int, ...]]:
    """Validate one ``.npy`` sample against ``signature``; (descr, shape) or ``SampleRejected``.
    Parsed with the standard library: magic, version, a header that is a literal dict, the
    dtype, C order, the shape (a missing batch axis is allowed) and the exact data length."""
    if len(data) > signature.max_bytes + MAX_HEADER_BYTES:
        raise SampleRejected(f"sample is {len(data)} bytes; the input takes at most "
                             f"{signature.max_bytes}", code="size")
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
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
                             f"{[d if d is not None else '?' for d in signature.shape]}",
                             code="shape")
    expected = math.prod(shape) * int(want[-1])
    if expected > signature.max_bytes or len(data) - start - header_len != expected:
        raise SampleRejected(f"sample holds {len(data) - start - header_len} data bytes; shape "
                             f"{list(shape)} needs {expected}", code="size")
    return descr, tuple(shape)


# ---- the area -----------------------------------------------------------------------------------

class SamplesArea:
    """Every model's ``samples/`` folder under ``models_dir``; loaded once, then kept in memory."""

    def __init__(self, models_dir: Path, limits: Limits = Limits()) -> None:
        self.root = Path(models_dir).absolute()
        self.limits = limits
        self._lock = threading.RLock()   # load() runs under it too (lazily, on first use)
        self._models: dict[str, _Model] = {}
        self._sizes: dict[str, int] = {}   # digest -> bytes (content-addressed: same everywhere)
        self._sizes_of: dict[str, dict[str, int]] = {}
        self._signatures: dict[str, tuple[tuple[int, int, int], InputSignature]] = {}
        self._loaded = False

    # -- paths
    def folder(self, model: str) -> Path:
        if not model or "/" in model or model.startswith(".") or "\0" in model:
            raise SampleRejected(f"not a model name: {model[:40]!r}", code="model")
        return self.root / model / SAMPLES_DIR

    def _snapshot(self, model: str, generation: str) -> Path:
        return self.folder(model) / f"{GENERATION_PREFIX}{generation}"

    # -- loading
    def load(self) -> None:
        """Read every model's index (or its files, when the index is missing or damaged)."""
        with self._lock:
            self._models.clear()
            self._sizes_of.clear()
            try:
                names = sorted(p.name for p in self.root.iterdir()
                               if not p.name.startswith(".") and (p / SAMPLES_DIR).is_dir()
                               and not (p / SAMPLES_DIR).is_symlink())
            except OSError:
                names = []
            for name in names:
                self._models[name] = self._read(name)
            self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _read(self, model: str) -> _Model:
        folder = self.folder(model)
        on_disk: dict[str, int] = {}
        remove_leftovers(folder)   # temp files of a write a crash interrupted
        try:
            for entry in os.scandir(folder):
                if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                    on_disk[entry.name[:-len(SUFFIX)]] = entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        try:
            doc = json.loads(read_regular(folder / INDEX_NAME, MAX_INDEX_BYTES))
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        m = _Model()
        listed = doc.get("samples") if isinstance(doc.get("samples"), list) else []
        for row in listed:
            if not isinstance(row, dict) or row.get("sha256") not in on_disk:
                continue
            digest = row["sha256"]
            m.samples[digest] = _Sample(digest, str(row.get("node", ""))[:MAX_NODE_CHARS],
                                        float(row.get("at_unix_s") or 0.0)
                                        if isinstance(row.get("at_unix_s"), (int, float)) else 0.0,
                                        on_disk[digest])
        for digest, size in on_disk.items():   # files the index does not know (a crash)
            if digest not in m.samples:
                m.samples[digest] = _Sample(digest, "", 0.0, size)
        sizes = dict(on_disk)
        for key, members_key in (("generation", "members"), ("previous", "previous_members")):
            gen = doc.get(key)
            members = doc.get(members_key)
            if isinstance(gen, str) and isinstance(members, list) \
                    and generation_id(str(d) for d in members) == gen:
                snap = self._snapshot(model, gen)
                present = {d: (snap / f"{d}{SUFFIX}") for d in members}
                if snap.is_dir() and not snap.is_symlink() and all(p.is_file() for p in present.values()):
                    setattr(m, key, gen)
                    setattr(m, members_key, frozenset(str(d) for d in members))
                    for d, p in present.items():
                        sizes.setdefault(d, p.lstat().st_size)
        self._sizes_of[model] = sizes
        return m

    # -- reading
    def state(self, model: str, needed: int) -> FieldSamples:
        """The model's samples as planning sees them (cheap: memory only)."""
        with self._lock:
            self._ensure_loaded()
            m = self._models.get(model)
            if m is None:
                return FieldSamples(0, needed)
            folder = str(self._snapshot(model, m.generation)) if m.generation else None
            return FieldSamples(len(m.samples), needed, m.generation, folder, len(m.members))

    def rows(self, model: str) -> list[dict[str, Any]]:
        """One row per kept sample, oldest first (``mecha10-modeld samples NAME``)."""
        with self._lock:
            self._ensure_loaded()
            m = self._models.get(model) or _Model()
            return [{"sha256": s.digest, "node": s.node, "at_unix_s": round(s.at_unix_s, 3),
                     "bytes": s.size, "in_generation": s.digest in m.members}
                    for s in m.samples.values()]

    def disk_bytes(self) -> int:
        with self._lock:
            self._ensure_loaded()
            return self._total_bytes()

    def _total_bytes(self) -> int:
        return sum(m.disk_bytes(self._sizes_of.get(n, {})) for n, m in self._models.items())

    # -- writing
    def add(self, model: str, node: str, data: bytes, *, signature: InputSignature,
            needed: int) -> dict[str, Any]:
        """Keep one sample (see the module docstring for the rules); what happened, as the
        ``sample`` answer's fields. ``SampleRejected`` when a rule refuses it."""
        check_sample(data, signature, model)
        digest = hashlib.sha256(data).hexdigest()
        node = (node or "")[:MAX_NODE_CHARS]
        with self._lock:
            self._ensure_loaded()
            m = self._models.setdefault(model, _Model())
            sizes = self._sizes_of.setdefault(model, {})
            if digest in m.samples:
                return self._answer(model, m, digest, needed, stored=False)
            evict = self._eviction(m, node)
            after = self._total_bytes() + len(data) - sum(
                sizes.get(d, 0) for d in evict if d not in m.members | m.previous_members)
            if after > self.limits.budget_bytes:
                raise SampleRejected(f"samples of every model would take {after} bytes; the "
                                     f"budget is {self.limits.budget_bytes}", code="budget")
            folder = self._ensure_folder(model)
            final = folder / f"{digest}{SUFFIX}"
            if digest not in m.members | m.previous_members or not final.exists():
                _write_private(final, data)
            for old in evict:
                self._drop(model, m, old)
            m.samples[digest] = _Sample(digest, node, time.time(), len(data))
            sizes[digest] = len(data)
            cut = should_cut(m.samples, m.members if m.generation else None, needed)
            if cut:
                self._cut(model, m)
            self._write_index(model, m)
            return self._answer(model, m, digest, needed, stored=True, generation_cut=cut)

    def _eviction(self, m: _Model, node: str) -> list[str]:
        mine = [s.digest for s in m.samples.values() if s.node == node]
        if len(mine) >= self.limits.per_node:
            return mine[:len(mine) - self.limits.per_node + 1]
        if len(m.samples) < self.limits.per_model:
            return []
        counts: dict[str, int] = {}
        for s in m.samples.values():
            counts[s.node] = counts.get(s.node, 0) + 1
        richest = max(counts, key=lambda n: counts[n])
        if counts[richest] <= len(mine) + 1 and richest != node:
            raise SampleRejected(f"the samples of this model are full ({len(m.samples)}), and no "
                                 "node holds more than this one", code="full")
        return [next(s.digest for s in m.samples.values() if s.node == richest)]

    def _drop(self, model: str, m: _Model, digest: str) -> None:
        m.samples.pop(digest, None)
        try:
            (self.folder(model) / f"{digest}{SUFFIX}").unlink()
        except FileNotFoundError:
            pass
        if digest not in m.members | m.previous_members:
            self._sizes_of.get(model, {}).pop(digest, None)

    def _cut(self, model: str, m: _Model) -> None:
        """Freeze the pool as a new generation (hard links); keep the previous one, drop older."""
        members = frozenset(m.samples)
        gen = generation_id(members)
        folder = self.folder(model)
        snap = self._snapshot(model, gen)
        if not snap.is_dir():
            work = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{snap.name}"
            os.mkdir(work, 0o750)
            for digest in members:
                os.link(folder / f"{digest}{SUFFIX}", work / f"{digest}{SUFFIX}")
            os.replace(work, snap)
            fsync_dir(folder)
        keep = {gen, m.generation}
        old_members = m.previous_members
        if m.previous and m.previous not in keep:
            shutil.rmtree(self._snapshot(model, m.previous), ignore_errors=True)
        m.previous, m.previous_members = m.generation, m.members
        m.generation, m.members = gen, members
        sizes = self._sizes_of.get(model, {})
        for digest in old_members - m.members - m.previous_members - set(m.samples):
            sizes.pop(digest, None)

    def clear(self, model: str) -> int:
        """Remove every sample and snapshot of ``model``; how many samples there were."""
        with self._lock:
            self._ensure_loaded()
            m = self._models.pop(model, None)
            self._sizes_of.pop(model, None)
            self._signatures.pop(model, None)
            folder = self.folder(model)
            if folder.is_dir() and not folder.is_symlink():
                aside = folder.with_name(f"{TEMP_PREFIX}cleared-{uuid.uuid4().hex[:8]}")
                os.replace(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
            return len(m.samples) if m else 0

    def forget(self, model: str) -> None:
        """The model's folder was removed (``remove``): its samples went with it."""
        with self._lock:
            self._models.pop(model, None)
            self._sizes_of.pop(model, None)
            self._signatures.pop(model, None)

    def _ensure_folder(self, model: str) -> Path:
        folder = self.folder(model)
        parent = folder.parent
        st = os.lstat(parent)   # FileNotFoundError: the model is not pulled
        if not stat.S_ISDIR(st.st_mode):
            raise SampleRejected(f"models/{model} is not a folder", code="model")
        try:
            os.mkdir(folder, 0o750)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise SampleRejected(f"models/{model}/{SAMPLES_DIR} is not a folder",
                                     code="model") from None
        return folder

    def _write_index(self, model: str, m: _Model) -> None:
        doc = {"version": 1,
               "samples": [{"sha256": s.digest, "node": s.node, "at_unix_s": round(s.at_unix_s, 3)}
                           for s in m.samples.values()],
               "generation": m.generation, "members": sorted(m.members),
               "previous": m.previous, "previous_members": sorted(m.previous_members)}
        _write_private(self.folder(model) / INDEX_NAME,
                       json.dumps(doc, separators=(",", ":")).encode())

    def _answer(self, model: str, m: _Model, digest: str, needed: int, *, stored: bool,
                generation_cut: bool = False) -> dict[str, Any]:
        return {"model": model, "sha256": digest, "stored": stored, "count": len(m.samples),
                "needed": needed, "generation": m.generation, "generation_cut": generation_cut}

    # -- the model's signature
    def signature(self, model: str) -> InputSignature:
        """The model's input signature from its config.json (cached by the file's stat)."""
        path = self.root / model / "config.json"
        try:
            st = os.lstat(path)
        except OSError:
            raise SampleRejected("the model is not pulled yet", code="model") from None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._signatures.get(model)
        if known is not None and known[0] == key:
            return known[1]
        try:
            config = json.loads(read_regular(path, 1 << 20))
        except (OSError, ValueError):
            raise SampleRejected("its config.json is unreadable", code="model") from None
        signature = signature_from_config(config, model)
        with self._lock:
            self._signatures[model] = (key, signature)
        return signature


def _write_private(final: Path, data: bytes) -> None:
    """Write ``data`` atomically as a file of mode 0640 or stricter (given when the temp file is
    created, under the umask: never readable by others); no temp is left on failure."""
    temp = temp_path_for(final)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        fsync_dir(final.parent)
    except OSError as e:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        raise disk_error(e, final) from e


def accept(area: SamplesArea, entries: Mapping[str, Any], model: str, node: str,
           data: bytes) -> dict[str, Any]:
    """A node's sample for catalog entry ``model`` (the server's ``on_sample``, in a thread)."""
    entry = entries.get(model)
    if entry is None:
        raise SampleRejected("the model is not in the catalog", code="model")
    if not uses_field_samples(entry):
        spec = entry.quantize
        why = ("quantization is off" if spec is None or not spec.enabled else
               f"its catalog entry names a calibration folder" if spec.calibration else
               f"method {spec.method} does not calibrate")
        raise SampleRejected(f"its entry does not use field samples ({why})", code="unused")
    return area.add(model, node, data, signature=area.signature(model), needed=needed_for(entry))


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


def field_samples_context(area: SamplesArea, catalog: Any) -> dict[str, FieldSamples]:
    """The plan context's ``field_samples``: every entry that calibrates on them."""
    return {name: area.state(name, needed_for(entry)) for name, entry in catalog.entries.items()
            if uses_field_samples(entry)}


def quantizer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A method's options as the quantizer takes them: ``field_samples`` is the daemon's."""
    return {k: v for k, v in params.items() if k != "field_samples"}


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
    return pa == pb and ca != cb and _is_generation(ca) and _is_generation(cb) \
        and (a.onnx, a.onnxruntime) == (b.onnx, b.onnxruntime)


def _is_generation(folder: Any) -> bool:
    """None (no calibration data: synthetic inputs) or a generation's snapshot folder."""
    return folder is None or isinstance(folder, str) and Path(folder).parent.name == SAMPLES_DIR \
        and Path(folder).name.startswith(GENERATION_PREFIX)
