"""Prove a model file before it is served: onnx checker, load and run per execution provider,
agreement with FP32 and speed measured interleaved with FP32.

``prove_file``/``prove_files`` run in-process (quantize's ``auto`` proves its candidates
together); ``prove`` is the worker entry point the reconciler runs through
``modeld.jobs.JobRunner``. A bad model never
raises: the answer is a ``Proof`` whose reasons say what failed. Only infrastructure problems
(a missing file) raise typed errors.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import structlog

from ..errors import StoreError
from ..store import sha256_file
from ..variants import Gates, Proof, ProviderProof, proof_key
from .inputs import CalibrationError, sample_inputs

log = structlog.get_logger(__name__)

CPU = "CPUExecutionProvider"
#: protobuf cannot hold more than 2 GiB; anything larger is not a model we should parse
MAX_PROTOBUF_BYTES = 2**31 - 1
#: interleaved timing: wall-clock budget per provider, and the least/most rounds of each file
SPEED_BUDGET_S = 1.5
MIN_ROUNDS = 15
#: FP32 proven alone has no speed gate to pass (a derived variant times FP32 again, interleaved
#: with itself): its latency is for the record, and every pull waits for it
ALONE_BUDGET_S = 0.1
ALONE_MIN_ROUNDS = 5
MAX_ROUNDS = 1000
WARMUP_RUNS = 2
#: models faster than this get an untimed run after each switch (see interleaved_latencies_ms)
REWARM_BELOW_MS = 50.0
#: detection agreement: candidates above this score count, matched at IoU >= MATCH_IOU
DETECTION_SCORE = 0.25
MATCH_IOU = 0.5
MAX_DETECTIONS = 300
REASON_CHARS = 300
#: outputs whose FP32 and variant values all stay within this are "both zero" (cosine undefined)
NEGLIGIBLE_ABS = 1e-5
SYNTHETIC_WARNING = "agreement measured on synthetic inputs (no calibration data)"

Feed = dict[str, np.ndarray]
ProgressFn = Callable[[float | None, str], None]


@dataclass(frozen=True)
class ProveRequest:
    """What the reconciler asks a verify worker to prove (pickles across the spawn boundary)."""

    model_dir: str
    file_name: str
    variant: str
    reference_file: str | None      # "model.onnx" for derived variants, None for fp32
    providers: tuple[str, ...]
    gates: Gates
    calibration: str | None
    preprocessing_preset: str | None
    input_size: int | None
    simulated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    samples: int = 8
    seed: int = 0
    task: str | None = None         # the catalog's task; "...detection" loosens the detector test


def prove(request: ProveRequest, progress: ProgressFn) -> Proof:
    """Worker entry point: build sample inputs, then ``prove_file``."""
    model_dir = Path(request.model_dir)
    path = model_dir / request.file_name
    reference = model_dir / request.reference_file if request.reference_file else None
    progress(0.0, f"proving {request.file_name}")
    try:
        feeds, synthetic = sample_inputs(reference or path, calibration=request.calibration,
                                         preset=request.preprocessing_preset,
                                         input_size=request.input_size, count=request.samples,
                                         seed=request.seed, split="holdout")
    except CalibrationError:
        raise  # the entry's calibration settings are wrong: the user must fix them
    except Exception:  # noqa: BLE001 - an unreadable model: prove_file says why, or raises
        feeds, synthetic = None, False
    proof = prove_file(path, variant=request.variant, reference=reference,
                       providers=request.providers, gates=request.gates, feeds=feeds,
                       simulated=request.simulated, model_dir=model_dir, seed=request.seed,
                       task=request.task, progress=progress)
    if synthetic and reference is not None and SYNTHETIC_WARNING not in proof.warnings:
        proof = replace(proof, warnings=proof.warnings + (SYNTHETIC_WARNING,))
    progress(1.0, f"proved {request.file_name}")
    return proof


def prove_file(path: str | Path, *, variant: str, reference: str | Path | None,
               providers: tuple[str, ...], gates: Gates, feeds: list[Feed] | None,
               simulated: Mapping[str, tuple[str, ...]], model_dir: str | Path, seed: int = 0,
               task: str | None = None, progress: ProgressFn | None = None) -> Proof:
    """Prove ``path`` on each provider (against ``reference``, the FP32 file, when derived)."""
    return prove_files([(path, variant)], reference=reference, providers=providers, gates=gates,
                       feeds=feeds, simulated=simulated, model_dir=model_dir, seed=seed,
                       task=task, progress=progress)[0]


def prove_files(files: list[tuple[str | Path, str]], *, reference: str | Path | None,
                providers: tuple[str, ...], gates: Gates, feeds: list[Feed] | None,
                simulated: Mapping[str, tuple[str, ...]], model_dir: str | Path, seed: int = 0,
                task: str | None = None, progress: ProgressFn | None = None,
                time_refused: bool = True) -> list[Proof]:
    """Prove each ``(path, variant)`` of ``files`` against one ``reference``, one proof each.

    The reference runs once per provider, and FP32 and the files are timed in one interleaved
    loop (``auto`` proves its candidates together: FP32 is timed once, not once per candidate).
    With ``time_refused=False`` a file whose agreement already misses a gate is not timed: its
    proof has no latency, and its reason is the agreement's."""
    model_dir = Path(model_dir)
    gates = gates or Gates()
    reference = Path(reference) if reference is not None else None
    providers = tuple(providers)
    simulated = {k: tuple(v) for k, v in (simulated or {}).items()}
    ref_sha = _sha256_of(reference) if reference is not None else None
    bases, models, proofs = [], [], {}
    for i, (path, variant) in enumerate(files):
        path = Path(path)
        file_sha = _sha256_of(path)
        key = proof_key(file_sha256=file_sha, reference_sha256=ref_sha, providers=providers,
                        gates=gates, onnxruntime=ort.__version__, simulated=simulated)
        bases.append(dict(variant=variant, file_sha256=file_sha, key=key,
                          onnxruntime=ort.__version__))
        model, checker_error = check_file(path, model_dir)
        models.append((path, model))
        if checker_error:
            log.info("proof_refused_by_checker", file=path.name, variant=variant,
                     reason=checker_error)
            proofs[i] = Proof(checker_ok=False, checker_error=checker_error, **bases[i],
                              providers=tuple(ProviderProof(p, usable=False, passed=False,
                                                            reason=f"onnx checker: {checker_error}")
                                              for p in providers))
    pending = [i for i in range(len(files)) if i not in proofs]

    def refuse_all(reason: str) -> list[Proof]:
        for i in pending:
            proofs[i] = Proof(checker_ok=True, **bases[i], providers=tuple(
                ProviderProof(p, usable=False, passed=False, reason=reason) for p in providers))
        return [proofs[i] for i in range(len(files))]

    ref_model = None
    if reference is not None and pending:
        ref_model, ref_error = check_file(reference, _containing_folder(reference, model_dir))
        if ref_error:
            # the FP32 reference is broken: nothing can be compared, so nothing is proven
            return refuse_all(f"FP32 reference refused by onnx checker: {ref_error}")
    warnings: list[list[str]] = [[] for _ in files]
    if feeds is None and pending:
        try:
            feeds, _ = sample_inputs(reference or models[pending[0]][0], calibration=None,
                                     preset=None, input_size=None, count=4, seed=seed)
        except Exception as e:  # noqa: BLE001 - e.g. a model without inputs
            return refuse_all(f"cannot build sample inputs: {_first_line(e)}")
        if reference is not None:
            for i in pending:
                warnings[i].append(SYNTHETIC_WARNING)
    results: dict[int, list[ProviderProof]] = {i: [] for i in pending}
    for k, provider in enumerate(providers if pending else ()):
        if progress:
            names = ", ".join(models[i][0].name for i in pending)
            progress(k / max(len(providers), 1), f"proving {names} on {provider}")
        on_provider = _prove_on(provider, [models[i] for i in pending], reference, ref_model,
                                feeds, gates, simulated, task, [warnings[i] for i in pending],
                                time_refused)
        for i, result in zip(pending, on_provider):
            results[i].append(result)
    for i in pending:
        proofs[i] = Proof(checker_ok=True, **bases[i], providers=tuple(results[i]),
                          warnings=tuple(warnings[i]))
        log.info("proved", file=models[i][0].name, variant=bases[i]["variant"],
                 passed_anywhere=proofs[i].passed_anywhere,
                 providers={p.provider: (p.passed, p.reason) for p in results[i]})
    return [proofs[i] for i in range(len(files))]


# ---------------------------------------------------------------------------------------------
# 1. structure: size, external-data locations, onnx checker

def check_file(path: Path, model_dir: Path) -> tuple[onnx.ModelProto | None, str]:
    """(model without external data, "") if ``path`` is a sound ONNX file, else (None, reason)."""
    size = path.stat().st_size
    if size > MAX_PROTOBUF_BYTES:
        return None, (f"protobuf is {size} bytes, over the {MAX_PROTOBUF_BYTES} byte limit "
                      "(weights this large must be stored as external data)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError, ...
        return None, ("not a readable ONNX model (truncated, or not ONNX at all): "
                      f"{_first_line(e)}")
    if not model.HasField("graph") or model.ir_version == 0:
        return None, "not an ONNX model (no graph or no IR version)"
    escape = _external_data_escape(model, path.parent, model_dir)
    if escape:
        return None, escape
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: >2 GB and external data
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, OSError ...
        return None, _first_line(e)
    return model, ""


def _containing_folder(reference: Path, model_dir: Path) -> Path:
    """The folder the FP32 reference's external data must stay in: ``model_dir`` when the
    reference lives there (the usual case), else the reference's own folder (a candidate proven
    in a scratch folder against the store's FP32 file)."""
    return model_dir if reference.resolve().is_relative_to(model_dir.resolve()) else reference.parent


def _external_data_escape(model: onnx.ModelProto, base: Path, model_dir: Path) -> str:
    """A reason if any external-data location leaves ``model_dir``; "" if all stay inside."""
    root = model_dir.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = f"external data of tensor {tensor.name!r} at {location!r}"
        if not location:
            return f"{where}: no location"
        if os.path.isabs(location) or ".." in Path(location).parts:
            return f"{where} escapes the model folder"
        if not (base / location).resolve().is_relative_to(root):
            return f"{where} escapes the model folder (through a symlink)"
    return ""


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph, its sparse initializers, node attributes and subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub)


def op_types(graph: onnx.GraphProto) -> set[str]:
    """Operator types used anywhere in a graph, subgraphs included."""
    out: set[str] = set()
    for node in graph.node:
        out.add(node.op_type)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                out |= op_types(sub)
    return out


# ---------------------------------------------------------------------------------------------
# 2.-4. per provider: load, run, agreement, interleaved speed

def _prove_on(provider: str, files: list[tuple[Path, onnx.ModelProto]], reference: Path | None,
              ref_model: onnx.ModelProto | None, feeds: list[Feed], gates: Gates,
              simulated: Mapping[str, tuple[str, ...]], task: str | None,
              warnings: list[list[str]], time_refused: bool = True) -> list[ProviderProof]:
    """One ``ProviderProof`` per file on ``provider``; ``warnings[i]`` collects file i's."""
    done: dict[int, ProviderProof] = {}
    ran: dict[int, tuple[Any, list]] = {}
    for i, (path, model) in enumerate(files):
        session, reason = open_session(path, model, provider, simulated)
        if session is None:
            done[i] = ProviderProof(provider, usable=False, passed=False, reason=reason)
            continue
        try:
            ran[i] = (session, [run_session(session, feed) for feed in feeds])
        except Exception as e:  # noqa: BLE001 - the runtime's own message is the reason
            done[i] = ProviderProof(provider, usable=False, passed=False, reason=_first_line(e))

    def in_order() -> list[ProviderProof]:
        return [done[i] for i in range(len(files))]

    if reference is None:  # FP32 itself: usable means passed
        for i, (session, _) in ran.items():
            try:
                latency_ms = interleaved_latencies_ms([session], feeds, budget_s=ALONE_BUDGET_S,
                                                      min_rounds=ALONE_MIN_ROUNDS)[0]
            except Exception as e:  # noqa: BLE001 - ran once, failed later: not dependable
                done[i] = ProviderProof(provider, usable=False, passed=False, reason=_first_line(e))
                continue
            done[i] = ProviderProof(provider, usable=True, passed=True, latency_ms=latency_ms,
                                    fp32_latency_ms=latency_ms, speedup=1.0)
        return in_order()
    if not ran:
        return in_order()

    ref_session, ref_reason = open_session(reference, ref_model, provider, simulated)
    baseline_on_provider = ref_session is not None
    if ref_session is None:  # FP32 cannot run here: compare against FP32 on CPU, no speed ratio
        ref_session, _ = open_session(reference, ref_model, CPU, {})
    ref_problem = f"FP32 reference does not load: {ref_reason}" if ref_session is None else ""
    if ref_session is not None:
        try:
            ref_outputs = [run_session(ref_session, feed) for feed in feeds]
        except Exception as e:  # noqa: BLE001
            ref_problem = f"FP32 reference does not run: {_first_line(e)}"
    if ref_problem:
        done.update((i, ProviderProof(provider, usable=True, passed=False, reason=ref_problem))
                    for i in ran)
        return in_order()
    names = [o.name for o in ref_session.get_outputs()]
    agreements = {i: compare_outputs(ref_outputs, outputs, task, names)
                  for i, (_, outputs) in ran.items()}
    for i, agreement in agreements.items():
        warnings[i].extend(n for n in agreement.notes if n not in warnings[i])
    timed = [i for i in ran if time_refused or not gate_failures(gates, agreements[i], None)]
    latencies, failed = _time_together([ran[i][0] for i in timed],
                                       ref_session if baseline_on_provider else None, feeds)
    for k, i in enumerate(timed):
        if k in failed:
            done[i] = ProviderProof(provider, usable=False, passed=False, reason=failed[k])
    for i, agreement in agreements.items():
        if i in done:
            continue
        latency_ms, fp32_ms = (latencies.get(timed.index(i), (None, None)) if i in timed
                               else (None, None))
        speedup = fp32_ms / latency_ms if fp32_ms is not None and latency_ms else None
        failures = gate_failures(gates, agreement, speedup)
        if not baseline_on_provider:
            warnings[i].append(f"FP32 does not run on {provider} ({ref_reason}): agreement "
                               "measured against FP32 on CPU, speed not compared")
        done[i] = ProviderProof(provider, usable=True, passed=not failures,
                                reason="; ".join(failures), latency_ms=latency_ms,
                                fp32_latency_ms=fp32_ms, speedup=speedup,
                                cosine=agreement.cosine, max_abs_error=agreement.max_abs_error,
                                detection_match=agreement.detection_match)
    return in_order()


def _time_together(sessions: list, ref_session, feeds: list[Feed]
                   ) -> tuple[dict[int, tuple[float, float | None]], dict[int, str]]:
    """({k: (latency_ms, fp32_ms or None)}, {k: reason}) for ``sessions[k]``, timed in one
    interleaved loop with ``ref_session`` (when given). If the loop fails, each session is timed
    on its own, so that the failure lands on the file that caused it."""
    if not sessions:
        return {}, {}
    head = [ref_session] if ref_session is not None else []
    try:
        medians = interleaved_latencies_ms(head + sessions, feeds)
    except Exception as e:  # noqa: BLE001 - ran once, failed later: not dependable
        if len(sessions) == 1:
            return {}, {0: _first_line(e)}
        latencies, failed = {}, {}
        for k, session in enumerate(sessions):  # which one was it?
            one, why = _time_together([session], ref_session, feeds)
            latencies.update((k, v) for v in one.values())
            failed.update((k, v) for v in why.values())
        return latencies, failed
    fp32_ms = medians[0] if head else None
    return {k: (m, fp32_ms) for k, m in enumerate(medians[len(head):])}, {}


def open_session(path: Path, model: onnx.ModelProto | None, provider: str,
                 simulated: Mapping[str, tuple[str, ...]]):
    """(session, "") on ``provider`` alone, or (None, reason) if it cannot be used there."""
    run_on = provider
    if provider in simulated:
        missing = sorted(op_types(model.graph) & set(simulated[provider])) if model else []
        if missing:
            return None, f"{missing[0]} is not implemented for {provider} (simulated)"
        run_on = CPU  # a stand-in for a provider that cannot exist on this host
    elif provider not in ort.get_available_providers():
        return None, "provider not available on this host"
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores_available()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures reach the proof as reasons; no stderr noise
    # two sessions alternate in the speed rounds: threads left spinning by one would steal the
    # cores from the other (measured: FP32 read 3x slower interleaved than alone)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if run_on != CPU:
        # fail the load instead of silently running unsupported nodes on the CPU
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=[run_on])
    except Exception as e:  # noqa: BLE001 - Fail, InvalidGraph, NotImplemented, ...
        return None, _first_line(e)
    active = session.get_providers()
    if not active or active[0] != run_on:
        return None, f"onnxruntime fell back to {', '.join(active) or 'nothing'} instead of {run_on}"
    return session, ""


def cores_available() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
               "tensor(bool)": np.bool_}


def run_session(session, feed: Feed) -> list[np.ndarray]:
    """Run one feed, cast to the session's input types (an FP16 variant may take float16)."""
    return session.run(None, adapt_feed(session, feed))


def adapt_feed(session, feed: Feed) -> Feed:
    adapted = {}
    for meta in session.get_inputs():
        if meta.name not in feed:
            raise ValueError(f"no sample for input {meta.name!r}")
        dtype = _ORT_DTYPES.get(meta.type)
        value = feed[meta.name]
        adapted[meta.name] = value.astype(dtype) if dtype and value.dtype != dtype else value
    return adapted


def interleaved_latencies_ms(sessions: list, feeds: list[Feed], *,
                             budget_s: float = SPEED_BUDGET_S, min_rounds: int = MIN_ROUNDS
                             ) -> list[float]:
    """Median latency (ms) of each session, timed in alternate rounds.

    Timing noise between separate passes reached 30% on this kind of host; alternating the
    files round by round lets all see the same conditions, and reversing the order every other
    round (A B C C B A ...) cancels what running first or last costs or gains. A fast model also
    gets one untimed run after each switch: otherwise it is timed with the other model's weights
    in the cache (measured: an INT8 MLP read 0.39 ms interleaved, 0.19 ms with the extra run,
    0.12 ms alone), which would flatter a bloated variant and penalise a compact one. The budget
    (``budget_s``, at least ``min_rounds`` rounds) is for all the sessions together.
    """
    # inputs cast once per session: a dtype conversion is not the model's latency
    adapted = [[adapt_feed(s, feed) for feed in feeds] for s in sessions]
    slowest_warmup_ms = 0.0
    for s, s_feeds in zip(sessions, adapted):
        for i in range(WARMUP_RUNS):
            t0 = time.perf_counter()
            s.run(None, s_feeds[i % len(s_feeds)])
        slowest_warmup_ms = max(slowest_warmup_ms, (time.perf_counter() - t0) * 1000.0)
    rewarm = len(sessions) > 1 and slowest_warmup_ms < REWARM_BELOW_MS
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds < min_rounds
                                   or time.perf_counter() - start < budget_s):
        order = range(len(sessions)) if rounds % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            feed = adapted[k][rounds % len(feeds)]
            if rewarm:
                sessions[k].run(None, feed)
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    return [float(np.median(t)) for t in times]


@dataclass(frozen=True)
class Agreement:
    cosine: float
    max_abs_error: float | None
    detection_match: float | None
    problem: str = ""   # a structural mismatch (shape, non-finite values) that fails outright
    notes: tuple[str, ...] = ()   # caveats for Proof.warnings


def compare_outputs(reference: list[list[Any]], variant: list[list[Any]],
                    task: str | None = None, names: list[str] | None = None) -> Agreement:
    """Worst per-output cosine (flattened over all feeds, float64) and the largest abs error."""
    worst_cos, max_abs, notes = 1.0, 0.0, []
    compared, negligible = 0, 0
    n_outputs = len(reference[0]) if reference else 0
    for o in range(n_outputs):
        name = names[o] if names and o < len(names) else str(o)
        pairs = [(r[o], v[o]) for r, v in zip(reference, variant)]
        if not all(isinstance(a, np.ndarray) and isinstance(b, np.ndarray) for a, b in pairs):
            continue  # sequences/maps (ZipMap) are not compared
        if any(a.shape != b.shape for a, b in pairs):
            return Agreement(0.0, None, None, f"output {name!r} shape {pairs[0][1].shape} "
                                                f"differs from FP32 {pairs[0][0].shape}")
        ref = np.concatenate([a.astype(np.float64).ravel() for a, _ in pairs])
        var = np.concatenate([b.astype(np.float64).ravel() for _, b in pairs])
        if not np.isfinite(var).all() and np.isfinite(ref).all():
            return Agreement(0.0, None, None,
                             f"output {name!r} has NaN/Inf values where FP32 has none")
        finite = np.isfinite(ref) & np.isfinite(var)
        ref, var = ref[finite], var[finite]
        if not ref.size:
            continue
        max_abs = max(max_abs, float(np.max(np.abs(ref - var))))
        if max(float(np.max(np.abs(ref))), float(np.max(np.abs(var)))) <= NEGLIGIBLE_ABS:
            # both ~0 (a probability map on inputs without objects): the angle between two
            # noise vectors says nothing, the absolute error says they agree
            notes.append(f"FP32 output {name!r} is ~0 on these inputs: agreement on it is weak "
                         "evidence (give calibration data)")
            negligible += 1
            continue
        compared += 1
        worst_cos = min(worst_cos, cosine_similarity(ref, var))
    if negligible and not compared:
        # e.g. a detector on inputs without anything to detect: nothing was proven
        return Agreement(0.0, max_abs, None,
                         "FP32's outputs are ~0 on every sample input, so agreement cannot be "
                         "measured: give calibration data the model responds to",
                         notes=tuple(notes))
    detection = None
    for o in range(n_outputs):  # the first output shaped like a detection head, if any
        if isinstance(reference[0][o], np.ndarray) and detector_layout(
                tuple(reference[0][o].shape), task):
            detection = detection_match([r[o] for r in reference], [v[o] for v in variant], task)
            break
    return Agreement(worst_cos, max_abs, detection, notes=tuple(notes))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def gate_failures(gates: Gates, agreement: Agreement, speedup: float | None) -> list[str]:
    """Which gates a derived variant misses, each with its numbers."""
    failures = []
    if agreement.problem:
        failures.append(agreement.problem)
    elif agreement.cosine < gates.min_cosine:
        failures.append(f"cosine {agreement.cosine:.4f} < min_cosine {gates.min_cosine:.4f}")
    if (gates.max_abs_error is not None and agreement.max_abs_error is not None
            and agreement.max_abs_error > gates.max_abs_error):
        failures.append(f"max abs error {agreement.max_abs_error:.4g} > max_abs_error "
                        f"{gates.max_abs_error:.4g}")
    if speedup is not None and speedup < gates.min_speedup:
        head = "slower than FP32: " if speedup < 1.0 else "speedup "
        failures.append(f"{head}{speedup:.2f}x < min_speedup {gates.min_speedup:.2f}")
    return failures


# ---------------------------------------------------------------------------------------------
# detection agreement (YOLO-style raw heads)

def detector_layout(shape: tuple[int, ...], task: str | None) -> str | None:
    """"CN" for [1, 4+C, N], "NC" for [1, N, 4+C], None if the output is not a detection head."""
    if len(shape) != 3 or shape[0] != 1:
        return None
    a, b = shape[1], shape[2]
    forced = bool(task) and "detect" in task.lower()   # "object-detection", "detection", ...
    if a >= 5 and (b >= 8 * a or (forced and b > a)):
        return "CN"
    if b >= 5 and (a >= 8 * b or (forced and a > b)):
        return "NC"
    return None


def detection_match(reference: list[np.ndarray], variant: list[np.ndarray],
                    task: str | None) -> float | None:
    """Share of FP32 detections (score >= DETECTION_SCORE) that the variant also finds
    (same class, IoU >= MATCH_IOU); None if the output is not a detection head or FP32
    detects nothing."""
    if not reference or not isinstance(reference[0], np.ndarray):
        return None
    layout = detector_layout(tuple(reference[0].shape), task)
    if layout is None:
        return None
    found = matched = 0
    for ref, var in zip(reference, variant):
        ref_boxes = _detections(ref, layout)
        var_boxes = _detections(var, layout)
        found += len(ref_boxes[0])
        matched += _count_matched(ref_boxes, var_boxes)
    return matched / found if found else None


def _detections(raw: np.ndarray, layout: str):
    rows = raw[0].T if layout == "CN" else raw[0]           # [N, 4+C]
    rows = rows.astype(np.float64)
    scores = rows[:, 4:].max(axis=1)
    classes = rows[:, 4:].argmax(axis=1)
    keep = np.flatnonzero(scores >= DETECTION_SCORE)
    keep = keep[np.argsort(-scores[keep])][:MAX_DETECTIONS]
    cx, cy, w, h = (rows[keep, i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, classes[keep]


def _count_matched(ref, var) -> int:
    ref_boxes, ref_classes = ref
    var_boxes, var_classes = var
    if not len(ref_boxes) or not len(var_boxes):
        return 0
    iou = _iou_matrix(ref_boxes, var_boxes)
    same_class = ref_classes[:, None] == var_classes[None, :]
    return int(np.count_nonzero(((iou >= MATCH_IOU) & same_class).any(axis=1)))


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# ---------------------------------------------------------------------------------------------
# helpers

def _sha256_of(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError as e:
        raise StoreError(f"cannot prove {path.name}: file is missing", path=str(path),
                         hint="re-run the reconcile; the file will be rebuilt") from e
    except OSError as e:
        raise StoreError(f"cannot read {path.name}: {e.strerror}", path=str(path)) from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line[:REASON_CHARS]
