"""``shusheng data``: dataset tools. Subcommand ``synthdrive`` writes SynthDrive images and annotations.

Examples::

    shusheng data synthdrive --out data/synthdrive --n 10000 --seed 0 --size 128 --workers 2
    shusheng data synthdrive --split test --out data/synthdrive_test
    shusheng data synthdrive --preview grid.png
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

_SPLIT_NAMES = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    p = sub.add_parser("synthdrive", help="procedural driving scenes with captions, QA, boxes and masks",
                       description="Write SynthDrive images, annotations.jsonl and coco.json, or a preview grid.")
    p.add_argument("--out", help="output folder (images/, masks/, annotations.jsonl, coco.json)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: the split's size, 10000 for train)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--seed", type=int, default=None, help="split seed (0 train, 1 val, 2023 the fixed test set)")
    group.add_argument("--split", choices=_SPLIT_NAMES, default=None, help="named split instead of --seed")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--start", type=int, default=0, help="index of the first image (default 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--no-masks", action="store_true", help="do not write the semantic mask PNGs")
    p.add_argument("--preview", metavar="PNG", help="also (or only) draw a grid of samples with boxes and captions")
    p.add_argument("--preview-n", type=int, default=16, help="samples in the preview grid (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from shusheng.data import synthdrive as sd

    if args.out is None and args.preview is None:
        logger.error("nothing to do: give --out DIR and/or --preview PNG")
        return 2
    split = args.split or "train"
    seed = args.seed if args.seed is not None else sd.SPLITS[split][0]
    n = args.n if args.n is not None else sd.SPLITS[split][1]
    if args.split == "test" and (n > sd.TEST_SIZE or args.size != sd.TEST_IMAGE_SIZE or args.start):
        logger.error("the fixed test set is %d images of %d px from index 0", sd.TEST_SIZE, sd.TEST_IMAGE_SIZE)
        return 2
    if args.out is not None:
        stats = sd.generate(args.out, n, seed, args.size, workers=max(1, args.workers), masks=not args.no_masks,
                            start=args.start, progress=not args.quiet)
        logger.info("%d images in %.1f s: %.1f images/s", stats["n"], stats["seconds"], stats["images_per_second"])
    if args.preview is not None:
        from PIL import Image

        grid = sd.preview_grid(seed, n=args.preview_n, size=args.size, start=args.start)
        if str(args.preview).lower().endswith(".png"):  # 256 colours keep the file small (a few hundred KB)
            grid = grid.quantize(256, dither=Image.Dither.NONE)
        grid.save(args.preview, optimize=True)
        logger.info("preview grid written to %s", args.preview)
    return 0
