"""``handoff``: an action -> its typed worker request, a result -> the manifest change. Pure: no
disk, no processes; the requests and results cross a ``spawn`` boundary, so they must pickle."""

from __future__ import annotations

import pickle
from dataclasses import replace

from modeld.catalog import parse_catalog
from modeld.handoff import apply, request_for
from modeld.manifest import FileRecord, Manifest, Provenance
from modeld.planning import (CONFIG_FILE, FP32_FILE, LABELS_FILE, Derive, PlanContext, Prove, Pull,
                             RestoreMode, config_derivation, derived_proof_key,
                             desired_derivation, plan_model, proof_basis)
from modeld.settings import Settings
from modeld.store import OK, FileState, ModelState
from modeld.variants import FP32, INT8, Gates, Proof, ProviderProof
from modeld.work import (FetchRequest, FetchResult, ProofBasis, ProveRequest, QuantizeRequest,
                         QuantizeResult)

CPU = "CPUExecutionProvider"
OV = "OpenVINOExecutionProvider"
CTX = PlanContext(providers=(CPU,), onnx_version="1.0", onnxruntime_version="1.2",
                  simulated={"CoreMLExecutionProvider": ("ConvInteger",)},
                  runtimes={OV: "/opt/ov/bin/python ort 1.24.1"})
SETTINGS = Settings(hub_endpoint="http://127.0.0.1:9", hub_offline=True, pull_attempts=2,
                    runtimes={OV: "/opt/ov/bin/python"},
                    simulated_providers={"CoreMLExecutionProvider": ("ConvInteger",)})
ENTRY = parse_catalog('''
[[models]]
name = "det"
repo = "acme/det"
filename = "det/model.onnx"
labels = "det/labels.txt"
task = "object-detection"
preprocessing_preset = "yolo"
input_size = 320
providers = ["CPUExecutionProvider", "OpenVINOExecutionProvider"]
[models.quantize]
method = "static_int8"
calibration = "/cal"
samples = 8
min_cosine = 0.98
''').entries["det"]


def rec(name: str, sha: str, **kw) -> FileRecord:
    return FileRecord(name=name, sha256=sha, size=10, mtime_ns=1, inode=1, **kw)


FP32_RECORD = rec(FP32_FILE, "f" * 64, provenance=Provenance("acme/det", "det/model.onnx", None,
                                                            "c" * 40, '"e"'))
DERIVATION = desired_derivation(ENTRY, FP32_RECORD, CTX)


def proof(file_sha: str, key: str, variant: str = INT8) -> Proof:
    return Proof(variant=variant, file_sha256=file_sha, key=key, checker_ok=True,
                 providers=(ProviderProof(CPU, usable=True, passed=True),))


def test_a_pull_request_carries_the_entry_the_settings_and_the_known_records():
    known = {FP32_FILE: FP32_RECORD}
    request = request_for(Pull("det", ENTRY, "test"), model_dir="/m/det", settings=SETTINGS,
                          context=CTX, known=known, token="hf_x")
    assert isinstance(request, FetchRequest) and request.target.startswith("modeld.workers.fetch:")
    assert (request.repo, request.filename, request.labels, request.input_size) == (
        "acme/det", "det/model.onnx", "det/labels.txt", 320)
    assert (request.endpoint, request.offline, request.attempts, request.token) == (
        "http://127.0.0.1:9", True, 2, "hf_x")
    assert request.known == known


def test_a_quantize_request_carries_the_daemons_derivation_and_proof_basis():
    request = request_for(Derive("det", ENTRY, DERIVATION, "test"), model_dir="/m/det",
                          settings=SETTINGS, context=CTX)
    assert isinstance(request, QuantizeRequest)
    assert request.derivation is DERIVATION                      # the one derivation, as planned
    assert request.basis == proof_basis(CTX) == ProofBasis("1.2", CTX.runtimes)
    # the worker gets the options it takes; field_samples is the daemon's (when to cut a generation)
    assert request.params == {k: v for k, v in ENTRY.quantize.params.items()
                              if k != "field_samples"} and request.params["samples"] == 8
    assert request.providers == (CPU, OV) and request.runtimes == {OV: "/opt/ov/bin/python"}
    assert request.gates == ENTRY.quantize.gates and request.calibration == "/cal"
    # what the worker will key the proof of the file it publishes by is the planner's key
    built = rec("model-int8.onnx", "8" * 64, derivation=DERIVATION)
    assert request.basis.key(file_sha256=built.sha256, reference_sha256=FP32_RECORD.sha256,
                             providers=request.providers, gates=request.gates,
                             simulated=request.simulated) == \
        derived_proof_key(ENTRY, built, FP32_RECORD, CTX)


def test_fp32_is_proven_without_calibration_and_a_variant_with_it():
    fp32 = request_for(Prove("det", ENTRY, FP32_FILE, FP32, "k", None, Gates(), "test"),
                       model_dir="/m/det", settings=SETTINGS, context=CTX)
    int8 = request_for(Prove("det", ENTRY, "model-int8.onnx", INT8, "k", FP32_FILE,
                             ENTRY.quantize.gates, "test"), model_dir="/m/det",
                       settings=SETTINGS, context=CTX)
    assert isinstance(fp32, ProveRequest) and fp32.calibration is None
    assert int8.calibration == "/cal" and int8.reference_file == FP32_FILE
    assert int8.gates == ENTRY.quantize.gates and fp32.basis == proof_basis(CTX)


def test_requests_and_results_pickle():
    record = rec("model-int8.onnx", "8" * 64, derivation=DERIVATION)
    results = [FetchResult(files=(FP32_RECORD,), commit="c" * 40, downloaded_bytes=10,
                           changed=True),
               QuantizeResult(record=record, variant=INT8, proof=proof(record.sha256, "k"),
                              candidates=({"recipe": "static"},), warnings=("w",)),
               proof(record.sha256, "k")]
    requests = [request_for(a, model_dir="/m/det", settings=SETTINGS, context=CTX)
                for a in (Pull("det", ENTRY, "t"), Derive("det", ENTRY, DERIVATION, "t"),
                          Prove("det", ENTRY, FP32_FILE, FP32, "k", None, Gates(), "t"))]
    for value in (*results, *requests):
        assert pickle.loads(pickle.dumps(value)) == value


def test_a_pull_writes_its_records_and_derives_config_from_them():
    labels = rec(LABELS_FILE, "1" * 64)
    config = rec(CONFIG_FILE, "2" * 64)
    result = FetchResult(files=(FP32_RECORD, labels, config), commit="c" * 40,
                         downloaded_bytes=30, changed=True)
    m = apply(Pull("det", ENTRY, "t"), result)(Manifest(name="det"))
    assert m.files[FP32_FILE] == FP32_RECORD and m.files[LABELS_FILE] == labels
    assert m.files[CONFIG_FILE].derivation == config_derivation(ENTRY, FP32_RECORD, labels)


def test_a_quantization_is_recorded_as_it_came_back_and_clears_its_failure():
    record = rec("model-int8.onnx", "8" * 64, derivation=DERIVATION)
    key = derived_proof_key(ENTRY, record, FP32_RECORD, CTX)
    before = Manifest(name="det").with_file(FP32_RECORD).with_failure(DERIVATION.key(), "boom")
    result = QuantizeResult(record=record, variant=INT8, proof=proof(record.sha256, key),
                            candidates=(), warnings=())
    after = apply(Derive("det", ENTRY, DERIVATION, "t"), result)(before)
    assert after.files[record.name] is record and after.proofs[record.name] is result.proof
    assert after.failures == {}
    # and the planner is satisfied: nothing computed again, nothing overwritten
    fp32_proven = after.with_proof(FP32_FILE, proof(FP32_RECORD.sha256, proof_basis(CTX).key(
        file_sha256=FP32_RECORD.sha256, reference_sha256=None, providers=(CPU, OV),
        gates=Gates(), simulated=CTX.simulated), variant=FP32))
    config = rec(CONFIG_FILE, "2" * 64, derivation=config_derivation(ENTRY, FP32_RECORD, None))
    entry = replace(ENTRY, labels=None)
    done = fp32_proven.with_file(config)
    files = {n: FileState(n, OK, r, "") for n, r in done.files.items()}
    assert plan_model(entry, ModelState("det", done, files), CTX) is None


def test_a_proof_of_a_file_that_changed_meanwhile_is_not_recorded():
    record = rec("model-int8.onnx", "8" * 64, derivation=DERIVATION)
    m = Manifest(name="det").with_file(FP32_RECORD).with_file(record)
    action = Prove("det", ENTRY, record.name, INT8, "planned", FP32_FILE, Gates(), "t")
    kept = apply(action, proof(record.sha256, "planned"))(m)
    assert kept.proofs[record.name].key == "planned"
    assert apply(action, proof("0" * 64, "planned"))(m) == m


def test_a_repair_changes_no_record():
    m = Manifest(name="det").with_file(FP32_RECORD)
    assert apply(RestoreMode("det", FP32_FILE, "t"), None)(m) is m


def test_the_share_requests_carry_the_daemons_derivation_and_its_outcomes_are_recorded():
    """Issue 15 on the typed boundary: ``Adopt`` asks the share for the daemon's derivation,
    ``Share`` uploads the record and proof the manifest holds; both outcomes are remembered
    (so nothing is asked twice) and an adopted file is published as the worker returned it."""
    from modeld import share
    from modeld.planning import Adopt, Share
    from modeld.work import AdoptRequest, AdoptResult, UploadRequest, UploadResult
    shared = replace(ENTRY, quantize=replace(ENTRY.quantize, share="fleet/variants"))
    adopt = Adopt("det", shared, DERIVATION, "look in the share first")
    request = request_for(adopt, model_dir="/m/det", settings=SETTINGS, context=CTX, token="t")
    assert isinstance(request, AdoptRequest) and request.derivation is DERIVATION
    assert (request.share, request.file_name, request.token) == ("fleet/variants",
                                                                "model-int8.onnx", "t")
    int8 = rec("model-int8.onnx", "8" * 64, derivation=DERIVATION)
    result = pickle.loads(pickle.dumps(AdoptResult(share.ADOPTED, "from fleet/variants@abc",
                                                   record=int8, commit="a" * 40)))
    m = apply(adopt, result)(Manifest("det").with_file(FP32_RECORD))
    assert m.files["model-int8.onnx"] == int8
    assert m.shares[share.adopt_key(DERIVATION)]["outcome"] == share.ADOPTED
    assert "record" not in m.shares[share.adopt_key(DERIVATION)]
    missed = apply(adopt, AdoptResult(share.NONE, "none"))(Manifest("det").with_file(FP32_RECORD))
    assert "model-int8.onnx" not in missed.files
    up = Share("det", shared, "model-int8.onnx", int8.sha256, "built and proven here")
    key = derived_proof_key(shared, int8, FP32_RECORD, CTX)
    manifest = m.with_proof(int8.name, proof(int8.sha256, key))
    upload = request_for(up, model_dir="/m/det", settings=SETTINGS, context=CTX, token=None,
                         manifest=manifest)
    assert isinstance(upload, UploadRequest)
    assert upload.record == int8 and upload.proof == manifest.proofs[int8.name]
    done = apply(up, UploadResult(share.DENIED, "no HF_TOKEN"))(manifest)
    assert done.shares[share.upload_key(int8.sha256)]["outcome"] == share.DENIED
