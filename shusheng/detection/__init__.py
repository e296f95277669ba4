"""Detection: region detectors behind one small protocol.

    >>> from shusheng.detection import DenseObjectDetector
    >>> from shusheng.miniclip import load_bundled
    >>> detector = DenseObjectDetector(load_bundled())
    >>> detector.detect("street.png")      # [{"box": [x, y, w, h], "label": "red car", "score": 0.93}, ...]

Anything with the :class:`Detector` shape plugs into ``shusheng.retrieval_index`` ingest (``--detect``).

Mask R-CNN / FCOS (torchvision) on a feature pyramid over any ``create_backbone`` tower (docs/detection.md):

    >>> from shusheng.detection import DetectionPipeline, DetectorConfig, InternImageDetector, PipelineDetector
    >>> model = InternImageDetector(DetectorConfig(backbone="internimage_t", head="fcos"))   # random init
    >>> DetectionPipeline(model)(["street.png"]).detections

Semantic segmentation, UperNet on any such tower (class id ``k`` = ``labels[k]``, SynthDrive's classes by default):

    >>> from shusheng.detection import InternImageSegmenter, SegmentationPipeline, SegmenterConfig
    >>> model = InternImageSegmenter(SegmenterConfig(backbone="internimage_t"))       # random init
    >>> SegmentationPipeline(model)(["street.png"]).class_ids                          # [(H, W) int64 ids]

Importing this package is light; torch models load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

_EXPORTS = {
    "DenseObjectDetector": "shusheng.detection.dense",
    "BackboneFPN": "shusheng.detection.fpn",
    "DetectorConfig": "shusheng.detection.model",
    "InternImageDetector": "shusheng.detection.model",
    "DetectionOutput": "shusheng.detection.pipelines",
    "DetectionPipeline": "shusheng.detection.pipelines",
    "PipelineDetector": "shusheng.detection.pipelines",
    "SegmenterConfig": "shusheng.detection.segment",
    "InternImageSegmenter": "shusheng.detection.segment",
    "SegmentationOutput": "shusheng.detection.pipelines",
    "SegmentationPipeline": "shusheng.detection.pipelines",
}

__all__ = sorted([*_EXPORTS, "Detector"])


@runtime_checkable
class Detector(Protocol):
    """What ingest needs from a region detector.

    Attributes:
        name: recorded by the index next to the region entries it produced.
    """

    name: str

    def detect(self, image: Any) -> list[dict[str, Any]]:
        """``[{"box": [x, y, w, h], "label": str, "score": float}, ...]`` in pixels of ``image``."""
        ...

    def __call__(self, image: Any) -> list[list[int]]:
        """Boxes ``[[x, y, w, h], ...]`` in pixels of ``image``."""
        ...


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shusheng.detection' has no attribute {name!r}")
