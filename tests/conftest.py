"""The suite's one conftest: registers the fixture modules of tests/support, keeps what
cannot share a machine, or shares a daemon, on one pytest-xdist worker, and hands the workers
the longest work first (by the durations recorded in tests/durations.txt).

Light on purpose: nothing here (nor in the modules it registers) imports onnx, onnxruntime or
the real-data packages at import time, so the unit tier (tests/unit) runs without the ML stack.
"""

from __future__ import annotations

import functools
import re
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
#: seconds per test (setup + call + teardown) as pytest's ``--durations`` printed them on a
#: whole run: only the order of work depends on them, never a result
DURATIONS_FILE = Path(__file__).with_name("durations.txt")
#: a test the file does not list (most take well under a second)
UNLISTED_S = 1.0
_DURATION_LINE = re.compile(r"^\s*([0-9.]+)s\s+(?:setup|call|teardown)\s+(\S.*?)\s*$")


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


@functools.lru_cache(maxsize=None)
def recorded_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """nodeid -> seconds, summed over the setup, call and teardown lines of ``path`` (lines
    pasted from a ``--durations`` table; anything else in the file is ignored)."""
    out: dict[str, float] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        match = _DURATION_LINE.match(line)
        if match:
            out[match[2]] = out.get(match[2], 0.0) + float(match[1])
    return out


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with the work units of ``work_unit_of``, handed out in the order the
    workers collected them (``longest_first``), not xdist's default of most tests first. (xdist's
    own groups come from ``xdist_group`` marks through a nodeid suffix, which pytest 9.2 no
    longer takes.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False   # a unit of 18 quick tests is not long work

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(config.rootpath, nodeid)
    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):
        longest_first(items)


def longest_first(items: list[pytest.Item]) -> None:
    """On xdist workers, the longest work units first (a unit's tests stay together and in
    order): the workers take work in this order, and a test of a minute picked up last would
    leave the other worker idle at the end. A unit's length is the sum of its tests' recorded
    durations (``UNLISTED_S`` for a test the file does not list); ties keep collection order."""
    rootpath = items[0].config.rootpath if items else Path()
    durations = recorded_durations()
    unit_of = {item.nodeid: work_unit_of(rootpath, item.nodeid) for item in items}
    length: dict[str, float] = {}
    for item in items:
        unit = unit_of[item.nodeid]
        length[unit] = length.get(unit, 0.0) + durations.get(item.nodeid, UNLISTED_S)
    first_seen = {unit: i for i, unit in enumerate(dict.fromkeys(unit_of.values()))}
    items.sort(key=lambda i: (-length[unit_of[i.nodeid]], first_seen[unit_of[i.nodeid]]))
