"""``shusheng data``: dataset tools. Subcommand ``synthdrive`` writes SynthDrive images and annotations, or
(``--sequence``) drives: short H.264 videos with per-frame annotations and temporal facts.

Examples::

    shusheng data synthdrive --out data/synthdrive --n 10000 --seed 0 --size 128 --workers 2
    shusheng data synthdrive --split test --out data/synthdrive_test
    shusheng data synthdrive --preview grid.png
    shusheng data synthdrive --sequence --n 4 --frames 48 --fps 8 --split val --out /tmp/drives
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

_SPLIT_NAMES = ("train", "val", "test")
_DEFAULT_DRIVES = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    p = sub.add_parser("synthdrive", help="procedural driving scenes with captions, QA, boxes and masks",
                       description="Write SynthDrive images, annotations.jsonl and coco.json, a preview "
                                   "grid, or (--sequence) drives: MP4 videos with per-frame annotations.")
    p.add_argument("--out", help="output folder (images/, masks/, annotations.jsonl, coco.json; with "
                                 "--sequence drive_NNNNNN.mp4, drive_NNNNNN.jsonl and drives.json)")
    p.add_argument("--n", type=int, default=None,
                   help="number of images (default: the split's size, 10000 for train), or of drives with "
                        f"--sequence (default {_DEFAULT_DRIVES})")
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
    seq = p.add_argument_group("sequences (needs the video extra: pip install 'shusheng[video]')")
    seq.add_argument("--sequence", action="store_true",
                     help="render drives (short videos of an evolving scene) instead of single images")
    seq.add_argument("--frames", type=int, default=48, help="frames per drive (default 48)")
    seq.add_argument("--fps", type=float, default=8, help="frames per second of the drives (default 8)")
    seq.add_argument("--overwrite", action="store_true", help="write drives into a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from shusheng.data import synthdrive as sd

    if args.out is None and args.preview is None:
        logger.error("nothing to do: give --out DIR and/or --preview PNG")
        return 2
    split = args.split or "train"
    seed = args.seed if args.seed is not None else sd.SPLITS[split][0]
    n = args.n if args.n is not None else (_DEFAULT_DRIVES if args.sequence else sd.SPLITS[split][1])
    if args.split == "test" and (n > sd.TEST_SIZE or args.size != sd.TEST_IMAGE_SIZE or args.start):
        logger.error("the fixed test set is %d images of %d px from index 0", sd.TEST_SIZE, sd.TEST_IMAGE_SIZE)
        return 2
    if args.sequence and args.out is not None:
        from shusheng.data import synthdrive_drive as sdd

        if args.frames < 1 or not args.fps > 0:
            logger.error("--frames must be >= 1 and --fps > 0")
            return 2
        fps = int(args.fps) if float(args.fps).is_integer() else args.fps
        try:
            stats = sdd.generate_drives(args.out, n, seed, args.frames, fps, args.size,
                                        workers=max(1, args.workers), start=args.start,
                                        overwrite=args.overwrite, progress=not args.quiet)
        except (FileExistsError, ImportError, ValueError) as e:
            logger.error("%s", e)
            return 2
        logger.info("%d drives of %d frames in %.1f s", stats["n"], stats["frames"], stats["seconds"])
    elif args.out is not None:
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
