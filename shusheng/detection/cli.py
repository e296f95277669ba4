"""``shusheng detect IMG... [--model DIR]``: boxes (and masks) of the bundled ``shusheng-mini-det`` or a saved
detector.

With ``--json`` it prints a JSON list of ``{"image", "detections": [{"label", "score", "box": [x, y, w, h],
"mask": RLE or null}], "in_domain", "domain_score"}`` objects (cars, trucks and buses also carry ``"color"`` and
``"color_score"`` when the detector folder has a colour head: ``shusheng train colors``), boxes and masks in the
image's own pixels (an image larger than the detector's input is downscaled before the model: its object also has
``"resized_from"``, its own ``[width, height]``, and ``"resized_to"``, what the detector saw); an image that cannot
be loaded gets an ``"error"`` entry instead, the others are still detected, and the exit status is 1. ``--draw
OUT_DIR`` writes one PNG per image with its boxes and instance masks. Without ``--model`` the bundled
``shusheng-mini-det`` runs; when it is missing the command stops with status 2 and says how to get one. Heavy
imports happen in ``run`` only.

``shusheng segment IMG... --out DIR [--model DIR] [--json]``: semantic segmentation (``run_segment``). Per image it
writes ``<stem>_classes.png`` (8-bit class ids, id ``k`` = the model's ``labels[k]``, SynthDrive's ``CLASSES`` for
the bundled ``shusheng-mini-seg``) and ``<stem>_overlay.png`` (the image blended with a fixed class palette);
``--json`` prints ``[{"image", "classes", "overlay", "shares": {class: pixel share}, "in_domain",
"domain_score"}]``. Unreadable images get an ``"error"`` entry and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "add_segment_arguments", "run", "run_segment"]

NO_MODEL = ("no bundled detector here (shusheng/weights/shusheng-mini-det is missing): pass --model DIR, the "
            "folder of a detector saved with shusheng.detection.InternImageDetector.save_pretrained (shusheng train "
            "detect writes <output>/final)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="detector folder (default: the bundled shusheng-mini-det)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score reported (default 0.5)")
    p.add_argument("--draw", default=None, metavar="OUT_DIR",
                   help="write one PNG per image with its boxes and masks here")
    p.add_argument("--batch-size", type=int, default=4)


def _fail(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _draw(image_path: str, detections: list[dict], out_dir: Path, used: set[str]) -> Path:
    from shusheng.data import load_image
    from shusheng.detection.visualize import draw_detections

    img = draw_detections(load_image(image_path), detections)
    out = out_dir / f"{_unique_stem(image_path, used)}.png"
    img.save(out)
    return out


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    from shusheng.data import ImageLoadError
    from shusheng.detection.pipelines import DetectionPipeline
    from shusheng.weights import BundledWeightsNotFound

    try:
        pipe = DetectionPipeline.from_pretrained(args.model)
    except BundledWeightsNotFound:
        return _fail(NO_MODEL)
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _fail(e)
    try:
        out = pipe(args.images, threshold=args.threshold, batch_size=args.batch_size)
    except (ImageLoadError, ValueError) as e:
        return _fail(e)
    rows = []
    for i, (im, dets, ok, score, err) in enumerate(zip(args.images, out.detections, out.in_domain, out.domain_score,
                                                       out.errors)):
        r = {"image": im, "detections": dets, "in_domain": ok,
             "domain_score": None if score != score else round(score, 4)}  # NaN (no check) -> null
        if err is not None:
            r["error"] = err
        elif out.resized(i):
            r["resized_from"], r["resized_to"] = list(out.sizes[i]), list(out.input_sizes[i])
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
            notes = [f"seen at {r['resized_to'][0]}x{r['resized_to'][1]}"] if "resized_to" in r else []
            if r["in_domain"] is False:
                notes.append(f"unlike the training scenes: domain score {r['domain_score']}")
            print(f"{r['image']}: {len(r['detections'])} detection(s)" + (f" ({'; '.join(notes)})" if notes else ""))
            for d in r["detections"]:
                name = f"{d['color']} {d['label']}" if "color" in d else d["label"]
                print(f"  {name:<14} {d['score']:.3f}  box {[round(v, 1) for v in d['box']]}")
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


# -- shusheng segment -----------------------------------------------------------------------------------------

NO_SEG_MODEL = ("no segmenter: the bundled shusheng-mini-seg is missing. Train one with `shusheng train segment "
                "--output runs/seg` and pass --model runs/seg/final (or copy that folder to "
                "shusheng/weights/shusheng-mini-seg)")


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for <stem>_classes.png (class ids) and <stem>_overlay.png")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="segmenter folder (default: the bundled shusheng-mini-seg)")
    p.add_argument("--json", action="store_true", help="print a JSON list: files and class shares per image")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlay (0.5)")
    p.add_argument("--batch-size", type=int, default=4)


def _unique_stem(image_path: str, used: set[str]) -> str:
    stem = Path(image_path).stem or "image"
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def run_segment(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        return _fail(f"--alpha must be in [0, 1], got {args.alpha}")
    import numpy as np
    from PIL import Image

    from shusheng.data import ImageLoadError, load_image
    from shusheng.detection.pipelines import SegmentationPipeline
    from shusheng.detection.segment import overlay
    from shusheng.weights import BundledWeightsNotFound

    try:
        pipe = SegmentationPipeline.from_pretrained(args.model)
    except BundledWeightsNotFound:
        return _fail(NO_SEG_MODEL)
    except (ValueError, FileNotFoundError, ImportError) as e:
        return _fail(e)
    if pipe.model.num_classes > 256:
        return _fail(f"the model has {pipe.model.num_classes} classes: more than an 8-bit class PNG holds")
    try:
        out = pipe(args.images, batch_size=args.batch_size)
    except (ImageLoadError, ValueError) as e:
        return _fail(e)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for i, im in enumerate(args.images):
        if out.errors[i] is not None:
            rows.append({"image": im, "error": out.errors[i]})
            continue
        ids = out.class_ids[i]
        stem = _unique_stem(im, used)
        classes, blended = out_dir / f"{stem}_classes.png", out_dir / f"{stem}_overlay.png"
        Image.fromarray(ids.astype(np.uint8), "L").save(classes)
        rgb = np.asarray(load_image(im), dtype=np.uint8)
        Image.fromarray(overlay(rgb, ids, args.alpha, pipe.model.num_classes)).save(blended)
        score = out.domain_score[i]
        rows.append({"image": im, "classes": str(classes), "overlay": str(blended),
                     "shares": {k: round(v, 4) for k, v in out.shares[i].items()}, "in_domain": out.in_domain[i],
                     "domain_score": None if score != score else round(score, 4)})  # NaN (no check) -> null
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['image']}: error: {r['error']}")
                continue
            top = sorted(r["shares"].items(), key=lambda kv: -kv[1])[:4]
            print(f"{r['image']}: {r['classes']}, {r['overlay']}  "
                  + ", ".join(f"{k} {v:.1%}" for k, v in top if v > 0)
                  + ("" if r["in_domain"] else "  (unlike the training scenes)"))
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0
