"""Which failures are remembered across restarts, and how an operator retries them.

A derive job that failed permanently is recorded in the manifest for exactly its inputs, so the
same inputs are not quantized again and again. Real Store, manifests and catalog files; the
reconciler's failure bookkeeping is called directly (no worker needed to fail)."""

from __future__ import annotations

import asyncio

from modeld.errors import QuantizeError
from modeld.planning import Derive
from modeld.variants import FP32, Gates, Proof, ProviderProof, proof_key
from tests.support.stores import reconciler_on_pulled_det


def test_a_failed_quantization_is_remembered_for_its_inputs(tmp_path):
    reconciler, store, action = reconciler_on_pulled_det(tmp_path)
    reconciler._record_failure(action, QuantizeError("unsupported operator", entry="det"))
    assert store.read_manifest("det").failures == {
        action.derivation.key(): "det: unsupported operator"}
    # the planner does not ask for the same quantization again
    assert not any(isinstance(a, Derive) for a in _plan_with_fp32_proven(reconciler, store))


def test_a_failure_while_the_source_vanished_is_not_remembered(tmp_path):
    """The FP32 file deleted (or replaced) under a running quantization: the error says nothing
    about these inputs, and a persisted failure would keep the re-pulled model from ever being
    quantized again."""
    reconciler, store, action = reconciler_on_pulled_det(tmp_path)
    (store.model_dir("det") / "model.onnx").unlink()
    reconciler._record_failure(action, QuantizeError("No such file: model.onnx", entry="det"))
    assert store.read_manifest("det").failures == {}
    assert "det" in reconciler.failed_models()          # still shown until the next success


def test_an_operator_retry_forgets_failures_in_memory_and_on_disk(tmp_path):
    reconciler, store, action = reconciler_on_pulled_det(tmp_path)
    reconciler._record_failure(action, QuantizeError("calibration folder is empty", entry="det"))
    assert not _plan_with_fp32_proven(reconciler, store)
    assert reconciler.forget_failures() == ["det"]
    assert store.read_manifest("det").failures == {} and reconciler.failed_models() == {}
    assert reconciler.forget_failures() == []
    assert [type(a) for a in _plan_with_fp32_proven(reconciler, store)] == [Derive]


def _plan_with_fp32_proven(reconciler, store):
    """The actions of one pass (not run), once FP32 carries a current proof."""
    ctx = reconciler.context()
    fp32 = store.read_manifest("det").files["model.onnx"]
    key = proof_key(file_sha256=fp32.sha256, reference_sha256=None, providers=ctx.providers,
                    gates=Gates(), onnxruntime=ctx.onnxruntime_version, simulated=ctx.simulated)
    proof = Proof(variant=FP32, file_sha256=fp32.sha256, key=key, checker_ok=True,
                  providers=(ProviderProof("CPUExecutionProvider", usable=True, passed=True),))
    store.update_manifest("det", lambda m: m.with_proof("model.onnx", proof))
    return asyncio.run(reconciler.reconcile(dispatch=False))


def test_a_file_that_vanishes_under_a_worker_is_retried_not_final(tmp_path):
    """Planning saw every input before the job: a FileNotFoundError in a worker is a race
    (a file deleted or renamed over meanwhile), retried with backoff, never a permanent error."""
    from modeld.errors import FileVanishedError, PermanentError, TemporaryError
    from modeld.jobs import _to_modeld_error
    try:
        (tmp_path / "labels.txt").read_text()
    except FileNotFoundError as e:
        error = _to_modeld_error(e)
    assert isinstance(error, FileVanishedError) and isinstance(error, TemporaryError)
    assert "labels.txt" in str(error) and "\n" not in str(error)
    assert isinstance(_to_modeld_error(PermissionError(13, "denied")), PermanentError)
