"""Node runtimes: which Python interpreter proves which execution provider, and what each is.

``MODELD_RUNTIMES="OpenVINOExecutionProvider=/opt/ov/bin/python;..."`` (or ``--runtime``) maps a
provider to the interpreter of the environment the nodes use for it. The reconciler asks each
runtime what it is (``probe``: ``runtime_worker.py --describe`` under that interpreter, in a
thread) at start-up and at every resync and SIGHUP; the answer's identity is part of every proof
key on that provider, so an upgraded runtime re-proves and a fixed one is tried again. No
onnxruntime here: the probe is a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from .errors import UsageError
from .workers import runtime_worker as rw
from .workers.runtime_worker import RuntimeInfo

PROBE_TIMEOUT_S = 60.0
UNAVAILABLE = "unavailable: "


def parse_runtimes(spec: str | None, *, source: str = "MODELD_RUNTIMES") -> dict[str, str]:
    """``"OpenVINOExecutionProvider=/opt/ov/bin/python;CUDAExecutionProvider=/opt/gpu/bin/python"``
    -> {provider: python}."""
    out: dict[str, str] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        provider, sep, python = part.partition("=")
        provider, python = provider.strip(), python.strip()
        if not sep or not provider or not python:
            raise UsageError(f"{source}: {part.strip()!r} is not PROVIDER=PYTHON",
                             hint="e.g. OpenVINOExecutionProvider=/opt/ov/bin/python")
        if not provider.endswith("ExecutionProvider"):
            raise UsageError(f"{source}: {provider!r} is not an execution provider name",
                             hint="e.g. OpenVINOExecutionProvider")
        # a path is made absolute (workers start it from other folders); a bare name such as
        # python3 is looked up on PATH when it is started
        out[provider] = os.path.abspath(python) if os.sep in python else python
    return out


@dataclass(frozen=True)
class Probed:
    """What one runtime said about itself, or why it could not say."""

    provider: str
    python: str
    info: RuntimeInfo | None
    reason: str = ""         # why the runtime cannot prove ``provider`` ("" when it can)

    @property
    def identity(self) -> str:
        """Part of the proof key: the runtime's build, or why it is unusable (so that fixing it
        changes the key and the proofs are made again)."""
        if self.info is not None and not self.reason:
            return self.info.identity()
        return f"{self.python} {UNAVAILABLE}{self.reason}"


def interpreter_problem(python: str) -> str:
    """Why ``python`` cannot be started at all ("" if it can be tried)."""
    if os.sep not in python:
        return "" if shutil.which(python) else "no such interpreter on PATH"
    if not os.access(python, os.X_OK) or os.path.isdir(python):
        return "no executable interpreter at this path"
    return ""


def judge_hello(hello: dict, provider: str) -> tuple[RuntimeInfo | None, str]:
    """(what the runtime is, why it cannot prove ``provider`` or "") from its ``Hello`` line:
    one wording for the probe and for the workers that start it."""
    if hello.get("protocol") != rw.PROTOCOL:
        return None, (f"speaks protocol {hello.get('protocol')!r}, not {rw.PROTOCOL} "
                      "(a runtime_worker.py of another version?)")
    if "error" in hello:
        return None, f"onnxruntime does not import: {hello['error']}"
    info = RuntimeInfo.from_dict(hello["info"])
    if provider not in info.providers:
        return info, (f"{info.package or 'onnxruntime ' + info.onnxruntime} has no {provider} "
                      f"(it has {', '.join(info.providers) or 'none'})")
    return info, ""


def probe(provider: str, python: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probed:
    """Ask ``python`` what onnxruntime it has; never raises."""
    if interpreter_problem(python):
        return Probed(provider, python, None, interpreter_problem(python))
    try:
        done = subprocess.run([python, rw.__file__, "--describe"], capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Probed(provider, python, None, f"no answer in {timeout_s:.0f} s")
    except OSError as e:
        return Probed(provider, python, None, f"cannot start: {e.strerror or e}")
    line = done.stdout.splitlines()[0] if done.stdout.strip() else ""
    try:
        hello = json.loads(line)
    except ValueError:
        tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return Probed(provider, python, None, f"exited with code {done.returncode}"
                      + (f": {tail}" if tail else ""))
    info, reason = judge_hello(hello, provider)
    return Probed(provider, python, info, reason)


def probe_all(runtimes: Mapping[str, str]) -> dict[str, Probed]:
    return {provider: probe(provider, python) for provider, python in runtimes.items()}
