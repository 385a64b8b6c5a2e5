"""The daemon's settings: one frozen dataclass, built once by the CLI from argv and environment.

Units are in the names. Nothing reads the environment after start-up except huggingface_hub
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), which the fetch worker passes on explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .variants import DEFAULT_PROVIDERS

DEFAULT_CATALOG = Path("model_catalog.toml")
DEFAULT_MODELS = Path("models")
DEFAULT_SOCKET = Path("/run/mecha10-modeld/modeld.sock")


@dataclass(frozen=True)
class Settings:
    catalog_path: Path = DEFAULT_CATALOG
    models_dir: Path = DEFAULT_MODELS
    socket_path: Path = DEFAULT_SOCKET
    #: execution providers the nodes use (a catalog entry may name its own)
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    #: test-only stand-ins for providers that cannot exist on this host (CoreML, CUDA; OpenVINO is
    #: real here, through ``runtimes``): provider ->
    #: operator types it cannot run. Set by MODELD_SIMULATE_PROVIDERS="CoreMLExecutionProvider=ConvInteger,MatMulInteger"
    simulated_providers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: provider -> Python interpreter of the node runtime that proves it (``MODELD_RUNTIMES=
    #: "OpenVINOExecutionProvider=/opt/ov/bin/python"``, ``--runtime``); unmapped providers are
    #: proven in the daemon's own onnxruntime
    runtimes: Mapping[str, str] = field(default_factory=dict)
    socket_mode: int = 0o660
    socket_group: str | None = None
    max_clients: int = 1024
    max_workers: int = 2
    debounce_step_ms: int = 50
    debounce_max_ms: int = 500
    resync_interval_s: float = 300.0
    #: re-hash every recorded file this often (bit rot keeps size and mtime: scans trust the
    #: stat); checked at a resync, so it adds no wake-up of its own; 0 turns it off
    scrub_interval_s: float = 86400.0
    pull_timeout_s: float = 1800.0
    pull_attempts: int = 5
    quantize_timeout_s: float = 900.0
    verify_timeout_s: float = 600.0
    worker_memory_mb: int = 8192
    #: retry delay of a temporary failure: base * 2**(attempt-1), at least the error's own
    #: retry_after_s, at most the cap (the cap wins: tests set it short)
    retry_backoff_base_s: float = 2.0
    retry_backoff_cap_s: float = 300.0
    hub_endpoint: str | None = None
    hub_offline: bool = False

    @property
    def lock_path(self) -> Path:
        return self.models_dir / ".modeld.lock"


def parse_simulated(spec: str | None) -> dict[str, tuple[str, ...]]:
    """``"CoreMLExecutionProvider=ConvInteger,MatMulInteger;Foo=Bar"`` -> mapping."""
    out: dict[str, tuple[str, ...]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        name, _, ops = part.partition("=")
        out[name.strip()] = tuple(o.strip() for o in ops.split(",") if o.strip())
    return out


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
