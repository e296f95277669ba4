"""Detect objects in one image with the dense object head of the bundled shusheng-mini-clip.

    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/detect_objects.py /tmp/scenes/images/000000.png --draw /tmp/boxes.png

It prints one line per object, best first: label, score and box [x, y, w, h] in pixels of the image:

    light green          1.00  [96, 32, 16, 32]
    orange car           0.87  [72, 88, 16, 16]
    green truck          0.84  [64, 64, 8, 8]
    sign speed_30        0.74  [24, 56, 16, 24]
    4 objects (threshold 0.5)
    boxes drawn on /tmp/boxes.png

This is the detector `shusheng index --detect` uses to index regions. Its boxes are as coarse as the head's
cells (8 model pixels), touching objects of one kind merge, and it knows only SynthDrive's vehicles, people,
traffic lights and signs. --draw writes a copy of the image with the boxes (small images are enlarged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def draw_boxes(image, detections: list[dict], out: Path) -> None:
    """Save ``image`` with its labelled boxes, enlarged to at least 512 pixels wide so the labels are legible."""
    from PIL import Image, ImageDraw

    scale = max(1, 512 // image.width)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for d in detections:
        x, y, w, h = (v * scale for v in d["box"])
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 40, 40), width=2)
        draw.text((x + 2, y + 1), f"{d['label']} {d['score']:.2f}", fill=(255, 255, 0))
    image.save(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("--draw", type=Path, default=None, metavar="OUT.png", help="write the image with its boxes")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum cell probability, in (0, 1) (0.5)")
    args = parser.parse_args()

    if not args.image.is_file():
        parser.error(f"image {str(args.image)!r} does not exist or is not a file")
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")

    from shusheng.data import ImageLoadError, load_image

    try:
        image = load_image(args.image)  # RGB, EXIF orientation applied; decoded before the model loads
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from shusheng.detection import DenseObjectDetector
    from shusheng.miniclip import load_bundled

    try:
        model = load_bundled()
    except FileNotFoundError as e:  # bundled weights missing: the message names the command that trains them
        print(f"error: {e}", file=sys.stderr)
        return 1
    detections = DenseObjectDetector(model, threshold=args.threshold).detect(image)  # boxes in image pixels
    for d in detections:
        print(f"{d['label']:<20} {d['score']:.2f}  {d['box']}")
    print(f"{len(detections)} objects (threshold {args.threshold})")
    if args.draw is not None:
        draw_boxes(image, detections, args.draw)
        print(f"boxes drawn on {args.draw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
