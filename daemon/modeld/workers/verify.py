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
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import structlog

from ..atomic import sha256_file
from ..errors import RuntimeUnavailableError, StoreError, first_line
from ..protocol import CPU_PROVIDER as CPU
from ..variants import CALIBRATION, SYNTHETIC, Check, Gates, Proof, ProviderProof
from ..work import ProgressFn, ProofBasis, ProveRequest
from . import runtime_worker, tasks
from .inputs import CalibrationError, sample_inputs
from .runtime_worker import adapt_feed, run_session
from .runtimes import RuntimeProcess

log = structlog.get_logger(__name__)

#: protobuf cannot hold more than 2 GiB; anything larger is not a model we should parse
MAX_PROTOBUF_BYTES = 2**31 - 1
#: interleaved timing: wall-clock budget per provider, and the least/most rounds of each file
SPEED_BUDGET_S = 1.5
MIN_ROUNDS = 15
#: FP32 proven alone has no speed gate to pass (a derived variant times FP32 again, interleaved
#: with itself): its latency is for the record, and every pull waits for it
ALONE_BUDGET_S = 0.1
ALONE_MIN_ROUNDS = 5
REASON_CHARS = runtime_worker.REASON_CHARS
#: outputs whose FP32 and variant values all stay within this are "both zero" (cosine undefined)
NEGLIGIBLE_ABS = tasks.NEGLIGIBLE_ABS
SYNTHETIC_WARNING = ("proven on synthetic inputs only (no calibration folder): weak evidence "
                     "of the model's task")

Feed = dict[str, np.ndarray]


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
                       task=request.task, preset=request.preprocessing_preset,
                       synthetic=synthetic, progress=progress, runtimes=request.runtimes,
                       basis=request.basis)
    progress(1.0, f"proved {request.file_name}")
    return proof


def prove_file(path: str | Path, *, variant: str, reference: str | Path | None,
               providers: tuple[str, ...], gates: Gates, feeds: list[Feed] | None,
               simulated: Mapping[str, tuple[str, ...]], model_dir: str | Path, seed: int = 0,
               task: str | None = None, preset: str | None = None, synthetic: bool = False,
               progress: ProgressFn | None = None,
               runtimes: Mapping[str, str] | None = None, basis: ProofBasis | None = None) -> Proof:
    """Prove ``path`` on each provider (against ``reference``, the FP32 file, when derived)."""
    return prove_files([(path, variant)], reference=reference, providers=providers, gates=gates,
                       feeds=feeds, simulated=simulated, model_dir=model_dir, seed=seed,
                       task=task, preset=preset, synthetic=synthetic, progress=progress,
                       runtimes=runtimes, basis=basis)[0]


def prove_files(files: list[tuple[str | Path, str]], *, reference: str | Path | None,
                providers: tuple[str, ...], gates: Gates, feeds: list[Feed] | None,
                simulated: Mapping[str, tuple[str, ...]], model_dir: str | Path, seed: int = 0,
                task: str | None = None, preset: str | None = None, synthetic: bool = False,
                progress: ProgressFn | None = None, time_refused: bool = True,
                runtimes: Mapping[str, str] | None = None,
                basis: ProofBasis | None = None) -> list[Proof]:
    """Prove each ``(path, variant)`` of ``files`` against one ``reference``, one proof each.

    The reference runs once per provider, and FP32 and the files are timed in one interleaved
    loop (``auto`` proves its candidates together: FP32 is timed once, not once per candidate).
    With ``time_refused=False`` a file whose agreement already misses a gate is not timed: its
    proof has no latency, and its reason is the agreement's. ``task`` and ``preset`` (the
    catalog's) choose the task metric; ``synthetic`` says the given ``feeds`` were made up, not
    held out of a calibration folder: every proof says so. A provider that ``runtimes`` maps to a
    Python interpreter is proven in that runtime (``runtime_worker``), with CPU fallback off;
    the others in this process's onnxruntime. Proof keys are made from ``basis``, the daemon's
    (its onnxruntime, its runtimes' identities); without one (``bench``, tests), from this
    process's onnxruntime and the runtimes' paths."""
    model_dir = Path(model_dir)
    runtimes = {p: str(py) for p, py in (runtimes or {}).items() if p in providers}
    gates = gates or Gates()
    reference = Path(reference) if reference is not None else None
    providers = tuple(providers)
    simulated = {k: tuple(v) for k, v in (simulated or {}).items()}
    ref_sha = _sha256_of(reference) if reference is not None else None
    basis = basis or ProofBasis(ort.__version__, runtimes)
    bases, models, proofs = [], [], {}
    for i, (path, variant) in enumerate(files):
        path = Path(path)
        file_sha = _sha256_of(path)
        key = basis.key(file_sha256=file_sha, reference_sha256=ref_sha, providers=providers,
                        gates=gates, simulated=simulated)
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
        synthetic = True
    evidence: dict[str, Any] = {}
    if reference is not None and feeds:
        evidence = dict(samples=len(feeds), inputs=SYNTHETIC if synthetic else CALIBRATION)
        if synthetic:
            for i in pending:
                warnings[i].append(SYNTHETIC_WARNING)
    results: dict[int, list[ProviderProof]] = {i: [] for i in pending}
    for k, provider in enumerate(providers if pending else ()):
        if progress:
            names = ", ".join(models[i][0].name for i in pending)
            progress(k / max(len(providers), 1), f"proving {names} on {provider}")
        on_provider, kind = _prove_with_runtime(
            provider, runtimes.get(provider), model_dir, [models[i] for i in pending], reference,
            ref_model, feeds, gates, simulated, task, preset, [warnings[i] for i in pending],
            time_refused)
        if kind:
            evidence.setdefault("task", kind)
        for i, result in zip(pending, on_provider):
            results[i].append(result)
    for i in pending:
        proofs[i] = Proof(checker_ok=True, **bases[i], providers=tuple(results[i]),
                          warnings=tuple(warnings[i]), **evidence)
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

class InProcess:
    """Sessions in this worker's own onnxruntime; a simulated provider runs on the CPU."""

    def __init__(self, simulated: Mapping[str, tuple[str, ...]]) -> None:
        self.simulated = simulated
        #: what ran the proof, recorded in each ProviderProof
        self.record = dict(python=sys.executable, onnxruntime=ort.__version__,
                           runtime_package=f"onnxruntime=={ort.__version__}")

    def open(self, path: Path, model: onnx.ModelProto | None, provider: str):
        return open_session(path, model, provider, self.simulated if provider != CPU else {})

    def run(self, session, feeds: list[Feed]) -> list[list[Any]]:
        return [run_session(session, feed) for feed in feeds]

    def output_names(self, session) -> list[str]:
        return [o.name for o in session.get_outputs()]

    def time(self, sessions: list, feeds: list[Feed], **budget: Any) -> list[float]:
        return interleaved_latencies_ms(sessions, feeds, **budget)


class InRuntime:
    """Sessions in a node runtime's own onnxruntime (``runtime_worker`` under its Python)."""

    def __init__(self, process: RuntimeProcess) -> None:
        self.process = process
        info = process.info
        assert info is not None
        self.record = dict(python=info.python, onnxruntime=info.onnxruntime,
                           runtime_package=info.package)

    def open(self, path: Path, model: onnx.ModelProto | None, provider: str):
        reply = self.process.open(path, cores_available(), provider)
        return ((reply.session, reply.outputs), "") if reply.ok else (None, reply.reason)

    def run(self, session, feeds: list[Feed]) -> list[list[Any]]:
        return self.process.run(session[0], feeds)

    def output_names(self, session) -> list[str]:
        return list(session[1])

    def time(self, sessions: list, feeds: list[Feed], *, budget_s: float = SPEED_BUDGET_S,
             min_rounds: int = MIN_ROUNDS) -> list[float]:
        return self.process.time([s[0] for s in sessions], feeds, budget_s=budget_s,
                                 min_rounds=min_rounds)


def _prove_with_runtime(provider: str, python: str | None, model_dir: Path,
                        files: list[tuple[Path, onnx.ModelProto]], reference: Path | None,
                        ref_model: onnx.ModelProto | None, feeds: list[Feed], gates: Gates,
                        simulated: Mapping[str, tuple[str, ...]], task: str | None,
                        preset: str | None, warnings: list[list[str]], time_refused: bool = True
                        ) -> tuple[list[ProviderProof], str]:
    """``_prove_on`` in the right runtime: this process's, or the node runtime ``python`` (a
    runtime that is missing, broken or lacks the provider refuses every file there, with one
    line that says why, and one log event)."""
    if not python:
        return _prove_on(provider, InProcess(simulated), files, reference, ref_model, feeds,
                         gates, task, preset, warnings, time_refused)
    try:
        with RuntimeProcess(python, provider, model_dir) as process:
            return _prove_on(provider, InRuntime(process), files, reference, ref_model, feeds,
                             gates, task, preset, warnings, time_refused)
    except RuntimeUnavailableError as e:
        log.error("runtime_unavailable", model=model_dir.name, provider=provider, python=python,
                  files=[path.name for path, _ in files], reason=e.message)
        return [ProviderProof(provider, usable=False, passed=False, reason=e.message,
                              python=python) for _ in files], ""


def _prove_on(provider: str, backend: InProcess | InRuntime,
              files: list[tuple[Path, onnx.ModelProto]], reference: Path | None,
              ref_model: onnx.ModelProto | None, feeds: list[Feed], gates: Gates,
              task: str | None, preset: str | None, warnings: list[list[str]],
              time_refused: bool = True) -> tuple[list[ProviderProof], str]:
    """(one ``ProviderProof`` per file on ``provider``, the task gated ("" if none));
    ``warnings[i]`` collects file i's. ``backend`` opens, runs and times the sessions; the
    judging (agreement, task metric, gates) is the same for every runtime."""
    done: dict[int, ProviderProof] = {}
    ran: dict[int, tuple[Any, list]] = {}
    for i, (path, model) in enumerate(files):
        session, reason = backend.open(path, model, provider)
        if session is None:
            done[i] = ProviderProof(provider, usable=False, passed=False, reason=reason)
            continue
        try:
            ran[i] = (session, backend.run(session, feeds))
        except RuntimeUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - the runtime's own message is the reason
            done[i] = ProviderProof(provider, usable=False, passed=False, reason=_first_line(e))

    kind = ""

    def in_order() -> tuple[list[ProviderProof], str]:
        return [replace(done[i], **backend.record) for i in range(len(files))], kind

    if reference is None:  # FP32 itself: usable means passed
        for i, (session, _) in ran.items():
            try:
                latency_ms = backend.time([session], feeds, budget_s=ALONE_BUDGET_S,
                                          min_rounds=ALONE_MIN_ROUNDS)[0]
            except RuntimeUnavailableError:
                raise
            except Exception as e:  # noqa: BLE001 - ran once, failed later: not dependable
                done[i] = ProviderProof(provider, usable=False, passed=False, reason=_first_line(e))
                continue
            done[i] = ProviderProof(provider, usable=True, passed=True, latency_ms=latency_ms,
                                    fp32_latency_ms=latency_ms, speedup=1.0)
        return in_order()
    if not ran:
        return in_order()

    ref_session, ref_reason = backend.open(reference, ref_model, provider)
    baseline_on_provider = ref_session is not None
    if ref_session is None:  # FP32 cannot run here: compare against FP32 on CPU, no speed ratio
        ref_session, _ = backend.open(reference, ref_model, CPU)
    ref_problem = f"FP32 reference does not load: {ref_reason}" if ref_session is None else ""
    if ref_session is not None:
        try:
            ref_outputs = backend.run(ref_session, feeds)
        except RuntimeUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001
            ref_problem = f"FP32 reference does not run: {_first_line(e)}"
    if ref_problem:
        done.update((i, ProviderProof(provider, usable=True, passed=False, reason=ref_problem))
                    for i in ran)
        return in_order()
    names = backend.output_names(ref_session)
    head = tasks.head_for(task, preset, ref_outputs[0]) if ref_outputs else None
    kind = head.kind if head else ""
    agreements = {i: compare_outputs(ref_outputs, outputs, task, names, head=head, gates=gates,
                                     input_hw=_input_hw(feeds))
                  for i, (_, outputs) in ran.items()}
    for i, agreement in agreements.items():
        warnings[i].extend(n for n in agreement.notes if n not in warnings[i])
    timed = [i for i in ran if time_refused or not gate_failures(gates, agreements[i], None)]
    latencies, failed = _time_together(backend, [ran[i][0] for i in timed],
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
        part = agreement.part
        done[i] = ProviderProof(provider, usable=True, passed=not failures,
                                reason="; ".join(failures), latency_ms=latency_ms,
                                fp32_latency_ms=fp32_ms, speedup=speedup,
                                cosine=agreement.cosine, max_abs_error=agreement.max_abs_error,
                                part_cosine=part.worst_cosine if part else None,
                                worst_part=part.worst_part if part else "",
                                checks=checks_of(gates, agreement, speedup))
    return in_order()


def _input_hw(feeds: list[Feed]) -> tuple[int, int] | None:
    """(height, width) of the first image-like input [N, C, H, W] of the feeds, if any."""
    for value in (feeds[0].values() if feeds else ()):
        if getattr(value, "ndim", 0) == 4:
            return int(value.shape[2]), int(value.shape[3])
    return None


def _time_together(backend: InProcess | InRuntime, sessions: list, ref_session,
                   feeds: list[Feed]
                   ) -> tuple[dict[int, tuple[float, float | None]], dict[int, str]]:
    """({k: (latency_ms, fp32_ms or None)}, {k: reason}) for ``sessions[k]``, timed in one
    interleaved loop with ``ref_session`` (when given). If the loop fails, each session is timed
    on its own, so that the failure lands on the file that caused it."""
    if not sessions:
        return {}, {}
    head = [ref_session] if ref_session is not None else []
    try:
        medians = backend.time(head + sessions, feeds)
    except RuntimeUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - ran once, failed later: not dependable
        if len(sessions) == 1:
            return {}, {0: _first_line(e)}
        latencies, failed = {}, {}
        for k, session in enumerate(sessions):  # which one was it?
            one, why = _time_together(backend, [session], ref_session, feeds)
            latencies.update((k, v) for v in one.values())
            failed.update((k, v) for v in why.values())
        return latencies, failed
    fp32_ms = medians[0] if head else None
    return {k: (m, fp32_ms) for k, m in enumerate(medians[len(head):])}, {}


def open_session(path: Path, model: onnx.ModelProto | None, provider: str,
                 simulated: Mapping[str, tuple[str, ...]]):
    """(session, "") on ``provider`` alone, or (None, reason) if it cannot be used there.
    A provider in ``simulated`` (CoreML, CUDA: they cannot exist on this host) refuses the
    operators it lists and runs on the CPU otherwise."""
    if provider in simulated:
        missing = sorted(op_types(model.graph) & set(simulated[provider])) if model else []
        if missing:
            return None, f"{missing[0]} is not implemented for {provider} (simulated)"
        return runtime_worker.open_on(ort, str(path), CPU, cores_available())
    return runtime_worker.open_on(ort, str(path), provider, cores_available())


def cores_available() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def interleaved_latencies_ms(sessions: list, feeds: list[Feed], *,
                             budget_s: float = SPEED_BUDGET_S, min_rounds: int = MIN_ROUNDS
                             ) -> list[float]:
    """Median latency (ms) of each session, timed in alternate rounds: one definition for
    every runtime (``runtime_worker.interleaved_latencies_ms`` says how and why)."""
    return runtime_worker.interleaved_latencies_ms(sessions, feeds, budget_s=budget_s,
                                                   min_rounds=min_rounds)


@dataclass(frozen=True)
class Agreement:
    cosine: float                    # the worst whole output's
    max_abs_error: float | None
    problem: str = ""   # a structural mismatch (shape, non-finite values, silence): fails outright
    notes: tuple[str, ...] = ()   # caveats for Proof.warnings
    part: tasks.PartAgreement | None = None   # the worst part of any output
    task: Check | None = None                 # the task metric, when the model has a task


def compare_outputs(reference: list[list[Any]], variant: list[list[Any]],
                    task: str | None = None, names: list[str] | None = None, *,
                    preset: str | None = None, head: tasks.Head | None = None,
                    gates: Gates | None = None,
                    input_hw: tuple[int, int] | None = None) -> Agreement:
    """How far ``variant``'s outputs are from ``reference``'s (FP32's) over all samples: the worst
    whole-output cosine (float64), the worst part's cosine and the task metric (``head``, else
    the one ``tasks.head_for`` finds from ``task``/``preset`` and the outputs)."""
    gates = gates or Gates()
    worst_cos, max_abs, notes = 1.0, 0.0, []
    compared, negligible = 0, 0
    n_outputs = len(reference[0]) if reference else 0
    names = [names[o] if names and o < len(names) else str(o) for o in range(n_outputs)]
    for o, name in enumerate(names):
        pairs = [(r[o], v[o]) for r, v in zip(reference, variant)]
        if not all(isinstance(a, np.ndarray) and isinstance(b, np.ndarray) for a, b in pairs):
            continue  # sequences/maps (ZipMap) are not compared
        if any(a.shape != b.shape for a, b in pairs):
            return Agreement(0.0, None, f"output {name!r} shape {pairs[0][1].shape} "
                                        f"differs from FP32 {pairs[0][0].shape}")
        ref = np.concatenate([a.astype(np.float64).ravel() for a, _ in pairs])
        var = np.concatenate([b.astype(np.float64).ravel() for _, b in pairs])
        if not np.isfinite(var).all() and np.isfinite(ref).all():
            return Agreement(0.0, None, f"output {name!r} has NaN/Inf values where FP32 has none")
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
        return Agreement(0.0, max_abs,
                         "FP32's outputs are ~0 on every sample input, so agreement cannot be "
                         "measured: give calibration data the model responds to",
                         notes=tuple(notes))
    if head is None and reference:
        head = tasks.head_for(task, preset, reference[0])
    if head is None and tasks.hint_of(task, preset):
        notes.append(f"task {task or preset!r}: no output is shaped like its head, so the "
                     "variant is judged by the per-part agreement only")
    part = tasks.part_agreement(reference, variant, names, head)
    measured = None
    if head is not None:
        try:
            measured = tasks.measure(head, reference, variant, gates, input_hw)
        except Exception as e:  # noqa: BLE001 - outputs the decoder did not expect: not proven
            log.warning("task_metric_failed", task=head.kind, layout=head.layout,
                        error=_first_line(e))
            measured = Check(head.gate, None, getattr(gates, head.gate), False,
                             f"{head.describe()} outputs could not be decoded "
                             f"({_first_line(e)}), so the task was not proven")
    return Agreement(worst_cos, max_abs, notes=tuple(notes), part=part, task=measured)


cosine_similarity = tasks.cosine_similarity


def checks_of(gates: Gates, agreement: Agreement, speedup: float | None) -> tuple[Check, ...]:
    """Every gate a derived variant is held to, measured: the task's first, then the whole
    outputs', the worst part's, the absolute error's and the speed's."""
    out: list[Check] = []
    if agreement.task is not None:
        out.append(agreement.task)
    if not agreement.problem:
        out.append(Check("min_cosine", agreement.cosine, gates.min_cosine,
                         agreement.cosine >= gates.min_cosine, f"cosine {agreement.cosine:.4f}"))
    if agreement.part is not None:
        part = agreement.part
        out.append(Check("min_part_cosine", part.worst_cosine, gates.min_part_cosine,
                         part.worst_cosine >= gates.min_part_cosine,
                         f"worst part {part.worst_part!r} cosine {part.worst_cosine:.4f} "
                         f"(of {part.compared} parts)"))
    if gates.max_abs_error is not None and agreement.max_abs_error is not None:
        out.append(Check("max_abs_error", agreement.max_abs_error, gates.max_abs_error,
                         agreement.max_abs_error <= gates.max_abs_error,
                         f"max abs error {agreement.max_abs_error:.4g}"))
    if speedup is not None:
        head = "slower than FP32: " if speedup < 1.0 else "speedup "
        out.append(Check("min_speedup", speedup, gates.min_speedup,
                         speedup >= gates.min_speedup, f"{head}{speedup:.2f}x"))
    return tuple(out)


def gate_failures(gates: Gates, agreement: Agreement, speedup: float | None) -> list[str]:
    """Which gates a derived variant misses, each in one line with its numbers."""
    failures = [agreement.problem] if agreement.problem else []
    failures += [c.failure() for c in checks_of(gates, agreement, speedup) if not c.passed]
    return failures


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
    return first_line(error, REASON_CHARS)
