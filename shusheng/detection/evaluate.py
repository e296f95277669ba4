"""COCO evaluation of detectors and segmenters on SynthDrive (or any list of images with COCO-style objects).

    >>> from shusheng.detection.evaluate import synthdrive_scenes, evaluate_detector
    >>> scenes = synthdrive_scenes("test", n=1000, size=256)   # the fixed test seed, rendered at 256 px
    >>> evaluate_detector(model, scenes)["bbox"]["AP"]

Box and mask AP are pycocotools' ``COCOeval`` numbers (AP@[.5:.95], AP50, AP75, per-class AP). The evaluation
never fails deep inside pycocotools: a model that finds nothing scores 0, images without objects are allowed, and
a class absent from the ground truth gets ``None`` (not -1) in the per-class table.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["Scene", "synthdrive_scenes", "evaluate_detector", "coco_ground_truth", "coco_eval",
           "evaluate_segmenter", "confusion_miou"]


@dataclass
class Scene:
    """One evaluation image: ``image`` (H, W, 3) uint8, its COCO ``objects`` (``category_id``, ``bbox`` [x, y, w, h],
    ``segmentation`` RLE, ``area``) and, for segmentation, ``semantic`` (H, W) class ids."""

    image: np.ndarray
    objects: list[dict[str, Any]] = field(default_factory=list)
    semantic: np.ndarray | None = None


def synthdrive_scenes(split: str | int = "test", n: int = 1000, size: int = 256, start: int = 0) -> list[Scene]:
    """``n`` SynthDrive scenes of a split (``"train"``, ``"val"``, ``"test"`` or a split seed) rendered at ``size``
    pixels. ``"test"`` is the fixed test seed at any resolution (the detection benchmark renders it at the
    training resolution rather than the 128 px of the captioning test set)."""
    from shusheng.data import synthdrive as sd

    seed = sd.SPLITS[split][0] if isinstance(split, str) else int(split)
    out = []
    for i in range(start, start + n):
        img, ann = sd.sample(seed, i, size)
        out.append(Scene(np.array(img, dtype=np.uint8), list(ann.objects), ann.semantic))
    return out


def coco_ground_truth(scenes: Sequence[Scene], categories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A COCO ground-truth dict for ``scenes`` (image ids are their positions)."""
    images, annotations = [], []
    for i, s in enumerate(scenes):
        h, w = s.image.shape[:2]
        images.append({"id": i, "width": int(w), "height": int(h)})
        for o in s.objects:
            x, y, bw, bh = (float(v) for v in o["bbox"])
            ann = {"id": len(annotations) + 1, "image_id": i, "category_id": int(o["category_id"]),
                   "bbox": [x, y, bw, bh], "area": float(o.get("area", bw * bh)), "iscrowd": 0}
            if o.get("segmentation") is not None:
                ann["segmentation"] = o["segmentation"]
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


def coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox") -> dict[str, Any]:
    """pycocotools' COCOeval of ``results`` (``image_id``, ``category_id``, ``score``, ``bbox`` or
    ``segmentation``) against ``gt``: ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100",
    "per_class": {name: AP or None}}``. No results, or no ground truth, gives zeros rather than an exception."""
    mask_api = require("pycocotools", extra="data")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    del mask_api
    names = {c["id"]: c["name"] for c in gt["categories"]}
    empty = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP_small": 0.0, "AP_medium": 0.0, "AP_large": 0.0, "AR100": 0.0,
             "per_class": {n: (0.0 if any(a["category_id"] == c for a in gt["annotations"]) else None)
                           for c, n in names.items()}, "n_results": len(results)}
    if not gt["annotations"] or not results:
        return empty
    key = "segmentation" if iou_type == "segm" else "bbox"
    results = [r for r in results if r.get(key) is not None]
    if not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = {k: list(v) for k, v in gt.items()}
        coco.createIndex()
        dets = coco.loadRes(results)
        ev = COCOeval(coco, dets, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[cid]] = float(p.mean()) if p.size else None
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]), "AP_small": float(s[3]),
            "AP_medium": float(s[4]), "AP_large": float(s[5]), "AR100": float(s[8]), "per_class": per_class,
            "n_results": len(results)}


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


@torch.no_grad()
def detect_scenes(model, scenes: Sequence[Scene], batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Raw detections of an :class:`~shusheng.detection.model.InternImageDetector` on ``scenes``: per image
    ``{"boxes" (N, 4) xyxy, "labels", "scores"(, "masks" (N, 1, H, W) probabilities)}`` as numpy arrays."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = []
    try:
        for b in tqdm(range(0, len(scenes), batch_size), desc="detect", disable=not progress, mininterval=5):
            found = model([_as_tensor(s.image) for s in scenes[b:b + batch_size]])
            out.extend({k: v.cpu().numpy() for k, v in r.items()} for r in found)
    finally:
        model.train(was_training)
    return out


def detections_to_coco(found: Sequence[dict], labels_to_ids: Sequence[int] | None = None,
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result entries from :func:`detect_scenes`' output (image ids are positions). ``labels_to_ids[k - 1]``
    is the category id of label ``k`` (default: the label itself)."""
    from pycocotools import mask as mask_util

    results = []
    for i, r in enumerate(found):
        masks = r.get("masks")
        for j, (box, label, score) in enumerate(zip(r["boxes"], r["labels"], r["scores"])):
            x0, y0, x1, y1 = (float(v) for v in box)
            cid = int(label) if labels_to_ids is None else int(labels_to_ids[int(label) - 1])
            entry = {"image_id": i, "category_id": cid, "score": float(score), "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if masks is not None:
                m = np.asfortranarray((masks[j, 0] >= mask_threshold).astype(np.uint8))
                rle = mask_util.encode(m)
                rle["counts"] = rle["counts"].decode("ascii")
                entry["segmentation"] = rle
            results.append(entry)
    return results


def evaluate_detector(model, scenes: Sequence[Scene], categories: Sequence[dict[str, Any]] | None = None,
                      batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Box (and, for Mask R-CNN, mask) COCO AP of ``model`` on ``scenes``: ``{"bbox": {...}, "segm": {...} or
    None, "n_images", "n_objects"}`` (see :func:`coco_eval`). Labels ``1..K`` are matched to ``categories`` by
    name (default: SynthDrive's COCO categories)."""
    if categories is None:
        from shusheng.data.synthdrive import COCO_CATEGORIES

        categories = COCO_CATEGORIES
    by_name = {c["name"]: int(c["id"]) for c in categories}
    missing = [n for n in model.labels if n not in by_name]
    if missing:
        raise ValueError(f"the model's labels {missing} are not among the evaluation categories {sorted(by_name)}")
    ids = [by_name[n] for n in model.labels]
    gt = coco_ground_truth(scenes, categories)
    found = detect_scenes(model, scenes, batch_size, progress)
    results = detections_to_coco(found, ids)
    out = {"bbox": coco_eval(gt, results, "bbox"), "segm": None, "n_images": len(scenes),
           "n_objects": len(gt["annotations"])}
    if model.config.head == "maskrcnn":
        out["segm"] = coco_eval(gt, results, "segm")
    return out


def confusion_miou(pred: np.ndarray, target: np.ndarray, num_classes: int,
                   confusion: np.ndarray | None = None) -> np.ndarray:
    """Add ``pred`` vs ``target`` class-id maps (any shape, same size) to a ``(C, C)`` confusion matrix (rows:
    ground truth) and return it. Ids outside ``[0, num_classes)`` in ``target`` are ignored."""
    if confusion is None:
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    t, p = target.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
    ok = (t >= 0) & (t < num_classes)
    confusion += np.bincount(t[ok] * num_classes + np.clip(p[ok], 0, num_classes - 1),
                             minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return confusion


def iou_table(confusion: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU and their mean over the classes present in the ground truth (``None`` for absent ones)."""
    tp = np.diag(confusion).astype(np.float64)
    gt, pred = confusion.sum(1), confusion.sum(0)
    union = gt + pred - tp
    per_class = {n: (float(tp[k] / union[k]) if gt[k] > 0 else None) for k, n in enumerate(names)}
    present = [v for v in per_class.values() if v is not None]
    return {"mIoU": float(np.mean(present)) if present else 0.0, "per_class": per_class,
            "pixel_accuracy": float(tp.sum() / max(1, confusion.sum()))}


def evaluate_segmenter(predict, scenes: Sequence[Scene], names: Sequence[str], batch_size: int = 8,
                       progress: bool = False) -> dict[str, Any]:
    """mIoU of ``predict(list of (H, W, 3) uint8) -> list of (H, W) class ids`` against the scenes' semantic
    masks; ``names[k]`` names class id ``k``."""
    from tqdm.auto import tqdm

    confusion = None
    for b in tqdm(range(0, len(scenes), batch_size), desc="segment", disable=not progress, mininterval=5):
        chunk = scenes[b:b + batch_size]
        preds = list(predict([s.image for s in chunk]))
        if len(preds) != len(chunk):
            raise ValueError(f"predict returned {len(preds)} maps for {len(chunk)} images")
        for s, p in zip(chunk, preds):
            if s.semantic is None:
                raise ValueError("a scene without a semantic mask cannot be scored")
            confusion = confusion_miou(np.asarray(p), s.semantic, len(names), confusion)
    if confusion is None:
        raise ValueError("no scenes to evaluate")
    return {**iou_table(confusion, names), "n_images": len(scenes)}
