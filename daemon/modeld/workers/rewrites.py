"""Graph rewrites applied before quantization, kept in every candidate: they change how the
model computes, not what (the same function, up to float rounding), and they remove
elementwise passes that cost FP32 as much time as the convolutions and cost a quantized model
a quantize/dequantize boundary each.

Called by ``workers.quantize`` (``_simplified``) on the preprocessed model. Measured on PP-OCRv4
det (PP-LCNetV3 backbone: a hard-swish written as four operators and a scalar affine pair
around every activation), 2 threads, AVX2: FP32 1.0x -> 1.04x with the affine pairs folded into
the convolutions before them, -> 1.29x with the hard-swish fused and the affine pairs after it
folded into the convolutions that follow; output cosine to the original 0.99999999995.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: scalar multipliers below this are not divided by (``fold_scale_into_next_conv``)
MIN_FOLDED_SCALE = 1e-6


def simplify(graph: onnx.GraphProto) -> dict[str, int]:
    """Every rewrite of this module, in order; returns how often each one applied (only the
    non-zero counts). Node names must be unique (``quantize.name_nodes``)."""
    counts = {"affine_folded": fold_affine_into_conv(graph),
              "hard_swish_fused": fuse_hard_swish(graph),
              "scale_folded_forward": fold_scale_into_next_conv(graph)}
    if any(counts.values()):
        counts["initializers_dropped"] = drop_unused_initializers(graph)
    return {k: v for k, v in counts.items() if v}


def fold_affine_into_conv(graph: onnx.GraphProto) -> int:
    """Fold ``Conv -> Mul(constant) [-> Add(constant)]`` into the Conv's weights and bias, where
    the constants are scalars or per-output-channel and nothing else reads the intermediates.

    Exact algebra (W' = W*s, B' = B*s + b), like the BatchNormalization folding every optimizer
    does; onnxruntime leaves scalar affine pairs alone, and PP-LCNetV3-style backbones put one
    after every convolution ("learnable affine blocks"): two extra passes over each activation
    in FP32, and two more quantize/dequantize boundaries in a quantized model. Returns how many
    Conv nodes absorbed an affine pair.
    """
    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    folded = 0
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in weights:
            continue
        w = onnx.numpy_helper.to_array(weights[conv.input[1]])
        if w.dtype != np.float32:
            continue
        mul = _sole_consumer(conv.output[0], consumers, outputs, "Mul")
        scale = _channel_constant(mul, conv.output[0], weights, w.shape[0]) if mul else None
        if scale is None:
            continue
        add = _sole_consumer(mul.output[0], consumers, outputs, "Add")
        shift = _channel_constant(add, mul.output[0], weights, w.shape[0]) if add else None
        has_bias = len(conv.input) > 2 and conv.input[2] in weights
        bias = (onnx.numpy_helper.to_array(weights[conv.input[2]]) if has_bias
                else np.zeros(w.shape[0], np.float32))
        new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = (bias * scale + (shift if shift is not None else 0.0)).astype(np.float32)
        last = add if shift is not None else mul
        w_name, b_name = f"{conv.name}_folded_w", f"{conv.name}_folded_b"
        graph.initializer.extend([onnx.numpy_helper.from_array(new_w, w_name),
                                  onnx.numpy_helper.from_array(new_b, b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = last.output[0]
        removed.update(id(n) for n in (mul, add if shift is not None else None) if n is not None)
        folded += 1
    if removed:
        kept = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _sole_consumer(tensor: str, consumers, outputs: set[str], op_type: str | tuple[str, ...]):
    readers = consumers.get(tensor, [])
    types = (op_type,) if isinstance(op_type, str) else op_type
    if tensor in outputs or len(readers) != 1 or readers[0].op_type not in types:
        return None
    return readers[0]


def _channel_constant(node: onnx.NodeProto, tensor: str, weights, channels: int):
    """The constant operand of ``node`` as a per-output-channel vector, if it is a scalar or
    has shape [C,1,1] or [1,C,1,1] (a bare [C] would broadcast over width); else None."""
    other = [i for i in node.input if i != tensor]
    if len(other) != 1 or other[0] not in weights or list(node.input).count(tensor) != 1:
        return None
    value = onnx.numpy_helper.to_array(weights[other[0]])
    if value.dtype != np.float32:
        return None
    if value.size == 1:
        return np.full(channels, value.reshape(()), np.float32)
    squeezed = value.reshape(-1)
    channel_shaped = value.shape in ((channels, 1, 1), (1, channels, 1, 1))
    return squeezed.astype(np.float32) if squeezed.size == channels and channel_shaped else None


def fuse_hard_swish(graph: onnx.GraphProto) -> int:
    """Rewrite ``x * Clip(x + 3, 0, 6) / 6`` (four operators, as Paddle and older PyTorch
    exports write hard-swish) as ``x * HardSigmoid(x; 1/6, 1/2)``: two operators, available since
    opset 6, which onnxruntime runs as one pass. The division may come before or after the
    multiplication, and may be a multiplication by 1/6. Returns how many were fused."""
    weights = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        x = _other_input(add, weights, 3.0)
        if x is None:
            continue
        clip = _sole_consumer(add.output[0], consumers, outputs, "Clip")
        if clip is None or _clip_bounds(clip, weights) != (0.0, 6.0):
            continue
        first = _sole_consumer(clip.output[0], consumers, outputs, ("Mul", "Div"))
        if first is None:
            continue
        if first.op_type == "Mul" and sorted(first.input) == sorted([x, clip.output[0]]):
            last = _sole_consumer(first.output[0], consumers, outputs, ("Div", "Mul"))
            if last is None or not _is_sixth(last, first.output[0], weights):
                continue
        elif _is_sixth(first, clip.output[0], weights):
            last = _sole_consumer(first.output[0], consumers, outputs, "Mul")
            if last is None or sorted(last.input) != sorted([x, first.output[0]]):
                continue
        else:
            continue
        gate = f"{add.name}_hardsigmoid"
        replaced[id(last)] = [
            helper.make_node("HardSigmoid", [x], [gate], name=gate, alpha=1.0 / 6.0, beta=0.5),
            helper.make_node("Mul", [x, gate], [last.output[0]], name=f"{add.name}_hardswish")]
        removed.update((id(add), id(clip), id(first)))
    if replaced:
        _rebuild(graph, removed, replaced)
    return len(replaced)


def fold_scale_into_next_conv(graph: onnx.GraphProto) -> int:
    """Fold ``Mul(h, a) [-> Add(., b)] -> Conv`` (scalar constants ``a``, ``b``) into the Conv:
    W' = a*W, so the Mul goes; the Add goes too when the Conv has no padding (B' = B + b*sum(W),
    summed over each output channel's inputs), else it stays as ``Add(h, b/a)`` (the padded
    border must still see zeros). PP-LCNetV3 puts such a pair after every activation, where the
    backward fold (``fold_affine_into_conv``) cannot reach. Returns how many Muls went."""
    weights = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    taken = set(weights)
    removed: set[int] = set()
    folded = 0
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        h = _other_input(mul, weights)
        scale = _scalar(mul.input[1] if mul.input[0] == h else mul.input[0], weights) if h else None
        if scale is None or not np.isfinite(scale) or abs(scale) < MIN_FOLDED_SCALE:
            continue
        add = _sole_consumer(mul.output[0], consumers, outputs, "Add")
        shift = None
        if add is not None:
            shift_name = next((i for i in add.input if i != mul.output[0]), None)
            once = list(add.input).count(mul.output[0]) == 1
            shift = _scalar(shift_name, weights) if once else None
            if shift is None:
                continue
        conv = _sole_consumer((add or mul).output[0], consumers, outputs, "Conv")
        if conv is None or conv.input[0] != (add or mul).output[0] or len(conv.input) < 2:
            continue
        w = _float_weight(conv.input[1], weights)
        if w is None or (len(conv.input) > 2 and _float_weight(conv.input[2], weights) is None):
            continue
        padded = _padded(conv)
        bias = (numpy_helper.to_array(weights[conv.input[2]]) if len(conv.input) > 2
                else np.zeros(w.shape[0], np.float32))
        new_inputs = [_add_initializer(graph, taken, f"{conv.name}_scaled_w",
                                       w * np.float32(scale))]
        if shift is not None and not padded:
            new_bias = bias + np.float32(shift) * w.reshape(w.shape[0], -1).sum(axis=1)
            new_inputs.append(_add_initializer(graph, taken, f"{conv.name}_shifted_b", new_bias))
            removed.add(id(add))
            conv.input[0] = h
        else:
            new_inputs += list(conv.input[2:])
            if add is not None:  # Add(h, b/a) before the padded conv
                shifted = _add_initializer(graph, taken, f"{add.name}_unscaled",
                                           np.array(shift / scale, np.float32))
                del add.input[:]
                add.input.extend([h, shifted])
            else:
                conv.input[0] = h
        del conv.input[1:]
        conv.input.extend(new_inputs)
        removed.add(id(mul))
        folded += 1
    if removed:
        _rebuild(graph, removed, {})
    return folded


def drop_unused_initializers(graph: onnx.GraphProto) -> int:
    """Remove initializers no node (subgraphs included) reads: the folds leave the original
    weights behind, which would otherwise be carried into every variant file."""
    used = set(_names_read(graph)) | {o.name for o in graph.output} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(kept)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return dropped


# ---- helpers -------------------------------------------------------------------------------------

def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _rebuild(graph: onnx.GraphProto, removed: set[int],
             replaced: dict[int, list[onnx.NodeProto]]) -> None:
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _names_read(graph: onnx.GraphProto) -> Iterable[str]:
    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _names_read(sub)
                yield from (o.name for o in sub.output)


def _scalar(name: str | None, weights) -> float | None:
    if name is None or name not in weights:
        return None
    value = numpy_helper.to_array(weights[name])
    return float(value.reshape(())) if value.size == 1 and value.dtype == np.float32 else None


def _other_input(node: onnx.NodeProto, weights, constant: float | None = None) -> str | None:
    """The non-constant input of a binary node whose other input is a scalar constant (equal
    to ``constant`` when given); None otherwise."""
    a, b = node.input
    for value, const in ((a, b), (b, a)):
        if value in weights:
            continue
        got = _scalar(const, weights)
        if got is not None and (constant is None or got == constant):
            return value
    return None


def _is_sixth(node: onnx.NodeProto, tensor: str, weights) -> bool:
    """``node`` divides ``tensor`` by 6 or multiplies it by 1/6."""
    if list(node.input).count(tensor) != 1:
        return False
    if node.op_type == "Div":
        return node.input[0] == tensor and _scalar(node.input[1], weights) == 6.0
    other = next(i for i in node.input if i != tensor)
    value = _scalar(other, weights)
    return value is not None and abs(value - 1.0 / 6.0) < 1e-7


def _clip_bounds(clip: onnx.NodeProto, weights) -> tuple[float | None, float | None]:
    attrs = {a.name: a.f for a in clip.attribute if a.name in ("min", "max")}
    if attrs:  # opset < 11
        return attrs.get("min"), attrs.get("max")
    bounds = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
    return (_scalar(bounds[0], weights) if bounds[0] else None,
            _scalar(bounds[1], weights) if bounds[1] else None)


def _float_weight(name: str, weights) -> np.ndarray | None:
    if name not in weights:
        return None
    value = numpy_helper.to_array(weights[name])
    return value if value.dtype == np.float32 else None


def _padded(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: a for a in conv.attribute}
    auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(attrs["pads"].ints) if "pads" in attrs and auto_pad == "NOTSET" else False


def _add_initializer(graph: onnx.GraphProto, taken: set[str], base: str, value) -> str:
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name
