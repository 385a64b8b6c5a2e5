"""The suite's one conftest: registers the fixture modules of tests/support, and keeps what
cannot share a machine, or shares a daemon, on one pytest-xdist worker.

Light on purpose: nothing here (nor in the modules it registers) imports onnx, onnxruntime or
the real-data packages at import time, so the unit tier (tests/unit) runs without the ML stack.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.hub",
    "tests.support.workspace",
    "tests.support.realdata",
    "tests.support.systemd_user",
]

#: fixtures shared by the tests of a module (a daemon started once per module): on one worker
SHARED_SCOPES = ("module", "class", "package")
SHARED_SCOPE_TEXT = tuple(f'scope="{scope}"' for scope in SHARED_SCOPES)
#: what a module that uses the real ``systemd --user`` manager says
SYSTEMD_TEXT = ("user_manager", "mark.systemd")


def work_unit_of(rootpath: Path, nodeid: str) -> str:
    """What one xdist worker runs as a whole, from a test's id (the controller collects nothing,
    so it reads the module's text): every module that uses the ``systemd --user`` manager (one
    per session; it creates and removes /run/systemd/system and its inaccessible nodes) goes to
    one worker; a module with a module-scoped fixture (a daemon started once per module) stays
    on one worker; any other test may go anywhere."""
    module = nodeid.split("::", 1)[0]
    text = _module_text(rootpath / module)
    if any(word in text for word in SYSTEMD_TEXT):
        return "systemd"
    if any(word in text for word in SHARED_SCOPE_TEXT):
        return module
    return nodeid


@functools.lru_cache(maxsize=None)
def _module_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with the work units of ``work_unit_of``. (xdist's own groups come
    from ``xdist_group`` marks through a nodeid suffix, which pytest 9.2 no longer takes.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(config.rootpath, nodeid)
    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):
        longest_first(items)


def longest_first(items: list[pytest.Item]) -> None:
    """On xdist workers, modules with slow tests or a shared daemon go first (a module's tests
    stay together and in order): the workers take work in this order, and a campaign of minutes
    picked up last would leave the other worker idle at the end."""
    rootpath = items[0].config.rootpath if items else Path()

    def weight(item: pytest.Item) -> int:
        unit = work_unit_of(rootpath, item.nodeid)
        if item.get_closest_marker("slow") or unit == "systemd":
            return 0
        return 1 if unit != item.nodeid else 2
    module_weight: dict[str, int] = {}
    for item in items:
        module = item.module.__name__
        module_weight[module] = min(module_weight.get(module, 2), weight(item))
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(i.module.__name__ for i in items))}
    items.sort(key=lambda i: (module_weight[i.module.__name__], first_seen[i.module.__name__]))
