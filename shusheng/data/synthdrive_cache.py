"""A rendered SynthDrive split cached on disk and held in memory as tensors (what training and evaluation read).

    >>> from shusheng.data.synthdrive_cache import load_split_cache
    >>> split = load_split_cache("runs/cache", seed=1, n=1000)   # rendered once, loaded afterwards
    >>> split.images.shape, len(split.attributes)                  # (1000, 3, 128, 128) uint8, 1000
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["SplitCache", "load_split_cache"]


@dataclass
class SplitCache:
    """A rendered SynthDrive split in memory: ``images`` ``(N, 3, S, S)`` uint8, ``labels`` ``(N, S, S)`` uint8
    per-pixel object labels (:func:`shusheng.data.synthdrive.dense_labels`), per-image annotations."""

    images: torch.Tensor
    labels: torch.Tensor
    attributes: list[dict]
    captions: list[list[str]]
    seed: int
    start: int


def load_split_cache(cache_dir: str | Path, seed: int, n: int, size: int = 128, start: int = 0,
                     progress: bool = True) -> SplitCache:
    """Render images ``start .. start+n-1`` of the SynthDrive split seeded ``seed`` once (in this process) into
    ``cache_dir/synthdrive_s{seed}_i{start}_n{n}_{size}px`` and load them.

    The folder holds ``images.npy`` (``(N, S, S, 3)`` uint8), ``labels.npy`` (``(N, S, S)`` uint8 dense object
    labels), ``annotations.jsonl`` (attributes and captions) and ``meta.json`` (written last: a folder without
    it, or with an older format, is rendered again).
    """
    from tqdm.auto import tqdm

    from shusheng.data import synthdrive as sd

    folder = Path(cache_dir) / f"synthdrive_s{seed}_i{start}_n{n}_{size}px"
    meta = {"seed": seed, "start": start, "n": n, "size": size, "format": 2}
    meta_file = folder / "meta.json"
    if not (meta_file.is_file() and json.loads(meta_file.read_text()) == meta):
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)
        t0 = time.time()
        arr = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        lab = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        with open(folder / "annotations.jsonl", "w", encoding="utf-8") as f:
            for i in tqdm(range(n), desc=f"render seed {seed}", disable=not progress, mininterval=10):
                img, ann = sd.sample(seed, start + i, size)
                arr[i] = np.asarray(img, dtype=np.uint8)
                lab[i] = sd.dense_labels(ann)
                f.write(json.dumps({"index": start + i, "attributes": ann.attributes, "captions": ann.captions})
                        + "\n")
        arr.flush()
        lab.flush()
        del arr, lab
        meta_file.write_text(json.dumps(meta))
        logger.info("rendered %d SynthDrive images (seed %d) into %s in %.1f s", n, seed, folder, time.time() - t0)
    images = torch.from_numpy(np.load(folder / "images.npy")).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    anns = [json.loads(line) for line in (folder / "annotations.jsonl").read_text(encoding="utf-8").splitlines()]
    return SplitCache(images, labels, [a["attributes"] for a in anns], [a["captions"] for a in anns], seed, start)
