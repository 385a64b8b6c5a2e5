"""``auto`` on a real trained detector with a folder of real frames (issue 10, point 4).

The served INT8 must still find FP32's detections on held-out frames (the proof's task gate),
and the head's decode (DFL, box arithmetic, score Sigmoid, the Concat of pixel boxes with
scores) must have stayed in FP32. Real parts only: the YOLOv8n of the ``nudenet`` wheel and
photographs of the wheels in ``modeld.testing.realdata``. Speed is not asserted here (the
benchmark rows carry it): the speed gate is off, so a loaded host cannot fail the test.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modeld.variants import Gates
from modeld.workers.quantize import QuantizeRequest, quantize_model
from modeld.workers.recipes import GraphSummary, auto_candidates
from modeld.workers.selection import decode_nodes, head_nodes, stem_nodes

CPU = "CPUExecutionProvider"
YOLO = "yolov8n-nudenet"


@pytest.fixture(scope="module")
def yolo_auto(tmp_path_factory, real_model, real_frames):
    """(source model, the auto result) for the YOLOv8n with one calibration folder of real
    frames (the daemon holds a hash-chosen share of it out of calibration for the proof)."""
    model = real_model(YOLO)
    root = tmp_path_factory.mktemp("auto-real")
    folder = root / "frames"
    folder.mkdir()
    for split in ("calibration", "holdout"):
        for frame in real_frames(YOLO, split).iterdir():
            shutil.copy(frame, folder / frame.name)
    model_dir = root / "yolo"
    model_dir.mkdir()
    shutil.copy(model.path, model_dir / "model.onnx")
    request = QuantizeRequest(
        name="yolo", model_dir=str(model_dir),
        method="auto", params={"samples": 32}, calibration=str(folder),
        preprocessing_preset=model.preset, input_size=model.input_size, providers=(CPU,),
        gates=Gates(min_speedup=0.0), task=model.task)
    return model_dir / "model.onnx", quantize_model(request, lambda fraction, detail: None)


def test_auto_serves_a_yolov8n_int8_whose_detections_match_fp32(yolo_auto):
    _, result = yolo_auto
    proof = result.proof
    on_cpu = proof.on(CPU)
    assert proof.passed_anywhere, on_cpu.reason
    assert result.variant == "int8" and not proof.synthetic
    check = on_cpu.task_check
    assert check is not None and check.gate == "min_detection_f1"
    assert check.value is not None and check.value >= 0.9 and check.passed
    chosen = [r for r in result.candidates if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"] and chosen[0]["task_value"] >= 0.9


def test_the_served_yolov8n_keeps_its_decode_in_fp32(yolo_auto):
    source, result = yolo_auto
    decode = set(decode_nodes(onnx.load(str(source)).graph))
    served = onnx.load(str(source.parent / result.record.name)).graph
    producer = {out: node for node in served.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in served.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = [n for n in served.node if n.name in decode]
    assert {n.op_type for n in kept} >= {"Softmax", "Sigmoid", "Concat"}
    for node in kept:
        if node.op_type in ("Shape", "Gather", "Cast", "Range", "ConstantOfShape"):
            continue
        for name in node.output:  # nothing of the decode is quantized again
            assert not any(c.op_type == "QuantizeLinear" for c in consumers.get(name, ())), node.name
        if node.op_type in ("Softmax", "Sigmoid", "Concat", "Mul", "Sub", "Add", "Div"):
            # and it computes on floats, not on a quantize/dequantize round trip of its own
            for name in node.input:
                p = producer.get(name)
                assert p is None or p.op_type != "DequantizeLinear" or \
                    _is_head_output(p, producer, decode), (node.name, name)
    final = producer[served.output[0].name]
    assert final.op_type == "Concat" and all(
        producer[i].op_type != "DequantizeLinear" for i in final.input if i in producer)


def _is_head_output(dq, producer, decode) -> bool:
    """A DequantizeLinear of a head convolution's output (the last quantized tensor before the
    decode, which reads it in float)."""
    q = producer.get(dq.input[0])
    source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    return source is not None and source.op_type == "Conv" and source.name not in decode


def test_auto_records_what_each_candidate_did_on_the_task(yolo_auto):
    _, result = yolo_auto
    rows = {r["recipe"]: r for r in result.candidates}
    # every candidate that ran was judged by the detection F1, not only by a cosine
    judged = [r for r in rows.values() if r.get("task_metric")]
    assert judged and all(r["task_metric"] for r in judged)
    assert "static_qdq_u8s8_pc_task_search" in rows


# ---- the decode, found structurally -------------------------------------------------------

def _tiny_yolo_head() -> onnx.GraphProto:
    """A two-branch head as YOLO exports write it: box and class convs over one feature map,
    the boxes scaled by a stride, the class logits through a Sigmoid, one Concat."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 8, 1, 1)).astype(np.float32), "wc"),
             numpy_helper.from_array(np.array([1, 7, 64], np.int64), "shape4"),
             numpy_helper.from_array(np.array(8.0, np.float32), "stride")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["f"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["r"], name="act"),
             helper.make_node("Conv", ["r", "wb"], ["box"], name="box_conv"),
             helper.make_node("Conv", ["r", "wc"], ["cls"], name="cls_conv"),
             helper.make_node("Mul", ["box", "stride"], ["box_px"], name="to_pixels"),
             helper.make_node("Sigmoid", ["cls"], ["score"], name="score"),
             helper.make_node("Concat", ["box_px", "score"], ["cat"], name="cat", axis=1),
             helper.make_node("Reshape", ["cat", "shape4"], ["out"], name="flat")]
    return helper.make_graph(nodes, "head", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, [1, 7, 64])], inits)


def test_decode_nodes_are_what_lies_between_the_head_convs_and_the_output():
    graph = _tiny_yolo_head()
    assert sorted(head_nodes(graph)) == ["box_conv", "cls_conv"]
    assert decode_nodes(graph) == ["to_pixels", "score", "cat", "flat"]


def test_stem_nodes_are_the_first_compute_nodes_the_inputs_reach():
    graph = _tiny_yolo_head()
    assert stem_nodes(graph) == ["stem"]
    # through light nodes too (a normalising Mul before the first conv)
    graph.node[0].input[0] = "xn"
    graph.node.insert(0, helper.make_node("Mul", ["x", "stride"], ["xn"], name="norm"))
    assert stem_nodes(graph) == ["stem"]


def test_a_detectors_task_search_starts_from_percentile_ranges_with_stem_and_head_in_fp32():
    summary = GraphSummary(op_counts={"Conv": 4}, conv_macs=100.0, matmul_macs=0.0,
                           head_nodes=("box_conv", "cls_conv"), heavy_convs=("body",),
                           conv_work={"stem": 1.0, "body": 90.0, "box_conv": 1.0,
                                      "cls_conv": 1.0},
                           decode_nodes=("to_pixels", "score", "cat"), stem_nodes=("stem",))
    recipes = {r.name: r for r in auto_candidates(summary, (CPU,), detector=True)}
    search = recipes["static_qdq_u8s8_pc_task_search"]
    assert search.refine and search.nodes_to_quantize is None
    assert search.options["calibrate_method"] == "Percentile" and search.options["per_channel"]
    assert set(search.nodes_to_exclude) == {"to_pixels", "score", "cat", "box_conv", "cls_conv",
                                            "stem"}
    # not for other models: no task search, and the plain candidates keep MinMax
    others = auto_candidates(summary, (CPU,), detector=False)
    assert "static_qdq_u8s8_pc_task_search" not in {r.name for r in others}
    assert {r.options["calibrate_method"] for r in others if r.kind == "static"} == {"MinMax"}
