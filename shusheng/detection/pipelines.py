"""``DetectionPipeline``: boxes (and instance masks) of an :class:`InternImageDetector` for a list of images.

    >>> from shusheng.detection.pipelines import DetectionPipeline, PipelineDetector
    >>> pipe = DetectionPipeline.from_pretrained("out/det")         # no bundled detector exists yet
    >>> out = pipe(["a.png", "b.jpg"], threshold=0.5)
    >>> out.detections[0]          # [{"label": "car", "score": 0.91, "box": [x, y, w, h], "mask": RLE | None}, ...]
    >>> index_folder(..., detector=PipelineDetector(pipe))         # the Detector protocol, for ingest

Images are decoded batch by batch through ``shusheng.data.load_image`` and handed to the detector at their own
size: the detector normalises them with the backbone's mean/std, resizes them keeping the aspect ratio, and
maps its boxes and masks back, so ``box`` is ``[x, y, w, h]`` in the pixels of the image as loaded (EXIF
orientation applied). ``mask`` is a COCO run-length encoding (``{"size": [h, w], "counts": str}``, pycocotools)
of the instance mask thresholded at 0.5, or None for a head without masks (FCOS). An image that cannot be loaded
gets ``None`` and its reason in ``errors`` (``on_error="raise"`` raises instead). No in-domain check exists for
detectors yet: every item is ``in_domain`` with a NaN ``domain_score``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shusheng.detection.model import InternImageDetector
from shusheng.pipelines import Pipeline, PipelineOutput, as_image_list

__all__ = ["DetectionOutput", "DetectionPipeline", "PipelineDetector"]


@dataclass
class DetectionOutput(PipelineOutput):
    """Per image, its detections best score first (``None`` for an image that failed; see ``errors``).

    Attributes:
        detections: ``[{"label": str, "score": float, "box": [x, y, w, h], "mask": RLE dict | None}, ...]``.
        sizes: ``(width, height)`` of each image as loaded (None when it failed).
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    detections: list[list[dict[str, Any]] | None]
    sizes: list[tuple[int, int] | None]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class DetectionPipeline(Pipeline):
    """Object detection with an :class:`~shusheng.detection.model.InternImageDetector`.

    Args:
        model: the detector.
        domain_check: must be None (detectors have no in-domain check yet).
        runtime: only ``"torch"`` for now.
    """

    model_class = InternImageDetector
    bundled_model = None  # no trained detector is bundled yet (issue 18)

    def __init__(self, model: InternImageDetector, domain_check: Any = None, runtime: str = "torch"):
        if runtime != "torch":
            raise ValueError(f"DetectionPipeline runs on runtime='torch' only for now, got {runtime!r}")
        if domain_check is not None:
            raise ValueError("detectors have no in-domain check yet; pass domain_check=None")
        super().__init__(model, None, runtime)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        runtime: str = "torch", **kwargs: Any) -> DetectionPipeline:
        """Load a detector folder written by ``InternImageDetector.save_pretrained``.

        Raises:
            FileNotFoundError: ``path`` is None (no bundled detector exists yet) or not a model folder.
        """
        if path is None:
            from shusheng.weights import BundledWeightsNotFound

            raise BundledWeightsNotFound("no bundled detector exists yet: pass the folder of a detector saved with "
                                         "InternImageDetector.save_pretrained (shusheng detect --model DIR)")
        model = cls.model_class.from_pretrained(path, **kwargs).to(device)
        return cls(model, None, runtime=runtime)

    def __call__(self, images: Any, threshold: float = 0.5, batch_size: int = 4,
                 on_error: str = "item") -> DetectionOutput:
        """Detect objects in images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            threshold: lowest score reported (the model never reports below its ``config.score_threshold``).
            batch_size: images decoded and detected at a time.
            on_error: ``"item"`` or ``"raise"`` (see the module docstring).

        Returns:
            :class:`DetectionOutput`.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        images = as_image_list(images)
        n = len(images)
        out = {"detections": [None] * n, "sizes": [None] * n, **self._empty(n)}
        with torch.inference_mode():
            for batch in self.batches(images, batch_size, on_error, own_size=True):
                results = self.model(batch.images) if batch.images else []
                for i, img, res in zip(batch.index, batch.images, results):
                    out["sizes"][i] = (int(img.shape[2]), int(img.shape[1]))
                    out["detections"][i] = self._convert(res, threshold)
                self._fill(out, batch, [True] * len(batch.index), [math.nan] * len(batch.index))
        return DetectionOutput(**out)

    def _convert(self, res: dict[str, torch.Tensor], threshold: float) -> list[dict[str, Any]]:
        keep = res["scores"] >= threshold
        boxes = res["boxes"][keep].float().cpu().tolist()
        scores = res["scores"][keep].float().cpu().tolist()
        labels = res["labels"][keep].cpu().tolist()
        masks = (res["masks"][keep, 0] >= 0.5).cpu().numpy() if "masks" in res else None
        found = []
        for k, ((x0, y0, x1, y1), s, lab) in enumerate(zip(boxes, scores, labels)):
            found.append({"label": self.model.label_name(lab), "score": round(float(s), 4),
                          "box": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                          "mask": None if masks is None else _rle(masks[k])})
        return sorted(found, key=lambda d: -d["score"])


class PipelineDetector:
    """A :class:`DetectionPipeline` as a :class:`~shusheng.detection.Detector` (what ingest's ``--detect``
    takes).

    Args:
        pipeline: the pipeline.
        threshold: lowest score reported.
        name: recorded by the index (default ``"<backbone>-<head>"``).
    """

    def __init__(self, pipeline: DetectionPipeline, threshold: float = 0.5, name: str | None = None):
        self.pipeline, self.threshold = pipeline, float(threshold)
        c = pipeline.model.config
        self.name = name or f"{c.backbone}-{c.head}"

    def detect(self, image: Any) -> list[dict[str, Any]]:
        """``[{"box": [x, y, w, h], "label": str, "score": float}, ...]`` in pixels of ``image``, best first.

        Raises:
            shusheng.data.ImageLoadError: the image cannot be loaded.
        """
        out = self.pipeline([image], threshold=self.threshold, batch_size=1, on_error="raise")
        return [{"box": d["box"], "label": d["label"], "score": d["score"]} for d in out.detections[0]]

    def __call__(self, image: Any) -> list[list[int]]:
        """Integer boxes ``[[x, y, w, h], ...]`` covering the detections (the protocol's boxes only)."""
        boxes = []
        for d in self.detect(image):
            x, y, w, h = d["box"]
            x0, y0 = math.floor(x), math.floor(y)
            boxes.append([x0, y0, math.ceil(x + w) - x0, math.ceil(y + h) - y0])
        return boxes
