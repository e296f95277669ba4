"""Drawing detections: boxes, labels and instance masks on the image they were found in.

    >>> from shusheng.detection.visualize import draw_detections, label_counts
    >>> out = DetectionPipeline.from_pretrained()(["street.png"], threshold=0.5)
    >>> draw_detections(load_image("street.png"), out.detections[0]).save("street_detections.png")
    >>> label_counts(out.detections[0])      # [("car", 3, 0.97), ("person", 1, 0.71)]

Each label has one colour (SynthDrive's categories the colours of ``shusheng.data.synthdrive.preview_grid``: car
red, truck orange, bus yellow, person cyan, traffic light green, sign magenta; other labels a fixed colour of
their name). Masks are COCO run-length encodings at the image's size (what
:class:`~shusheng.detection.pipelines.DetectionPipeline` reports); ``None`` masks (FCOS) draw only the box.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LABEL_COLORS", "decode_mask", "draw_detections", "label_color", "label_counts"]

#: colours of SynthDrive's detection categories (as in ``synthdrive.preview_grid``)
LABEL_COLORS: dict[str, tuple[int, int, int]] = {
    "car": (255, 64, 64), "truck": (255, 160, 0), "bus": (255, 230, 0), "person": (0, 230, 255),
    "traffic light": (80, 255, 80), "sign": (255, 80, 255)}


def label_color(label: str) -> tuple[int, int, int]:
    """The colour of ``label``: :data:`LABEL_COLORS`, else a bright colour fixed by the name."""
    if label in LABEL_COLORS:
        return LABEL_COLORS[label]
    h = zlib.crc32(label.encode("utf-8"))
    rgb = np.array([(h >> 16) & 255, (h >> 8) & 255, h & 255], dtype=np.float64)
    rgb = 96 + rgb * (159 / 255)  # never too dark to see on a dark scene
    return tuple(int(v) for v in rgb)


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO run-length encoding (``counts`` as str or bytes) → ``(H, W)`` bool array."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]),
                              "counts": counts.encode("ascii") if isinstance(counts, str) else counts}).astype(bool)


def draw_detections(image: Any, detections: Sequence[dict[str, Any]], mask_alpha: float = 0.45,
                    width: int | None = None, labels: bool = True) -> Any:
    """A copy of ``image`` (PIL) with each detection's instance mask blended in its label's colour, its box
    outlined and ``"label score"`` written above it.

    Args:
        image: the image the detections are in (their boxes and masks are in its pixels).
        detections: ``[{"label", "score", "box": [x, y, w, h], "mask": RLE | None}, ...]``.
        mask_alpha: opacity of the mask colours (0: boxes only).
        width: box line width (default: about 1/250 of the longer side, at least 2).
        labels: write the label and score of each box.

    Raises:
        ValueError: ``mask_alpha`` outside [0, 1], or a mask of another size than the image.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not 0.0 <= mask_alpha <= 1.0:
        raise ValueError(f"mask_alpha must be in [0, 1], got {mask_alpha}")
    img = image.convert("RGB")
    w, h = img.size
    if mask_alpha > 0 and any(d.get("mask") for d in detections):
        arr = np.asarray(img, dtype=np.float32).copy()
        for d in sorted(detections, key=lambda d: d["score"]):  # the best on top
            if not d.get("mask"):
                continue
            m = decode_mask(d["mask"])
            if m.shape != (h, w):
                raise ValueError(f"a mask of {m.shape[1]}x{m.shape[0]} on an image of {w}x{h}")
            arr[m] = (1 - mask_alpha) * arr[m] + mask_alpha * np.asarray(label_color(d["label"]), np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    line = width or max(2, round(max(w, h) / 250))
    font = ImageFont.load_default(size=max(10, round(max(w, h) / 40)))
    for d in detections:
        x, y, bw, bh = d["box"]
        color = label_color(d["label"])
        draw.rectangle([x, y, x + bw, y + bh], outline=color, width=line)
        if labels:
            name = f"{d['color']} {d['label']}" if d.get("color") else d["label"]  # a colour head's reading
            text = f"{name} {d['score']:.2f}"
            x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
            ty = y - (y1 - y0) - 4 if y - (y1 - y0) - 4 >= 0 else y + line
            draw.rectangle([x, ty, x + (x1 - x0) + 4, ty + (y1 - y0) + 4], fill=color)
            draw.text((x + 2 - x0, ty + 2 - y0), text, fill=(0, 0, 0), font=font)
    return img


def label_counts(detections: Sequence[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """``[(label, count, best score), ...]``, most frequent first (ties by label)."""
    seen: dict[str, list[float]] = {}
    for d in detections:
        seen.setdefault(d["label"], []).append(float(d["score"]))
    return sorted(((k, len(v), max(v)) for k, v in seen.items()), key=lambda r: (-r[1], r[0]))
