"""Real stores for the unit tier: bit rot that keeps the stat, and a reconciler over a store with
one pulled model (no worker runs: its bookkeeping is called directly).
"""

from __future__ import annotations

import os
from pathlib import Path

from modeld.catalog_file import CatalogKeeper
from modeld.manifest import FileRecord, Provenance
from modeld.planning import Derive, config_derivation, desired_derivation
from modeld.reconciler import Reconciler
from modeld.settings import Settings
from modeld.store import Store, sha256_file
from tests.support.workspace import entry_toml


def rot_in_place(path) -> None:
    """Flip one byte and put size, mtime and inode back as they were: what bit rot looks like."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def reconciler_on_pulled_det(tmp_path: Path) -> tuple[Reconciler, Store, Derive]:
    """A reconciler on a real store under ``tmp_path`` holding ``det`` as pulled (an FP32 file and
    its config.json in the manifest), its catalog asking for dynamic_int8; with the ``Derive``
    that INT8 would be made by."""
    catalog = tmp_path / "model_catalog.toml"
    catalog.write_text(entry_toml("det", labels=None, quantize="dynamic_int8"))
    settings = Settings(catalog_path=catalog, models_dir=tmp_path / "models",
                        socket_path=tmp_path / "s.sock")
    store = Store(settings.models_dir)
    keeper = CatalogKeeper(catalog)
    keeper.reload()
    reconciler = Reconciler(settings, store=store, catalog=keeper)
    folder = store.model_dir("det")
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"fp32 bytes")
    st = (folder / "model.onnx").stat()
    record = FileRecord("model.onnx", sha256_file(folder / "model.onnx"), st.st_size,
                        st.st_mtime_ns, st.st_ino,
                        provenance=Provenance("acme/detector", "det/model.onnx", None, "c" * 40, "e"))
    entry = keeper.current.entries["det"]
    (folder / "config.json").write_text("{}")
    st = (folder / "config.json").stat()
    config = FileRecord("config.json", sha256_file(folder / "config.json"), st.st_size,
                        st.st_mtime_ns, st.st_ino, derivation=config_derivation(entry, record, None))
    store.update_manifest("det", lambda m: m.with_file(record).with_file(config))
    derivation = desired_derivation(entry, record, reconciler.context())
    return reconciler, store, Derive("det", entry, derivation, "test")
