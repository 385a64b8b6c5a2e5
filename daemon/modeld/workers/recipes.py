"""Quantization recipes: the single recipe of an explicit method, and the candidates ``auto``
tries for a model's operator mix.

Pure (no onnx/onnxruntime import): ``workers.quantize`` turns a ``Recipe`` into library calls.
The methods' options, defaults and allowed values are ``modeld.methods.METHODS`` (the catalog
validates against it; a request's ``params`` are already canonical).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..methods import METHODS, recipe_options


@dataclass(frozen=True)
class Recipe:
    """One concrete way to quantize a model, as the onnxruntime quantizer's arguments."""

    name: str
    kind: str                                    # "dynamic" | "static" | "fp16"
    options: Mapping[str, Any] = field(default_factory=dict)
    op_types_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_quantize: tuple[str, ...] | None = None
    #: measured selection: start from ``nodes_to_quantize`` and put back to FP32 the nodes that
    #: introduce the most error until the outputs agree (``selection.refine_selection``); with
    #: ``nodes_to_quantize`` None, start from everything but ``nodes_to_exclude`` and put back
    #: the nodes that cost the task most per unit of work (``selection.exclusion_search``)
    refine: bool = False

    @property
    def variant(self) -> str:
        return "fp16" if self.kind == "fp16" else "int8"

    def describe(self) -> dict[str, Any]:
        """A candidate row's recipe fields (JSON-able)."""
        out: dict[str, Any] = {"recipe": self.name, "kind": self.kind, **dict(self.options)}
        if self.op_types_to_quantize is not None:
            out["op_types"] = list(self.op_types_to_quantize)
        if self.nodes_to_exclude:
            out["excluded_nodes"] = len(self.nodes_to_exclude)
        if self.nodes_to_quantize is not None:
            out["quantized_nodes"] = len(self.nodes_to_quantize)
        if self.refine:
            out["measured_selection"] = True
        return out


def recipe_for(method: str, params: Mapping[str, Any]) -> Recipe:
    """The single recipe of an explicit method (``params`` already canonical)."""
    kinds = {"dynamic_int8": "dynamic", "static_int8": "static", "fp16": "fp16"}
    if method not in kinds or METHODS[method].chooses:
        raise ValueError(f"{method} has no single recipe")
    return Recipe(kinds[method], kinds[method], recipe_options(method, params))


@dataclass(frozen=True)
class GraphSummary:
    """What ``auto`` needs to know of a model to choose candidates (built by ``quantize``)."""

    op_counts: Mapping[str, int]
    conv_macs: float          # multiply-accumulates per sample of Conv/ConvTranspose weights
    matmul_macs: float        # of MatMul/Gemm with a constant weight
    #: compute nodes (Conv/MatMul/Gemm) feeding the outputs with nothing heavy in between:
    #: the head, whose precision the outputs feel directly
    head_nodes: tuple[str, ...] = ()
    #: the heaviest convolutions, largest first, that together hold most of the conv work
    heavy_convs: tuple[str, ...] = ()
    #: every Conv/ConvTranspose with a constant weight -> its multiply-accumulates per sample
    conv_work: Mapping[str, float] = field(default_factory=dict)
    #: op type -> its nodes, for the light types (activations, Concat, Resize ...)
    light_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: what turns the head's maps into the answer (a detector's DFL, box arithmetic, score
    #: Sigmoid and the Concat of boxes with scores): every INT8 candidate keeps it in FP32
    decode_nodes: tuple[str, ...] = ()
    #: compute nodes fed by the model's inputs through light nodes only (its first conv)
    stem_nodes: tuple[str, ...] = ()

    @property
    def conv_heavy(self) -> bool:
        return self.conv_macs >= self.matmul_macs and self.conv_macs > 0


#: providers on which FP16 may pay off (tensor cores, Apple's ANE); never the CPU here
FP16_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "CoreMLExecutionProvider",
                  "DmlExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider")

_QDQ_U8S8 = {"format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
             "per_channel": False, "reduce_range": False, "calibrate_method": "MinMax"}
#: per-channel weights: depthwise and re-parameterised convs have very unequal channel ranges
#: (measured on PP-OCR det: per-channel cut single-conv errors up to 10x; 7-bit weights
#: (reduce_range) made them worse)
_QDQ_U8S8_PC = _QDQ_U8S8 | {"per_channel": True}
#: activation ranges from the 99.999th percentile of the calibration values instead of their
#: extremes: measured on a YOLOv8n at 320 (first conv and head in FP32, 136 held-out frames),
#: detection F1 0.88 with MinMax, 0.905 with Percentile 99.999, 0.87 with 99.99, 0.88 with
#: Entropy; speed alike (1.5x-1.57x)
_QDQ_U8S8_PC_PCT = _QDQ_U8S8_PC | {"calibrate_method": "Percentile"}
_COMPUTE = ("Conv", "MatMul", "Gemm")


def auto_candidates(summary: GraphSummary, providers: tuple[str, ...], *,
                    detector: bool = False) -> list[Recipe]:
    """The recipes worth proving for this model (each is proven; the fastest that passes wins).

    Every INT8 candidate keeps the head's decode (``GraphSummary.decode_nodes``) in FP32: on a
    YOLOv8 head one scale for the Concat of boxes and scores rounded every score to 0, at a
    whole-output cosine of 0.9998 (issue 10).

    Measured on this kind of CPU: dynamic INT8 of a CNN lands on ConvInteger (0.3x-0.6x), so
    CNNs get static QDQ recipes only: everything but the decode, per tensor and per channel
    (the fastest: 1.3x-1.5x on a YOLOv8n at 320), the measured selection
    (``selection.refine_selection``: single-conv error probes, then the convolutions with the
    most work per unit of error, then harmless op-type groups), the heaviest convolutions, and
    all convolutions but the head. With a task metric (a detector, classifier or map, real
    calibration frames) the searches are judged by it; for a ``detector`` one more candidate
    (Percentile ranges) starts from everything but the decode, the head's convolutions and the
    stem (``GraphSummary.stem_nodes``: the first conv) and puts back in FP32 the convolutions
    whose quantization costs the detections most per unit of work
    (``selection.exclusion_search``; where it meets the gate on the calibration frames, the
    measured selection is not run). On
    PP-OCRv4 det only the measured one kept cosine >= 0.99 (the others 0.68-0.95). FP16 only
    where a provider can use it.
    """
    head = tuple(summary.head_nodes)
    decode = tuple(summary.decode_nodes)
    out: list[Recipe] = []
    if summary.conv_heavy:
        out.append(Recipe("static_qdq_u8s8", "static", _QDQ_U8S8, nodes_to_exclude=decode))
        out.append(Recipe("static_qdq_u8s8_pc", "static", _QDQ_U8S8_PC, nodes_to_exclude=decode))
        if detector and summary.conv_work:
            ends = decode + tuple(n for n in head + tuple(summary.stem_nodes) if n not in decode)
            out.append(Recipe("static_qdq_u8s8_pc_task_search", "static", _QDQ_U8S8_PC_PCT,
                              nodes_to_exclude=ends, refine=True))
        body = tuple(n for n in summary.conv_work if n not in head)
        if body:
            out.append(Recipe("static_qdq_u8s8_measured", "static", _QDQ_U8S8_PC,
                              nodes_to_quantize=body, refine=True))
        heavy = tuple(n for n in summary.heavy_convs if n not in head)
        if heavy:
            out.append(Recipe("static_qdq_u8s8_heavy_convs", "static", _QDQ_U8S8_PC,
                              nodes_to_quantize=heavy))
        out.append(Recipe("static_qdq_u8s8_conv_keep_head", "static", _QDQ_U8S8,
                          op_types_to_quantize=("Conv",), nodes_to_exclude=head + decode))
    else:
        out.append(Recipe("dynamic_u8", "dynamic", {"weight_type": "QUInt8", "per_channel": False,
                                                   "reduce_range": False},
                          op_types_to_quantize=("MatMul", "Gemm"), nodes_to_exclude=decode))
        out.append(Recipe("dynamic_u8_keep_head", "dynamic",
                          {"weight_type": "QUInt8", "per_channel": False, "reduce_range": False},
                          op_types_to_quantize=("MatMul", "Gemm"), nodes_to_exclude=head + decode))
        out.append(Recipe("static_qdq_u8s8_matmul", "static", _QDQ_U8S8,
                          op_types_to_quantize=_COMPUTE, nodes_to_exclude=decode))
    if any(p in FP16_PROVIDERS for p in providers):
        out.append(Recipe("fp16", "fp16", {"keep_io_types": True}))
    return _without_duplicates(out)


def _without_duplicates(recipes: list[Recipe]) -> list[Recipe]:
    seen, out = set(), []
    for r in recipes:
        key = (r.kind, tuple(sorted(r.options.items())), r.op_types_to_quantize,
               r.nodes_to_exclude, r.nodes_to_quantize, r.refine)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
