"""The README's first command: the demo runs end to end on this machine alone and ends by itself
(real hub server, real daemon, real nodes hot-swapping under inference)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_shows_the_mission_and_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "modeld.demo", "--keep", str(workdir),
                             "--timeout", "240"], capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "intent-node <- fp32" in out                       # added to the catalog: served
    assert "intent-node <- int8" in out                       # quantization enabled: proven, served
    after_damage = out.split("step 5", 1)[1]
    assert after_damage.index("<- fp32") < after_damage.index("<- int8")  # moved, then healed
    node_lines = [line for line in out.splitlines() if line.startswith("nodes ")]
    assert len(node_lines) >= 1
    for line in node_lines:                                   # no inference call lost to a swap
        assert ", 0 failed," in line, line
        assert int(line.split(": ", 1)[1].split()[0]) > 0
    assert "daemon   stopped (exit 0)" in out                 # it ends by itself, cleanly
    assert "hub      stopped" in out
    assert not (workdir / "modeld.sock").exists()
