"""The actual state of the store as pure data: ``Inventory`` -> ``ModelState`` -> ``FileState``.

``store.Store.scan`` produces these; ``planning``, ``views`` and the reconciler read them. Pure:
no disk, no clock, so the planner and the views depend on this module and never on the store.
An unchanged model is returned by the store as the very ``ModelState`` of the previous scan
(see ``modeld.unchanged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .manifest import FileRecord, Manifest

OK, MISSING, DAMAGED, UNREADABLE = "ok", "missing", "damaged", "unreadable"


@dataclass(frozen=True)
class FileState:
    """What a recorded file looks like now."""

    name: str
    status: str                     # ok | missing | damaged | unreadable
    record: FileRecord | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True)
class ModelState:
    """One model folder: its manifest and the state of every recorded file."""

    name: str
    manifest: Manifest
    files: Mapping[str, FileState] = field(default_factory=dict)
    #: a file kept its content under a new stat (touched, copied back): see Store.refresh_stats
    new_stats: bool = False
    #: why the folder or its manifest cannot be used as it is (one line; "" when fine): this
    #: model's error, healed by pulling again, never the daemon's
    problem: str = ""
    #: models/<name> is not a real folder (a file, a symlink, a loop): it is moved aside
    misplaced: bool = False

    def intact(self, file_name: str) -> bool:
        state = self.files.get(file_name)
        return state is not None and state.ok

    def record(self, file_name: str) -> FileRecord | None:
        return self.manifest.files.get(file_name)


@dataclass(frozen=True)
class Inventory:
    models: Mapping[str, ModelState] = field(default_factory=dict)

    def get(self, name: str) -> ModelState | None:
        return self.models.get(name)
