"""The loopback Hub of the tests: the one ``hub`` fixture, what is published on it, and requests
for the fetch worker.

Everything is real: a ``LocalHub`` on 127.0.0.1 with a free port, huggingface_hub as the client.
``publish`` commits the detector (``acme/detector``: the seed-0 tiny CNN and its labels);
``publish_demo`` adds the MatMul model ``acme/mlp``: what a ``workspace`` (tests/support/workspace.py)
serves. The models are built on call, so importing this module needs no onnx.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from modeld.manifest import FileRecord
from modeld.testing.hub import LocalHub
from modeld.workers.fetch import FetchRequest, FetchResult

REPO = "acme/detector"
MODEL_PATH = "det/model.onnx"
LABELS_PATH = "det/labels.txt"
#: one label per output channel of the tiny CNN ([1, 4, S/2, S/2])
LABELS = b"person\nbicycle\ncar\ndog\n"
MLP_REPO = "acme/mlp"
MLP_PATH = "mlp.onnx"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    """A running hub with an empty store under ``tmp_path/hub``; stopped after the test."""
    with LocalHub(tmp_path / "hub") as running:
        yield running


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """``models/det`` (not created: the fetch worker creates it)."""
    return tmp_path / "models" / "det"


def publish(hub: LocalHub, repo: str = REPO, *, model: bytes | None = None,
            labels: bytes | None = LABELS, filename: str = MODEL_PATH,
            labels_path: str = LABELS_PATH, branch: str = "main", message: str = "") -> str:
    """Commit a model (default: the seed-0 tiny CNN) and its labels; returns the commit sha."""
    if model is None:
        from modeld.testing.onnx_models import tiny_cnn
        model = tiny_cnn()
    files: dict[str, bytes | None] = {filename: model}
    if labels is not None:
        files[labels_path] = labels
    return hub.store.commit(repo, files, branch=branch, message=message)


def publish_demo(hub: LocalHub) -> LocalHub:
    """The repos a workspace serves: ``acme/detector`` (tiny CNN + labels) and ``acme/mlp``
    (a MatMul model, for the quantization paths)."""
    from modeld.testing.onnx_models import matmul_mlp
    hub.store.create_repo(REPO)
    publish(hub)
    hub.store.create_repo(MLP_REPO)
    hub.store.commit(MLP_REPO, {MLP_PATH: matmul_mlp()})
    return hub


def fetch_request(endpoint: str, model_dir: Path, *, known: Mapping[str, FileRecord] | None = None,
                  **overrides: Any) -> FetchRequest:
    """A request for ``REPO`` with fast test defaults (3 attempts, 2 s timeout, 10 ms backoff)."""
    fields: dict[str, Any] = dict(
        name=model_dir.name, model_dir=str(model_dir), repo=REPO, filename=MODEL_PATH,
        revision=None, labels=LABELS_PATH, task="object-detection", description="test detector",
        preprocessing_preset="yolo", input_size=32, known=dict(known or {}), endpoint=endpoint,
        token=None, offline=False, attempts=3, timeout_s=2.0, backoff_base_s=0.01)
    fields.update(overrides)
    return FetchRequest(**fields)


def records_of(result: FetchResult) -> dict[str, FileRecord]:
    """The result's records by file name: the ``known`` of the next request."""
    return {r.name: r for r in result.files}


def dead_endpoint() -> str:
    """A loopback endpoint where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class ProgressLog:
    """A ``progress`` callable that remembers every call."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, str]] = []

    def __call__(self, fraction: float | None, detail: str = "") -> None:
        self.calls.append((fraction, detail))
