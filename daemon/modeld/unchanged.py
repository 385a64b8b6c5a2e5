"""The identity contract of a reconcile pass: what did not change is the very same object.

One pass over 1,000 models that finds nothing new must cost identity checks, not planning. So:

- **Producers** return the previous object when nothing changed, and a new one whenever
  anything did: ``catalog.keep_last_good`` keeps an entry an edit did not touch,
  ``store.Store.scan_model`` returns the previous ``ModelState`` when the manifest object and
  every file's stat are unchanged, ``views.ViewBuilder`` returns the previous ``ModelView``
  when its inputs are the same objects. Every such value is a frozen dataclass: never mutated.
- **Consumers** skip on identity only: ``planning.Planner`` and ``views.ViewBuilder`` (through
  ``PassMemo``) give a model its previous answer when its inputs are the very objects of the
  last pass; ``server.Server.publish`` treats a view as untouched when ``not differs(old, new)``.

An equal but new object is never wrong, only slower: consumers recompute it (or, the server,
compare it with ``==``). A producer that returned the old object for a changed input would be
wrong: that is the one rule, tested in tests/test_unchanged.py. Pure; imports nothing.
"""

from __future__ import annotations

from typing import Generic, TypeVar

A = TypeVar("A")

#: what ``PassMemo.recall`` returns when the inputs are not those of the last pass
MISSING = object()


def same(old: object, new: object) -> bool:
    """True when ``new`` is the very object ``old`` was: by the contract, nothing changed."""
    return old is new


def differs(old: object, new: object) -> bool:
    """True when ``new`` is another object that is not equal to ``old`` (identity first: an
    unchanged value is the same object, and costs no comparison)."""
    return old is not new and old != new


class PassMemo(Generic[A]):
    """Each name's answer on the last pass, with the inputs it came from.

    ``recall(name, inputs, key)`` gives the previous answer when every object of ``inputs`` is
    the very object of last time and ``key`` (small values: flags, an activity) is equal; else
    ``MISSING``. ``remember`` records this pass's answer; ``end_pass`` forgets the names this
    pass did not see (a model gone from the catalog) and ``clear`` everything (an input common
    to every model changed, such as the onnxruntime version)."""

    __slots__ = ("_last", "_this")

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple, object, A]] = {}
        self._this: dict[str, tuple[tuple, object, A]] = {}

    def recall(self, name: str, inputs: tuple, key: object = ()) -> A | object:
        known = self._last.get(name)
        if known is None or known[1] != key or len(known[0]) != len(inputs):
            return MISSING
        for old, new in zip(known[0], inputs):
            if old is not new:
                return MISSING
        return known[2]

    def remember(self, name: str, inputs: tuple, key: object, answer: A) -> A:
        self._this[name] = (inputs, key, answer)
        return answer

    def end_pass(self) -> None:
        self._last, self._this = self._this, {}

    def clear(self) -> None:
        self._last.clear()
        self._this.clear()
