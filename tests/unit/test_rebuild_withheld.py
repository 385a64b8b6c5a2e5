"""A variant rebuilt from a newer generation of field samples replaces the one serving only when
it passes wherever that one passes (issue 13): planned, requested, withheld, recorded, and the
generation the serving variant was calibrated on kept on disk."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np

from modeld.handoff import apply, request_for
from modeld.planning import Derive, derived_proof_key, plan_model
from modeld.samples import FieldSamples, InputSignature, Limits
from modeld.samplestore import SamplesArea
from modeld.settings import Settings
from modeld.variants import INT8, Proof, ProviderProof, Serving, still_serving, withheld_reason
from modeld.views import Activity, model_view
from modeld.work import QuantizeResult
from tests.support.plans import CTX, entry, pulled, rec, state

CPU, OV = "CPUExecutionProvider", "OpenVINOExecutionProvider"
AUTO = '[models.quantize]\nenabled = true\nmethod = "auto"\nfield_samples = 4'


def generation(n: int, name: str) -> FieldSamples:
    return FieldSamples(n, 4, name, f"/m/det/samples/gen-{name}", n)


def built_proof(sha: str, *passes: str, providers=(CPU, OV)) -> Proof:
    return Proof(variant=INT8, file_sha256=sha, key="k", checker_ok=True,
                 providers=tuple(ProviderProof(p, usable=True, passed=p in passes,
                                               reason="" if p in passes else "F1 0.41 < 0.9")
                                 for p in providers))


def serving_a(e):
    """A manifest whose INT8 was built from generation A and proven on the CPU."""
    ctx = replace(CTX, field_samples={"det": generation(4, "aaaa")})
    first = plan_model(e, state(pulled(e)), ctx)
    assert isinstance(first, Derive) and first.serving is None   # nothing serves yet
    r = rec("model-int8.onnx", "8" * 64, derivation=first.derivation)
    m = pulled(e).with_file(r)
    return m.with_proof(r.name, replace(built_proof(r.sha256, CPU, providers=(CPU,)),
                                        key=derived_proof_key(e, r, m.files["model.onnx"], ctx))), r


def test_a_rebuild_from_newer_samples_must_pass_where_the_serving_variant_passes():
    e = entry(AUTO)
    m, served = serving_a(e)
    newer = replace(CTX, field_samples={"det": generation(6, "bbbb")})
    action = plan_model(e, state(m), newer)
    assert isinstance(action, Derive) and action.serving == Serving("model-int8.onnx", INT8, (CPU,))
    assert "newer field samples" in action.reason
    assert action.derivation.params["calibration"].endswith("gen-bbbb")
    # a damaged serving file protects nothing: it cannot serve
    damaged = plan_model(e, state(m, model_int8_onnx="damaged"), newer)
    assert isinstance(damaged, Derive) and damaged.serving is None

    request = request_for(action, model_dir="/m/det", settings=Settings(), context=newer)
    assert request.serving == action.serving

    # the build did not pass on the CPU: nothing is published, the failure is remembered...
    reason = withheld_reason(built_proof("9" * 64, OV), request.serving)
    assert "CPUExecutionProvider: F1 0.41 < 0.9" in reason
    # ...and the serving INT8, proven again on the same newer held-out samples, still passes
    again = replace(m.proofs[served.name], samples=8)
    reason += still_serving(request.serving, again)
    assert reason.endswith("model-int8.onnx passes on them and keeps serving")
    result = QuantizeResult(record=None, variant=INT8, proof=built_proof("9" * 64, OV),
                            candidates=(), warnings=(), withheld=reason, serving_proof=again)
    after = apply(action, result)(m)
    assert after.files == m.files and after.proofs[served.name] == again
    assert after.failures[action.derivation.key()] == reason
    # ...so it is not built again for these samples, and the old INT8 keeps being offered
    assert plan_model(e, state(after), newer) is None
    view = model_view(e, state(after), newer, activity=_idle(), pending=False, models_root="/m")
    int8 = view.variant(INT8)
    assert int8 is not None and int8.sha256 == served.sha256
    assert view.detail["failures"][action.derivation.key()] == reason
    # a generation after that tries again, still held to the same providers
    later = plan_model(e, state(after), replace(CTX, field_samples={"det": generation(8, "cccc")}))
    assert isinstance(later, Derive) and later.serving == action.serving


def test_a_build_may_replace_only_when_it_passes_on_every_provider_the_old_one_passes_on():
    both, cpu = Serving("model-int8.onnx", INT8, (CPU, OV)), Serving("model-int8.onnx", INT8, (CPU,))
    assert withheld_reason(built_proof("9" * 64, CPU), None) == ""        # nothing serves
    assert withheld_reason(built_proof("9" * 64, CPU, OV), both) == ""
    assert withheld_reason(built_proof("9" * 64, CPU, OV), cpu) == ""     # better: fine
    assert OV in withheld_reason(built_proof("9" * 64, CPU), both)
    broken = replace(built_proof("9" * 64, CPU), checker_ok=False, checker_error="bad graph")
    assert "bad graph" in withheld_reason(broken, cpu)
    # the serving one judged on the newer samples: a shift fails it too, and FP32 serves there
    assert "fails on them too" in still_serving(both, built_proof("8" * 64, CPU))
    assert "FP32 serves there" in still_serving(both, built_proof("8" * 64, CPU))
    assert still_serving(cpu, None).endswith("keeps serving")


def test_a_serving_variant_that_fails_on_the_newer_samples_is_no_longer_offered():
    e = entry(AUTO)
    m, served = serving_a(e)
    newer = replace(CTX, field_samples={"det": generation(6, "bbbb")})
    action = plan_model(e, state(m), newer)
    failing = replace(m.proofs[served.name], providers=(
        ProviderProof(CPU, usable=True, passed=False, reason="F1 0.2 < 0.9"),))
    result = QuantizeResult(record=None, variant=INT8, proof=built_proof("9" * 64),
                            candidates=(), warnings=(), withheld="x", serving_proof=failing)
    after = apply(action, result)(m)
    assert plan_model(e, state(after), newer) is None   # no rebuild loop over the same samples
    view = model_view(e, state(after), newer, activity=_idle(), pending=False, models_root="/m")
    assert not view.variant(INT8).proof.passed_anywhere
    # a proof of other bytes (the file changed meanwhile) is not recorded
    other = replace(failing, file_sha256="7" * 64)
    kept = apply(action, replace(result, serving_proof=other))(m)
    assert kept.proofs[served.name] == m.proofs[served.name]


def _idle() -> Activity:
    return Activity()


# ---- the generation the serving variant was calibrated on stays on disk -------------------------

def _npy(seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).random((1, 3, 4, 4), dtype=np.float32))
    return buf.getvalue()


def _area(tmp_path) -> SamplesArea:
    (tmp_path / "det").mkdir()
    (tmp_path / "det" / "config.json").write_text(json.dumps(
        {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 4, 4]}]}))
    return SamplesArea(tmp_path, Limits(per_model=64, per_node=64))


def _add(area: SamplesArea, seeds) -> None:
    sig = InputSignature("x", "float32", (1, 3, 4, 4))
    for s in seeds:
        area.add("det", "node-1", _npy(s), signature=sig, needed=4)


def test_the_proven_generation_is_kept_however_many_are_cut_after_it(tmp_path):
    area = _area(tmp_path)
    _add(area, range(4))
    a = area.state("det", 4)
    assert a.folder is not None
    area.proven("det", a.folder)                 # the INT8 built from A passed
    _add(area, range(4, 6))                      # B: 2 of 6 new
    _add(area, range(6, 9))                      # C: cut at 8 (2 of 8 new), then a 9th
    c = area.state("det", 4)
    assert c.generation not in (a.generation, None)
    snaps = sorted(p.name for p in (tmp_path / "det" / "samples").glob("gen-*"))
    assert f"gen-{a.generation}" in snaps and len(snaps) == 3   # C, B (previous) and A (proven)
    # a restart reads the proven one back; then C proves and A goes
    area = SamplesArea(tmp_path, Limits(per_model=64, per_node=64))
    area.proven("det", c.folder)
    snaps = sorted(p.name for p in (tmp_path / "det" / "samples").glob("gen-*"))
    assert f"gen-{a.generation}" not in snaps and f"gen-{c.generation}" in snaps
    assert len(list((tmp_path / "det" / "samples" / f"gen-{c.generation}").iterdir())) \
        == c.generation_count == 8   # cut at the 8th sample (2 of 8 new)
    # another model's folder, or a folder that is not a generation, changes nothing
    area.proven("det", "/elsewhere/samples/gen-0000")
    area.proven("other", c.folder)
    assert area.state("det", 4).generation == c.generation


def test_a_proven_generation_counts_against_the_disk_budget(tmp_path):
    area = _area(tmp_path)
    area.limits = Limits(per_model=4, per_node=4)
    _add(area, range(4))
    area.proven("det", area.state("det", 4).folder)
    one = len(_npy(0))
    _add(area, range(4, 12))                     # the pool forgets every sample of A...
    assert area.state("det", 4).count == 4
    assert area.disk_bytes() >= 8 * one          # ...its proven snapshot still holds them


def test_status_counts_the_field_samples_while_auto_builds_without_them():
    """Until a generation is cut, status says how many samples there are and how many are
    needed, also while auto builds what it can without them (the verb alone hid the count)."""
    e = entry(AUTO)
    few = replace(CTX, field_samples={"det": FieldSamples(3, 4)})
    busy = model_view(e, state(pulled(e)), few, activity=Activity(action="quantizing"),
                      pending=False, models_root="/m")
    assert busy.reason == "quantizing; field samples: 3 of 4 needed"
    idle = model_view(e, state(pulled(e)), few, activity=_idle(), pending=False, models_root="/m")
    assert idle.reason == "field samples: 3 of 4 needed"
    cut = model_view(e, state(pulled(e)), replace(CTX, field_samples={"det": generation(4, "a")}),
                     activity=Activity(action="quantizing"), pending=False, models_root="/m")
    assert cut.reason == "quantizing"
