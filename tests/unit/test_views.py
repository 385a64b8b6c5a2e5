"""Views are pure; ViewBuilder remembers the previous pass. Plain tables, no disk."""

from __future__ import annotations

from modeld.inventory import Inventory
from modeld.views import Activity, ViewBuilder, build_views
from tests.support.plans import CTX, QUANT, catalog_of, entry, pulled, state, with_int8


def test_view_builder_keeps_unchanged_views_and_rebuilds_changed_ones():
    a, b = entry(QUANT, name="a"), entry(QUANT, name="b")
    catalog = catalog_of(a, b)
    inventory = Inventory(models={"a": state(pulled(a)), "b": state(with_int8(b, pulled(b)))})
    builder = ViewBuilder()
    first = builder.build(catalog, inventory, CTX, {}, frozenset(), "/m")
    assert first == build_views(catalog, inventory, CTX, {}, frozenset(), "/m")
    assert [v.variant for v in first["b"].variants] == ["fp32", "int8"]
    again = builder.build(catalog, inventory, CTX, {}, frozenset(), "/m")
    assert again["a"] is first["a"] and again["b"] is first["b"]

    busy = {"a": Activity(action="quantizing", progress=0.5)}
    moving = builder.build(catalog, inventory, CTX, busy, frozenset({"a"}), "/m")
    assert moving["a"].state == "pending" and moving["a"].reason == "quantizing"
    assert moving["b"] is first["b"]
    waiting = builder.build(catalog, inventory, CTX, {}, frozenset({"b"}), "/m")
    assert (waiting["b"].state, waiting["b"].reason) == ("pending", "queued")   # no worker yet

    damaged = Inventory(models={"a": inventory.models["a"],
                                "b": state(with_int8(b, pulled(b)), model_int8_onnx="damaged")})
    healing = builder.build(catalog, damaged, CTX, {}, frozenset(), "/m")
    assert [v.variant for v in healing["b"].variants] == ["fp32"]
    assert healing == build_views(catalog, damaged, CTX, {}, frozenset(), "/m")
