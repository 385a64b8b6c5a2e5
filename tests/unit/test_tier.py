"""The unit tier stays light: importing every module pytest loads for it (the conftests, the
fixture modules they register, every tests/unit module) leaves onnx and onnxruntime unloaded."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests import conftest
from tests.unit.conftest import HEAVY, UNIT_DIR

ROOT = UNIT_DIR.parents[1]


def test_no_module_of_the_unit_tier_imports_onnx_or_onnxruntime():
    modules = ["tests.conftest", *conftest.pytest_plugins, "tests.unit.conftest",
               *sorted(f"tests.unit.{p.stem}" for p in UNIT_DIR.glob("test_*.py"))]
    assert "tests.unit.test_catalog" in modules and "tests.unit.test_planning" in modules
    probe = ("import importlib, sys\n"
             "for name in sys.argv[1:]:\n"
             "    importlib.import_module(name)\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"the unit tier imports {done.stdout.strip()}"


def test_the_tiers_are_folders_of_one_package_and_tests_import_only_support():
    tests_dir = ROOT / "tests"
    for tier in ("unit", "integration", "faults", "support"):
        assert (tests_dir / tier / "__init__.py").is_file(), tier
    assert not list(tests_dir.glob("test_*.py")), "a test outside the tiers"
    path_edits, cross_imports = [], []
    for path in tests_dir.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" \
                    and isinstance(node.value, ast.Name) and node.value.id == "sys":
                path_edits.append(str(path.relative_to(ROOT)))
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.rsplit(".", 1)[-1].startswith("test_") or name == "conftest":
                    cross_imports.append(f"{path.relative_to(ROOT)}: {name}")
    assert path_edits == [], f"sys.path used in {path_edits}"
    assert cross_imports == [], f"test modules imported as helpers: {cross_imports}"
