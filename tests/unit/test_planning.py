"""Planning is a pure function: plain tables of (catalog, inventory) -> expected action. No disk."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modeld.catalog import parse_catalog
from modeld.manifest import Manifest
from modeld.planning import (FP32_FILE, Derive, Prove, Pull, Planner, Quarantine, RestoreMode,
                             desired_derivation, plan, plan_model, proof_key)
from modeld.store import DAMAGED, MISSING, UNREADABLE, Inventory, ModelState
from modeld.variants import INT8, Gates
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
