"""Plain tables for the planning and views tests: catalog entries, manifests of a complete pull
(and of its INT8), and the scanned states of them. No disk, no clock.
"""

from __future__ import annotations

from dataclasses import replace

from modeld.catalog import Catalog, parse_catalog
from modeld.manifest import FileRecord, Manifest, Provenance
from modeld.planning import (CONFIG_FILE, FP32_FILE, LABELS_FILE, PlanContext, config_derivation,
                             derived_proof_key, desired_derivation, proof_key)
from modeld.inventory import OK, FileState, ModelState
from modeld.variants import FP32, Gates, Proof, ProviderProof

CTX = PlanContext(providers=("CPUExecutionProvider",), onnx_version="1.0", onnxruntime_version="1.2")
COMMIT = "a" * 40


def entry(quantize: str = "", revision: str = "", labels: bool = True, name: str = "det"):
    text = f'''
[[models]]
name = "{name}"
repo = "acme/det"
filename = "det/model.onnx"
task = "object-detection"
{'revision = "%s"' % revision if revision else ''}
{'labels = "det/labels.txt"' if labels else ''}
{quantize}
'''
    return parse_catalog(text).entries[name]


QUANT = '[models.quantize]\nenabled = true\nmethod = "dynamic_int8"'
QUANT_OFF = '[models.quantize]\nenabled = false\nmethod = "dynamic_int8"'


def rec(name: str, sha: str, **kw) -> FileRecord:
    return FileRecord(name=name, sha256=sha, size=10, mtime_ns=1, inode=1, **kw)


def proof_for(record: FileRecord, key: str, passed: bool = True) -> Proof:
    return Proof(variant=FP32, file_sha256=record.sha256, key=key, checker_ok=True,
                 providers=(ProviderProof("CPUExecutionProvider", usable=True, passed=passed),))


def pulled(e, *, fp32_sha: str = "f" * 64, revision: str | None = None) -> Manifest:
    """A manifest of a complete, proven pull of entry ``e``."""
    prov = Provenance(e.repo, e.filename, revision if revision is not None else e.revision,
                      COMMIT, '"etag"')
    fp32 = rec(FP32_FILE, fp32_sha, provenance=prov)
    files = {FP32_FILE: fp32}
    labels = None
    if e.labels:
        labels = rec(LABELS_FILE, "1" * 64, provenance=replace(prov, filename=e.labels))
        files[LABELS_FILE] = labels
    files[CONFIG_FILE] = rec(CONFIG_FILE, "2" * 64, derivation=config_derivation(e, fp32, labels))
    m = Manifest(name=e.name, files=files)
    key = proof_key(file_sha256=fp32.sha256, reference_sha256=None, providers=CTX.providers,
                    gates=Gates(), onnxruntime=CTX.onnxruntime_version, simulated={})
    return m.with_proof(FP32_FILE, proof_for(fp32, key))


def with_int8(e, m: Manifest, *, proven: bool = True) -> Manifest:
    d = desired_derivation(e, m.files[FP32_FILE], CTX)
    r = rec("model-int8.onnx", "8" * 64, derivation=d)
    m = m.with_file(r)
    if proven:
        m = m.with_proof(r.name, proof_for(r, derived_proof_key(e, r, m.files[FP32_FILE], CTX)))
    return m


def state(m: Manifest, **statuses: str) -> ModelState:
    files = {n: FileState(n, statuses.get(n.replace("-", "_").replace(".", "_"), OK), r, "x")
             for n, r in m.files.items()}
    return ModelState(name=m.name, manifest=m, files=files)


def catalog_of(*entries):
    return Catalog(path="c.toml", entries={e.name: e for e in entries})
