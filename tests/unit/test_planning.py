"""Planning is a pure function: plain tables of (catalog, inventory) -> expected action. No disk."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modeld.catalog import parse_catalog
from modeld.inventory import DAMAGED, MISSING, UNREADABLE, Inventory, ModelState
from modeld.manifest import Manifest, Provenance
from modeld.planning import (FP32_FILE, Adopt, Derive, Prove, Pull, Planner, Quarantine,
                             RestoreMode, Share, derived_proof_key, desired_derivation, plan,
                             plan_model, proof_key)
from modeld.share import ADOPTED, DENIED, NONE, adopt_key, upload_key
from modeld.variants import INT8, Derivation, Gates
from tests.support.plans import (COMMIT, CTX, QUANT, QUANT_OFF, catalog_of, entry, proof_for,
                                 pulled, rec, state, with_int8)

E, EQ = entry(), entry(QUANT)

CASES = [
    # (id, entry, state, context, expected action type, expected reason fragment)
    ("nothing on disk", E, None, CTX, Pull, "not pulled"),
    ("complete and proven", E, state(pulled(E)), CTX, None, ""),
    ("fp32 missing", E, state(pulled(E), model_onnx=MISSING), CTX, Pull, "model.onnx"),
    ("fp32 damaged", E, state(pulled(E), model_onnx=DAMAGED), CTX, Pull, "model.onnx"),
    ("labels damaged", E, state(pulled(E), labels_txt=DAMAGED), CTX, Pull, "labels"),
    ("config damaged", E, state(pulled(E), config_json=MISSING), CTX, Pull, "config.json"),
    ("unreadable file: restore mode first", E, state(pulled(E), model_onnx=UNREADABLE), CTX,
     RestoreMode, "model.onnx"),
    ("revision changed in catalog", entry(revision="v2"), state(pulled(E)), CTX, Pull,
     "source changed"),
    ("labels added in catalog", E, state(pulled(entry(labels=False))), CTX, Pull, "labels"),
    ("description edit rewrites config", replace(E, description="new"), state(pulled(E)), CTX, Pull,
     "config.json out of date"),
    ("refresh asks upstream", E, state(pulled(E)), replace(CTX, refresh=frozenset({"det"})), Pull,
     "upstream"),
    ("refresh skips a pinned commit", entry(revision=COMMIT), state(pulled(entry(revision=COMMIT))),
     replace(CTX, refresh=frozenset({"det"})), None, ""),
    ("fp32 unproven", E, state(replace(pulled(E), proofs={})), CTX, Prove, "FP32 not proven"),
    ("local proofs come before an upstream check", E, state(replace(pulled(E), proofs={})),
     replace(CTX, refresh=frozenset({"det"})), Prove, "FP32 not proven"),
    ("local derive comes before an upstream check", EQ, state(pulled(EQ)),
     replace(CTX, refresh=frozenset({"det"})), Derive, "no dynamic_int8"),
    ("providers changed: proof stale", E, state(pulled(E)),
     replace(CTX, providers=("CUDAExecutionProvider",)), Prove, "stale"),
    ("runtime upgraded: proof stale", E, state(pulled(E)),
     replace(CTX, onnxruntime_version="9.9"), Prove, "stale"),
    ("quantize enabled, no variant", EQ, state(pulled(EQ)), CTX, Derive, "no dynamic_int8"),
    ("quantize disabled", entry(QUANT_OFF), state(pulled(EQ)), CTX, None, ""),
    ("int8 present and proven", EQ, state(with_int8(EQ, pulled(EQ))), CTX, None, ""),
    ("int8 unproven", EQ, state(with_int8(EQ, pulled(EQ), proven=False)), CTX, Prove,
     "model-int8.onnx not proven"),
    ("int8 damaged", EQ, state(with_int8(EQ, pulled(EQ)), model_int8_onnx=DAMAGED), CTX, Derive,
     "model-int8.onnx"),
    ("int8 missing", EQ, state(with_int8(EQ, pulled(EQ)), model_int8_onnx=MISSING), CTX, Derive,
     "model-int8.onnx"),
    ("method params changed: stale derivation",
     entry(QUANT + '\nweight_type = "QInt8"'), state(with_int8(EQ, pulled(EQ))), CTX, Derive, "no"),
    ("input size changed: stale derivation (calibration inputs change)",
     replace(EQ, input_size=640), state(with_int8(EQ, pulled(EQ))), CTX, Pull, "config.json"),
    ("onnxruntime upgraded: stale derivation", EQ, state(with_int8(EQ, pulled(EQ))),
     replace(CTX, onnxruntime_version="2.0"), Prove, "FP32"),
    # issue 11: untrusted on-disk state; a nack makes the daemon prove again for itself
    ("model folder is not a folder: quarantine", E,
     ModelState(name="det", manifest=Manifest(name="det"), problem="a symlink", misplaced=True),
     CTX, Quarantine, "symlink"),
    ("unreadable manifest: pull again, saying why", E,
     ModelState(name="det", manifest=Manifest(name="det"), problem="manifest.json is list"),
     CTX, Pull, "manifest.json is list"),
    ("a nacked fp32 is proven again", E, state(pulled(E)),
     replace(CTX, recheck=frozenset({("det", FP32_FILE)})), Prove, "node rejected"),
    ("a nacked int8 is proven again", EQ, state(with_int8(EQ, pulled(EQ))),
     replace(CTX, recheck=frozenset({("det", "model-int8.onnx")})), Prove, "node rejected"),
    ("a nack of another model changes nothing", E, state(pulled(E)),
     replace(CTX, recheck=frozenset({("other", FP32_FILE)})), None, ""),
    ("new upstream fp32: int8 stale", EQ, state(with_int8(EQ, pulled(EQ)).with_file(
        rec(FP32_FILE, "e" * 64, provenance=pulled(EQ).files[FP32_FILE].provenance))), CTX, Pull,
     "config.json out of date"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plan_model(case):
    _, e, st, ctx, expected, reason = case
    action = plan_model(e, st, ctx)
    if expected is None:
        assert action is None
    else:
        assert isinstance(action, expected), action
        assert reason in action.reason
        assert action.name == e.name


def test_permanent_failure_is_not_retried_until_an_input_changes():
    m = pulled(EQ)
    d = desired_derivation(EQ, m.files[FP32_FILE], CTX)
    failed = state(m.with_failure(d.key(), "QuantizeError: boom"))
    assert plan_model(EQ, failed, CTX) is None
    changed = entry(QUANT + '\nper_channel = true')
    assert isinstance(plan_model(changed, failed, CTX), Derive)


def test_plan_gives_one_action_per_model_in_catalog_order():
    catalog = parse_catalog("\n".join(
        f'[[models]]\nname = "m{i}"\nrepo = "acme/m"\nfilename = "m{i}.onnx"\n' for i in range(5)))
    m2 = pulled(catalog.entries["m2"])
    inventory = Inventory(models={"m2": state(m2)})
    actions = plan(catalog, inventory, CTX)
    assert [a.name for a in actions] == ["m0", "m1", "m3", "m4"]
    assert all(isinstance(a, Pull) for a in actions)


def test_action_identity_follows_desired_state():
    a = plan_model(E, None, CTX)
    b = plan_model(entry(revision="v3"), None, CTX)
    assert a.identity != b.identity
    assert a.identity == plan_model(E, None, CTX).identity


def test_derived_proof_key_changes_with_gates():
    m = with_int8(EQ, pulled(EQ))
    stricter = entry(QUANT + "\nmin_cosine = 0.999")
    action = plan_model(stricter, state(m), CTX)
    assert isinstance(action, Prove) and action.variant == INT8 and "stale" in action.reason


def test_preset_and_input_size_are_inputs_of_a_derivation():
    fp32 = pulled(EQ).files[FP32_FILE]
    base = desired_derivation(EQ, fp32, CTX).key()
    assert desired_derivation(replace(EQ, input_size=640), fp32, CTX).key() != base
    assert desired_derivation(replace(EQ, preprocessing_preset="imagenet"), fp32, CTX).key() != base
    assert desired_derivation(EQ, fp32, CTX).key() == base


def test_planner_remembers_unchanged_models_and_replans_changed_ones():
    """Planner gives what plan() gives; a model with the same entry and state objects keeps
    its previous action object, a changed entry, state or refresh is planned again."""
    a, b = entry(QUANT, name="a"), entry(QUANT, name="b")
    ma, mb = pulled(a), with_int8(b, pulled(b))
    inventory = Inventory(models={"a": state(ma), "b": state(mb)})
    planner = Planner()
    first = planner.plan(catalog_of(a, b), inventory, CTX)
    assert first == plan(catalog_of(a, b), inventory, CTX)
    assert [type(x) for x in first] == [Derive]          # b is done
    again = planner.plan(catalog_of(a, b), inventory, CTX)
    assert again[0] is first[0]
    a2 = entry(QUANT + "\nper_channel = true", name="a")
    changed = planner.plan(catalog_of(a2, b), inventory, CTX)
    assert changed == plan(catalog_of(a2, b), inventory, CTX)
    assert changed[0].derivation.key() != first[0].derivation.key()
    asked = replace(CTX, refresh=frozenset({"b"}))
    refreshed = planner.plan(catalog_of(a2, b), inventory, asked)
    assert [x.name for x in refreshed] == ["a", "b"] and isinstance(refreshed[1], Pull)
    newer_runtime = replace(CTX, onnxruntime_version="9.9")
    assert planner.plan(catalog_of(a2, b), inventory, newer_runtime) == \
        plan(catalog_of(a2, b), inventory, newer_runtime)
    healed = Inventory(models={"a": state(with_int8(a2, pulled(a2))), "b": state(mb)})
    assert planner.plan(catalog_of(a2, b), healed, CTX) == []


def test_a_new_recipes_version_makes_derived_variants_stale(monkeypatch):
    """The daemon's own quantization code is an input, like the onnxruntime version."""
    import modeld.planning as planning
    m = with_int8(EQ, pulled(EQ))
    assert plan_model(EQ, state(m), CTX) is None
    monkeypatch.setattr(planning, "RECIPES_VERSION", "next")
    action = plan_model(EQ, state(m), CTX)
    assert isinstance(action, Derive) and action.derivation.params["recipes"] == "next"


def test_a_recheck_is_planned_again_when_asked_and_only_then():
    """The memo must not hide a re-check: same entry and state, a recheck in the context."""
    planner = Planner()
    catalog = catalog_of(E)
    inventory = Inventory(models={"det": state(pulled(E))})
    assert planner.plan(catalog, inventory, CTX) == []
    [action] = planner.plan(catalog, inventory, replace(CTX, recheck=frozenset({("det", FP32_FILE)})))
    assert isinstance(action, Prove) and action.recheck
    assert planner.plan(catalog, inventory, CTX) == []

def test_a_node_runtime_is_an_input_of_the_proofs_on_its_provider():
    """MODELD_RUNTIMES: the identity of the runtime that proves a provider is in the proof keys
    of that provider only; a new runtime build (or a fixed one) makes those proofs stale, and
    without a mapping the keys are what they always were."""
    ov = "OpenVINOExecutionProvider"
    both = replace(CTX, providers=("CPUExecutionProvider", ov))
    m = pulled(E)
    base = dict(file_sha256="f" * 64, reference_sha256=None, gates=Gates(),
                onnxruntime=CTX.onnxruntime_version, simulated={})
    assert proof_key(providers=CTX.providers, runtimes={}, **base) == \
        m.proofs[FP32_FILE].key                          # no mapping: keys unchanged
    assert proof_key(providers=CTX.providers, runtimes={ov: "/opt/ov 1.24.1"}, **base) == \
        m.proofs[FP32_FILE].key                          # a provider this entry does not use
    v1 = replace(both, runtimes={ov: "/opt/ov/bin/python onnxruntime-openvino==1.24.1"})
    v2 = replace(both, runtimes={ov: "/opt/ov/bin/python onnxruntime-openvino==1.25.0"})
    key_v1 = proof_key(providers=both.providers, runtimes=v1.runtimes, **base)
    proven = m.with_proof(FP32_FILE, proof_for(m.files[FP32_FILE], key_v1))
    assert plan_model(E, state(proven), v1) is None
    upgraded = plan_model(E, state(proven), v2)
    assert isinstance(upgraded, Prove) and "stale" in upgraded.reason
    assert Planner().plan(catalog_of(E), Inventory(models={E.name: state(proven)}), v2) == \
        [upgraded]


STATIC = '[models.quantize]\nmethod = "static_int8"\ncalibration = "/cal"'
AUTO = '[models.quantize]\nmethod = "auto"'


def test_the_derivation_changes_when_any_input_changes():
    """``desired_derivation`` is the one derivation (the quantize request carries it): every
    option of the method's table, the calibration inputs, the source and the versions count,
    and a default spelled out is the default."""
    fp32 = pulled(EQ).files[FP32_FILE]
    base = desired_derivation(entry(STATIC), fp32, CTX)
    changed = [desired_derivation(entry(STATIC + extra), fp32, CTX) for extra in (
        "\nsamples = 8", '\ncalibrate_method = "Entropy"', '\nformat = "QOperator"',
        "\nper_channel = false", "\nreduce_range = true", '\nweight_type = "QUInt8"')]
    changed += [desired_derivation(entry(STATIC.replace("/cal", "/other")), fp32, CTX),
                desired_derivation(replace(entry(STATIC), preprocessing_preset="yolo"), fp32, CTX),
                desired_derivation(replace(entry(STATIC), input_size=64), fp32, CTX),
                desired_derivation(entry(QUANT), fp32, CTX),
                desired_derivation(entry(STATIC), replace(fp32, sha256="0" * 64), CTX),
                desired_derivation(entry(STATIC), fp32, replace(CTX, onnxruntime_version="9")),
                desired_derivation(entry(STATIC), fp32, replace(CTX, onnx_version="9"))]
    keys = [d.key() for d in (base, *changed)]
    assert len(set(keys)) == len(keys)
    assert desired_derivation(entry(STATIC + "\nsamples = 32"), fp32, CTX) == base  # the default
    auto = desired_derivation(entry(AUTO), fp32, CTX)
    assert desired_derivation(entry(AUTO + "\nmin_speedup = 1.5"), fp32, CTX) != auto
    assert desired_derivation(entry(AUTO), fp32, replace(CTX, providers=("X",))) != auto
    # an explicit method's choice does not depend on the gates
    assert desired_derivation(entry(STATIC + "\nmin_speedup = 1.5"), fp32, CTX) == base


def test_a_fake_option_in_the_one_table_reaches_catalog_derivation_and_worker(monkeypatch):
    """Adding an option is one line in ``modeld.methods``: the catalog accepts it (and checks
    its values), the derivation keys on it, and the quantize request and recipe carry it."""
    from modeld import methods
    from modeld.handoff import request_for
    from modeld.settings import Settings
    from modeld.workers.recipes import recipe_for
    dynamic = methods.METHODS["dynamic_int8"]
    monkeypatch.setitem(methods.METHODS, "dynamic_int8", replace(dynamic, options={
        **dynamic.options, "fake_knob": methods.Option(3, kind=int, minimum=0, maximum=9)}))
    fp32 = pulled(EQ).files[FP32_FILE]
    assert entry(QUANT).quantize.params["fake_knob"] == 3                    # the default
    spec = entry(QUANT + "\nfake_knob = 7")
    assert spec.quantize.params["fake_knob"] == 7
    bad = parse_catalog(f'[[models]]\nname = "det"\nrepo = "a/b"\nfilename = "m.onnx"\n'
                        f'{QUANT}\nfake_knob = 10').entries["det"]
    assert bad.quantize is None and bad.quantize_error.field == "quantize.fake_knob"
    derivation = desired_derivation(spec, fp32, CTX)
    assert derivation.params["fake_knob"] == 7
    assert derivation.key() != desired_derivation(entry(QUANT), fp32, CTX).key()
    request = request_for(Derive("det", spec, derivation, "test"), model_dir="/m/det",
                          settings=Settings(), context=CTX)
    assert request.params["fake_knob"] == 7 and request.derivation is derivation
    assert recipe_for(request.method, request.params).options["fake_knob"] == 7


# -- the share (issue 15): adopt before building, share after proving --------------------

SHARED = QUANT + '\nshare = "fleet/variants"'
ES = entry(SHARED)
SHARE_PROV = Provenance("fleet/variants", "variants/x/y/model-int8.onnx", None, "c" * 40, '"e"')


def adopted(m: Manifest, *, passed: bool) -> Manifest:
    m = with_int8(ES, m, proven=False)
    r = replace(m.files["model-int8.onnx"], provenance=SHARE_PROV)
    m = m.with_file(r)
    key = derived_proof_key(ES, r, m.files[FP32_FILE], CTX)
    return m.with_proof(r.name, proof_for(r, key, passed=passed))


def derivation_of(m: Manifest) -> Derivation:
    return with_int8(ES, m).files["model-int8.onnx"].derivation


@pytest.mark.parametrize("case", [
    ("no variant: look in the share first", lambda m: m, Adopt, "fleet/variants"),
    ("none in the share: build", lambda m: m.with_share(adopt_key(derivation_of(m)),
                                                        {"outcome": NONE}), Derive, "no dynamic"),
    ("adopted: prove it here", lambda m: with_int8(ES, m, proven=False).with_file(replace(
        with_int8(ES, m).files["model-int8.onnx"], provenance=SHARE_PROV)), Prove, "not proven"),
    ("adopted and proven here: serve it", lambda m: adopted(m, passed=True), None, ""),
    ("adopted, damaged here: fetch it again", "damaged", lambda m: adopted(m, passed=True)
     .with_share(adopt_key(derivation_of(m)), {"outcome": ADOPTED}), Adopt, "model-int8.onnx"),
    ("adopted, damaged, share gone: build", "damaged", lambda m: adopted(m, passed=True)
     .with_share(adopt_key(derivation_of(m)), {"outcome": NONE}), Derive, "model-int8.onnx"),
    ("adopted, fails here: build our own", lambda m: adopted(m, passed=False), Derive,
     "did not prove on this host"),
    ("built and proven: share it", lambda m: with_int8(ES, m), Share, "fleet/variants"),
    ("already shared (or denied): nothing", lambda m: with_int8(ES, m).with_share(
        upload_key("8" * 64), {"outcome": DENIED}), None, ""),
    ("built but refused here: not shared", lambda m: with_int8(ES, m, proven=False).with_proof(
        "model-int8.onnx", proof_for(rec("model-int8.onnx", "8" * 64), derived_proof_key(
            ES, with_int8(ES, m).files["model-int8.onnx"], m.files[FP32_FILE], CTX),
            passed=False)), None, ""),
], ids=lambda c: c[0] if isinstance(c, tuple) else "")
def test_share_planning(case):
    if len(case) == 5:    # a variant damaged on disk
        _, _, change, expected, reason = case
        action = plan_model(ES, state(change(pulled(ES)), model_int8_onnx=DAMAGED), CTX)
    else:
        _, change, expected, reason = case
        action = plan_model(ES, state(change(pulled(ES))), CTX)
    if expected is None:
        assert action is None
    else:
        assert isinstance(action, expected), action
        assert reason in action.reason


def test_without_a_share_nothing_is_adopted_or_shared():
    e = entry(QUANT)
    assert isinstance(plan_model(e, state(pulled(e)), CTX), Derive)
    assert plan_model(e, state(with_int8(e, pulled(e))), CTX) is None


# ---- field samples (issue 13) -------------------------------------------------------------------

STATIC_FIELD = '[models.quantize]\nenabled = true\nmethod = "static_int8"\nfield_samples = 4'


def test_static_int8_without_a_folder_waits_for_field_samples_then_derives_from_a_generation():
    from modeld.planning import served_record
    from modeld.samples import FieldSamples

    e = entry(STATIC_FIELD)
    st = state(pulled(e))
    few = replace(CTX, field_samples={"det": FieldSamples(3, 4)})
    assert plan_model(e, st, few) is None
    gen = "/m/det/samples/gen-aaaa"
    enough = replace(CTX, field_samples={"det": FieldSamples(4, 4, "aaaa", gen, 4)})
    action = plan_model(e, st, enough)
    assert isinstance(action, Derive) and action.derivation.params["calibration"] == gen
    assert "field_samples" not in action.derivation.params   # the daemon's, not the quantizer's
    # a new generation re-derives, and the file of the old one is offered meanwhile
    r = rec("model-int8.onnx", "8" * 64, derivation=action.derivation)
    m = st.manifest.with_file(r)
    newer = replace(CTX, field_samples={"det": FieldSamples(5, 4, "bbbb",
                                                            "/m/det/samples/gen-bbbb", 5)})
    later = plan_model(e, state(m), newer)
    assert isinstance(later, Derive) and later.derivation.params["calibration"].endswith("bbbb")
    assert served_record(m, later.derivation) is r
    # ...but never a file of another method or source
    other = replace(later.derivation, source_sha256="0" * 64)
    assert served_record(m, other) is None
