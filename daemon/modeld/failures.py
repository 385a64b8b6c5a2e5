"""Failed jobs and when they may run again: backoff for temporary errors, a wait for an input to
change for permanent ones. Decided by the error's type, never by its text.

Owned by the reconciler (one ``Failures`` per daemon), in memory; a derive that failed
permanently is also written to the model's manifest by the reconciler, so a restart does not try
the same inputs again. No disk and no clock of its own (``now`` and the jitter are passed in):
tested in tests/test_failures.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import ModeldError, PermanentError, TemporaryError, WorkerTimeoutError
from .planning import Action, Derive, Prove


@dataclass(frozen=True)
class Failure:
    identity: tuple              # the failed action's identity (``Action.identity``)
    error: ModeldError
    attempts: int                # failures in a row of this very action
    retry_at: float | None       # monotonic; None = permanent (until an input changes)
    delay_s: float | None = None  # the backoff chosen at the failure


class Failures:
    """The last failure of each model's job, and the backoff: ``base_s * 2**(attempts-1)``,
    at least the error's ``retry_after_s``, at most ``cap_s``, times a jitter in [0.5, 1) so
    a fleet does not retry in lockstep. A proof or quantization that times out
    ``max_timeouts`` times in a row becomes permanent (local work on fixed inputs; a pull's
    timeout is the network's, and stays temporary)."""

    def __init__(self, *, base_s: float = 2.0, cap_s: float = 300.0, max_timeouts: int = 3,
                 jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0)) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.max_timeouts = max_timeouts
        self._jitter = jitter
        self._by_model: dict[str, Failure] = {}

    def record(self, action: Action, error: ModeldError, now: float) -> Failure:
        """Remember that ``action`` failed with ``error`` at ``now``; returns the failure, whose
        error may be the permanent one a run of timeouts became."""
        previous = self._by_model.get(action.name)
        attempts = (previous.attempts + 1 if previous and previous.identity == action.identity
                    else 1)
        if (isinstance(error, WorkerTimeoutError) and isinstance(action, (Derive, Prove))
                and attempts >= self.max_timeouts):
            # A proof or quantization that never ends would hold a worker slot forever.
            error = PermanentError(f"{error.message}, {attempts} times in a row: given up",
                                   entry=action.name, hint="fix the model or raise the timeout, "
                                   "then `systemctl reload` (or `mecha10-modeld sync`) retries")
        if isinstance(error, TemporaryError):
            delay: float | None = min(self.cap_s, max(error.retry_after_s,
                                                      self.base_s * 2 ** (attempts - 1)))
            delay *= self._jitter()
            retry_at: float | None = now + delay
        else:
            delay, retry_at = None, None
        failure = Failure(action.identity, error, attempts, retry_at, delay)
        self._by_model[action.name] = failure
        return failure

    def hold(self, action: Action, now: float, *, oneshot: bool = False) -> float | None:
        """None when ``action`` may run now; else how long it must wait (``math.inf``: until
        an input changes, or for the rest of a one-shot run)."""
        failure = self._by_model.get(action.name)
        if failure is None or failure.identity != action.identity:
            return None
        if failure.retry_at is None or oneshot:
            return math.inf
        delay = failure.retry_at - now
        return delay if delay > 0 else None

    def succeeded(self, name: str) -> None:
        self._by_model.pop(name, None)

    def forget(self, name: str) -> bool:
        """An operator's retry of ``name``; True when it had a failure."""
        return self._by_model.pop(name, None) is not None

    def forget_pulls(self) -> list[str]:
        """A refresh (resync, SIGHUP) asks the hub again: failed pulls run again."""
        names = [n for n, f in self._by_model.items() if f.identity[1] == "pull"]
        for name in names:
            del self._by_model[name]
        return names

    def get(self, name: str) -> Failure | None:
        return self._by_model.get(name)

    def items(self) -> Iterator[tuple[str, Failure]]:
        return iter(list(self._by_model.items()))
