"""``shusheng train domain-check``: fit the in-domain check of a trained model and store it with its weights.

The check (:class:`shusheng.pipelines.DomainCheck`) is a Gaussian over the image features the model's pipeline
reads, fitted on SynthDrive training scenes and calibrated on validation scenes (never the fixed test set, which
measures it: ``python bench/domain_check.py``). It writes ``domain_check.safetensors`` into the model folder.

    shusheng train domain-check --model shusheng/weights/shusheng-mini-uniperceiver
    shusheng train domain-check --model runs/miniclip/final --n-fit 4000 --n-calibration 1000
    shusheng train domain-check --model shusheng/weights/shusheng-mini-det     # a detector: its tower's levels
    shusheng train domain-check --model shusheng/weights/shusheng-mini-seg     # a segmenter: the same features

For a detector or a segmenter (``DetectionPipeline.domain_features``, ``SegmentationPipeline.domain_features``:
one implementation, :mod:`shusheng.detection.domain`) the features are the per-channel mean and standard
deviation of every tower level the head reads, at the model's input size (a detector's ``min_size``, a
segmenter's ``image_size``). Fitting runs the tower only: a few minutes for the default 5,000 scenes at 256 px on
a 2-core CPU, rendering included.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["add_train_arguments", "fit_and_save", "fit_domain_check", "pipeline_for", "run_train"]


def pipeline_for(model_dir: str | Path):
    """The pipeline class that serves a model folder, from its ``model_type``."""
    from shusheng.detection.pipelines import DetectionPipeline, SegmentationPipeline
    from shusheng.miniclip.pipelines import EmbeddingPipeline
    from shusheng.modeling import model_class_for
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    pipelines = {p.model_class: p for p in (CaptionPipeline, EmbeddingPipeline, DetectionPipeline,
                                               SegmentationPipeline)}
    cls = model_class_for(model_dir)
    if cls not in pipelines:
        raise ValueError(f"{model_dir} holds a {cls.model_type!r} model; the in-domain check knows "
                         f"{sorted(c.model_type for c in pipelines)}")
    return pipelines[cls]


def _features(pipe, seed: int, n: int, size: int, batch_size: int, desc: str):
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from shusheng.data import synthdrive as sd

    rows = []
    with torch.inference_mode():
        for s in tqdm(range(0, n, batch_size), desc=desc, mininterval=5):
            images = [sd.sample(seed, i, size)[0] for i in range(s, min(n, s + batch_size))]
            for b in pipe.batches(images, batch_size, on_error="raise"):
                rows.append(pipe.domain_features(b.pixels).float().cpu().numpy())
    return torch.from_numpy(np.concatenate(rows))


def fit_domain_check(pipe, n_fit: int = 4000, n_calibration: int = 1000, alpha: float = 0.005,
                     shrinkage: float = 0.1, batch_size: int = 64) -> Any:
    """Fit ``pipe``'s :class:`~shusheng.pipelines.DomainCheck` on SynthDrive train scenes ``0..n_fit-1``,
    calibrated on val scenes ``0..n_calibration-1``, at the model's input size."""
    from shusheng.data import TRAIN_SEED, VAL_SEED
    from shusheng.pipelines import DomainCheck

    size = pipe.model.preprocess_config().size
    t0 = time.time()
    fit = _features(pipe, TRAIN_SEED, n_fit, size, batch_size, "fit features")
    cal = _features(pipe, VAL_SEED, n_calibration, size, batch_size, "calibration features")
    info = {"data": f"SynthDrive train seed {TRAIN_SEED} images 0..{n_fit - 1} (fit), val seed {VAL_SEED} "
                    f"images 0..{n_calibration - 1} (calibration), {size} px",
            "features": type(pipe).__name__ + ".domain_features", "seconds": round(time.time() - t0, 1)}
    return DomainCheck.fit(fit, cal, alpha=alpha, shrinkage=shrinkage, info=info)


def fit_and_save(model_dir: str | Path, n_fit: int, copies: tuple[str | Path, ...] = ()) -> Path:
    """Fit the check of the model in ``model_dir`` (``n_fit`` train scenes, ``max(16, n_fit // 4)`` val
    scenes) and write it there and into each folder of ``copies`` (e.g. an fp16 export of the same weights).
    The trainers call this after writing their final folder."""
    import shutil

    pipe = pipeline_for(model_dir).from_pretrained(model_dir)
    path = fit_domain_check(pipe, n_fit, max(16, n_fit // 4)).save(model_dir)
    for folder in copies:
        shutil.copyfile(path, Path(folder) / path.name)
    logger.info("in-domain check fitted on %d scenes: %s", n_fit, path)
    return path


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (written by save_pretrained)")
    p.add_argument("--n-fit", type=int, default=4000, help="SynthDrive train scenes for the Gaussian (4000)")
    p.add_argument("--n-calibration", type=int, default=1000, help="SynthDrive val scenes for calibration (1000)")
    p.add_argument("--alpha", type=float, default=0.005,
                   help="in-domain when the score is at least this (0.005: ~0.5%% of scenes flagged)")
    p.add_argument("--shrinkage", type=float, default=0.1, help="covariance shrinkage towards the diagonal")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def run_train(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = pipeline_for(args.model).from_pretrained(args.model)
    check = fit_domain_check(pipe, args.n_fit, args.n_calibration, args.alpha, args.shrinkage)
    path = check.save(args.model)
    print(f"wrote {path} ({check.info})")
    return 0
