"""workers.rewrites with real onnxruntime on onnx.helper models: each rewrite removes the
operators it promises and the model computes what it computed before (borders of padded
convolutions included); patterns that do not match exactly are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modeld.workers.rewrites import (drop_unused_initializers, fold_scale_into_next_conv,
                                     fuse_hard_swish, simplify)

CPU = "CPUExecutionProvider"


def _model(nodes, inits, *, side=8, extra_outputs=(), opset=13):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, side, side])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, side, side])
           for n in extra_outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    return session.run(None, {"x": x})


def _same_outputs(model: onnx.ModelProto, rewrite) -> tuple[int, list[str]]:
    # inputs spread over the interesting range of hard-swish (-3..3) and beyond
    x = np.random.default_rng(0).uniform(-5, 5, (1, 4, 8, 8)).astype(np.float32)
    before = _run(model, x)
    count = rewrite(model.graph)
    onnx.checker.check_model(model, full_check=True)
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return count, [n.op_type for n in model.graph.node]


def _hard_swish_nodes(order: str, sixth: str = "Div"):
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip")]
    scale = (["six"] if sixth == "Div" else ["one_sixth"])
    if order == "mul_first":
        nodes += [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
                  helper.make_node(sixth, ["m"] + scale, ["y"], name="sixth")]
    else:
        nodes += [helper.make_node(sixth, ["c"] + scale, ["d"], name="sixth"),
                  helper.make_node("Mul", ["d", "x"], ["y"], name="mul")]
    inits = {"three": 3.0, "zero": 0.0, "six": 6.0, "one_sixth": 1.0 / 6.0}
    return nodes, inits


@pytest.mark.parametrize("order, sixth", [("mul_first", "Div"), ("div_first", "Div"),
                                          ("mul_first", "Mul")])
def test_hard_swish_written_out_becomes_hard_sigmoid_times_x(order, sixth):
    nodes, inits = _hard_swish_nodes(order, sixth)
    count, ops = _same_outputs(_model(nodes, inits), fuse_hard_swish)
    assert count == 1 and ops == ["HardSigmoid", "Mul"]


def test_hard_swish_with_clip_attributes_of_an_old_opset():
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a"], ["c"], name="clip", min=0.0, max=6.0),
             helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    count, ops = _same_outputs(_model(nodes, {"three": 3.0, "six": 6.0}, opset=10),
                               fuse_hard_swish)
    assert count == 1 and ops == ["HardSigmoid", "Mul"]


@pytest.mark.parametrize("change", ["other_offset", "clip_read_elsewhere", "other_bound"])
def test_near_misses_of_hard_swish_stay(change):
    nodes, inits = _hard_swish_nodes("mul_first")
    extra = ()
    if change == "other_offset":
        inits["three"] = 2.0
    elif change == "other_bound":
        inits["six"] = 5.0  # Clip(0, 5) / 5 is not a hard-swish (and "six" is the divisor)
    else:
        extra = ("c",)
    count, ops = _same_outputs(_model(nodes, inits, extra_outputs=extra), fuse_hard_swish)
    assert count == 0 and ops == ["Add", "Clip", "Mul", "Div"]


def _scaled_conv(*, pads, group=1, shift=True):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="act"),
             helper.make_node("Mul", ["scale", "h"], ["m"], name="mul")]
    conv_in = "m"
    if shift:
        nodes.append(helper.make_node("Add", ["m", "shift"], ["s"], name="add"))
        conv_in = "s"
    kernel = 3 if any(pads) else 1
    nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["y"], name="conv", pads=pads,
                                  group=group))
    inits = {"scale": [1.7], "shift": [-0.8],
             "w": rng.normal(0, 0.5, (4, 4 // group, kernel, kernel)),
             "b": rng.normal(0, 0.1, 4)}
    return _model(nodes, inits)


@pytest.mark.parametrize("group", [1, 4])
def test_scale_and_shift_fold_into_an_unpadded_conv(group):
    count, ops = _same_outputs(_scaled_conv(pads=[0, 0, 0, 0], group=group),
                               fold_scale_into_next_conv)
    assert count == 1 and ops == ["Relu", "Conv"]


def test_a_padded_conv_takes_the_scale_and_keeps_a_shift_before_it():
    """The border of a padded conv must see zeros, not the shift: the Add stays (b/a), the
    outputs agree everywhere, borders included."""
    count, ops = _same_outputs(_scaled_conv(pads=[1, 1, 1, 1]), fold_scale_into_next_conv)
    assert count == 1 and ops == ["Relu", "Add", "Conv"]


def test_a_scale_alone_folds_into_a_padded_conv():
    count, ops = _same_outputs(_scaled_conv(pads=[1, 1, 1, 1], shift=False),
                               fold_scale_into_next_conv)
    assert count == 1 and ops == ["Relu", "Conv"]


def test_a_scale_read_elsewhere_stays():
    model = _scaled_conv(pads=[0, 0, 0, 0])
    model.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 4, 8, 8]))
    count, ops = _same_outputs(model, fold_scale_into_next_conv)
    assert count == 0 and ops == ["Relu", "Mul", "Add", "Conv"]


def test_simplify_counts_and_drops_the_weights_it_replaced():
    model = _scaled_conv(pads=[0, 0, 0, 0])
    names_before = {t.name for t in model.graph.initializer}
    counts, _ = _same_outputs(model, simplify)
    assert counts == {"scale_folded_forward": 1, "initializers_dropped": 4}
    left = {t.name for t in model.graph.initializer}
    assert not left & names_before and len(left) == 2


def test_unused_initializers_go_but_those_a_subgraph_reads_stay():
    then = helper.make_graph([helper.make_node("Add", ["x", "outer"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then,
                              else_branch=other)]
    model = _model(nodes, {"outer": 1.0, "unused": [1.0, 2.0]})
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    assert drop_unused_initializers(model.graph) == 1
    assert {t.name for t in model.graph.initializer} == {"outer", "cond"}
