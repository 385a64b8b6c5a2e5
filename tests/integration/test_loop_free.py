"""Disk work stays off the event loop that serves the nodes: while a scan hashes a file (a stand-in
hasher that holds until the test lets it go), the daemon's real socket keeps answering."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path

from modeld import client
from modeld.catalog_file import CatalogKeeper
from modeld.layout import FP32_FILE
from modeld.manifest import FileRecord, Manifest
from modeld.reconciler import Reconciler
from modeld.server import Server
from modeld.settings import Settings
from modeld.store import Store, sha256_file

CATALOG = '[[models]]\nname = "det"\nrepo = "acme/det"\nfilename = "model.onnx"\n'


def test_the_socket_answers_while_a_scan_hashes_a_touched_file(tmp_path):
    models, catalog = tmp_path / "models", tmp_path / "model_catalog.toml"
    catalog.write_text(CATALOG)
    folder = models / "det"
    folder.mkdir(parents=True)
    fp32 = folder / FP32_FILE
    fp32.write_bytes(os.urandom(4096))
    st = fp32.stat()
    record = FileRecord(FP32_FILE, sha256_file(fp32), st.st_size, st.st_mtime_ns, st.st_ino)
    Store(models).write_manifest(Manifest(name="det", files={FP32_FILE: record}))
    os.utime(fp32, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same size, new stat

    hashing, release = threading.Event(), threading.Event()

    def slow_hash(path: Path) -> str:   # a large file on a slow disk, held by the test
        hashing.set()
        release.wait(10)
        return sha256_file(path)

    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    sock = Path(tempfile.mkdtemp(prefix="loop-")) / "modeld.sock"
    store = Store(models, hasher=slow_hash)
    server = Server(socket_path=sock)
    reconciler = Reconciler(Settings(models_dir=models, catalog_path=catalog, socket_path=sock),
                            store=store, catalog=CatalogKeeper(catalog), publish=server.publish)

    async def main() -> None:
        await server.start()
        try:
            scan = asyncio.ensure_future(reconciler.reconcile(dispatch=False))
            assert await asyncio.to_thread(hashing.wait, 10), "the scan never hashed"
            answer = await asyncio.to_thread(client.request, {"op": "ping"}, socket_path=sock,
                                             timeout_s=5)
            assert answer["event"] == "pong"
            assert not scan.done()            # the hash still runs: the loop answered meanwhile
            release.set()
            await scan
        finally:
            release.set()
            await server.close()

    asyncio.run(main())
    assert store.hash_count == 1
    state = store.scan_model("det")
    assert state is not None and state.intact(FP32_FILE) and state.new_stats
    os.rmdir(sock.parent)
