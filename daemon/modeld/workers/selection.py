"""Which nodes ``auto`` quantizes: the model's operator mix and work per node, its head, and a
measured selection that drops the convolutions whose quantization hurts the outputs most.

Called by ``workers.quantize`` (in the quantize worker). Stock recipes gain little or lose
accuracy on real CNNs on this kind of CPU; quantizing the convolutions that carry the work and
keeping the few that introduce most of the error in FP32 is what gets both speed and agreement.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
import structlog

from ..protocol import CPU_PROVIDER as CPU
from . import verify
from .recipes import GraphSummary

log = structlog.get_logger(__name__)

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: convolutions that together hold this share of the conv work count as "heavy"
HEAVY_CONV_SHARE = 0.8
#: nodes with less of the total work than this are not worth a probe (nor their Q/DQ pairs)
MIN_WORK_SHARE = 0.004
#: at most this many single-node probes (the heaviest nodes), each one a quantize and a run
MAX_PROBES = 32
#: wall-clock budget of all the probes of one auto job, shared by its searches (the exclusion
#: search, then the measured selection get what the first left): a large model quantizes
#: slowly and the job has a time limit of its own (quantize_timeout_s, 900 s). Measured before
#: it was shared: auto on the PicoDet layout detector took 740 s, two searches of 240 s each
PROBE_BUDGET_S = 300.0
#: combinations measured before giving up
MAX_ROUNDS = 6
#: feeds a probe (one node, one op-type group) is measured on; combinations are judged on all
#: the feeds given. One 640x640 run per probe halves the selection's run time, and the
#: single-node errors it ranks span orders of magnitude (measured on PP-OCRv4 det)
PROBE_SAMPLES = 1
#: op-type groups probed after the convolutions (the most frequent types first)
MAX_GROUP_PROBES = 12
#: aim above the gate: the selection is measured on calibration feeds, proven on others; the
#: error budget is this share of the gate's (0.99 -> target 0.997)
COSINE_MARGIN = 0.3

Feed = dict[str, np.ndarray]


class SearchBudget:
    """The probe time one auto job may spend, shared by its searches: each search probes
    while ``left()`` is positive, and ``spent()`` is reported with the candidates."""

    __slots__ = ("seconds", "_started")

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = PROBE_BUDGET_S if seconds is None else seconds
        self._started = time.monotonic()

    def left(self) -> float:
        return self.seconds - self.spent()

    def part(self, share: float) -> "SearchBudget":
        """A budget of ``share`` of what is left, for a search that must leave the rest to the
        next one (its time counts against this budget too: both run on the wall clock)."""
        return SearchBudget(max(self.left(), 0.0) * share)

    def spent(self) -> float:
        return time.monotonic() - self._started


def summarize_graph(model_path: Path, feed: Mapping[str, np.ndarray]) -> GraphSummary:
    """Operator mix, conv/matmul work and the head of a model, for ``auto``'s candidates.

    Work = weight elements x output positions. Output shapes are measured by running the model
    once on ``feed`` (shape inference loses them behind Resize with computed scales, which
    detectors' necks have), so the heaviest convolutions are the real ones.
    """
    model = onnx.load(str(model_path))
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS
               and len(n.input) > 1 and n.input[1] in weights]
    shapes = _output_shapes(model_path, [n.output[0] for n in compute], feed)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    conv_work: dict[str, float] = {}
    matmul_work = 0.0
    for node in compute:
        shape = shapes.get(node.output[0], ())
        size = float(np.prod(weights[node.input[1]]))
        if node.op_type in ("Conv", "ConvTranspose"):
            conv_work[node.name] = size * float(np.prod(shape[2:])) if len(shape) > 2 else size
        else:
            matmul_work += size * float(np.prod(shape[:-1])) if len(shape) > 1 else size
    total = sum(conv_work.values())
    heavy, running = [], 0.0
    for name, work in sorted(conv_work.items(), key=lambda kv: -kv[1]):
        if running >= HEAVY_CONV_SHARE * total:
            break
        heavy.append(name)
        running += work
    decode = decode_nodes(model.graph)
    return GraphSummary(op_counts=counts, conv_macs=total, matmul_macs=matmul_work,
                        head_nodes=tuple(n for n in head_nodes(model.graph) if n not in decode),
                        heavy_convs=tuple(n for n in heavy if n not in decode),
                        conv_work={n: w for n, w in conv_work.items() if n not in decode},
                        light_groups=_light_groups(model.graph, set(decode)),
                        decode_nodes=tuple(decode),
                        stem_nodes=tuple(n for n in stem_nodes(model.graph) if n not in decode))


def _light_groups(graph: onnx.GraphProto, decode: set[str]) -> dict[str, tuple[str, ...]]:
    """Op type -> names of its nodes, for the types other than the compute ones, most frequent
    first (candidates for step 4 of ``refine_selection``); the decode is never among them."""
    groups: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS and node.op_type != "Constant" \
                and node.name not in decode:
            groups.setdefault(node.op_type, []).append(node.name)
    return {k: tuple(v) for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))}


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """Compute nodes nearest the outputs: walking back from each output through light nodes
    (Sigmoid, Concat, Reshape, Resize ...), the first Conv/MatMul/Gemm met on every path."""
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in COMPUTE_OPS:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def stem_nodes(graph: onnx.GraphProto) -> list[str]:
    """Compute nodes nearest the inputs: walking forward from each graph input through light
    nodes, the first Conv/MatMul/Gemm met on every path (a CNN's first convolution). Its
    output holds the widest pre-activation of the network on one 8-bit grid: on a YOLOv8n,
    keeping it alone in FP32 (1% of the conv work) halved the class-score error of the INT8
    (0.11 -> 0.05) and raised detection F1 on 136 held-out frames from 0.78 to 0.88."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name for t in graph.initializer}
    found: list[str] = []
    seen: set[str] = set()
    stack = [i.name for i in graph.input if i.name not in initializers]
    while stack:
        for node in consumers.get(stack.pop(), ()):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in COMPUTE_OPS:
                found.append(node.name)
            else:
                stack.extend(node.output)
    return found


def decode_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes between the head's compute nodes and the outputs: what turns the last
    convolutions' maps into the model's answer. In a YOLO-style detector that is the DFL
    (Reshape, Softmax, the fixed-weight Conv), the box arithmetic, the score Sigmoid and the
    Concat of boxes (0..input size) with scores (0..1); in a classifier its Softmax, in a text
    detector its Sigmoid. Quantizing any of it puts quantities of different scales, or values
    whose small differences decide the answer, on one 8-bit grid (issue 10: one scale for the
    final Concat rounded every score to 0), and it is cheap: elementwise work on the outputs.

    Found structurally: every node on a path from a head node (``head_nodes``) to an output,
    head nodes that lie downstream of other head nodes (the DFL's Conv) included."""
    heads = set(head_nodes(graph))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    below: set[str] = set()   # reachable from a head's outputs
    stack = [o for node in graph.node if node.name in heads for o in node.output]
    while stack:
        for node in consumers.get(stack.pop(), ()):
            if node.name not in below:
                below.add(node.name)
                stack.extend(node.output)
    producer = {out: node for node in graph.node for out in node.output}
    above: set[str] = set()   # on a path to an output
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in above:
            above.add(node.name)
            stack.extend(node.input)
    keep = below & above
    return [n.name for n in graph.node if n.name in keep]


def refine_target(min_cosine: float) -> float:
    """The cosine a measured selection aims for: above the gate, since it is measured on
    calibration feeds and proven on others."""
    return min(1.0 - (1.0 - min_cosine) * COSINE_MARGIN, 0.99999)


@dataclass(frozen=True)
class Verdict:
    """A build judged against FP32: ``error`` ranks probes (0 = identical, errors of small
    builds add up), ``value`` is the number recorded (a cosine, a detection F1), ``accepted``
    says whether a combination is good enough."""

    error: float
    value: float
    accepted: bool


class CosineJudge:
    """Judge by the worst output cosine, aiming above the gate (``refine_target``)."""

    __slots__ = ("target",)
    label = "cosine"
    probe_samples = PROBE_SAMPLES
    #: a missed round drops this share of the picked nodes
    drop_share = 0.25
    max_rounds = MAX_ROUNDS

    def __init__(self, min_cosine: float) -> None:
        self.target = refine_target(min_cosine)

    @property
    def budget(self) -> float:
        return 1.0 - self.target

    def __call__(self, reference: list[list], variant: list[list]) -> Verdict:
        cosine = verify.compare_outputs(reference, variant).cosine
        return Verdict(1.0 - cosine, cosine, cosine >= self.target)


class TaskJudge:
    """Judge by the task: a combination is accepted when ``metric`` (e.g. detection F1
    against FP32's detections) reaches ``minimum`` and the worst cosine its gate; probes are
    ranked by ``error`` (continuous, on the part of the outputs the task reads: single nodes
    rarely move a count of matched detections). The error budget is open: every probed node
    is picked first, then the ones that cost most per unit of work are dropped in small
    steps until the task passes (on a YOLOv8n the loss was spread over many convolutions)."""

    __slots__ = ("metric", "minimum", "min_cosine", "error", "label", "kind", "probe_samples")
    budget = float("inf")
    drop_share = 0.125
    max_rounds = 12

    def __init__(self, metric: Callable[[list[list], list[list]], float | None], minimum: float,
                 *, min_cosine: float, error: Callable[[list[list], list[list]], float],
                 label: str, kind: str = "") -> None:
        self.metric, self.minimum, self.min_cosine = metric, minimum, min_cosine
        self.error, self.label, self.kind = error, label, kind
        # detections: every feed (one frame rarely holds a detection near the threshold);
        # maps and classes: the error of one feed ranks single nodes as the cosine does
        self.probe_samples = None if kind == "detection" else PROBE_SAMPLES

    def __call__(self, reference: list[list], variant: list[list]) -> Verdict:
        value = self.metric(reference, variant)
        cosine = verify.compare_outputs(reference, variant).cosine
        value = 0.0 if value is None else float(value)  # nothing measurable proves nothing
        return Verdict(max(self.error(reference, variant), 0.0), value,
                       value >= self.minimum and cosine >= self.min_cosine)


@dataclass(frozen=True)
class Refinement:
    """The outcome of ``refine_selection``: the nodes kept quantized, the judge's value for
    them (cosine or task metric) and the numbers behind the choice (for the candidates
    table)."""

    nodes: tuple[str, ...]
    cosine: float               # the judge's value: a cosine, or the task metric
    probed: int                 # nodes measured one at a time
    rounds: tuple[dict, ...]    # each combination tried: how many nodes, the judge's value


def refine_selection(quantize: Callable[[tuple[str, ...]], Path], reference: Path,
                     work: Mapping[str, float], feeds: list[Feed], *,
                     min_cosine: float | None = None, judge=None,
                     groups: Mapping[str, tuple[str, ...]] | None = None,
                     budget: SearchBudget | None = None) -> Refinement | None:
    """Choose which of the nodes in ``work`` (node -> multiply-accumulates), and then which of
    the ``groups`` of light nodes (op type -> node names), to quantize.

    1. Probe: quantize each node that carries real work on its own and measure how far the
       outputs move (the judge's error: 1 - cosine to ``reference`` by default, on
       ``PROBE_SAMPLES`` of the ``feeds``; the combinations of steps 3 and 4 are judged on all
       of them). On a PP-OCR detector the errors of single convolutions spanned five orders
       of magnitude, and the sensitive ones were light.
    2. Pick nodes by work per unit of error until the summed errors fill the error budget
       (errors of small size add up nearly linearly).
    3. Build the combination and measure it; while the judge does not accept it, drop the
       last-picked share (a quarter for the cosine) and measure again.
    4. With what is left of the budget, add whole op-type groups (Relu, Concat, Resize ...),
       least harmful first: a tensor that stays INT8 between two quantized nodes saves a
       dequantize/quantize pair. Groups that would break the target are left in FP32.
    ``judge`` (``CosineJudge(min_cosine)`` unless given; ``TaskJudge`` for a task metric)
    decides. ``quantize(nodes)`` builds a model with only ``nodes`` quantized and returns its
    path; the last combination built is the one returned. None if no combination is accepted.
    The probes of step 1 stop when ``budget`` (shared with the job's other search) is spent.
    """
    judge = judge if judge is not None else CosineJudge(min_cosine)
    total = sum(work.values()) or 1.0
    candidates = sorted((n for n, w in work.items() if w / total >= MIN_WORK_SHARE),
                        key=lambda n: -work[n])[:MAX_PROBES]
    ref_session = cpu_session(reference)
    ref_outputs = [verify.run_session(ref_session, f) for f in feeds]
    measured: dict[tuple[str, int], Verdict] = {}

    def verdict_of(nodes: tuple[str, ...], *, probe: bool = False) -> Verdict:
        """The judge's verdict on the build with ``nodes`` quantized: on the first
        ``PROBE_SAMPLES`` feeds for a probe (an estimate), on all feeds for a decision. A build
        byte-identical to one measured before (a group the quantizer leaves alone) is not run
        again."""
        path = quantize(nodes)
        count = min(judge.probe_samples or len(feeds), len(feeds)) if probe else len(feeds)
        key = (hashlib.sha256(path.read_bytes()).hexdigest(), count)
        if key not in measured:
            session = cpu_session(path)
            measured[key] = judge(ref_outputs[:count],
                                  [verify.run_session(session, f) for f in feeds[:count]])
        return measured[key]

    errors: dict[str, float] = {}
    budget = budget if budget is not None else SearchBudget()
    for node in candidates:  # heaviest first: what a short budget leaves unprobed matters least
        if budget.left() <= 0:
            log.warning("selection_probe_budget_spent", probed=len(errors),
                        unprobed=len(candidates) - len(errors), budget_s=budget.seconds)
            break
        errors[node] = max(verdict_of((node,), probe=True).error, 1e-9)
    candidates = list(errors)
    picked = _fill_budget(sorted(candidates, key=lambda n: errors[n] / work[n]), errors,
                          judge.budget)
    log.info("selection_probed", probed=len(candidates), picked=len(picked),
             work_share=round(sum(work[n] for n in picked) / total, 3),
             estimated_error=round(sum(errors[n] for n in picked), 5), judge=judge.label)
    rounds: list[dict] = []
    verdict = None
    while picked and len(rounds) < judge.max_rounds:
        verdict = verdict_of(tuple(picked))
        rounds.append({"quantized": len(picked), judge.label: round(verdict.value, 5),
                       "work_share": round(sum(work[n] for n in picked) / total, 3)})
        log.info("selection_round", **rounds[-1])
        if verdict.accepted:
            break
        picked = picked[:len(picked) - max(1, int(len(picked) * judge.drop_share))]
    else:
        return None  # nothing picked, or no combination was accepted in max_rounds
    nodes = tuple(picked)
    extra, value = _add_groups(nodes, verdict, judge, groups or {}, verdict_of, rounds)
    if extra:
        nodes += extra
    elif groups:
        quantize(nodes)  # the group probes overwrote the accepted build
    return Refinement(nodes, value, len(candidates), tuple(rounds))


def _fill_budget(ordered: list[str], errors: Mapping[str, float], budget: float) -> list[str]:
    picked, spent = [], 0.0
    for name in ordered:
        if spent + errors[name] <= budget:
            picked.append(name)
            spent += errors[name]
    return picked


def _add_groups(nodes: tuple[str, ...], verdict: Verdict, judge,
                groups: Mapping[str, tuple[str, ...]], verdict_of, rounds: list[dict]
                ) -> tuple[tuple[str, ...], float]:
    """Step 4 of ``refine_selection``: (the group nodes added, empty if none fit; the judge's
    value of the result)."""
    probed = list(groups)[:MAX_GROUP_PROBES]
    if not probed:
        return (), verdict.value
    base = verdict_of(nodes, probe=True).error  # the probes' baseline, on the probes' feeds
    costs = {g: max(verdict_of(nodes + tuple(groups[g]), probe=True).error - base, 0.0)
             for g in probed}
    chosen = _fill_budget(sorted(probed, key=lambda g: costs[g]), costs,
                          judge.budget - verdict.error)
    while chosen:
        extra = tuple(n for g in chosen for n in groups[g])
        combined = verdict_of(nodes + extra)
        rounds.append({"quantized": len(nodes) + len(extra),
                       judge.label: round(combined.value, 5), "op_types": list(chosen)})
        log.info("selection_groups", op_types=chosen, value=round(combined.value, 5),
                 judge=judge.label)
        if combined.accepted:
            return extra, combined.value
        chosen = chosen[:-1]
    return (), verdict.value


def _read_tensors(path: Path, tensors: list[str], feed: Feed, probe: Path) -> dict[str, np.ndarray]:
    """Run ``path`` once with ``tensors`` added as outputs (a probe copy in the scratch dir)."""
    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output}
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name in produced and name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(probe))
    session = cpu_session(probe)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, verify.run_session(session, feed)))
    return {k: v for k, v in values.items() if k in tensors and isinstance(v, np.ndarray)}


def _output_shapes(model_path: Path, tensors: list[str], feed: Feed) -> dict[str, tuple[int, ...]]:
    if not tensors:
        return {}
    probe = model_path.with_name(model_path.stem + "-shapes.onnx")
    try:
        values = _read_tensors(model_path, tensors, feed, probe)
    except Exception as e:  # noqa: BLE001 - shapes only refine the ranking; weights still rank
        log.info("shape_probe_failed", reason=str(e).splitlines()[0][:200] if str(e) else "")
        return {}
    finally:
        probe.unlink(missing_ok=True)
    return {k: tuple(v.shape) for k, v in values.items()}


def cpu_session(path: Path):
    """A session of ``path`` on the CPU; RuntimeError if it does not load."""
    session, reason = verify.open_session(path, None, CPU, {})
    if session is None:
        raise RuntimeError(f"{path.name} does not load: {reason}")
    return session


# ---------------------------------------------------------------------------------------------
# judged by the task

#: detection heads: score entries count towards the ranking error when FP32's or the
#: variant's score reaches this share of the detection threshold (the candidates a node could
#: report; the rest are background that no threshold keeps)
NEAR_THRESHOLD_SHARE = 0.5


def task_judge(head, gates, *, min_cosine: float):
    """A ``TaskJudge`` for ``head`` (``tasks.Head``): accepted when the task metric reaches its
    gate; probes ranked by ``task_error``."""
    from . import tasks

    def metric(reference, variant):
        return tasks.measure(head, reference, variant, gates).value

    minimum = getattr(gates, head.gate)
    # a map or class scores are dense, and their cosine tracks the task: aim above the cosine
    # gate as the cosine judge does (measured on PP-OCRv4 det: a selection accepted at 0.99 on
    # calibration pages proved 0.984 on held-out ones). A detector's cosine is the boxes'
    # (the largest values): the F1 decides, the gate itself is enough
    if head.kind != tasks.DETECTION:
        min_cosine = refine_target(min_cosine)
    return TaskJudge(metric, minimum, min_cosine=min_cosine,
                     error=lambda r, v: task_error(head, r, v), label=head.gate[4:],
                     kind=head.kind)


def task_error(head, reference: list[list], variant: list[list]) -> float:
    """A continuous error on what the task reads, 0 when identical: for a detector, the mean
    absolute difference of class scores over the candidates near or above the threshold
    (measured on a YOLOv8n: INT8 moved them by 0.1 on average while the whole-output cosine
    stayed at 0.996); otherwise 1 - the worst cosine of the outputs the task reads."""
    from . import tasks

    if head.kind == tasks.DETECTION and head.layout in ("CN", "NC", "split"):
        diffs = []
        for r, v in zip(reference, variant):
            a, b = _scores(head, r), _scores(head, v)
            near = np.maximum(a, b) >= tasks.SCORE_THRESHOLD * NEAR_THRESHOLD_SHARE
            diffs.append(np.abs(a - b)[near])
        joined = np.concatenate(diffs) if diffs else np.zeros(0)
        return float(joined.mean()) if joined.size else 0.0
    worst = 1.0
    for o in head.outputs:
        ref = np.concatenate([np.asarray(r[o], np.float64).ravel() for r in reference])
        var = np.concatenate([np.asarray(v[o], np.float64).ravel() for v in variant])
        worst = min(worst, tasks.cosine_similarity(ref, var))
    return 1.0 - worst


def _scores(head, outputs) -> np.ndarray:
    """[N, C] class scores (probabilities) of one sample's outputs."""
    from . import tasks

    if head.layout == "split":
        scores = np.concatenate([tasks._squeeze(outputs[s]).astype(np.float64)
                                 for s in head.outputs[::2]])
    else:
        rows = tasks._rows(outputs[head.outputs[0]], head.layout).astype(np.float64)
        scores = rows[:, 4:4 + head.classes] if head.classes is not None else rows[:, 4:]
    if head.logits:
        scores = 1.0 / (1.0 + np.exp(-np.clip(scores, -60, 60)))
    return scores


@dataclass(frozen=True)
class Exclusion:
    """The outcome of ``exclusion_search``: the nodes put back in FP32 (beyond the ones the
    recipe excludes anyway), the judge's value, and the numbers behind the choice."""

    excluded: tuple[str, ...]
    value: float
    probed: int
    rounds: tuple[dict, ...]


def exclusion_search(quantize: Callable[[tuple[str, ...]], Path], reference: Path,
                     work: Mapping[str, float], feeds: list[Feed], *, judge,
                     budget: SearchBudget | None = None) -> Exclusion | None:
    """Start from the build that quantizes everything it may (``quantize(())``) and, while the
    judge does not accept it, put back in FP32 the nodes of ``work`` whose quantization costs
    the task most per unit of work.

    1. Judge the full build on ``feeds``; accepted: nothing to put back.
    2. Probe: rebuild with each node of ``work`` alone in FP32, lightest first, and measure how
       much the judge's error falls (in context, with everything else quantized). The first
       probe the judge accepts ends the search (on a YOLOv8n: its first convolution, 1% of the
       work, cut the score error from 0.12 to 0.03).
    3. Otherwise put back the best 1, 2, 4, 8 ... by gain per unit of work, until the judge
       accepts.
    ``quantize(excluded)`` builds the model with ``excluded`` in FP32 too and returns its path;
    the last build is the one returned. None if no round is accepted. The probes of step 2
    stop when ``budget`` (shared with the job's other search) is spent."""
    ref_session = cpu_session(reference)
    ref_outputs = [verify.run_session(ref_session, f) for f in feeds]

    def verdict_of(excluded: tuple[str, ...]) -> Verdict:
        session = cpu_session(quantize(excluded))
        return judge(ref_outputs, [verify.run_session(session, f) for f in feeds])

    rounds: list[dict] = []
    base = verdict_of(())
    rounds.append({"excluded": 0, judge.label: round(base.value, 5), "error": round(base.error, 5)})
    log.info("exclusion_round", **rounds[-1])
    if base.accepted:
        return Exclusion((), base.value, 0, tuple(rounds))
    total = sum(work.values()) or 1.0
    candidates = sorted(work, key=lambda n: work[n])  # lightest first: cheapest to put back
    gains: dict[str, float] = {}
    budget = budget if budget is not None else SearchBudget()
    for node in candidates:
        if budget.left() <= 0:
            log.warning("exclusion_probe_budget_spent", probed=len(gains),
                        unprobed=len(candidates) - len(gains), budget_s=budget.seconds)
            break
        probe = verdict_of((node,))
        gains[node] = base.error - probe.error
        if probe.accepted:  # the lightest node whose return to FP32 is enough: done
            rounds.append({"excluded": 1, judge.label: round(probe.value, 5),
                           "error": round(probe.error, 5),
                           "work_share_kept": round(1 - work[node] / total, 3)})
            log.info("exclusion_round", **rounds[-1])
            return Exclusion((node,), probe.value, len(gains), tuple(rounds))
    ranked = sorted((n for n in gains if gains[n] > 0),
                    key=lambda n: -gains[n] / max(work[n], 1e-9))
    log.info("exclusion_probed", probed=len(gains), helpful=len(ranked), judge=judge.label)
    count = 1
    while ranked and len(rounds) <= judge.max_rounds:
        excluded = tuple(ranked[:count])
        verdict = verdict_of(excluded)
        rounds.append({"excluded": len(excluded), judge.label: round(verdict.value, 5),
                       "error": round(verdict.error, 5),
                       "work_share_kept": round(1 - sum(work[n] for n in excluded) / total, 3)})
        log.info("exclusion_round", **rounds[-1])
        if verdict.accepted:
            return Exclusion(excluded, verdict.value, len(gains), tuple(rounds))
        if count >= len(ranked):
            break
        count = min(count * 2, len(ranked))
    return None
