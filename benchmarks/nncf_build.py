"""Build an NNCF INT8 of an ONNX model; run by ``bench_task.py`` inside the benchmark's own venv
(``benchmarks/.venv-nncf``: nncf, onnxruntime, onnx, numpy), never in the daemon's.

    .venv-nncf/bin/python nncf_build.py MODEL.onnx FEEDS.npz OUT.onnx [--head-ignored]

``FEEDS.npz`` holds the calibration feeds as ``<index>__<input name>`` arrays. Plain: ``nncf.quantize``
with its defaults, calibrated on every feed. ``--head-ignored``: as Ultralytics exports YOLO to
INT8 (``ultralytics/utils/export/openvino.py``, ``int8_detect``): preset MIXED, every Sigmoid and
every node of the module of the last Sigmoid (the detection head, ``/model.22/...``) in the ignored
scope. Prints one JSON line: the ignored node count and the seconds nncf.quantize took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnx


def feeds_from(path: str) -> list[dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as archive:
        by_index: dict[int, dict[str, np.ndarray]] = {}
        for key in archive.files:
            index, name = key.split("__", 1)
            by_index.setdefault(int(index), {})[name] = archive[key]
    return [by_index[i] for i in sorted(by_index)]


def head_scope(model: onnx.ModelProto) -> list[str]:
    """Every Sigmoid, and every node under the module path of the last Sigmoid."""
    sigmoids = [n.name for n in model.graph.node if n.op_type == "Sigmoid"]
    names = set(sigmoids)
    if sigmoids and "/" in sigmoids[-1].lstrip("/"):
        scope = sigmoids[-1].rsplit("/", 1)[0] + "/"
        names |= {n.name for n in model.graph.node if n.name.startswith(scope)}
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("feeds")
    parser.add_argument("out")
    parser.add_argument("--head-ignored", action="store_true")
    args = parser.parse_args(argv)

    import nncf

    model = onnx.load(args.model)
    feeds = feeds_from(args.feeds)
    options: dict = {"subset_size": len(feeds)}
    ignored: list[str] = []
    if args.head_ignored:
        ignored = head_scope(model)
        options["preset"] = nncf.QuantizationPreset.MIXED
        if ignored:
            options["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
    started = time.monotonic()
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    seconds = time.monotonic() - started
    onnx.save(quantized, args.out)
    print(json.dumps({"ignored_nodes": len(ignored), "quantize_s": round(seconds, 2),
                      "nncf": nncf.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
