"""Task agreement (workers/tasks.py): heads found from the catalog's words and output shapes,
per-part agreement, detection F1, top-1 and mask IoU. Pure numpy: no onnx, no onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from modeld.variants import Gates
from modeld.workers import tasks

GATES = Gates()


def _yolo_head(boxes, classes, n: int = 64, n_classes: int = 3, score: float = 0.9) -> np.ndarray:
    """[1, 4+C, N]: boxes (cx, cy, w, h in pixels) in the first rows, sigmoid scores below."""
    head = np.zeros((4 + n_classes, n), np.float32)
    head[:4, :] = 10.0
    head[4:, :] = 0.01
    for i, (box, cls) in enumerate(zip(boxes, classes)):
        head[:4, i] = box
        head[4 + cls, i] = score
    return head[None]


BOXES = np.array([[50, 50, 20, 20], [100, 100, 30, 30], [150, 40, 10, 10], [20, 150, 16, 16]],
                 np.float32)
CLASSES = np.array([0, 1, 2, 0])


def _f1(reference, variant, task="object-detection"):
    head = tasks.head_for(task, None, reference[0])
    assert head is not None and head.kind == tasks.DETECTION
    return tasks.measure(head, reference, variant, GATES)


def test_detection_f1_counts_one_to_one_matches_of_the_same_class():
    reference = [[_yolo_head(BOXES, CLASSES)]]
    moved = BOXES.copy()
    moved[0, 0] += 1          # still IoU >= 0.5
    moved[1, 0] += 25         # moved away: IoU < 0.5
    other_class = CLASSES.copy()
    other_class[2] = 1        # wrong class
    variant = [[_yolo_head(moved, other_class)]]
    same = _f1(reference, reference)
    assert same.value == 1.0 and same.passed
    check = _f1(reference, variant)
    assert check.value == pytest.approx(2 * 2 / (4 + 4)) and not check.passed
    assert "2 of FP32's 4 detections matched" in check.detail
    assert "< min_detection_f1 0.9000" in check.failure()
    transposed = [[r[0].transpose(0, 2, 1)] for r in reference]     # [1, N, 4+C]
    assert _f1(transposed, [[v[0].transpose(0, 2, 1)] for v in variant]).value == check.value


def test_duplicates_are_removed_by_class_aware_nms_before_matching():
    # FP32 finds one box; the variant finds it twice (a duplicate NMS removes) and once more as
    # another class at the same place (class-aware NMS keeps it: an extra, wrong detection)
    reference = [[_yolo_head(BOXES[:1], [0])]]
    variant = [[_yolo_head(np.stack([BOXES[0], BOXES[0] + 1, BOXES[0]]), [0, 0, 1])]]
    check = _f1(reference, variant)
    assert "the variant found 2" in check.detail
    assert check.value == pytest.approx(2 * 1 / (1 + 2))


def test_dead_class_scores_fail_the_parts_and_the_task_while_the_cosine_passes():
    """The measured failure: an INT8 whose class scores round to 0 next to pixel boxes."""
    rng = np.random.default_rng(0)
    n = 2100
    boxes = rng.uniform(0, 320, (4, n)).astype(np.float32)
    scores = np.full((3, n), 0.02, np.float32)
    scores[0, :40] = 0.9
    reference = [[np.concatenate([boxes, scores])[None]]]
    dead = [[np.concatenate([boxes, np.zeros_like(scores)])[None]]]
    names = ["output0"]
    whole = tasks.cosine_similarity(reference[0][0].ravel().astype(np.float64),
                                    dead[0][0].ravel().astype(np.float64))
    assert whole > 0.999                                  # the whole tensor hides it
    head = tasks.head_for(None, None, reference[0])       # found from the shape alone
    part = tasks.part_agreement(reference, dead, names, head)
    assert part.worst_part == "output0 class scores" and part.worst_cosine == 0.0
    check = tasks.measure(head, reference, dead, GATES)
    assert check.value == 0.0 and not check.passed


def test_silence_is_not_a_proof():
    quiet = [[_yolo_head(BOXES, CLASSES, score=0.1)]] * 3   # nothing above 0.25
    check = _f1(quiet, quiet)
    assert check.value is None and not check.passed
    assert "FP32 detects nothing" in check.failure() and "3 proof samples" in check.failure()
    empty = np.zeros((1, 1, 32, 32), np.float32)
    head = tasks.head_for("text-detection", "ocr", [empty])
    mask = tasks.measure(head, [[empty]], [[empty]], GATES)
    assert mask.value is None and not mask.passed and "empty" in mask.detail


def test_split_score_and_dfl_box_outputs_are_decoded_on_the_anchor_grid():
    """PicoDet-style heads: per stride, scores [1, N, C] and DFL bins [1, N, 4*8]."""
    rng = np.random.default_rng(1)
    outputs = []
    for stride in (8, 16):
        n = (64 // stride) * (48 // stride)
        scores = np.full((1, n, 5), 0.01, np.float32)
        scores[0, rng.choice(n, 3, replace=False), rng.integers(0, 5, 3)] = 0.8
        bins = rng.normal(0, 2, (1, n, 32)).astype(np.float32)
        outputs += [scores, bins]
    head = tasks.head_for(None, None, outputs)
    assert head is not None and head.layout == "split" and head.outputs == (0, 1, 2, 3)
    found = tasks.detections(head, outputs, (64, 48))
    assert len(found.classes) == 6
    assert (found.boxes[:, 2] > found.boxes[:, 0]).all()
    assert tasks.measure(head, [outputs], [outputs], GATES, (64, 48)).value == 1.0
    wrong = [o.copy() for o in outputs]
    wrong[0][..., :] = wrong[0][..., ::-1]               # classes permuted at stride 8
    assert tasks.measure(head, [outputs], [wrong], GATES, (64, 48)).value < 0.9


def test_top1_agreement_of_a_classifier():
    logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]] * 5
    reference = [[row[None]] for row in logits]
    variant = [[row[None]] for row in logits]
    variant[0] = [np.array([[0, 5, 0, 0]], np.float32)]
    head = tasks.head_for("classification", "imagenet", reference[0])
    assert head.kind == tasks.CLASSIFICATION
    check = tasks.measure(head, reference, variant, GATES)
    assert check.value == pytest.approx(7 / 8) and not check.passed
    softmax = [np.array([[0.1, 0.7, 0.2]], np.float32)]
    assert tasks.head_for(None, None, softmax).kind == tasks.CLASSIFICATION
    assert tasks.head_for(None, None, [np.array([[3.0, -1.0, 0.5]], np.float32)]) is None


def test_mask_iou_at_the_models_threshold():
    ref = np.zeros((1, 1, 32, 32), np.float32)
    ref[0, 0, 4:12, 4:12] = 0.8                        # 64 pixels of text
    var = ref.copy()
    var[0, 0, 4:12, 4:8] = 0.25                        # half of it below the OCR threshold 0.3
    head = tasks.head_for("text-detection", "ocr", [ref])
    assert head.kind == tasks.MASK and head.threshold == tasks.OCR_MASK_THRESHOLD
    check = tasks.measure(head, [[ref]], [[var]], GATES)
    assert check.value == pytest.approx(32 / 64) and not check.passed
    assert tasks.measure(head, [[ref]], [[ref]], GATES).passed


def test_feature_maps_and_embeddings_have_no_task():
    assert tasks.head_for(None, None, [np.ones((1, 4, 8, 8), np.float32)]) is None
    assert tasks.head_for(None, None, [np.ones((1, 512), np.float32)]) is None
    assert tasks.head_for("face-recognition", None, [np.ones((1, 512), np.float32)]) is None
    ctc = tasks.head_for("text-recognition", "ocr", [np.ones((1, 40, 97), np.float32)])
    assert ctc.kind == tasks.CLASSIFICATION
    assert tasks.detector_layout((1, 6, 20)) is None
    assert tasks.detector_layout((1, 6, 20), forced=True) == "CN"


def test_parts_split_yolo_heads_by_quantity_and_maps_by_channel():
    yolo = tasks.Head(tasks.DETECTION, (0,), "CN")
    names = [name for name, _ in tasks.parts(yolo, 0, np.zeros((1, 7, 64)))]
    assert names == ["box coordinates", "class scores"]
    assert len(tasks.parts(None, 0, np.zeros((1, 3, 8, 8)))) == 3
    assert [n for n, _ in tasks.parts(None, 0, np.zeros((1, 1000)))] == [""]
    ref = [[np.stack([np.ones((8, 8)), np.linspace(0, 1, 64).reshape(8, 8)])[None]]]
    var = [[np.stack([np.ones((8, 8)), -np.linspace(0, 1, 64).reshape(8, 8)])[None]]]
    part = tasks.part_agreement(ref, var, ["maps"], None)
    assert part.worst_part == "maps channel 1" and part.worst_cosine == pytest.approx(-1.0)


def test_end_to_end_detections_are_read_as_they_are():
    """[1, K, 6]: x1 y1 x2 y2 score class after the model's own NMS (YOLOv10-style exports)."""
    rows = np.zeros((1, 300, 6), np.float32)
    rows[0, :3] = [[10, 10, 50, 50, 0.9, 2], [60, 60, 90, 120, 0.6, 0], [0, 0, 5, 5, 0.1, 1]]
    head = tasks.head_for(None, None, [rows])
    assert head is not None and head.layout == "nms"
    assert len(tasks.detections(head, [rows]).classes) == 2
    moved = rows.copy()
    moved[0, 1, :4] += 40
    assert tasks.measure(head, [[rows]], [[moved]], GATES).value == pytest.approx(0.5)
    names = [n for n, _ in tasks.parts(head, 0, rows)]
    assert names == ["box corners", "scores", "classes"]


def test_segmentation_and_pose_heads_read_only_their_class_scores():
    """YOLOv8-seg: [1, 4+C+32, N] with unbounded mask coefficients after the C sigmoid scores;
    -pose: [1, 4+1+51, N] with keypoint pixels after the person score."""
    rng = np.random.default_rng(2)
    head = _yolo_head(BOXES, CLASSES, n=400)                # 3 classes
    coefficients = rng.normal(0, 3, (1, 32, head.shape[2])).astype(np.float32)
    seg = np.concatenate([head, coefficients], axis=1)
    found = tasks.head_for(None, None, [seg, np.ones((1, 32, 16, 16), np.float32)])
    assert found.layout == "CN" and found.classes == 3 and not found.logits
    assert len(tasks.detections(found, [seg]).classes) == 4
    assert [n for n, _ in tasks.parts(found, 0, seg)] == ["box coordinates", "class scores",
                                                          "extras"]
    moved = seg.copy()
    moved[0, 7:] += 5                                        # extras only: detections agree
    assert tasks.measure(found, [[seg]], [[moved]], GATES).value == 1.0
    raw = head.copy()
    raw[0, 4:] = np.log(raw[0, 4:] / (1 - raw[0, 4:]))      # logits: no Sigmoid in the graph
    logits = tasks.head_for(None, None, [raw])
    assert logits.logits and logits.classes is None
    assert len(tasks.detections(logits, [raw]).classes) == 4
    person = _yolo_head(BOXES, [0, 0, 0, 0], n=600, n_classes=1)
    keypoints = rng.uniform(0, 320, (1, 51, 600)).astype(np.float32)
    pose = tasks.head_for("pose", None, [np.concatenate([person, keypoints], axis=1)])
    assert pose.kind == tasks.DETECTION and pose.classes == 1

