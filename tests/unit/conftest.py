"""The unit tier's guard: a run of tests/unit alone (``./dev test --unit``, and the first step of
``./dev test``) fails the test after which onnx or onnxruntime is found loaded.

The ML stack is what makes the other tiers slow to start and heavy to install; a pure test that
pulls it in (an import at the top of a module, or inside a test) belongs in tests/integration.
In a run mixed with the other tiers they have loaded it already, so the guard is off there;
``test_tier.py`` checks the imports of every unit module in a fresh interpreter instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HEAVY = ("onnx", "onnxruntime")
UNIT_DIR = Path(__file__).resolve().parent


def heavy_modules_loaded() -> list[str]:
    return [name for name in HEAVY if name in sys.modules]


@pytest.fixture(scope="session")
def unit_tier_alone(request) -> bool:
    """True when every collected test is in tests/unit."""
    return all(UNIT_DIR in Path(item.path).resolve().parents for item in request.session.items)


@pytest.fixture(autouse=True)
def _no_ml_stack(unit_tier_alone):
    yield
    if unit_tier_alone and (loaded := heavy_modules_loaded()):
        pytest.fail(f"the unit tier imported {', '.join(loaded)} (during this test or while "
                    "collecting): move the test to tests/integration or import lazily",
                    pytrace=False)
