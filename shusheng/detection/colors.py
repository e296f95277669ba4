"""Vehicle colours from instance masks: a small classifier over the colour statistics of a detection's pixels.

    >>> from shusheng.detection.colors import ColorHead, fit_color_head
    >>> head, metrics = fit_color_head(n_scenes=3000)              # SynthDrive train scenes, ground-truth masks
    >>> head.save("shusheng/weights/shusheng-mini-det")             # -> colors.safetensors next to the weights
    >>> head = ColorHead.load("shusheng/weights/shusheng-mini-det") # None when the folder has none
    >>> head.predict(image_uint8, [mask_bool, ...])                 # [("red", 0.97), ...]

A detector says *what* and *where*; people also search and ask by colour ("the red car", "what colour is the
nearest vehicle?"). Averaging a box's pixels mixes the body with the road, windows and tyres, and the same paint
looks different at night, at dusk or in fog. The head therefore reads the pixels *inside the instance mask*
(mean, spread and quartiles of R, G, B) together with the whole image's mean and spread (the light the scene was
rendered in), and a two-layer MLP maps those 24 numbers to one of SynthDrive's vehicle colours.

It is fitted on SynthDrive training scenes (rendered at several sizes), on the ground-truth masks, the detector's
own masks (the pixels it reads in use: a predicted mask at night takes in road and shadow) or both, and validated
on validation scenes: ``shusheng train colors --model DIR`` writes ``colors.safetensors`` into a detector folder,
and :class:`~shusheng.detection.pipelines.DetectionPipeline` then reports a ``color`` (with ``color_score``) for
every car, truck and bus it finds with a mask (Mask R-CNN). It knows SynthDrive's flat paints only; on
photographs its colours mean little (the pipeline's ``in_domain`` says when an image is unlike the scenes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["COLOR_FILE", "MASK_SOURCES", "N_FEATURES", "ColorHead", "fit_color_head", "region_features", "scene_color_samples"]

#: file name of a colour head inside a detector folder
COLOR_FILE = "colors.safetensors"
#: labels the head names colours for (SynthDrive's vehicle types)
APPLIES_TO = ("car", "truck", "bus")
N_FEATURES = 24


def region_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 24 colour statistics of one region: mean, standard deviation and 25/50/75/90th percentiles of R, G, B
    inside ``mask``, then the whole image's mean and standard deviation of R, G, B (all in [0, 1]).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool (or 0/1) of the region; an empty mask gives the image's own statistics in its place.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape[:2]}")
    every = image.reshape(-1, 3).astype(np.float32) / 255.0
    inside = image[mask.astype(bool)].astype(np.float32) / 255.0
    if len(inside) == 0:
        inside = every
    quart = np.percentile(inside, [25, 50, 75, 90], axis=0).reshape(-1)
    return np.concatenate([inside.mean(0), inside.std(0), quart, every.mean(0), every.std(0)]).astype(np.float32)


class ColorHead(nn.Module):
    """MLP over :func:`region_features` (standardised with the training set's mean and spread) to colour names.

    Args:
        names: the colour names, in output order.
        hidden: width of the two hidden layers.
        applies_to: detector labels the head names colours for.
    """

    def __init__(self, names: Sequence[str], hidden: int = 64, applies_to: Sequence[str] = APPLIES_TO):
        super().__init__()
        if len(names) < 2:
            raise ValueError("a colour head needs at least two colours")
        self.names, self.hidden, self.applies_to = [str(n) for n in names], int(hidden), tuple(applies_to)
        self.register_buffer("shift", torch.zeros(N_FEATURES))
        self.register_buffer("scale", torch.ones(N_FEATURES))
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(self.names)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, 24)`` region features -> ``(N, colours)`` logits."""
        return self.net((features - self.shift) / self.scale)

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
        """``(regions, colours)`` probabilities (columns in the order of :attr:`names`) of each region of
        ``image`` (``(H, W, 3)`` uint8) given as a mask."""
        if not len(masks):
            return np.zeros((0, len(self.names)), np.float32)
        x = torch.from_numpy(np.stack([region_features(image, m) for m in masks]))
        return self(x).softmax(-1).numpy()

    def predict(self, image: np.ndarray, masks: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """``(colour, probability)`` of each region of ``image`` (``(H, W, 3)`` uint8) given as a mask."""
        return [(self.names[int(p.argmax())], round(float(p.max()), 4)) for p in self.probabilities(image, masks)]

    def detection_probabilities(self, pixels: Any, labels: Sequence[str], masks: Any) -> list[np.ndarray | None]:
        """The colour probabilities (:meth:`probabilities`) of each detection whose label the head applies to,
        None for the others.

        Args:
            pixels: the image the detector saw, ``(3, H, W)`` in [0, 1] (tensor or array).
            labels: each detection's label name.
            masks: the detections' ``(N, 1, H, W)`` mask probabilities (thresholded at 0.5).
        """
        rows = [k for k, name in enumerate(labels) if name in self.applies_to]
        out: list[np.ndarray | None] = [None] * len(labels)
        if rows:
            img = torch.as_tensor(pixels).float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
            probs = torch.as_tensor(masks)
            for k, p in zip(rows, self.probabilities(img, [(probs[k, 0] >= 0.5).cpu().numpy() for k in rows])):
                out[k] = p
        return out

    def name_detections(self, pixels: Any, labels: Sequence[str], masks: Any) -> list[tuple[str, float] | None]:
        """``(colour, probability)`` of each detection whose label the head applies to, None for the others
        (arguments as :meth:`detection_probabilities`)."""
        return [None if p is None else (self.names[int(p.argmax())], round(float(p.max()), 4))
                for p in self.detection_probabilities(pixels, labels, masks)]

    def save(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``colors.safetensors`` into ``folder`` (names, sizes and the fit's ``metrics`` in its metadata);
        returns the file."""
        from safetensors.torch import save_file

        path = Path(folder) / COLOR_FILE
        meta = {"names": json.dumps(self.names), "hidden": str(self.hidden),
                "applies_to": json.dumps(list(self.applies_to)), "features": "region_features/24",
                "metrics": json.dumps(metrics or {})}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ColorHead | None:
        """The head stored in a model folder, or None when it has no ``colors.safetensors``.

        Raises:
            ValueError: the file is not a colour head of this version (named in the message).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(folder) / COLOR_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("features") != "region_features/24" or "names" not in meta:
            raise ValueError(f"{path} is not a colour head written by ColorHead.save (metadata {sorted(meta)})")
        head = cls(json.loads(meta["names"]), int(meta.get("hidden", 64)),
                   json.loads(meta.get("applies_to", json.dumps(list(APPLIES_TO)))))
        head.load_state_dict(load_file(str(path)))
        return head.eval()


#: a detected mask stands for a true vehicle (and takes its colour) when they overlap at least this much (IoU)
MATCH_IOU = 0.3
#: where :func:`scene_color_samples` takes each vehicle's pixels from
MASK_SOURCES = ("truth", "detector", "both")


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def scene_color_samples(seed: int, indices: Sequence[int], sizes: Sequence[int] = (128,),
                        progress: bool = False, detector: Any = None, masks: str = "truth"
                        ) -> tuple[np.ndarray, list[str]]:
    """Region features and colour names of every vehicle in SynthDrive scenes ``indices`` of split ``seed``, scene
    ``i`` rendered at ``sizes[i % len(sizes)]``.

    Args:
        detector: a Mask R-CNN :class:`~shusheng.detection.model.InternImageDetector` (eval mode), needed unless
            ``masks="truth"``.
        masks: ``"truth"``: the ground-truth masks; ``"detector"``: the detector's masks of the vehicles it finds
            (each detected car, truck or bus mask overlapping a true vehicle's by at least :data:`MATCH_IOU`,
            the best one, with that vehicle's colour; missed vehicles give no sample), the pixels the head reads in
            use; ``"both"``: one sample of each.
    """
    from pycocotools import mask as mask_util
    from tqdm.auto import tqdm

    from shusheng.data import synthdrive as sd

    if masks not in MASK_SOURCES:
        raise ValueError(f"masks must be one of {MASK_SOURCES}, got {masks!r}")
    if masks != "truth" and detector is None:
        raise ValueError(f"masks={masks!r} needs a detector")
    rows, names = [], []
    for i in tqdm(list(indices), desc="scenes", disable=not progress, mininterval=5):
        img, ann = sd.sample(seed, int(i), int(sizes[int(i) % len(sizes)]))
        pixels = np.asarray(img)
        found: list[np.ndarray] = []
        if masks != "truth":
            with torch.inference_mode():
                r = detector([torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255])[0]
            found = [(m[0] >= 0.5).cpu().numpy() for m, lab in zip(r["masks"], r["labels"])
                     if detector.label_name(int(lab)) in APPLIES_TO]
        # SynthDrive lists the vehicles' objects first, in the order of attributes["vehicles"]
        for obj, v in zip(ann.objects, ann.attributes["vehicles"]):
            truth = mask_util.decode(obj["segmentation"]).astype(bool)
            if masks != "detector":
                rows.append(region_features(pixels, truth))
                names.append(v["color"])
            if found:
                overlaps = [_mask_iou(truth, m) for m in found]
                k = int(np.argmax(overlaps))
                if overlaps[k] >= MATCH_IOU:
                    rows.append(region_features(pixels, found[k]))
                    names.append(v["color"])
    return np.stack(rows) if rows else np.zeros((0, N_FEATURES), np.float32), names


def fit_color_head(n_scenes: int = 3000, sizes: Sequence[int] = (128, 256), val_n: int = 300, epochs: int = 150,
                   hidden: int = 64, seed: int = 0, progress: bool = True, detector: Any = None,
                   masks: str = "truth") -> tuple[ColorHead, dict[str, Any]]:
    """Fit a :class:`ColorHead` on the vehicles of SynthDrive train scenes ``0..n_scenes-1`` and measure it on
    val scenes ``0..val_n-1`` (rendered at the smallest of ``sizes``, the harder case). ``detector`` and
    ``masks``: see :func:`scene_color_samples`; with a detector the val scenes are measured on its masks too
    (``val_accuracy_detector_masks``: what the head meets in use). Returns the head (eval mode) and
    ``{"train_vehicles", "val_vehicles", "val_accuracy", "val_accuracy_by_color", ...}``."""
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_render import COLORS

    names = list(COLORS)
    x, y = scene_color_samples(sd.TRAIN_SEED, range(n_scenes), sizes, progress, detector, masks)
    xv, yv = scene_color_samples(sd.VAL_SEED, range(val_n), (min(sizes),), progress)
    if len(x) == 0:
        raise ValueError("no vehicle samples in the training scenes: give more scenes"
                         + (" (or a detector that finds the vehicles: masks='detector' keeps only those it found)"
                            if masks == "detector" else ""))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ColorHead(names, hidden)
    xt, yt = torch.from_numpy(x), torch.tensor([names.index(c) for c in y])
    head.shift.copy_(xt.mean(0))
    head.scale.copy_(xt.std(0).clamp_min(1e-4))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(256):
            loss = nn.functional.cross_entropy(head(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    metrics: dict[str, Any] = {"train_scenes": n_scenes, "sizes": list(sizes), "masks": masks, "train_vehicles": len(y),
                               "val_scenes": val_n, "val_vehicles": len(yv), "epochs": epochs, "seed": seed,
                               "final_loss": round(float(loss.detach()), 4)}
    if len(yv):
        with torch.inference_mode():
            pred = head(torch.from_numpy(xv)).argmax(-1).tolist()
        hits = [names[p] == t for p, t in zip(pred, yv)]
        metrics["val_accuracy"] = round(float(np.mean(hits)), 4)
        metrics["val_accuracy_by_color"] = {c: round(float(np.mean([h for h, t in zip(hits, yv) if t == c])), 4)
                                            for c in names if c in yv}
    if detector is not None:
        xd, yd = scene_color_samples(sd.VAL_SEED, range(val_n), (min(sizes),), progress, detector, "detector")
        if len(yd):
            with torch.inference_mode():
                pred = head(torch.from_numpy(xd)).argmax(-1).tolist()
            metrics["val_vehicles_detected"] = len(yd)
            metrics["val_accuracy_detector_masks"] = round(float(np.mean([names[p] == t for p, t in zip(pred, yd)])), 4)
    return head, metrics
