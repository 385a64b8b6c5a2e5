"""Small real ONNX models built with ``onnx.helper`` in milliseconds, for tests, demo and benchmarks.

Each builder returns the serialized model bytes; weights are seeded so the same call gives the
same bytes (and the same sha256).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def tiny_cnn(*, input_size: int = 32, channels: int = 8, seed: int = 0,
             opset: int = OPSET) -> bytes:
    """A YOLO-flavoured CNN: Conv -> Sigmoid*x (SiLU) -> Conv -> Resize -> Concat -> Conv.

    Input ``images`` [1,3,S,S] float32, output ``output0`` [1,4,S/2,S/2].
    """
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, (c,))),
        _init("w2", rng.normal(0, 0.2, (c, c, 3, 3))), _init("b2", rng.normal(0, 0.1, (c,))),
        _init("w3", rng.normal(0, 0.2, (4, 2 * c, 1, 1))), _init("b3", rng.normal(0, 0.1, (4,))),
        numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c2"], ["s2"]),
        helper.make_node("Mul", ["c2", "s2"], ["a2"]),
        helper.make_node("Resize", ["a2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["a1", "up"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["output0"]),
    ]
    half = input_size // 2
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, input_size, input_size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, half, half])],
        inits)
    return _finish(graph, opset)


def matmul_mlp(*, features: int = 64, hidden: int = 256, outputs: int = 16, seed: int = 0,
               opset: int = OPSET) -> bytes:
    """A MatMul/Gemm-heavy model (an MLP head): ``input`` [N,F] -> ``logits`` [N,outputs]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 1 / np.sqrt(features), (features, hidden))),
        _init("b1", rng.normal(0, 0.05, (hidden,))),
        _init("w2", rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden))),
        _init("w3", rng.normal(0, 1 / np.sqrt(hidden), (outputs, hidden))),
        _init("b3", rng.normal(0, 0.05, (outputs,))),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Relu", ["m2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "matmul_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", outputs])],
        inits)
    return _finish(graph, opset)


def two_input_cnn(*, channels: int = 8, seed: int = 0, opset: int = OPSET) -> bytes:
    """A model of two inputs, the first of dynamic size: an image and a per-channel prior added
    to its features (Conv -> + prior -> Relu -> Conv).

    Inputs ``image`` [1,3,H,W] float32 (H, W symbolic) and ``prior`` [1,C] float32, output
    ``output0`` [1,4,H/2,W/2].
    """
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, (c,))),
        _init("w2", rng.normal(0, 0.2, (4, c, 3, 3))), _init("b2", rng.normal(0, 0.1, (4,))),
        numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), "prior_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["prior", "prior_shape"], ["p"]),
        helper.make_node("Add", ["c1", "p"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["output0"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "two_input_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("prior", TensorProto.FLOAT, [1, c])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, "half_h", "half_w"])],
        inits)
    return _finish(graph, opset)


def with_unknown_operator(*, seed: int = 0) -> bytes:
    """A valid-looking model using an operator of a custom domain that no provider implements:
    passes ``onnx.checker`` structurally but fails to load in onnxruntime."""
    rng = np.random.default_rng(seed)
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.mecha10.nonexistent")
    graph = helper.make_graph(
        [node], "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [_init("unused", rng.normal(size=(1,)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.mecha10.nonexistent", 1)])
    return model.SerializeToString()


def _finish(graph: onnx.GraphProto, opset: int) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="mecha10-modeld-tests")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()
