"""Fixtures for real trained models and real photographs (``modeld.testing.realdata``) and for a
real second node runtime (``modeld.testing.noderuntime``), used by tests/integration and
tests/faults. Both modules are imported inside the fixtures: the unit tier never loads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_model():
    """``real_model(name)`` -> ``realdata.RealModel`` (its ``.path`` is the .onnx file in the
    installed wheel); skips, naming the pip command, when a wheel it needs is absent."""
    from modeld.testing import realdata

    def get(name: str):
        reason = realdata.missing(*realdata.needed(name))
        if reason and os.environ.get("CI"):
            pytest.fail(f"CI installs every wheel of realdata.PACKAGES (./dev): {reason}")
        if reason:
            pytest.skip(reason)
        return realdata.model(name)
    return get


@pytest.fixture(scope="session")
def real_frames(tmp_path_factory, real_model):
    """``real_frames(model, split)`` -> a folder of PNG frames of real photographs for that
    model ("calibration" or "holdout": disjoint photographs), written once per session."""
    from modeld.testing import realdata
    folders: dict[tuple[str, str], Path] = {}

    def get(name: str, split: str = "holdout") -> Path:
        real_model(name)
        if (name, split) not in folders:
            folder = tmp_path_factory.mktemp(f"frames-{name}-{split}")
            realdata.write_frames(folder, name, split)
            folders[(name, split)] = folder
        return folders[(name, split)]
    return get


@pytest.fixture(scope="session")
def openvino_python() -> str:
    """The interpreter of a real ``onnxruntime-openvino`` venv (``./dev`` creates it; created
    here on first use otherwise, then kept). CI fails instead of skipping without it."""
    from modeld.testing import noderuntime
    given = os.environ.get("MODELD_OPENVINO_PYTHON")
    if given:
        return given
    try:
        return str(noderuntime.ensure())
    except noderuntime.RuntimeInstallError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the OpenVINO node runtime (./dev): {e}")
        pytest.skip(f"no OpenVINO node runtime: {e}")
