"""Which failures are remembered across restarts, and how an operator retries them.

A derive job that failed permanently is recorded in the manifest for exactly its inputs, so the
same inputs are not quantized again and again. Real Store, manifests and catalog files; the
reconciler's failure bookkeeping is called directly (no worker needed to fail)."""

from __future__ import annotations

import asyncio

from modeld.errors import QuantizeError
from modeld.manifest import FileRecord
from modeld.planning import Derive, desired_derivation
from modeld.variants import FP32, Gates, Proof, ProviderProof, proof_key
from tests.support.stores import reconciler_on_pulled_det
from tests.support.workspace import entry_toml


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


# ---- the backoff itself (modeld.failures, no reconciler) ---------------------------------------

def _failures():
    from modeld.failures import Failures
    return Failures(base_s=2.0, cap_s=10.0, max_timeouts=3, jitter=lambda: 1.0)


def _entry(revision: str | None = None, quantize: str | None = None):
    from modeld.catalog import parse_catalog
    text = entry_toml("det", labels=None, revision=revision, quantize=quantize)
    return parse_catalog(text).entries["det"]


def test_a_temporary_failure_backs_off_exponentially_up_to_the_cap():
    from modeld.errors import HubUnavailableError
    from modeld.planning import Pull
    failures = _failures()
    action = Pull("det", _entry(), "test")
    delays = [failures.record(action, HubUnavailableError("down", retry_after_s=0),
                              now=100.0).delay_s
              for _ in range(5)]
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert failures.hold(action, now=105.0) == 5.0          # retry_at 110
    assert failures.hold(action, now=110.0) is None
    assert failures.hold(action, now=105.0, oneshot=True) == float("inf")
    other = Pull("det", _entry(revision="v2"), "test")      # another desired state: runs now
    assert failures.hold(other, now=105.0) is None
    assert failures.record(other, HubUnavailableError("down"), now=0).attempts == 1
    assert failures.forget_pulls() == ["det"] and failures.get("det") is None


def test_a_permanent_failure_holds_until_an_input_changes_and_timeouts_become_permanent():
    from modeld.errors import PermanentError, WorkerTimeoutError
    from modeld.planning import PlanContext
    failures = _failures()
    entry = _entry(quantize="dynamic_int8")
    ctx = PlanContext(providers=("CPUExecutionProvider",), onnx_version="1",
                      onnxruntime_version="1")
    derivation = desired_derivation(entry, FileRecord("model.onnx", "f" * 64, 1, 1, 1), ctx)
    action = Derive("det", entry, derivation, "test")
    assert failures.record(action, QuantizeError("boom", entry="det"), now=0).retry_at is None
    assert failures.hold(action, now=1e9) == float("inf")
    failures.succeeded("det")
    errors = [failures.record(action, WorkerTimeoutError("slow"), now=0).error
              for _ in range(3)]
    assert [type(e) for e in errors] == [WorkerTimeoutError, WorkerTimeoutError, PermanentError]
    assert "3 times in a row: given up" in str(errors[-1])
    assert failures.forget("det") and not failures.forget("det")
