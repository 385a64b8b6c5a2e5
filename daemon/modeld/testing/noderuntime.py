"""A real second node runtime for tests, benchmarks and the demo: ``onnxruntime-openvino`` in a
venv of its own (it replaces the ``onnxruntime`` module, so it cannot share the daemon's venv),
giving a working ``OpenVINOExecutionProvider`` on this kind of CPU.

``./dev`` calls ``python -m modeld.testing.noderuntime --ensure`` (CI too, through ``./dev
test``); the tests' fixture calls ``ensure()`` when the venv is missing. Created once, kept between
runs (a stamp names what was installed). Measured here: ~90 s from the registry, 443 MB on disk.
Standard library only; never imported by the daemon.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

OPENVINO = "OpenVINOExecutionProvider"
#: what a node on an Intel robot installs (the same pins everywhere: one definition)
REQUIREMENTS: tuple[str, ...] = ("numpy", "onnxruntime-openvino==1.24.1")
ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = ROOT / ".venv-openvino"
INSTALL_TIMEOUT_S = 900


class RuntimeInstallError(RuntimeError):
    """The node runtime could not be created (no registry access, no venv module...)."""


def python_of(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _stamp(venv: Path) -> Path:
    digest = hashlib.sha256(" ".join(REQUIREMENTS).encode()).hexdigest()[:16]
    return Path(venv) / f".installed-{digest}"


def installed(venv: Path = DEFAULT_VENV) -> bool:
    return _stamp(venv).is_file() and os.access(python_of(venv), os.X_OK)


def ensure(venv: Path = DEFAULT_VENV, *, base_python: str | None = None) -> Path:
    """The venv's interpreter, after creating the venv and installing ``REQUIREMENTS`` if that
    was not done yet; checks the provider really registers. Raises ``RuntimeInstallError``."""
    venv = Path(venv).absolute()    # the daemon starts it from other working directories
    if installed(venv):
        return python_of(venv)
    base = base_python or getattr(sys, "_base_executable", None) or sys.executable

    def run(*cmd: str) -> None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeInstallError(f"{' '.join(cmd[:4])} ...: {e}") from e
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeInstallError(f"{' '.join(cmd[:4])} ... failed: {tail}")

    if not os.access(python_of(venv), os.X_OK):
        run(base, "-m", "venv", str(venv))
    run(str(python_of(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
        *REQUIREMENTS)
    run(str(python_of(venv)), "-c", "import onnxruntime, sys; "
        f"sys.exit({OPENVINO!r} not in onnxruntime.get_available_providers())")
    _stamp(venv).touch()
    return python_of(venv)


if __name__ == "__main__":   # ./dev: python -m modeld.testing.noderuntime --ensure [VENV]
    if sys.argv[1:2] != ["--ensure"]:
        sys.exit("usage: python -m modeld.testing.noderuntime --ensure [VENV]")
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_VENV
    try:
        print(ensure(target))
    except RuntimeInstallError as e:
        sys.exit(f"noderuntime: {e}")
