"""Does a variant still do the model's task? Task agreement of a variant's outputs with FP32's.

A whole-tensor cosine lets a small part of an output die unseen: a YOLOv8 head concatenates box
coordinates (0..640) with sigmoid scores (0..1), and an INT8 whose scores are all 0 still has a
cosine of 0.9998 (shared/notes/measured-facts.md). So the proof asks two more questions here:

- ``parts``: each output split along the axis that separates quantities (box coordinates vs class
  scores; channels of a map), every part compared on its own; the worst part is gated;
- ``measure``: the task itself, decoded the way a node decodes it: detections (class-aware NMS,
  matched to FP32's at IoU >= 0.5: F1), top-1 classes, masks at the model's threshold (IoU).

Which task a model has comes from the catalog (``task``, ``preprocessing_preset``) and the shapes
of its outputs (``head_for``). A task metric that cannot be measured (FP32 detects nothing on any
sample) is a failed check, never a pass: silence proves nothing.

Pure numpy: ``verify`` (proofs), ``quantize`` (auto's choice), ``selection`` and the benchmarks
call it with the outputs they ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..variants import Check, Gates

DETECTION, CLASSIFICATION, MASK = "detection", "classification", "mask"

#: detections: candidates at or above this score count (Ultralytics' default ``conf``)
SCORE_THRESHOLD = 0.25
#: class-aware NMS overlap (Ultralytics' default ``iou``) and the match overlap against FP32
NMS_IOU = 0.7
MATCH_IOU = 0.5
MAX_CANDIDATES = 3000
MAX_DETECTIONS = 300
#: a probability map is a mask at this threshold (DB text detectors binarise at 0.3)
MASK_THRESHOLD = 0.5
OCR_MASK_THRESHOLD = 0.3
#: parts whose FP32 and variant values all stay within this are "both zero" (nothing to compare)
NEGLIGIBLE_ABS = 1e-5
#: outputs with more channels than this are compared whole, not channel by channel
MAX_PARTS = 256
#: DFL box branches: 4 sides x this many bins at most
MAX_DFL_BINS = 64

Runs = Sequence[Sequence[np.ndarray]]   # per sample, the outputs of one session


@dataclass(frozen=True)
class Head:
    """How a model's outputs are read for its task: which outputs, in which layout."""

    kind: str                          # DETECTION | CLASSIFICATION | MASK
    outputs: tuple[int, ...]           # indices of the outputs the task reads
    #: DETECTION: "CN" ([1, 4+C, N]), "NC" ([1, N, 4+C]), "split" (score/box output pairs,
    #: ``outputs`` = score0, box0, score1, box1 ...) or "nms" ([1, K, 6] final detections);
    #: MASK: "binary" or "classes"
    layout: str = ""
    threshold: float = MASK_THRESHOLD  # MASK "binary"
    logits: bool = False               # scores/maps are logits (sigmoid applied before reading)
    #: "CN"/"NC": how many class-score rows follow the 4 box rows (None: all of them); the rest
    #: are per-detection extras (mask coefficients of a -seg head, keypoints of a -pose head)
    classes: int | None = None

    @property
    def gate(self) -> str:
        return {DETECTION: "min_detection_f1", CLASSIFICATION: "min_top1_agreement",
                MASK: "min_mask_iou"}[self.kind]

    def describe(self) -> str:
        return {DETECTION: "detection", CLASSIFICATION: "classification (top-1)",
                MASK: "mask"}[self.kind]


# ---------------------------------------------------------------------------------------------
# which task

def hint_of(task: str | None, preset: str | None) -> str:
    """The kind the catalog names, or "" (free text: "object-detection", "text-detection" ...)."""
    text = (task or "").lower()
    if "text" in text and "detect" in text:
        return MASK                    # a text detector gives a probability map
    if "detect" in text or "layout" in text or preset == "yolo":
        return DETECTION
    if "segment" in text or "mask" in text or "matting" in text:
        return MASK
    # "recognition" alone may be a face embedding, whose argmax means nothing: only text
    # recognition (one class per position) is judged on top-1
    if "classif" in text or "orientation" in text or preset == "imagenet" or (
            "recogni" in text and ("text" in text or "ocr" in text)):
        return CLASSIFICATION
    return ""                          # e.g. preset "ocr" alone (det, rec, cls): shapes decide


def head_for(task: str | None, preset: str | None, outputs: Sequence[np.ndarray]) -> Head | None:
    """The task head of a model, from the catalog's words and FP32's outputs on one sample;
    None if nothing task-shaped is recognised (then only the per-part agreement applies)."""
    arrays = [(i, o) for i, o in enumerate(outputs) if isinstance(o, np.ndarray)
              and o.dtype.kind in "fc" and o.size]
    hint = hint_of(task, preset)
    ocr = preset == "ocr" or "text" in (task or "").lower()
    threshold = OCR_MASK_THRESHOLD if ocr else MASK_THRESHOLD
    if hint in ("", DETECTION):
        pairs = _score_box_pairs(arrays)
        # structurally, only when every output is one of the pairs (PicoDet/NanoDet-style heads)
        if pairs and (hint == DETECTION or 2 * len(pairs) == len(arrays)):
            flat = tuple(k for pair in pairs for k in pair)
            scores = np.concatenate([_squeeze(outputs[s]).ravel() for s, _ in pairs])
            return Head(DETECTION, flat, "split", logits=_are_logits(scores))
        for i, o in arrays:
            if _is_nms_output(o):
                return Head(DETECTION, (i,), "nms")
        for i, o in arrays:
            layout = detector_layout(o.shape, forced=hint == DETECTION)
            if layout:
                classes = _probability_columns(_rows(o, layout)[:, 4:])
                if classes == 0:  # raw logits (no Sigmoid in the graph)
                    return Head(DETECTION, (i,), layout, logits=True)
                return Head(DETECTION, (i,), layout, classes=classes)
    if hint in ("", MASK):
        for i, o in arrays:
            if not _is_map(o):
                continue
            one = o.ndim == 3 or o.shape[1] == 1
            if hint == MASK:
                if not one:
                    return Head(MASK, (i,), "classes")
                return Head(MASK, (i,), "binary", threshold=threshold, logits=_are_logits(o))
            if one and not _are_logits(o):
                # structurally only a one-channel probability map: a feature map is no mask
                return Head(MASK, (i,), "binary", threshold=threshold)
    if hint == CLASSIFICATION:
        for i, o in arrays:
            if o.ndim >= 2 and o.shape[-1] >= 2 and not _is_map(o):
                return Head(CLASSIFICATION, (i,))
    if hint == "":
        for i, o in arrays:  # softmax rows: a classifier, whatever the catalog says
            if o.ndim == 2 and 2 <= o.shape[-1] <= 100_000 and np.all(o >= 0) and np.allclose(
                    o.sum(axis=-1), 1.0, atol=1e-3):
                return Head(CLASSIFICATION, (i,))
    return None


def detector_layout(shape: Sequence[int], forced: bool = False) -> str | None:
    """"CN" for [1, 4+C, N], "NC" for [1, N, 4+C], None if not a YOLO-style concatenated head.
    ``forced`` (the catalog says detection) accepts any N > 4+C; otherwise N >= 8 (4+C)."""
    if len(shape) != 3 or shape[0] != 1:
        return None
    a, b = shape[1], shape[2]
    if a >= 5 and (b >= 8 * a or (forced and b > a)):
        return "CN"
    if b >= 5 and (a >= 8 * b or (forced and a > b)):
        return "NC"
    return None


def _is_nms_output(o: np.ndarray) -> bool:
    """[1, K, 6] rows of x1 y1 x2 y2 score class, as end-to-end exports give them (YOLOv10,
    Ultralytics ``nms=True``): whole-number classes, scores in [0, 1]."""
    if o.ndim != 3 or o.shape[0] != 1 or o.shape[2] != 6 or not 1 <= o.shape[1] <= 10_000:
        return False
    classes, scores = o[0, :, 5], o[0, :, 4]
    return bool(np.all(classes == np.round(classes)) and np.all(classes >= 0)
                and np.all((scores >= 0) & (scores <= 1)))


def _score_box_pairs(arrays: list[tuple[int, np.ndarray]]) -> list[tuple[int, int]]:
    """(score output, box output) pairs with the same anchor count: scores [1, N, C] and boxes
    [1, N, 4] (corners) or [1, N, 4k] (DFL distance bins), as PicoDet/NanoDet/SSD-style exports
    give them. Of two outputs with the same N, the box is the one 4 wide, else the one that is
    not in [0, 1] (scores are probabilities, bins are logits), else the one named like a box."""
    shaped = [(i, _squeeze(o)) for i, o in arrays]
    shaped = [(i, o) for i, o in shaped if o.ndim == 2 and o.shape[0] >= 8]
    pairs, used = [], set()
    for i, a in shaped:
        for j, b in shaped:
            if j <= i or i in used or j in used or a.shape[0] != b.shape[0]:
                continue
            which = _box_of((i, a), (j, b))
            if which is not None:
                pairs.append(which)
                used |= {i, j}
    return pairs


def _box_of(first: tuple[int, np.ndarray], second: tuple[int, np.ndarray]
            ) -> tuple[int, int] | None:
    """(score, box) of two same-N outputs, or None if neither reads as the box of the other."""
    def box_like(o: np.ndarray) -> bool:
        return o.shape[1] % 4 == 0 and o.shape[1] // 4 <= MAX_DFL_BINS

    for (s, score), (b, box) in ((first, second), (second, first)):
        if box.shape[1] == 4 and score.shape[1] != 4:
            return s, b
    for (s, score), (b, box) in ((first, second), (second, first)):
        if box_like(box) and not _are_logits(score) and _are_logits(box):
            return s, b
    for (s, score), (b, box) in ((first, second), (second, first)):
        if box_like(box) and not box_like(score):
            return s, b
    return None


def _squeeze(o: np.ndarray) -> np.ndarray:
    return o[0] if o.ndim == 3 and o.shape[0] == 1 else o


def _is_map(o: np.ndarray) -> bool:
    """[1, C, H, W] with few channels, or [1, H, W]: a dense map (mask, probability, classes)."""
    if o.ndim == 4:
        return o.shape[0] == 1 and o.shape[1] <= 64 and min(o.shape[2:]) >= 16
    return o.ndim == 3 and o.shape[0] == 1 and min(o.shape[1:]) >= 16 and o.shape[1] <= 4 * o.shape[2] \
        and o.shape[2] <= 4 * o.shape[1]


def _probability_columns(scores: np.ndarray) -> int:
    """How many leading columns of ``scores`` [N, K] hold probabilities (all in [0, 1]): YOLOv8
    heads put sigmoid class scores first and unbounded extras (mask coefficients, keypoint
    coordinates) after them."""
    inside = (scores >= -1e-3).all(axis=0) & (scores <= 1 + 1e-3).all(axis=0)
    return int(np.argmin(inside)) if not inside.all() else scores.shape[1]


def _are_logits(values: np.ndarray) -> bool:
    return bool(values.size) and (float(np.min(values)) < -1e-3 or float(np.max(values)) > 1 + 1e-3)


# ---------------------------------------------------------------------------------------------
# per-part agreement

def parts(head: Head | None, index: int, output: np.ndarray) -> list[tuple[str, tuple]]:
    """(name, slice) of each part of output ``index``: box coordinates vs class scores of a YOLO
    head; each channel of a map or of an [1, C, N] tensor; the whole output otherwise."""
    shape = output.shape
    if head is not None and head.kind == DETECTION and head.layout == "nms" \
            and head.outputs == (index,):
        return [("box corners", (..., slice(0, 4))), ("scores", (..., slice(4, 5))),
                ("classes", (..., slice(5, 6)))]
    if head is not None and head.kind == DETECTION and head.layout in ("CN", "NC") \
            and head.outputs == (index,):
        axis = 1 if head.layout == "CN" else 2
        end = 4 + head.classes if head.classes is not None else shape[axis]

        def along(start: int, stop: int) -> tuple:
            index = [slice(None)] * 3
            index[axis] = slice(start, stop)
            return tuple(index)
        out = [("box coordinates", along(0, 4)), ("class scores", along(4, end))]
        return out + ([("extras", along(end, shape[axis]))] if end < shape[axis] else [])
    if head is not None and head.kind == DETECTION and index in head.outputs:
        return [("", (slice(None),))]          # split heads: scores and boxes are outputs
    if len(shape) == 4 and 1 < shape[1] <= MAX_PARTS:
        return [(f"channel {c}", (slice(None), c)) for c in range(shape[1])]
    if len(shape) == 3:  # [B, A, B']: the shorter axis separates the quantities
        axis = 1 if shape[1] <= shape[2] else 2
        if 1 < shape[axis] <= MAX_PARTS:
            return [(f"channel {c}", (slice(None),) * axis + (c,)) for c in range(shape[axis])]
    return [("", (slice(None),))]


@dataclass(frozen=True)
class PartAgreement:
    worst_cosine: float
    worst_part: str        # "output0 class scores", "maps channel 3"
    compared: int          # parts compared (negligible ones are not)


def part_agreement(reference: Runs, variant: Runs, names: Sequence[str],
                   head: Head | None) -> PartAgreement | None:
    """The worst cosine over every part of every float output (None if nothing to compare)."""
    worst, where, compared = 1.0, "", 0
    for o, name in enumerate(names):
        refs = [r[o] for r in reference]
        vars_ = [v[o] for v in variant]
        if not all(isinstance(a, np.ndarray) and a.dtype.kind in "fc" for a in refs + vars_):
            continue
        if any(a.shape != b.shape for a, b in zip(refs, vars_)):
            continue  # the shape check of the whole output reports this
        for part, index in parts(head, o, refs[0]):
            ref = np.concatenate([a[index].astype(np.float64).ravel() for a in refs])
            var = np.concatenate([b[index].astype(np.float64).ravel() for b in vars_])
            finite = np.isfinite(ref) & np.isfinite(var)
            ref, var = ref[finite], var[finite]
            if not ref.size or max(float(np.max(np.abs(ref))),
                                   float(np.max(np.abs(var)))) <= NEGLIGIBLE_ABS:
                continue
            compared += 1
            cos = cosine_similarity(ref, var)
            if cos < worst or not where:
                worst, where = cos, f"{name} {part}".strip()
    return PartAgreement(worst, where, compared) if compared else None


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


# ---------------------------------------------------------------------------------------------
# the task metric

def measure(head: Head, reference: Runs, variant: Runs, gates: Gates,
            input_hw: tuple[int, int] | None = None) -> Check:
    """The task check of ``head`` over all samples: its metric, its gate, and what it stands on.
    An unmeasurable metric (FP32 detects nothing, an empty mask) fails."""
    samples = len(reference)
    if head.kind == DETECTION:
        ref = [detections(head, r, input_hw) for r in reference]
        var = [detections(head, v, input_hw) for v in variant]
        n_ref = sum(len(d.classes) for d in ref)
        n_var = sum(len(d.classes) for d in var)
        threshold = gates.min_detection_f1
        if n_ref == 0:
            return Check("min_detection_f1", None, threshold, False,
                         f"FP32 detects nothing (score >= {SCORE_THRESHOLD}) on any of the "
                         f"{samples} proof samples, so detection agreement cannot be measured: "
                         "give a calibration folder of real frames with objects in them")
        matched = sum(match_count(a, b) for a, b in zip(ref, var))
        f1 = 2.0 * matched / (n_ref + n_var)
        return Check("min_detection_f1", f1, threshold, f1 >= threshold,
                     f"detection F1 {f1:.3f}: {matched} of FP32's {n_ref} detections matched "
                     f"(IoU >= {MATCH_IOU}, same class), the variant found {n_var}, "
                     f"on {samples} samples")
    if head.kind == CLASSIFICATION:
        o = head.outputs[0]
        ref = np.concatenate([np.asarray(r[o]).reshape(-1, r[o].shape[-1]).argmax(-1)
                              for r in reference])
        var = np.concatenate([np.asarray(v[o]).reshape(-1, v[o].shape[-1]).argmax(-1)
                              for v in variant])
        same = float(np.mean(ref == var)) if ref.size else 0.0
        threshold = gates.min_top1_agreement
        return Check("min_top1_agreement", same, threshold, same >= threshold,
                     f"top-1 agreement {same:.3f}: {int(np.sum(ref == var))} of {ref.size} "
                     f"predictions on {samples} samples")
    o = head.outputs[0]
    inter = union = 0
    for r, v in zip(reference, variant):
        a, b = _mask(head, r[o]), _mask(head, v[o])
        inter += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    threshold = gates.min_mask_iou
    what = "classes other than 0" if head.layout == "classes" else f"score >= {head.threshold}"
    if not np.any([np.any(_mask(head, r[o])) for r in reference]):
        return Check("min_mask_iou", None, threshold, False,
                     f"FP32's mask ({what}) is empty on every one of the {samples} proof "
                     "samples, so mask agreement cannot be measured: give a calibration folder "
                     "of real inputs the model responds to")
    iou = inter / union if union else 1.0
    return Check("min_mask_iou", iou, threshold, iou >= threshold,
                 f"mask IoU {iou:.3f} ({what}) over {union} pixels on {samples} samples")


def _mask(head: Head, output: np.ndarray) -> np.ndarray:
    values = output.astype(np.float32)
    if head.layout == "classes":
        return values.argmax(axis=1) > 0
    if head.logits:
        return values >= math.log(head.threshold / (1 - head.threshold))
    return values >= head.threshold


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray     # [K, 4] x1 y1 x2 y2
    scores: np.ndarray    # [K]
    classes: np.ndarray   # [K]


def detections(head: Head, outputs: Sequence[np.ndarray],
               input_hw: tuple[int, int] | None = None) -> Detections:
    """What a node would report for one sample: decoded boxes over ``SCORE_THRESHOLD``,
    class-aware NMS, at most ``MAX_DETECTIONS``."""
    if head.layout == "nms":
        rows = outputs[head.outputs[0]][0].astype(np.float64)
        boxes = _split_boxes(rows[:, :4], input_hw)
        keep = np.flatnonzero(rows[:, 4] >= SCORE_THRESHOLD)[:MAX_DETECTIONS]
        return Detections(boxes[keep], rows[keep, 4], rows[keep, 5].astype(np.int64))
    if head.layout in ("CN", "NC"):
        rows = _rows(outputs[head.outputs[0]], head.layout).astype(np.float64)
        scores = rows[:, 4:4 + head.classes] if head.classes is not None else rows[:, 4:]
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    else:
        all_boxes, all_scores = [], []
        for s, b in zip(head.outputs[::2], head.outputs[1::2]):
            all_scores.append(_squeeze(outputs[s]).astype(np.float64))
            all_boxes.append(_split_boxes(_squeeze(outputs[b]).astype(np.float64), input_hw))
        scores, boxes = np.concatenate(all_scores), np.concatenate(all_boxes)
    if head.logits:
        scores = 1.0 / (1.0 + np.exp(-np.clip(scores, -60, 60)))
    best = scores.max(axis=1)
    classes = scores.argmax(axis=1)
    keep = np.flatnonzero(best >= SCORE_THRESHOLD)
    keep = keep[np.argsort(-best[keep], kind="stable")][:MAX_CANDIDATES]
    kept = nms(boxes[keep], best[keep], classes[keep])
    keep = keep[kept][:MAX_DETECTIONS]
    return Detections(boxes[keep], best[keep], classes[keep])


def _rows(output: np.ndarray, layout: str) -> np.ndarray:
    return output[0].T if layout == "CN" else output[0]


def _split_boxes(raw: np.ndarray, input_hw: tuple[int, int] | None) -> np.ndarray:
    """[N, 4] corners of a box output: corners as given (ordered), or DFL distance bins
    ([N, 4k]: softmax expectation per side) around the anchor grid the count implies."""
    n, width = raw.shape
    if width == 4:
        x1, y1, x2, y2 = raw.T
        return np.stack([np.minimum(x1, x2), np.minimum(y1, y2),
                         np.maximum(x1, x2), np.maximum(y1, y2)], axis=1)
    bins = width // 4
    logits = raw.reshape(n, 4, bins)
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    dist = (e / e.sum(axis=2, keepdims=True)) @ np.arange(bins, dtype=np.float64)   # [N, 4]
    height, wide = input_hw or (int(round(math.sqrt(n))),) * 2
    stride, cols = _grid(n, height, wide)
    idx = np.arange(n)
    cx, cy = (idx % cols + 0.5) * stride, (idx // cols + 0.5) * stride
    return np.stack([cx - dist[:, 0] * stride, cy - dist[:, 1] * stride,
                     cx + dist[:, 2] * stride, cy + dist[:, 3] * stride], axis=1)


def _grid(n: int, height: int, width: int) -> tuple[float, int]:
    """(stride, columns) of an anchor grid of ``n`` points over a ``height`` x ``width`` input."""
    for stride in (4, 8, 16, 32, 64, 128, 256):
        for rounding in (math.ceil, math.floor):
            cols, rows = rounding(width / stride), rounding(height / stride)
            if cols * rows == n:
                return float(stride), int(cols)
    stride = math.sqrt(height * width / n) if n else 1.0
    return stride, max(int(round(width / stride)), 1)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
        iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by class-aware greedy NMS (``boxes`` sorted by descending score)."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    # offset each class far apart: one NMS pass never suppresses across classes
    span = float(np.max(np.abs(boxes))) * 2 + 1
    shifted = boxes + (classes.astype(np.float64) * span)[:, None]
    order = np.arange(len(boxes))
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        overlap = iou_matrix(shifted[i:i + 1], shifted[rest])[0]
        order = rest[overlap < iou]
    return np.asarray(keep, dtype=np.int64)


def match_count(reference: Detections, variant: Detections, iou: float = MATCH_IOU) -> int:
    """FP32 detections (by descending score) matched one-to-one to a variant detection of the
    same class with IoU >= ``iou``."""
    if not len(reference.classes) or not len(variant.classes):
        return 0
    overlaps = iou_matrix(reference.boxes, variant.boxes)
    overlaps[reference.classes[:, None] != variant.classes[None, :]] = -1.0
    taken = np.zeros(len(variant.classes), dtype=bool)
    matched = 0
    for r in np.argsort(-reference.scores, kind="stable"):
        candidates = np.where(taken, -1.0, overlaps[r])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou:
            taken[best] = True
            matched += 1
    return matched


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
