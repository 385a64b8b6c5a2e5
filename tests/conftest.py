"""The suite's one conftest: registers the fixture modules of tests/support, and keeps what
cannot share a machine on one pytest-xdist worker.

Light on purpose: nothing here (nor in the modules it registers) imports onnx, onnxruntime or
the real-data packages at import time, so the unit tier (tests/unit) runs without the ML stack.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.hub",
    "tests.support.workspace",
    "tests.support.realdata",
    "tests.support.systemd_user",
]

#: fixtures shared by the tests of a module (a daemon started once per module): on one worker
SHARED_SCOPES = ("module", "class", "package")


def xdist_group_of(item: pytest.Item) -> str | None:
    """The xdist group of a test under ``--dist loadgroup``; None: any worker.

    The real ``systemd --user`` manager is one per session and creates /run/systemd/system if
    missing: every test that uses it runs on one worker. Tests sharing a module-scoped fixture
    stay together, so that the daemon the fixture starts is started once, not once per worker.
    """
    if item.get_closest_marker("systemd") or "user_manager" in item.fixturenames:
        return "systemd"
    defs = item._fixtureinfo.name2fixturedefs
    if any(d and d[-1].scope in SHARED_SCOPES for d in defs.values()):
        return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)     # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = xdist_group_of(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(config, "workerinput"):
        longest_first(items)


def longest_first(items: list[pytest.Item]) -> None:
    """On xdist workers, modules with slow tests or a shared daemon go first (a module's tests
    stay together and in order): the workers take work in this order, and a campaign of minutes
    picked up last would leave the other worker idle at the end."""
    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") or xdist_group_of(item) == "systemd":
            return 0
        return 1 if xdist_group_of(item) else 2
    module_weight: dict[str, int] = {}
    for item in items:
        module = item.module.__name__
        module_weight[module] = min(module_weight.get(module, 2), weight(item))
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(i.module.__name__ for i in items))}
    items.sort(key=lambda i: (module_weight[i.module.__name__], first_seen[i.module.__name__]))
