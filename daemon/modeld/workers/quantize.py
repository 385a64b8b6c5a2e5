"""Quantize one model in a worker process: preprocess, quantize (dynamic/static INT8, FP16, or
``auto``: prove several recipes and keep the fastest that passes), prove, publish atomically.

``quantize_model`` is the entry point the reconciler runs through ``modeld.jobs.JobRunner``. All
intermediate files live in a private scratch folder inside the model folder (the quantizer and
symbolic shape inference drop temp files in the working directory), removed in every case.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import structlog

from ..work import ProgressFn, QuantizeRequest, QuantizeResult
from ..atomic import WORK_PREFIX, publish_file, real_folder, temp_path_for
from ..atomic import sha256_file as _sha256_of
from ..errors import QuantizeError, StoreError
from ..errors import first_line as _one_line
from ..manifest import FileRecord
from ..variants import (FP32, VARIANT_FILES, Derivation, Proof, still_serving,
                        withheld_reason)
from . import verify
from .inputs import describe, sample_inputs
from .recipes import Recipe, auto_candidates, recipe_for
from .rewrites import simplify
from . import tasks
from .selection import (CosineJudge, SearchBudget, Verdict, cpu_session, exclusion_search,
                        refine_selection, summarize_graph, task_judge)

log = structlog.get_logger(__name__)

#: feeds used for the agreement check of each candidate (fewer than calibration: it repeats);
#: every held-out file of a folder (``inputs.HOLDOUT_MAX``): 4 frames held 3 detections of a
#: YOLOv8n, too few for an F1 to mean anything
AGREEMENT_SAMPLES = 8
#: the agreement feeds are drawn with another seed than the calibration ones where a folder allows
AGREEMENT_SEED = 1
#: MinMax calibration computes and merges ranges after this many samples (bounds memory)
CALIBRATION_BATCH = 4
#: calibration feeds the measured selection judges its probes on
REFINE_SAMPLES = 2
#: ... when judged by a task metric: a count of matched detections needs frames with objects
#: in them, and one 320x320 YOLOv8n run is ~20 ms here
TASK_SELECTION_SAMPLES = 16
#: ... by the detector exclusion search, which judges few builds (its base first): every
#: calibration feed, up to this many. On a YOLOv8n the same build scored F1 0.897 on 16
#: calibration frames, 0.915 on 32, and 0.905 on 136 held-out frames: 16 frames (~15
#: detections) are too few to decide near the gate
TASK_SEARCH_SAMPLES = 64
#: share of the searches' time budget the detector exclusion search may probe in: the rest is
#: the measured selection's. Measured: on the PicoDet layout detector the exclusion search
#: found nothing in the whole budget (368 s) and the measured selection, the one that passes
#: there, was left none; on the YOLOv8n it is accepted on its first build (no probes)
EXCLUSION_BUDGET_SHARE = 0.4

__all__ = ["QuantizeRequest", "QuantizeResult", "quantize_model"]


def quantize_model(request: QuantizeRequest, progress: ProgressFn) -> QuantizeResult:
    """Worker entry point: build, prove and publish the variant of ``request.method``."""
    started = time.monotonic()
    # the quantizer's sessions warn once per unused initializer: hundreds of lines per model
    ort.set_default_logger_severity(3)
    params = request.params   # canonical: the catalog checked them against methods.METHODS
    model_dir = real_folder(Path(request.model_dir))   # never written through a symlink
    source = model_dir / VARIANT_FILES[FP32]
    if not source.is_file():
        raise StoreError(f"cannot quantize: {source.name} is missing", entry=request.name,
                         path=str(source), hint="the model is fetched again on the next reconcile")
    warnings: list[str] = []
    with _scratch_dir(model_dir) as scratch:
        if request.method == "auto":
            built = _build_auto(request, params, source, scratch, progress, warnings)
        else:
            built = _build_one(request, params, source, scratch, progress, warnings)
        withheld = withheld_reason(built.proof, request.serving)
        record, size, again = None, built.path.stat().st_size, None
        if withheld:
            again = _prove_serving(request, model_dir, source)
            withheld += still_serving(request.serving, again)
        else:
            progress(0.95, "publishing")
            record = _publish(built.path, model_dir / VARIANT_FILES[built.recipe.variant],
                              request.derivation)
    result = QuantizeResult(record=record, variant=built.recipe.variant, proof=built.proof,
                            candidates=tuple(built.rows), warnings=tuple(warnings),
                            withheld=withheld, serving_proof=again)
    primary = built.proof.on(request.providers[0]) if request.providers else None
    log.info("quantized", model=request.name, method=request.method, recipe=built.recipe.name,
             variant=result.variant, seconds=round(time.monotonic() - started, 2),
             size_ratio=round(size / source.stat().st_size, 3),
             passed=built.proof.passed_anywhere, withheld=withheld or None,
             speedup=primary.speedup if primary else None,
             cosine=primary.cosine if primary else None, warnings=list(warnings))
    progress(1.0, "done")
    return result


def _prove_serving(request: QuantizeRequest, model_dir: Path, source: Path) -> Proof | None:
    """The variant serving now, proven on the held-out samples the withheld build failed on: a
    shift in what the robot sees may fail it too, and then FP32 is the honest answer."""
    assert request.serving is not None
    path = model_dir / request.serving.file_name
    if not path.is_file() or path.is_symlink():
        return None
    return _prove(request, path, request.serving.variant, source,
                  *_agreement_feeds(request, source))


@dataclass
class _Built:
    recipe: Recipe
    path: Path
    proof: Proof
    rows: list[dict]


# ---- explicit methods ------------------------------------------------------------------------

def _build_one(request: QuantizeRequest, params: Mapping[str, Any], source: Path, scratch: Path,
               progress: ProgressFn, warnings: list[str]) -> _Built:
    recipe = recipe_for(request.method, params)
    feeds = None
    if recipe.kind == "fp16":
        prepared = source  # the FP16 converter wants the graph as exported, not optimized
    else:
        progress(0.05, "preprocessing")
        prepared = _preprocess(source, scratch, warnings)
        if recipe.options.get("per_channel"):
            prepared = _at_least_opset_13(prepared, scratch, request.name)
    if recipe.kind == "static":
        progress(0.2, "calibrating")
        feeds = _calibration_feeds(request, prepared, params["samples"], warnings)
    progress(0.5, "quantizing")
    out = scratch / "quantized.onnx"
    _run_recipe(recipe, prepared, out, feeds, scratch, request.name)
    progress(0.7, "proving")
    proof = _prove(request, out, recipe.variant, source, *_agreement_feeds(request, source))
    return _Built(recipe, out, proof, [_row(recipe, out, proof, request.providers, source)])


# ---- auto --------------------------------------------------------------------------------------

def _build_auto(request: QuantizeRequest, params: Mapping[str, Any], source: Path, scratch: Path,
                progress: ProgressFn, warnings: list[str]) -> _Built:
    """Build the candidates, then prove them together (FP32 timed once, in one interleaved loop
    with every candidate whose agreement passes; see ``verify.prove_files``).

    The searches (the measured selection, and for detectors the exclusion search), by far the
    most expensive candidates (a quantize and a run per probe), are built only when quantizing
    everything but the decode misses the judge on the agreement feeds: a subset is not faster
    than the whole on this kind of CPU (measured on PP-OCRv4 det and a generated YOLO-sized
    CNN). The judge is the model's task metric when it has one and the frames are real
    (``_judge_for``), else the worst output cosine."""
    progress(0.05, "preprocessing")
    prepared = _preprocess(source, scratch, warnings)
    agreement, synthetic = _agreement_feeds(request, source)
    try:  # per-channel candidates need opset 13 (DequantizeLinear's axis)
        prepared = _at_least_opset_13(prepared, scratch, request.name)
        per_channel_ok = True
    except QuantizeError as e:
        warnings.append(f"{e.message}: per-channel candidates skipped")
        per_channel_ok = False
    summary = summarize_graph(prepared, agreement[0])
    judge = _judge_for(request, source, agreement, synthetic)
    recipes = [r for r in auto_candidates(summary, tuple(request.providers),
                                          detector=getattr(judge, "kind", "") == tasks.DETECTION)
               if per_channel_ok or not r.options.get("per_channel")]
    # static candidates that calibrate every op type go first: their range cache serves the
    # rest; the measured selection goes last (it is built only if still needed)
    recipes.sort(key=lambda r: (r.refine, r.kind != "static", r.op_types_to_quantize is not None))
    if not recipes:
        raise QuantizeError("auto found nothing to quantize in this model", entry=request.name,
                            hint="serve FP32 (remove 'quantize') or pick a method")
    feeds = None
    if any(r.kind == "static" for r in recipes):
        progress(0.1, "calibrating")
        feeds = _calibration_feeds(request, prepared, params["samples"], warnings)
    built: list[tuple[Recipe, Path, dict, dict]] = []  # recipe, file, extra fields, its row
    rows: list[dict] = []
    made: dict[str, str] = {}  # file sha256 -> recipe that made it: identical files prove alike
    whole_agrees = None  # the judge's verdict on a candidate that quantizes everything it may
    searched = None      # the task search that met its gate: the measured selection is not run
    budget = None        # the probe time of both searches, started by the first (SearchBudget)
    for i, recipe in enumerate(recipes, 1):
        progress(0.1 + 0.6 * (i - 1) / len(recipes), f"building candidate {i}/{len(recipes)}")
        out = scratch / f"candidate-{i}.onnx"
        # one range cache per calibration method: a Percentile candidate must not reuse MinMax
        # ranges (the quantizer takes whatever the cache holds)
        cache = scratch / f"calibration-{recipe.options.get('calibrate_method', 'none')}.json"
        extra: dict[str, Any] = {}
        if recipe.refine and searched is not None:
            rows.append(recipe.describe() | {"size": None, "speedup": None, "cosine": None,
                                             "passed": False, "reason": "not needed: "
                                             f"{searched} met the {judge.label} gate on the "
                                             "calibration frames"})
            continue
        if recipe.refine and whole_agrees is not None and whole_agrees.accepted:
            rows.append(recipe.describe() | {"size": None, "speedup": None, "cosine": None,
                                             "passed": False, "reason": "not needed: quantizing "
                                             f"every node agrees ({judge.label} "
                                             f"{whole_agrees.value:.4f})"})
            continue
        if recipe.refine and not cache.exists() and feeds:
            # calibrate before the budget's clock runs: it counts probes, and histogram
            # calibration of a large input (PicoDet 800x608, Percentile) takes minutes here
            with contextlib.suppress(QuantizeError):
                _run_recipe(replace(recipe, refine=False), prepared, out, feeds, scratch,
                            request.name, calibration_cache=cache)
        if recipe.refine and budget is None:
            budget = SearchBudget()
        if recipe.refine and budget.left() <= 0:
            rows.append(recipe.describe() | {"size": None, "speedup": None, "cosine": None,
                                             "passed": False, "reason": "not run: the searches' "
                                             f"time budget ({budget.seconds:.0f} s) is spent"})
            continue
        search_started = time.monotonic() if recipe.refine else None
        try:
            if recipe.refine and recipe.nodes_to_quantize is None:
                recipe, extra = _search_exclusions(recipe, request, prepared, out, feeds,
                                                   summary.conv_work, judge, scratch, cache,
                                                   budget)
                searched = recipe.name
            elif recipe.refine:
                work = {n: summary.conv_work[n] for n in recipe.nodes_to_quantize or ()}
                recipe, extra = _refine(recipe, request, prepared, out, feeds, work,
                                        summary.light_groups, judge, scratch, cache, budget)
            else:
                _run_recipe(recipe, source if recipe.kind == "fp16" else prepared, out, feeds,
                            scratch, request.name, calibration_cache=cache)
        except QuantizeError as e:
            rows.append(recipe.describe() | extra | _search_time(search_started, budget)
                        | {"size": None, "speedup": None, "cosine": None, "passed": False,
                           "reason": e.message})
            continue
        extra |= _search_time(search_started, budget)
        same_as = made.setdefault(_sha256_of(out), recipe.name)
        if same_as != recipe.name:
            rows.append(recipe.describe() | {"size": out.stat().st_size, "speedup": None,
                                             "cosine": None, "passed": False,
                                             "reason": f"same file as {same_as}"})
            continue
        if _quantizes_everything(recipe, summary.decode_nodes):
            verdict = _verdict_on(out, source, agreement, judge)
            if whole_agrees is None or verdict.value > whole_agrees.value:
                whole_agrees = verdict
        rows.append({})  # this candidate's row, filled in from its proof below
        built.append((recipe, out, extra, rows[-1]))
    if not built:
        raise QuantizeError(f"every auto candidate failed to quantize ({rows[0]['reason']})",
                            entry=request.name, hint="serve FP32, or pick a method explicitly")
    progress(0.75, f"proving {len(built)} candidates")
    proofs = verify.prove_files([(out, recipe.variant) for recipe, out, _, _ in built],
                                reference=source, providers=tuple(request.providers),
                                gates=request.gates, feeds=agreement, simulated=request.simulated,
                                runtimes=request.runtimes, basis=request.basis,
                                model_dir=request.model_dir, task=request.task,
                                preset=request.preprocessing_preset, synthetic=synthetic,
                                time_refused=False)
    tried = []
    for (recipe, out, extra, row), proof in zip(built, proofs):
        row.update(_row(recipe, out, proof, request.providers, source) | extra)
        tried.append(_Built(recipe, out, proof, rows))
    chosen = _choose(tried, request.providers)
    for row in rows:
        row["chosen"] = row["recipe"] == chosen.recipe.name
    if not chosen.proof.passed_anywhere:
        warnings.append(f"no auto candidate passed the gates; kept {chosen.recipe.name} "
                        "with its refusal (FP32 keeps serving)")
    return chosen


def _search_time(started: float | None, budget: SearchBudget | None) -> dict:
    """A search candidate's row fields (``started``: when its search began, None for the
    other candidates): its own seconds, and what is left of the budget all searches share."""
    if budget is None or started is None:
        return {}
    return {"search_s": round(time.monotonic() - started, 1),
            "search_budget_s": budget.seconds, "search_budget_left_s": round(budget.left(), 1)}


def _quantizes_everything(recipe: Recipe, decode: tuple[str, ...]) -> bool:
    """Static, every op type, every node but the decode (which no candidate quantizes)."""
    return (recipe.kind == "static" and recipe.op_types_to_quantize is None
            and recipe.nodes_to_quantize is None and not recipe.refine
            and set(recipe.nodes_to_exclude) <= set(decode))


def _judge_for(request: QuantizeRequest, source: Path, feeds: list[dict[str, np.ndarray]],
               synthetic: bool):
    """How auto judges its searches: by the task metric when the model has one (``tasks``
    finds a detector, classifier or map head in FP32's outputs) and the feeds are real frames;
    by the worst output cosine otherwise (synthetic inputs: a detector finds nothing on noise,
    so its metric could not be measured)."""
    cosine = CosineJudge(request.gates.min_cosine)
    if synthetic or not feeds:
        return cosine
    try:
        outputs = verify.run_session(cpu_session(source), feeds[0])
    except Exception:  # noqa: BLE001 - the proof reports a model that does not run
        return cosine
    head = tasks.head_for(request.task, request.preprocessing_preset, outputs)
    if head is None:
        return cosine
    log.info("auto_judged_by_task", model=request.name, task=head.kind, gate=head.gate,
             minimum=getattr(request.gates, head.gate))
    return task_judge(head, request.gates, min_cosine=request.gates.min_cosine)


def _verdict_on(path: Path, reference: Path, feeds: list[dict[str, np.ndarray]], judge
                ) -> Verdict:
    """The judge's verdict on ``path`` against ``reference`` on the CPU (refused if it does
    not load or run: the proof says why)."""
    try:
        variant = cpu_session(path)
        ref = cpu_session(reference)
        return judge([verify.run_session(ref, f) for f in feeds],
                     [verify.run_session(variant, f) for f in feeds])
    except Exception:  # noqa: BLE001 - judged properly by the proof
        return Verdict(1.0, 0.0, False)


def _search_exclusions(recipe: Recipe, request: QuantizeRequest, prepared: Path, out: Path,
                       feeds: list | None, work: Mapping[str, float], judge, scratch: Path,
                       cache: Path, budget: SearchBudget) -> tuple[Recipe, dict[str, Any]]:
    """``selection.exclusion_search`` from ``recipe`` (everything but its exclusions), judged
    on the calibration feeds: the proof that follows judges the result on held-out ones."""
    def build(excluded: tuple[str, ...]) -> Path:
        _run_recipe(replace(recipe, nodes_to_exclude=recipe.nodes_to_exclude + excluded,
                            refine=False), prepared, out, feeds, scratch, request.name,
                    calibration_cache=cache)
        return out

    with _search_errors(recipe, request, "search"):
        found = exclusion_search(build, prepared, work, (feeds or [])[:TASK_SEARCH_SAMPLES],
                                 judge=judge, budget=budget.part(EXCLUSION_BUDGET_SHARE))
    if found is None:
        raise QuantizeError(f"{recipe.name}: no set of convolutions left in FP32 reached the "
                            f"{judge.label} gate on the calibration frames",
                            entry=request.name, recipe=recipe.name)
    chosen = replace(recipe, nodes_to_exclude=recipe.nodes_to_exclude + found.excluded,
                     refine=False)
    return chosen, {"fp32_convs": list(found.excluded), "probed_nodes": found.probed,
                    "selection_rounds": list(found.rounds)}


@contextmanager
def _search_errors(recipe: Recipe, request: QuantizeRequest, what: str) -> Iterator[None]:
    """A probe that does not load or run ends a search: one QuantizeError naming the recipe."""
    try:
        yield
    except QuantizeError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's own words are the reason
        raise QuantizeError(f"{recipe.name} {what} failed: {_one_line(e)}",
                            entry=request.name, recipe=recipe.name) from e


def _refine(recipe: Recipe, request: QuantizeRequest, prepared: Path, out: Path,
            feeds: list | None, work: Mapping[str, float],
            groups: Mapping[str, tuple[str, ...]], judge, scratch: Path, cache: Path,
            budget: SearchBudget) -> tuple[Recipe, dict[str, Any]]:
    """Measured selection: the recipe with the nodes ``refine_selection`` kept, built at ``out``.

    The selection is measured on (a few of) the calibration feeds, so the proof that follows,
    on the agreement feeds, judges it on inputs it was not tuned on."""
    def build(nodes: tuple[str, ...]) -> Path:
        _run_recipe(replace(recipe, nodes_to_quantize=nodes, refine=False), prepared, out,
                    feeds, scratch, request.name, calibration_cache=cache)
        return out

    count = REFINE_SAMPLES if isinstance(judge, CosineJudge) else TASK_SELECTION_SAMPLES
    with _search_errors(recipe, request, "selection"):
        refined = refine_selection(build, prepared, work, (feeds or [])[:count], judge=judge,
                                   groups=groups, budget=budget)
    if refined is None:
        raise QuantizeError(f"{recipe.name}: no selection of nodes reached the {judge.label} "
                            "target",
                            entry=request.name, recipe=recipe.name)
    # the accepted round was the last one built: ``out`` holds exactly this selection
    chosen = replace(recipe, nodes_to_quantize=refined.nodes, refine=False)
    return chosen, {"quantized_nodes": len(refined.nodes), "probed_nodes": refined.probed,
                    "selection_rounds": list(refined.rounds)}


def _choose(tried: list[_Built], providers: tuple[str, ...]) -> _Built:
    """The fastest candidate that passes; if none passes, the one closest to passing (best
    agreement, then speed), so the refusal recorded is the most informative one."""
    def speed(b: _Built) -> float:
        return max((p.speedup or 0.0 for p in b.proof.providers if p.passed), default=0.0)

    passing = [b for b in tried if b.proof.passed_anywhere]
    if passing:
        return max(passing, key=speed)

    def closeness(b: _Built) -> tuple:
        p = b.proof.on(providers[0]) if providers else None
        return (b.proof.checker_ok, bool(p and p.usable), (p.cosine or 0.0) if p else 0.0,
                (p.speedup or 0.0) if p else 0.0)
    return max(tried, key=closeness)


# ---- the steps -------------------------------------------------------------------------------

def _preprocess(source: Path, scratch: Path, warnings: list[str]) -> Path:
    """``quant_pre_process`` (shape inference + ORT basic optimizations); when symbolic shape
    inference fails, which it did on every real model measured, retry without it; when that
    fails too, quantize the model as it is, with Constant weights moved to initializers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = scratch / "preprocessed.onnx"
    try:
        quant_pre_process(str(source), str(out))
        return _simplified(out)
    except Exception as first:  # noqa: BLE001 - any failure means: try the next, simpler way
        first_error = _one_line(first)
    try:
        quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
        # debug: it happens on every job without sympy, and the result is as good (issue 16)
        log.debug("preprocess_fallback", step="skip_symbolic_shape", reason=first_error)
        return _simplified(out)
    except Exception as second:  # noqa: BLE001
        second_error = _one_line(second)
    warnings.append(f"preprocessing failed ({second_error}); quantized without it")
    log.warning("preprocess_skipped", reason=second_error, symbolic_reason=first_error)
    model = onnx.load(str(source))
    constants_to_initializers(model.graph)
    onnx.save(model, str(out))
    return _simplified(out)


def _simplified(path: Path) -> Path:
    """Name every node (selection is by name) and apply the graph rewrites of
    ``workers.rewrites`` (the same function, fewer elementwise passes)."""
    model = onnx.load(str(path))
    named = name_nodes(model.graph)
    rewritten = simplify(model.graph)
    if named or rewritten:
        onnx.save(model, str(path))
    if rewritten:
        log.info("graph_rewritten", **rewritten)
    return path


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give unnamed nodes unique names: the quantizer selects and excludes nodes by name, and an
    empty name would match every unnamed node at once. Returns how many were named."""
    taken = {n.name for n in graph.node if n.name}
    named = 0
    for i, node in enumerate(graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        named += 1
    return named


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Turn ``Constant`` nodes holding a tensor into initializers (Paddle exports keep weights
    that way, and the quantizer only quantizes initializers). Returns how many moved."""
    moved, keep = 0, []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def _at_least_opset_13(path: Path, scratch: Path, entry: str) -> Path:
    """Per-channel DequantizeLinear needs ``axis`` (opset 13): an opset 11/12 model quantized per
    channel does not load, with no warning from the quantizer."""
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 13:
        return path
    try:
        converted = onnx.version_converter.convert_version(model, 13)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise QuantizeError(f"cannot convert opset {opset} to 13 for per-channel quantization: "
                            f"{_one_line(e)}", entry=entry,
                            hint="set per_channel = false") from e
    out = scratch / "opset13.onnx"
    onnx.save(converted, str(out))
    log.info("opset_converted", model=entry, from_opset=opset, to_opset=13)
    return out


def _calibration_feeds(request: QuantizeRequest, model: Path, samples: int,
                       warnings: list[str]) -> list[dict[str, np.ndarray]]:
    feeds, synthetic = sample_inputs(model, calibration=request.calibration,
                                     preset=request.preprocessing_preset,
                                     input_size=request.input_size, count=samples, seed=0,
                                     split="calibration")
    if synthetic:
        warnings.append("no calibration data: calibrated on synthetic inputs; set 'calibration' "
                        "to a folder of real samples for a trustworthy INT8 model")
        log.warning("calibration_synthetic", model=request.name, **describe(feeds))
    else:
        log.info("calibration_loaded", model=request.name, folder=request.calibration,
                 **describe(feeds))
    return feeds


def _agreement_feeds(request: QuantizeRequest, source: Path
                     ) -> tuple[list[dict[str, np.ndarray]], bool]:
    """(held-out feeds the proof compares on, whether they are synthetic)."""
    return sample_inputs(source, calibration=request.calibration,
                         preset=request.preprocessing_preset, input_size=request.input_size,
                         count=AGREEMENT_SAMPLES, seed=AGREEMENT_SEED, split="holdout")


class _FeedReader:
    """The quantizer's ``CalibrationDataReader`` over a list of feeds (duck-typed: the ABC only
    asks for ``get_next``; ``set_range`` serves strided MinMax calibration)."""

    __slots__ = ("_feeds", "_next", "_end")

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._next = 0
        self._end = len(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._feeds))

    def __len__(self) -> int:
        return len(self._feeds)


def _run_recipe(recipe: Recipe, model: Path, out: Path, feeds: list | None, scratch: Path,
                entry: str, *, calibration_cache: Path | None = None) -> None:
    """Turn ``recipe`` into the onnxruntime quantizer call; library errors become QuantizeError."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    opts = recipe.options
    selection = dict(op_types_to_quantize=list(recipe.op_types_to_quantize)
                     if recipe.op_types_to_quantize is not None else None,
                     nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
                     nodes_to_quantize=list(recipe.nodes_to_quantize)
                     if recipe.nodes_to_quantize is not None else None)
    try:
        if recipe.kind == "dynamic":
            quantize_dynamic(str(model), str(out), weight_type=QuantType[opts["weight_type"]],
                             per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                             **selection)
        elif recipe.kind == "static":
            quantize_static(str(model), str(out), _FeedReader(feeds or []),
                            quant_format=QuantFormat[opts["format"]],
                            activation_type=QuantType[opts["activation_type"]],
                            weight_type=QuantType[opts["weight_type"]],
                            per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                            calibrate_method=CalibrationMethod[opts["calibrate_method"]],
                            calibration_cache_path=str(calibration_cache) if calibration_cache else None,
                            extra_options=_calibration_options(opts["calibrate_method"],
                                                               len(feeds or [])),
                            **selection)
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16
            from onnxruntime.transformers.onnx_model import OnnxModel

            converted = convert_float_to_float16(onnx.load(str(model)),
                                                 keep_io_types=opts["keep_io_types"])
            # keep_io_types appends its Casts after the nodes that read them: onnxruntime sorts
            # on load, but the onnx checker (the proof's first step) refuses unsorted graphs
            OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
            onnx.save(converted, str(out))
    except (MemoryError, QuantizeError):
        raise
    except OSError as e:
        if e.errno is not None and e.filename is None:
            raise  # disk full and friends: the job runner types them (DiskFullError)
        raise QuantizeError(f"{recipe.name} quantization failed: {_one_line(e)}",
                            entry=entry, recipe=recipe.name) from e
    except Exception as e:  # noqa: BLE001 - the quantizer raises anything from anywhere
        raise QuantizeError(f"{recipe.name} quantization failed: {type(e).__name__}: "
                            f"{_one_line(e)}", entry=entry, recipe=recipe.name,
                            hint="try another method or options") from e
    if not out.is_file():
        raise QuantizeError(f"{recipe.name} quantization wrote no model", entry=entry)
    if recipe.kind != "fp16" and not quantized_op_count(out):
        # e.g. weights held as Constants inside If subgraphs (silero-vad): a copy of FP32 is no
        # INT8 variant, and serving it as one would only waste a reload
        raise QuantizeError(f"{recipe.name} quantized no operator of this model", entry=entry,
                            recipe=recipe.name, hint="serve FP32 or try another method")


def _calibration_options(method: str, samples: int) -> dict[str, Any]:
    """MinMax keeps every sample's outputs until it computes ranges (1.6 GB for 20 inputs at
    640x640 was measured); calibrating in strides of a few samples and merging the ranges
    bounds that. The stride must divide the sample count. (``CalibMaxIntermediateOutputs``
    would be the obvious knob, but onnxruntime 1.32 drops the outputs it clears, unmerged.)
    Histogram methods keep their histograms either way."""
    if method != "MinMax":
        return {}
    stride = next(n for n in range(min(CALIBRATION_BATCH, max(samples, 1)), 0, -1)
                  if samples % n == 0)
    return {"CalibStridedMinMax": stride} if 1 < stride < samples else {}


def quantized_op_count(path: Path) -> int:
    """How many integer operators (QLinear*, *Integer, Q/DQ pairs' QuantizeLinear) a file holds."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in model.graph.node
               if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer")
               or n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
                                "DynamicQuantizeMatMul", "QGemm", "QAttention"))


def _prove(request: QuantizeRequest, path: Path, variant: str, source: Path,
           feeds: list[dict[str, np.ndarray]], synthetic: bool) -> Proof:
    return verify.prove_file(path, variant=variant, reference=source,
                             providers=tuple(request.providers), gates=request.gates, feeds=feeds,
                             simulated=request.simulated, model_dir=request.model_dir,
                             runtimes=request.runtimes, basis=request.basis,
                             task=request.task, preset=request.preprocessing_preset,
                             synthetic=synthetic)


def _row(recipe: Recipe, path: Path, proof: Proof, providers: tuple[str, ...],
         source: Path) -> dict:
    p = proof.on(providers[0]) if providers else None
    reason = proof.checker_error or (p.reason if p else "")
    return recipe.describe() | {
        "size": path.stat().st_size,
        "size_ratio": round(path.stat().st_size / source.stat().st_size, 4),
        "speedup": round(p.speedup, 3) if p and p.speedup is not None else None,
        "cosine": round(p.cosine, 5) if p and p.cosine is not None else None,
        "part_cosine": round(p.part_cosine, 5) if p and p.part_cosine is not None else None,
        "task_metric": p.task_check.metric if p and p.task_check else None,
        "task_value": p.task_check.value if p and p.task_check else None,
        "passed": proof.passed_anywhere, "reason": reason}


def _publish(built: Path, final: Path, derivation: Derivation | None) -> FileRecord:
    """Move the built file beside its final name, then publish it atomically."""
    temp = temp_path_for(final)
    os.replace(built, temp)  # same folder tree, same file system: a rename
    try:
        publish_file(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    st = final.stat()
    return FileRecord(name=final.name, sha256=_sha256_of(final), size=st.st_size,
                      mtime_ns=st.st_mtime_ns, inode=st.st_ino, derivation=derivation)


@contextmanager
def _scratch_dir(model_dir: Path) -> Iterator[Path]:
    """A private folder inside the model folder, our working directory and temp dir meanwhile
    (quant_pre_process and the calibrator leave files in both), removed in every case."""
    scratch = model_dir / f"{WORK_PREFIX}{uuid.uuid4().hex[:12]}"
    scratch.mkdir()
    old_cwd, old_tempdir = os.getcwd(), tempfile.tempdir
    try:
        os.chdir(scratch)
        tempfile.tempdir = str(scratch)
        yield scratch
    finally:
        tempfile.tempdir = old_tempdir
        os.chdir(old_cwd)
        shutil.rmtree(scratch, ignore_errors=True)
