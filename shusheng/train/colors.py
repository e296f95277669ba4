"""``shusheng train colors``: fit a detector's vehicle-colour head and store it with its weights.

    shusheng train colors --model shusheng/weights/shusheng-mini-det
    shusheng train colors --model runs/det/maskrcnn/final --n-scenes 5000 --sizes 128,256

The head (:mod:`shusheng.detection.colors`) reads the colour statistics inside each car, truck and bus mask, so it
serves detectors that predict masks (Mask R-CNN). It is fitted on SynthDrive training scenes, by default on the
detector's own masks of the vehicles it finds (``--masks``), and measured on validation scenes (never the fixed test
set), on ground-truth and on detected masks; a few minutes on a 2-core CPU, rendering and detection included.
It writes ``colors.safetensors`` into the model folder and prints the fit's metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["add_train_arguments", "run_train"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="detector folder (its config.json says head 'maskrcnn')")
    p.add_argument("--n-scenes", type=int, default=3000, help="SynthDrive train scenes to fit on")
    p.add_argument("--sizes", default="128,256", help="sizes the scenes are rendered at, scene i at size i mod n")
    p.add_argument("--val-n", type=int, default=300, help="SynthDrive val scenes to measure on (smallest size)")
    p.add_argument("--masks", choices=("detector", "truth", "both"), default="detector",
                   help="fit on the detector's own masks of the vehicles it finds (default: what the head reads in "
                        "use), the ground-truth masks, or both")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)


def run_train(args: argparse.Namespace) -> int:
    from shusheng.detection.colors import fit_color_head
    from shusheng.detection.model import InternImageDetector

    folder = Path(args.model)
    model = InternImageDetector.from_pretrained(folder).eval()  # a clear error for anything but a detector folder
    if model.config.head != "maskrcnn":
        raise SystemExit(f"error: {folder} holds a {model.config.head!r} detector; the colour head reads instance "
                         "masks, which only 'maskrcnn' detectors predict")
    sizes = [int(v) for v in str(args.sizes).split(",") if v.strip()]
    if not sizes or min(sizes) < 32 or args.n_scenes < 1:
        raise SystemExit("error: need --n-scenes >= 1 and --sizes of at least 32 px")
    t = time.time()
    head, metrics = fit_color_head(args.n_scenes, sizes, args.val_n, args.epochs, seed=args.seed, detector=model,
                                   masks=args.masks)
    metrics["seconds"] = round(time.time() - t, 1)
    metrics["command"] = (f"shusheng train colors --model {folder} --n-scenes {args.n_scenes} --sizes {args.sizes} "
                          f"--val-n {args.val_n} --masks {args.masks} --epochs {args.epochs} --seed {args.seed}")
    path = head.save(folder, metrics)
    print(json.dumps({"file": str(path), **metrics}, indent=2))
    return 0
