"""A robot's workspace for tests and benchmarks: a catalog file, a models folder and the loopback
hub (tests/support/hub.py) serving ``acme/detector`` and ``acme/mlp``, and a CLI runner.

Everything is real: the hub is ``modeld.testing.hub.LocalHub`` on 127.0.0.1, downloads go through
huggingface_hub, models are built with onnx.helper (``modeld.testing.onnx_models``) when the hub
is filled, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from modeld.testing.hub import LocalHub
from tests.support.hub import publish_demo


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


def workspace_on(hub: LocalHub, root: Path) -> Workspace:
    """``root`` (created) as a robot's workspace on ``hub``, after ``publish_demo(hub)``."""
    publish_demo(hub)
    ws = Workspace(root=root, hub=hub, endpoint=hub.endpoint)
    ws.root.mkdir()
    return ws


@contextlib.contextmanager
def demo_workspace(root: Path) -> Iterator[Workspace]:
    """A workspace under ``root/robot`` with its own hub under ``root/hub``, stopped on exit:
    the ``workspace`` fixture for module-scoped fixtures and the benchmarks."""
    with LocalHub(root / "hub") as hub:
        yield workspace_on(hub, root / "robot")


@pytest.fixture
def workspace(hub, tmp_path) -> Workspace:
    """The ``hub`` fixture serving ``acme/detector`` (tiny CNN + labels) and ``acme/mlp``
    (MatMul model), with a workspace under ``tmp_path/robot``."""
    return workspace_on(hub, tmp_path / "robot")


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


def calibrated_mlp_toml(folder_name: str = "cal") -> str:
    """``mlp`` quantized with static_int8 from a calibration folder next to the catalog (speed
    gate off: these tests are about what happens, not how fast the host is)."""
    return entry_toml("mlp", repo="acme/mlp", filename="mlp.onnx", labels=None,
                      quantize="static_int8").replace(
        'method = "static_int8"',
        f'method = "static_int8"\ncalibration = "{folder_name}"\nsamples = 4\nmin_speedup = 0')


def write_mlp_calibration(folder, count: int = 4) -> None:
    import numpy as np
    rng = np.random.default_rng(3)
    for i in range(count):
        np.save(folder / f"{i}.npy", rng.standard_normal((1, 64)).astype(np.float32))
