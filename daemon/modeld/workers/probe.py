"""What this host's onnxruntime offers, for ``mecha10-modeld doctor``: the execution providers.

Runs in a worker process (``jobs.JobRunner``): the CLI never imports onnxruntime itself.
"""

from __future__ import annotations

from typing import Any, Callable


def available_providers(request: Any, progress: Callable[..., None]) -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())
