"""Synthetic pictures for models whose inputs are images, when no real samples are given.

Numpy only. Used by ``workers.inputs`` for seeded synthetic inputs (an OCR detector answers
nearly nothing to random colour fields, so it gets text-like pages), and by tests, the demo and
the benchmarks (through ``modeld.testing.images``).
"""

from __future__ import annotations

import numpy as np


def text_like_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """A page of dark 'words' on a light background (HxWx3 uint8): enough like printed text that
    an OCR detector's output responds, unlike random noise, which it maps to nearly zero."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), rng.integers(200, 256, 3), np.uint8)
    line_h = max(6, height // 16)
    for top in range(line_h, height - line_h, int(line_h * 1.8)):
        x = int(rng.integers(2, max(3, width // 8)))
        while x < width - line_h:
            word = int(rng.integers(line_h, 5 * line_h))
            ink = rng.integers(0, 80, 3)
            for cx in range(x, min(x + word, width - 2), max(2, line_h // 2)):
                glyph_h = int(rng.integers(line_h // 2, line_h + 1))
                stroke = max(1, line_h // 6)
                page[top + line_h - glyph_h:top + line_h, cx:cx + stroke] = ink
                page[top + line_h - stroke:top + line_h, cx:cx + max(2, line_h // 2) - 1] = ink
                if rng.random() < 0.5:
                    page[top + line_h - glyph_h:top + line_h - glyph_h + stroke,
                         cx:cx + max(2, line_h // 2) - 1] = ink
            x += word + int(rng.integers(line_h // 2, 2 * line_h))
    return page
