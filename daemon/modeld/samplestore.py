"""The field samples area under ``models/<name>/samples/``: the daemon's I/O side of
``modeld.samples`` (whose docstring has the rules: caps, dedupe, generations).

``SamplesArea.add`` checks a node's sample (``samples.check_sample``), enforces the caps and writes
it atomically; ``state`` tells planning how many there are and which generation to use. Standard
library only (the daemon's process): thread-safe, called off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .atomic import TEMP_PREFIX, fsync_dir, read_regular, remove_leftovers, write_atomic
from .samples import (FILE_MODE, GENERATION_PREFIX, INDEX_NAME, MAX_INDEX_BYTES, MAX_NODE_CHARS,
                      SAMPLES_DIR, SUFFIXES, FieldSamples, InputSignature, Limits, SampleRejected,
                      Signature, check_sample, generation_id, needed_for, should_cut,
                      signature_from_config, uses_field_samples)


@dataclass
class _Sample:
    digest: str
    node: str
    at_unix_s: float
    size: int
    suffix: str = SUFFIXES[0]     # .npy, or .npz for a model of several inputs

    @property
    def file_name(self) -> str:
        return f"{self.digest}{self.suffix}"


@dataclass
class _Model:
    samples: dict[str, _Sample] = field(default_factory=dict)     # digest -> sample, oldest first
    generation: str | None = None
    members: frozenset[str] = frozenset()
    previous: str | None = None
    previous_members: frozenset[str] = frozenset()
    #: the generation the serving variant was calibrated on (kept while it serves: its proof is
    #: made again on it), whatever was cut since
    proven: str | None = None
    proven_members: frozenset[str] = frozenset()

    @property
    def snapshotted(self) -> frozenset[str]:
        return self.members | self.previous_members | self.proven_members

    def disk_bytes(self, sizes: Mapping[str, int]) -> int:
        return sum(sizes.get(d, 0) for d in set(self.samples) | self.snapshotted)


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
        self._signatures: dict[str, tuple[tuple[int, int, int], Signature]] = {}
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
        suffixes: dict[str, str] = {}
        remove_leftovers(folder)   # temp files of a write a crash interrupted
        try:
            for entry in os.scandir(folder):
                digest, suffix = _split_name(entry.name)
                if suffix and entry.is_file(follow_symlinks=False):
                    on_disk[digest] = entry.stat(follow_symlinks=False).st_size
                    suffixes[digest] = suffix
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
                                        on_disk[digest], suffixes[digest])
        for digest, size in on_disk.items():   # files the index does not know (a crash)
            if digest not in m.samples:
                m.samples[digest] = _Sample(digest, "", 0.0, size, suffixes[digest])
        sizes = dict(on_disk)
        for key, members_key in (("generation", "members"), ("previous", "previous_members"),
                                 ("proven", "proven_members")):
            gen = doc.get(key)
            members = doc.get(members_key)
            if isinstance(gen, str) and isinstance(members, list) \
                    and generation_id(str(d) for d in members) == gen:
                snap = self._snapshot(model, gen)
                present = {d: _sample_file(snap, str(d)) for d in members}
                if snap.is_dir() and not snap.is_symlink() and all(present.values()):
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
    def add(self, model: str, node: str, data: bytes, *,
            signature: Signature | InputSignature, needed: int) -> dict[str, Any]:
        """Keep one sample (see the module docstring for the rules); what happened, as the
        ``sample`` answer's fields. ``SampleRejected`` when a rule refuses it. What is kept is
        what ``check_sample`` checked (an .npz repacked), under its own digest."""
        checked = check_sample(data, signature, model)
        data = checked.data
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
                sizes.get(d, 0) for d in evict if d not in m.snapshotted)
            if after > self.limits.budget_bytes:
                raise SampleRejected(f"samples of every model would take {after} bytes; the "
                                     f"budget is {self.limits.budget_bytes}", code="budget")
            folder = self._ensure_folder(model)
            final = folder / f"{digest}{checked.suffix}"
            if digest not in m.snapshotted or not final.exists():
                write_atomic(final, data, mode=FILE_MODE)   # never readable by others
            for old in evict:
                self._drop(model, m, old)
            m.samples[digest] = _Sample(digest, node, time.time(), len(data), checked.suffix)
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
        dropped = m.samples.pop(digest, None)
        try:
            if dropped is not None:
                (self.folder(model) / dropped.file_name).unlink()
        except FileNotFoundError:
            pass
        if digest not in m.snapshotted:
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
                name = m.samples[digest].file_name
                os.link(folder / name, work / name)
            os.replace(work, snap)
            fsync_dir(folder)
        old = (m.previous, m.previous_members)
        m.previous, m.previous_members = m.generation, m.members
        m.generation, m.members = gen, members
        self._release(model, m, *old)

    def _release(self, model: str, m: _Model, generation: str | None,
                 members: frozenset[str]) -> None:
        """Remove the snapshot of ``generation`` unless it is current, previous or proven."""
        if generation is None or generation in (m.generation, m.previous, m.proven):
            return
        shutil.rmtree(self._snapshot(model, generation), ignore_errors=True)
        sizes = self._sizes_of.get(model, {})
        for digest in members - m.snapshotted - set(m.samples):
            sizes.pop(digest, None)

    def proven(self, model: str, folder: str | None) -> None:
        """A variant calibrated on ``folder`` passed its proof and serves: keep that generation
        (its re-proofs read it) until another one proves. Not a generation of ``model``: no-op."""
        with self._lock:
            self._ensure_loaded()
            m = self._models.get(model)
            if m is None or folder is None or Path(folder).parent != self.folder(model):
                return
            gen = Path(folder).name[len(GENERATION_PREFIX):]
            members = {m.generation: m.members, m.previous: m.previous_members,
                       m.proven: m.proven_members}.get(gen)
            if members is None or gen == m.proven:
                return   # a generation no longer kept, or already the proven one
            old = (m.proven, m.proven_members)
            m.proven, m.proven_members = gen, members
            self._release(model, m, *old)
            self._write_index(model, m)

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
               "previous": m.previous, "previous_members": sorted(m.previous_members),
               "proven": m.proven, "proven_members": sorted(m.proven_members)}
        write_atomic(self.folder(model) / INDEX_NAME,
                     json.dumps(doc, separators=(",", ":")).encode(), mode=FILE_MODE)

    def _answer(self, model: str, m: _Model, digest: str, needed: int, *, stored: bool,
                generation_cut: bool = False) -> dict[str, Any]:
        return {"model": model, "sha256": digest, "stored": stored, "count": len(m.samples),
                "needed": needed, "generation": m.generation, "generation_cut": generation_cut}

    # -- the model's signature
    def signature(self, model: str) -> Signature:
        """The model's inputs from its config.json (cached by the file's stat)."""
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


def _split_name(name: str) -> tuple[str, str]:
    """A kept sample's file name -> (digest, suffix); suffix '' for any other file."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], suffix
    return name, ""


def _sample_file(folder: Path, digest: str) -> Path | None:
    """The file of sample ``digest`` in ``folder`` (a snapshot), whichever its suffix."""
    for suffix in SUFFIXES:
        path = folder / f"{digest}{suffix}"
        if path.is_file() and not path.is_symlink():
            return path
    return None


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


def field_samples_context(area: SamplesArea, catalog: Any) -> dict[str, FieldSamples]:
    """The plan context's ``field_samples``: every entry that calibrates on them."""
    return {name: area.state(name, needed_for(entry)) for name, entry in catalog.entries.items()
            if uses_field_samples(entry)}


