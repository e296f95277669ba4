"""``shusheng detect IMG... --model DIR``: boxes (and masks) of a saved detector.

With ``--json`` it prints a JSON list of ``{"image", "detections": [{"label", "score", "box": [x, y, w, h],
"mask": RLE or null}], "in_domain", "domain_score"}`` objects, boxes in the image's own pixels; an image that
cannot be loaded gets an ``"error"`` entry instead, the others are still detected, and the exit status is 1.
``--draw OUT_DIR`` writes one PNG per image with its boxes. No trained detector is bundled yet, so ``--model``
is required (a folder written by ``InternImageDetector.save_pretrained``). Heavy imports happen in ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]

NO_MODEL = ("no bundled detector exists yet (shusheng-mini-det is not trained): pass --model DIR, the folder of a "
            "detector saved with shusheng.detection.InternImageDetector.save_pretrained")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="detector folder (required for now: no detector is bundled yet)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score reported (default 0.5)")
    p.add_argument("--draw", default=None, metavar="OUT_DIR", help="write one PNG per image with its boxes here")
    p.add_argument("--batch-size", type=int, default=4)


def _fail(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _draw(image_path: str, detections: list[dict], out_dir: Path, used: set[str]) -> Path:
    from PIL import ImageDraw

    from shusheng.data import load_image

    img = load_image(image_path)
    draw = ImageDraw.Draw(img)
    for d in detections:
        x, y, w, h = d["box"]
        draw.rectangle([x, y, x + w, y + h], outline=(255, 40, 40), width=2)
        draw.text((x + 2, y + 1), f"{d['label']} {d['score']:.2f}", fill=(255, 255, 0))
    stem = Path(image_path).stem or "image"
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    out = out_dir / name
    img.save(out)
    return out


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        return _fail(NO_MODEL)
    if not 0.0 <= args.threshold <= 1.0:
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    from shusheng.data import ImageLoadError
    from shusheng.detection.pipelines import DetectionPipeline

    try:
        pipe = DetectionPipeline.from_pretrained(args.model)
        out = pipe(args.images, threshold=args.threshold, batch_size=args.batch_size)
    except (ImageLoadError, ValueError, FileNotFoundError, ImportError) as e:
        return _fail(e)
    rows = []
    for im, dets, ok, score, err in zip(args.images, out.detections, out.in_domain, out.domain_score, out.errors):
        r = {"image": im, "detections": dets, "in_domain": ok,
             "domain_score": None if score != score else round(score, 4)}  # NaN (no check) -> null
        if err is not None:
            r["error"] = err
        rows.append(r)
    if args.draw:
        out_dir = Path(args.draw)
        out_dir.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for r in rows:
            if "error" not in r:
                r["drawn"] = str(_draw(r["image"], r["detections"], out_dir, used))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['image']}: error: {r['error']}")
                continue
            print(f"{r['image']}: {len(r['detections'])} detection(s)")
            for d in r["detections"]:
                print(f"  {d['label']:<14} {d['score']:.3f}  box {[round(v, 1) for v in d['box']]}")
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0
