"""The dependency direction of STYLE.md, checked: import-linter contracts (pyproject.toml), and the
daemon process really does not load onnxruntime, onnx or huggingface_hub."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_daemon_process_stays_free_of_heavy_imports():
    code = ("import sys, modeld.cli, modeld.runner, modeld.client; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip()
    assert out == "[]"
