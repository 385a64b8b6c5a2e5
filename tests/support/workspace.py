"""Shared fixtures: a catalog writer, a loopback hub with a demo repo, and a CLI runner.

Everything is real: the hub is ``modeld.testing.hub.LocalHub`` on 127.0.0.1, downloads go through
huggingface_hub, models are built with onnx.helper (``modeld.testing.onnx_models``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from modeld.testing.hub import LocalHub
from modeld.testing.onnx_models import matmul_mlp, tiny_cnn

LABELS = b"person\nbicycle\ncar\ndog\n"


@dataclass
class Workspace:
    """A catalog file, a models folder and a hub, as a robot would have them."""

    root: Path
    hub: LocalHub
    endpoint: str = ""      # kept when the hub is stopped (an outage keeps the same address)

    @property
    def catalog(self) -> Path:
        return self.root / "model_catalog.toml"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HF_ENDPOINT": self.endpoint or self.hub.endpoint, "MODELD_CATALOG": str(self.catalog),
                    "MODELD_MODELS": str(self.models), "HF_HUB_DISABLE_TELEMETRY": "1",
                    "MODELD_SOCKET": str(self.root / "modeld.sock")})
        env.pop("HF_TOKEN", None)
        env.update(extra)
        return env

    def write_catalog(self, text: str) -> None:
        self.catalog.write_text(text)

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        """Run ``mecha10-modeld ARGS`` as a real process."""
        return subprocess.run([sys.executable, "-m", "modeld.cli", *args], env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode in (0, 1), result.stderr
        return json.loads(result.stdout)

    def manifest(self, name: str) -> dict:
        return json.loads((self.models / name / "manifest.json").read_text())


def entry_toml(name: str, *, repo: str = "acme/detector", filename: str = "det/model.onnx",
               labels: str | None = "det/labels.txt", revision: str | None = None,
               quantize: str | None = None, extra: str = "") -> str:
    lines = ["[[models]]", f'name = "{name}"', 'task = "object-detection"', f'repo = "{repo}"',
             f'filename = "{filename}"', 'preprocessing_preset = "yolo"', "input_size = 32"]
    if labels:
        lines.append(f'labels = "{labels}"')
    if revision:
        lines.append(f'revision = "{revision}"')
    if extra:
        lines.append(extra)
    if quantize:
        lines += ["", "[models.quantize]", "enabled = true", f'method = "{quantize}"']
    return "\n".join(lines) + "\n\n"


@pytest.fixture
def workspace(tmp_path):
    """A hub serving ``acme/detector`` (tiny CNN + labels) and ``acme/mlp`` (MatMul model)."""
    hub = LocalHub(tmp_path / "hub").start()
    hub.store.create_repo("acme/detector")
    hub.store.commit("acme/detector", {"det/model.onnx": tiny_cnn(), "det/labels.txt": LABELS})
    hub.store.create_repo("acme/mlp")
    hub.store.commit("acme/mlp", {"mlp.onnx": matmul_mlp()})
    ws = Workspace(root=tmp_path / "robot", hub=hub, endpoint=hub.endpoint)
    ws.root.mkdir()
    try:
        yield ws
    finally:
        hub.stop()


def calibrated_mlp_toml(folder_name: str = "cal") -> str:
    """``mlp`` quantized with static_int8 from a calibration folder next to the catalog (speed
    gate off: these tests are about what happens, not how fast the host is)."""
    return entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                      quantize="static_int8").replace(
        'method = "static_int8"',
        f'method = "static_int8"\ncalibration = "{folder_name}"\nsamples = 4\nmin_speedup = 0')


def write_mlp_calibration(folder, count: int = 4) -> None:
    rng = np.random.default_rng(3)
    for i in range(count):
        np.save(folder / f"{i}.npy", rng.standard_normal((1, 64)).astype(np.float32))


# ---- real trained models and real photographs (modeld.testing.realdata) ----------------------

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


# ---- a real second node runtime (modeld.testing.noderuntime) ---------------------------------

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
