"""Label every pixel of street scenes (semantic segmentation) with the bundled shusheng-mini-seg.

    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/segment_scene.py /tmp/scenes/images/000000.png /tmp/scenes/images/000001.png --out /tmp/seg

Per image it writes <stem>_classes.png (8-bit class ids: id k is the model's class k, SynthDrive's road,
sidewalk, sky, vehicle, person, ... for the bundled model) and <stem>_overlay.png (the image blended with one
colour per class), and prints one JSON line with the classes present, largest share of the pixels first:

    {"image": "/tmp/scenes/images/000000.png", "classes": "/tmp/seg/000000_classes.png", "overlay":
     "/tmp/seg/000000_overlay.png", "shares": {"road": 0.4, "building": 0.22, "sky": 0.19, ...}, "in_domain": true}

(wrapped here; the shares are made up). Two images with the same file name get <stem>_2_... files. An image
that cannot be read gets {"image", "error"} and the others are still segmented (exit status 1). --model DIR takes
a segmenter folder from `shusheng train segment` (runs/seg/final) instead of the bundled one, which this version
does not ship yet (without either, the demo says so). The model knows SynthDrive's driving scenes only;
"in_domain" is false for pictures unlike them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the class-id and overlay PNGs")
    parser.add_argument("--model", type=Path, default=None,
                        help="segmenter folder (default: the bundled shusheng-mini-seg)")
    args = parser.parse_args()

    for image in args.images:
        if not image.is_file():
            parser.error(f"image {str(image)!r} does not exist or is not a file")
    if args.model is not None and not args.model.is_dir():
        parser.error(f"model folder {str(args.model)!r} does not exist or is not a folder")

    import numpy as np
    from PIL import Image

    from shusheng.data import load_image
    from shusheng.detection import SegmentationPipeline
    from shusheng.detection.segment import overlay

    try:
        pipe = SegmentationPipeline.from_pretrained(args.model)  # None: the bundled model
    except (FileNotFoundError, ValueError) as e:  # bundled weights missing: the message names the training command
        hint = "; or pass --model DIR, a segmenter folder" if args.model is None else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    out = pipe([str(p) for p in args.images])  # per-image errors, never raises for an unreadable file
    args.out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    failed = 0
    for i, path in enumerate(args.images):
        if out.errors[i] is not None:
            failed += 1
            print(json.dumps({"image": str(path), "error": out.errors[i]}))
            print(f"error: {out.errors[i]}", file=sys.stderr)
            continue
        stem, k = path.stem, 1
        while stem in used:  # a.png and other/a.png: a_classes.png, a_2_classes.png
            k += 1
            stem = f"{path.stem}_{k}"
        used.add(stem)
        ids = out.class_ids[i]  # (H, W) class ids at the image's own size
        classes, blended = args.out / f"{stem}_classes.png", args.out / f"{stem}_overlay.png"
        Image.fromarray(ids.astype(np.uint8), "L").save(classes)
        Image.fromarray(overlay(np.asarray(load_image(path)), ids, 0.5, len(out.labels))).save(blended)
        shares = {name: round(s, 4) for name, s in sorted(out.shares[i].items(), key=lambda kv: -kv[1]) if s > 0}
        print(json.dumps({"image": str(path), "classes": str(classes), "overlay": str(blended), "shares": shares,
                          "in_domain": out.in_domain[i]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
