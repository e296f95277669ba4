"""``DetectionPipeline``: boxes (and instance masks) of an :class:`InternImageDetector` for a list of images.

    >>> from shusheng.detection.pipelines import DetectionPipeline, PipelineDetector
    >>> pipe = DetectionPipeline.from_pretrained()        # the bundled shusheng-mini-det, or a folder
    >>> out = pipe(["a.png", "b.jpg"], threshold=0.5)
    >>> out.detections[0]          # [{"label": "car", "score": 0.91, "box": [x, y, w, h], "mask": RLE | None}, ...]
    >>> index_folder(..., detector=PipelineDetector(pipe))         # the Detector protocol, for ingest

Images are decoded batch by batch through ``shusheng.data.load_image`` and handed to the detector, which
normalises them with the backbone's mean/std and resizes them keeping the aspect ratio (shorter side
``min_size``, longer at most ``max_size``). An image larger than that is first downscaled by the pipeline, with
Pillow's antialiasing, to exactly the size the detector would resize it to (``input_sizes``): a 4000 x 3000
photograph never becomes a float tensor at full size, and the detector's masks are not pasted at full size (a
hundred of them would take gigabytes). Boxes and masks are always mapped back to the image as loaded (EXIF
orientation applied): ``box`` is ``[x, y, w, h]`` in its pixels; ``mask`` is a COCO run-length encoding
(``{"size": [h, w], "counts": str}``, pycocotools) of the instance mask thresholded at 0.5, at the image's own
size, or None for a head without masks (FCOS). An image that cannot be loaded gets ``None`` and its reason in
``errors`` (``on_error="raise"`` raises instead).

In-domain check: a detector or segmenter folder may hold a ``domain_check.safetensors`` (``shusheng train
domain-check --model DIR``), fitted on the pipeline's ``domain_features``: the per-channel mean and standard
deviation of every tower level the head reads (:mod:`shusheng.detection.domain`, one implementation for both).
``__call__`` computes the same statistics from the level maps the model hands back from its own pass
(``InternImageDetector(images, return_levels=True)``, over each image's cells without the batch padding;
``InternImageSegmenter.segment``), so the check costs no second tower pass and uses no module hooks (a pipeline
may be called from several threads). Without a check, every item is ``in_domain`` with a NaN ``domain_score``.

``SegmentationPipeline`` (semantic segmentation, :class:`~shusheng.detection.segment.InternImageSegmenter`) gives
per image its ``(H, W)`` class-id map at the image's own size and the share of its pixels in each class:

    >>> seg = SegmentationPipeline.from_pretrained()       # the bundled shusheng-mini-seg, or a folder
    >>> out = seg(["a.png"]); out.class_ids[0], out.shares[0]["road"]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shusheng.detection.domain import LevelStatsDomain, tower_level_stats
from shusheng.detection.model import InternImageDetector
from shusheng.detection.segment import InternImageSegmenter
from shusheng.pipelines import Pipeline, PipelineOutput, as_image_list

__all__ = ["BUNDLED_DETECTOR", "DetectionOutput", "DetectionPipeline", "PipelineDetector", "SegmentationOutput",
           "SegmentationPipeline", "detector_input_size", "tower_level_stats"]


@dataclass
class DetectionOutput(PipelineOutput):
    """Per image, its detections best score first (``None`` for an image that failed; see ``errors``).

    Attributes:
        detections: ``[{"label": str, "score": float, "box": [x, y, w, h], "mask": RLE dict | None}, ...]``.
        sizes: ``(width, height)`` of each image as loaded (None when it failed).
        input_sizes: ``(width, height)`` the detector was given: ``sizes[i]``, or the smaller size the pipeline
            downscaled a larger image to (boxes and masks are still in the pixels of ``sizes[i]``).
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    detections: list[list[dict[str, Any]] | None]
    sizes: list[tuple[int, int] | None]
    input_sizes: list[tuple[int, int] | None] = field(default_factory=list)

    def resized(self, i: int) -> bool:
        """Whether image ``i`` was downscaled by the pipeline before the detector saw it."""
        return self.sizes[i] is not None and tuple(self.input_sizes[i]) != tuple(self.sizes[i])


#: the bundled detector (Mask R-CNN), written by ``shusheng train detect``
BUNDLED_DETECTOR = "shusheng-mini-det"


def detector_input_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` a torchvision detector resizes a ``width x height`` image to: aspect kept, shorter side
    ``min_size`` unless the longer side would pass ``max_size`` (rounded, so that the detector's own resize of an
    image at this size keeps it as it is)."""
    s = min(min_size / min(width, height), max_size / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class DetectionPipeline(LevelStatsDomain, Pipeline):
    """Object detection with an :class:`~shusheng.detection.model.InternImageDetector`.

    Args:
        model: the detector.
        domain_check: a :class:`~shusheng.pipelines.DomainCheck` over :meth:`domain_features`, or None
            (``from_pretrained`` loads the one stored with the weights).
        runtime: only ``"torch"`` for now.
        color_head: a :class:`~shusheng.detection.colors.ColorHead` naming the colour of every detection whose
            label it applies to (cars, trucks, buses) from its mask, or None (``from_pretrained`` loads the
            ``colors.safetensors`` stored with the weights). Needs a detector that predicts masks.
    """

    model_class = InternImageDetector
    bundled_model = BUNDLED_DETECTOR

    def __init__(self, model: InternImageDetector, domain_check: Any = None, runtime: str = "torch",
                 color_head: Any = None):
        if runtime != "torch":
            raise ValueError(f"DetectionPipeline runs on runtime='torch' only for now, got {runtime!r}")
        if color_head is not None and model.config.head != "maskrcnn":
            raise ValueError("a colour head reads instance masks: it needs a 'maskrcnn' detector, not "
                             f"{model.config.head!r}")
        super().__init__(model, domain_check, runtime)
        self.color_head = color_head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        runtime: str = "torch", **kwargs: Any) -> DetectionPipeline:
        """Load a detector folder written by ``InternImageDetector.save_pretrained`` (None: the bundled
        ``shusheng-mini-det``) with its in-domain check, if it has one.

        Raises:
            shusheng.weights.BundledWeightsNotFound: ``path`` is None and no detector is bundled here.
            FileNotFoundError: ``path`` is not a model folder.
        """
        if path is None:
            from shusheng.weights import BundledWeightsNotFound, bundled_path

            try:
                path = bundled_path(cls.bundled_model)
            except BundledWeightsNotFound as e:
                raise BundledWeightsNotFound(
                    f"no bundled detector here ({e}); or pass the folder of a detector saved with "
                    "InternImageDetector.save_pretrained (shusheng detect --model DIR)") from None
        from shusheng.detection.colors import ColorHead

        pipe = super().from_pretrained(path, device=device, runtime=runtime, **kwargs)
        if pipe.model.config.head == "maskrcnn":
            pipe.color_head = ColorHead.load(path)
        return pipe

    def _prepare(self, img: Any) -> Any:
        """An image larger than the detector's input, downscaled (antialiased) to the detector's own size."""
        from PIL import Image

        c = self.model.config
        size = detector_input_size(*img.size, c.min_size, c.max_size)
        if size[0] >= img.size[0] and size[1] >= img.size[1]:
            return img
        return img.resize(size, Image.Resampling.BILINEAR)

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
        out = {"detections": [None] * n, "sizes": [None] * n, "input_sizes": [None] * n, **self._empty(n)}
        with torch.inference_mode():
            for batch in self.batches(images, batch_size, on_error, own_size=True, prepare=self._prepare):
                if not batch.images:  # every image of this stretch failed
                    self._fill(out, batch, [], [])
                    continue
                results, levels, padded_sizes = self.model(batch.images, return_levels=True)
                for i, img, size, res in zip(batch.index, batch.images, batch.sizes, results):
                    given = (int(img.shape[2]), int(img.shape[1]))
                    out["sizes"][i], out["input_sizes"][i] = (int(size[0]), int(size[1])), given
                    out["detections"][i] = self._convert(res, threshold, given, out["sizes"][i], img)
                self._fill(out, batch, *self.score_levels(levels, len(batch.index), padded_sizes))
        return DetectionOutput(**out)

    def _convert(self, res: dict[str, torch.Tensor], threshold: float, given: tuple[int, int],
                 size: tuple[int, int], pixels: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Detections above ``threshold`` in the pixels of the image as loaded (``size``), from the detector's on
        the image it was given (``given``; ``pixels``, ``(3, H, W)`` in [0, 1], what the colour head reads)."""
        keep = res["scores"] >= threshold
        boxes = res["boxes"][keep].float()
        (gw, gh), (w, h) = given, size
        if given != size:
            boxes = boxes * boxes.new_tensor([w / gw, h / gh, w / gw, h / gh])
        scores = res["scores"][keep].float().cpu().tolist()
        labels = res["labels"][keep].cpu().tolist()
        masks = res["masks"][keep] if "masks" in res else None  # (N, 1, gh, gw) probabilities
        colors = [None] * len(labels)
        if self.color_head is not None and masks is not None and pixels is not None:
            colors = self.color_head.name_detections(pixels, [self.model.label_name(lab) for lab in labels], masks)
        found = []
        for k, ((x0, y0, x1, y1), s, lab) in enumerate(zip(boxes.cpu().tolist(), scores, labels)):
            mask = None
            if masks is not None:
                m = masks[k:k + 1].float()
                if given != size:  # one instance at a time at full size
                    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                mask = _rle((m[0, 0] >= 0.5).cpu().numpy())
            found.append({"label": self.model.label_name(lab), "score": round(float(s), 4),
                          "box": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                          "mask": mask})
            if colors[k] is not None:
                found[-1]["color"], found[-1]["color_score"] = colors[k]
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


@dataclass
class SegmentationOutput(PipelineOutput):
    """Per image, its class map and class shares (``None`` for an image that failed; see ``errors``).

    Attributes:
        class_ids: ``(H, W)`` int64 arrays at the image's own size; id ``k`` names ``labels[k]``.
        shares: ``{class name: share of the image's pixels}`` over every class (summing to 1).
        sizes: ``(width, height)`` of each image as loaded (None when it failed).
        labels: the model's class names.
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    class_ids: list[np.ndarray | None]
    shares: list[dict[str, float] | None]
    sizes: list[tuple[int, int] | None]
    labels: list[str]


class SegmentationPipeline(LevelStatsDomain, Pipeline):
    """Semantic segmentation with an :class:`~shusheng.detection.segment.InternImageSegmenter`.

    Images are loaded through ``shusheng.data.load_image``, resized to the model's square ``image_size`` and
    normalised (``resolve_transform``, from the preprocessing stored with the weights); the logits are resized
    back to each image's own size before the argmax. The in-domain check is the one stored with the weights, over
    the same features as a detector's (the per-channel mean and standard deviation of every tower level the head
    reads, taken from the segmentation pass itself); without one, every item is ``in_domain`` with a NaN
    ``domain_score``.

    Args:
        model: the segmenter.
        domain_check: a :class:`~shusheng.pipelines.DomainCheck` over :meth:`domain_features`, or None.
        runtime: what runs :meth:`image_module` (the tower and the UperNet head, up to the stride-4 logits):
            ``"torch"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"``; the resize and argmax stay in PyTorch.
    """

    model_class = InternImageSegmenter
    bundled_model = "shusheng-mini-seg"

    def image_module(self) -> torch.nn.Module:
        """``pixels -> (logits at stride 4, tower levels...)`` (:class:`~shusheng.detection.segment.SegmenterImageSide`)."""
        from shusheng.detection.segment import SegmenterImageSide

        return SegmenterImageSide(self.model)

    def __call__(self, images: Any, batch_size: int = 4, on_error: str = "item") -> SegmentationOutput:
        """Segment images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            batch_size: images decoded and segmented at a time.
            on_error: ``"item"``: an image that cannot be loaded fails its own item (``errors[i]``);
                ``"raise"``: its ``ImageLoadError`` ends the call.

        Returns:
            :class:`SegmentationOutput`.
        """
        images = as_image_list(images)
        n = len(images)
        labels = list(self.model.labels)
        out = {"class_ids": [None] * n, "shares": [None] * n, "sizes": [None] * n, **self._empty(n)}
        with torch.inference_mode():
            for batch in self.batches(images, batch_size, on_error):
                if batch.pixels is None:
                    self._fill(out, batch, [], [])
                    continue
                logits, *feats = self.image_outputs(batch.pixels)
                ids = self.model.class_maps(logits, batch.sizes)
                for i, size, m in zip(batch.index, batch.sizes, ids):
                    out["class_ids"][i] = m
                    out["shares"][i] = self.model.class_shares(m, labels)
                    out["sizes"][i] = (int(size[0]), int(size[1]))
                self._fill(out, batch, *self.score_levels(feats, len(batch.index)))
        return SegmentationOutput(**out, labels=labels)
