"""The README's first command: the demo runs end to end on this machine alone and ends by itself
(real hub server, real daemon, real nodes hot-swapping under inference).

The whole demo is run without its field-samples act (``--no-field-samples``): that act waits
for ``auto`` to build and prove a YOLOv8n from a node's frames, minutes of CPU. Its pieces are
checked here cheaply instead: the catalog entry asks only for ``auto`` and ``field_samples``
(no calibration folder), and the count chosen cuts exactly one generation from the camera's
frames; the act's check of the served file on the photographs the node never sent runs the
proofs' detection code on real frames. The daemon side of field samples (a real node moved from
FP32 to a proven INT8) is tests/integration/test_field_samples.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from modeld import demo
from modeld.catalog import parse_catalog
from modeld.samples import needed_for, should_cut, uses_field_samples


@pytest.mark.slow
def test_demo_shows_the_mission_and_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "modeld.demo", "--keep", str(workdir),
                             "--timeout", "240", "--no-field-samples"],
                            capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "step 2   field samples: skipped (--no-field-samples)" in out
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


def test_the_field_samples_entry_says_only_auto_and_cuts_one_generation(tmp_path):
    text = demo.catalog_text(intent=False, intent_quant=False, ocr_quant=False, have_ocr=False,
                             people=True)
    catalog = parse_catalog(text, path=str(tmp_path / "model_catalog.toml"))
    assert not catalog.errors, catalog.errors
    entry = catalog.entries[demo.FIELD_ENTRY]
    assert entry.quantize.method == "auto" and entry.quantize.calibration is None
    assert uses_field_samples(entry) and needed_for(entry) == demo.FIELD_SAMPLES
    # the camera's 42 frames: a generation once FIELD_SAMPLES arrived, and nothing the camera
    # sends later cuts a second one (a rebuild the demo would wait for)
    camera = [f"frame-{i}" for i in range(42)]
    assert demo.FIELD_SAMPLES <= len(camera)
    assert not should_cut(camera[:demo.FIELD_SAMPLES - 1], None, demo.FIELD_SAMPLES)
    assert should_cut(camera[:demo.FIELD_SAMPLES], None, demo.FIELD_SAMPLES)
    assert not should_cut(camera, camera[:demo.FIELD_SAMPLES], demo.FIELD_SAMPLES)


def test_the_field_act_checks_the_served_file_on_photographs_never_sent(tmp_path, real_model):
    model = real_model(demo.FIELD_MODEL)
    act = demo.FieldAct(model.path, tmp_path / "photographs")
    frames, unseen = act.prepare()
    assert len(frames) == 42 and unseen == 14
    assert len({f["images"].tobytes() for f in frames[:demo.FIELD_SAMPLES]}) == demo.FIELD_SAMPLES
    check, count, fp32_ms, served_ms = act.check_unseen(model.path, model.path, budget_s=0.2)
    assert count == unseen and fp32_ms > 0 and served_ms > 0
    assert check.gate == "min_detection_f1" and check.value == 1.0, check   # FP32 vs itself
    assert "detections matched" in check.detail
