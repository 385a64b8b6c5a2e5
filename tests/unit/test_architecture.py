"""The dependency direction of STYLE.md, checked: import-linter contracts (pyproject.toml), and the
daemon process really does not load onnxruntime, onnx or huggingface_hub."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_every_module_of_the_daemon_has_a_layer():
    """A new module must be placed in the layers contract (pyproject.toml), or the linter would
    not hold its imports to the direction; the test helpers and the demo are not the daemon."""
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in config["contracts"] if c["type"] == "layers")
    placed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    package = ROOT / "daemon" / "modeld"
    modules = {f"modeld.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"modeld.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert modules - placed - {"modeld.testing", "modeld.demo"} == set()


def test_daemon_process_stays_free_of_heavy_imports():
    code = ("import sys, modeld.cli, modeld.runner, modeld.client; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    assert out == "[]"


def test_runtime_worker_needs_only_stdlib_numpy_and_onnxruntime():
    """runtime_worker.py runs under a node runtime's Python, where modeld is not installed: it
    imports no module of modeld, and numpy/onnxruntime only inside functions (the daemon side
    imports it for the message types without loading them)."""
    import ast
    path = ROOT / "daemon" / "modeld" / "workers" / "runtime_worker.py"
    tree = ast.parse(path.read_text())
    allowed_anywhere = set(sys.stdlib_module_names) | {"numpy", "onnxruntime"}
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            assert root in allowed_anywhere, f"{name} imported at line {node.lineno}"
            if id(node) in top_level:
                assert root in sys.stdlib_module_names, f"{name} imported at module level"
    from modeld.protocol import CPU_PROVIDER
    from modeld.workers import runtime_worker
    assert runtime_worker.CPU == CPU_PROVIDER   # its own copy: it cannot import modeld
    code = ("import sys, modeld.workers.runtime_worker, modeld.runtimes; "
            "print(sorted(m for m in ('numpy', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    assert out == "[]"
