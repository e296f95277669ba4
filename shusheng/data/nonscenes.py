"""Simple synthetic pictures that are not driving scenes: what the in-domain check must flag.

Eight kinds, cycled: uniform noise, a flat colour, a colour gradient, a checkerboard, stripes, overlapping
ellipses, lines of text on white, and blocky low-frequency noise. Used by ``bench/domain_check.py`` and the tests
next to real photographs (scikit-image's and matplotlib's bundled samples), never for training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["NONSCENE_KINDS", "nonscene_images"]

NONSCENE_KINDS = ("noise", "flat", "gradient", "checkerboard", "stripes", "ellipses", "text", "blocks")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def nonscene_images(n: int = 40, seed: int = 0, size: int = 128) -> list[Image.Image]:
    """``n`` RGB ``size x size`` pictures, kind ``i % 8`` of :data:`NONSCENE_KINDS` for picture ``i``."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        kind = NONSCENE_KINDS[k % len(NONSCENE_KINDS)]
        a = np.zeros((size, size, 3), np.uint8)
        if kind == "noise":
            a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        elif kind == "flat":
            a[:] = _colour(rng)
        elif kind == "gradient":
            a[:] = (np.linspace(0, 255, size)[None, :, None] * (rng.random(3) > 0.3)).astype(np.uint8)
        elif kind == "checkerboard":
            s = int(rng.integers(4, 32))
            a[:] = ((np.add.outer(np.arange(size) // s, np.arange(size) // s) % 2) * 255)[..., None].astype(np.uint8)
        elif kind == "stripes":
            a[:] = (((np.arange(size) // int(rng.integers(3, 20))) % 2) * 255)[:, None, None] * rng.integers(0, 2, 3)
        elif kind == "ellipses":
            im = Image.new("RGB", (size, size), _colour(rng))
            draw = ImageDraw.Draw(im)
            for _ in range(8):
                x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
                x1, y1 = (int(v) for v in rng.integers(size * 3 // 4, size, 2))
                draw.ellipse([x0, y0, x1, y1], fill=_colour(rng))
            a = np.asarray(im)
        elif kind == "text":
            im = Image.new("RGB", (size, size), "white")
            draw = ImageDraw.Draw(im)
            for y in range(0, size, 12):
                draw.text((4, y), "lorem ipsum dolor sit amet", fill="black")
            a = np.asarray(im)
        else:  # blocks
            cell = max(1, size // 16)
            small = np.clip(rng.normal(128, 40, (size // cell, size // cell, 3)), 0, 255).astype(np.uint8)
            a = small.repeat(cell, 0).repeat(cell, 1)
        out.append(Image.fromarray(np.ascontiguousarray(a)))
    return out
