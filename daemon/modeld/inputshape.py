"""The one rule of an image input's shape: which axes are its sides, and what size a symbolic
side takes. ``workers.inputs`` sizes calibration and agreement inputs by it; ``samples`` checks a
node's field sample of a dynamic-size input against it, so the daemon keeps only samples of the
size it would calibrate on. Pure (standard library only).
"""

from __future__ import annotations

from typing import Sequence

#: a symbolic side taken from an image (no ``input_size`` in the catalog) is its own side rounded
#: down to this stride, and at least ``MIN_SIDE``: detectors downsample by 32
STRIDE = 32
MIN_SIDE = 32


def image_layout(shape: Sequence[object]) -> str | None:
    """"NCHW" / "NHWC" when a shape looks like an image batch (rank 4, 1 or 3 channels)."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return None


def spatial_axes(shape: Sequence[object]) -> tuple[int, ...]:
    """The axes of an image input's height and width (none for other inputs)."""
    return {"NCHW": (2, 3), "NHWC": (1, 2)}.get(image_layout(shape) or "", ())


def fitted_side(input_size: int | None, own_side: int) -> int:
    """The side a symbolic spatial dimension takes for an input whose own side is ``own_side``:
    the catalog's ``input_size``, else its own, rounded down to ``STRIDE`` (at least ``MIN_SIDE``)."""
    return input_size or max(MIN_SIDE, (own_side // STRIDE) * STRIDE)


def side_rule(input_size: int | None) -> str:
    """``fitted_side``'s rule in words, for a refusal."""
    if input_size:
        return f"{input_size} (the catalog's input_size)"
    return f"a multiple of {STRIDE} from {MIN_SIDE} (no input_size in the catalog)"
