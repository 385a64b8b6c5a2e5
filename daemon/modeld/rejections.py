"""Nodes' rejections of files: the one record of who nacked what, kept in memory.

The runner makes one ``Rejections`` and hands it to the server and the reconciler (which never
import each other). The server adds a node's nack and asks which files each node rejected when
it chooses a variant for that node; the reconciler fills it from the manifests at start-up
(where it also keeps every named node's rejection, so a restart remembers them) and forgets
them on an operator's retry. Whoever forgets a rejection, the watchers (the server) are told
which models to offer again. Pure: no disk, no clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A node nacked this file on this provider. Evidence, not a verdict (issue 11): only that
    node is not offered the file again; the daemon proves the file again itself, and only its
    own proof takes a file from every node. ``revision`` names the published copy (its inode):
    a re-published copy (a heal) is offered again."""

    model: str
    variant: str
    sha256: str
    provider: str
    node: str
    error: str
    generation: int
    at_unix_s: float
    revision: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.node, self.sha256, self.provider)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Rejection":
        """From a manifest's record (written by the reconciler; read back after a restart)."""
        return cls(model=str(record.get("model", "")), variant=str(record.get("variant", "")),
                   sha256=str(record.get("sha256", "")), provider=str(record.get("provider", "")),
                   node=str(record.get("node", "")), error=str(record.get("error", "")),
                   generation=0, at_unix_s=float(record.get("at_unix_s") or 0.0),
                   revision=str(record.get("revision", "")))


class Rejections:
    """(node, sha256, provider) -> the node's rejection, indexed by node for the serving choice."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str], Rejection] = {}
        self._by_node: dict[str, frozenset[tuple[str, str]]] = {}
        self._watchers: list[Callable[[set[str]], None]] = []

    def watch(self, offer_again: Callable[[set[str]], None]) -> None:
        """``offer_again(models)`` is called after rejections of those models were forgotten."""
        self._watchers.append(offer_again)

    def add(self, rejections: Iterable[Rejection]) -> list[Rejection]:
        """Record rejections (a node's nack, or those persisted before a restart); returns the
        new ones (a node's second nack of the same file changes nothing)."""
        new, nodes = [], set()
        for rejection in rejections:
            if rejection.key not in self._by_key:
                self._by_key[rejection.key] = rejection
                new.append(rejection)
                nodes.add(rejection.node)
        self._index(nodes)
        return new

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Rejection]:
        return iter(list(self._by_key.values()))

    def of_node(self, node: str) -> frozenset[tuple[str, str]]:
        """(sha256, provider) pairs ``node`` rejected."""
        return self._by_node.get(node, frozenset())

    def providers_of(self, sha256: str) -> list[str]:
        """The providers some node rejected this file on."""
        return sorted({p for (_, s, p) in self._by_key if s == sha256})

    def forget(self, which: Callable[[Rejection], bool] | None = None, *,
               tell: bool = True) -> list[Rejection]:
        """Forget the rejections ``which`` selects (all of them by default); the watchers are
        told the models (unless ``tell`` is False: the caller offers them again itself)."""
        gone = [r for r in self._by_key.values() if which is None or which(r)]
        for rejection in gone:
            del self._by_key[rejection.key]
        self._index({r.node for r in gone})
        models = {r.model for r in gone}
        if models and tell:
            for offer_again in self._watchers:
                offer_again(models)
        return gone

    def _index(self, nodes: set[str]) -> None:
        for node in nodes:
            keys = frozenset((s, p) for (n, s, p) in self._by_key if n == node)
            if keys:
                self._by_node[node] = keys
            else:
                self._by_node.pop(node, None)
