"""Detection: region detectors behind one small protocol.

    >>> from shusheng.detection import DenseObjectDetector
    >>> from shusheng.miniclip import load_bundled
    >>> detector = DenseObjectDetector(load_bundled())
    >>> detector.detect("street.png")      # [{"box": [x, y, w, h], "label": "red car", "score": 0.93}, ...]

Anything with the :class:`Detector` shape plugs into ``shusheng.retrieval_index`` ingest (``--detect``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["DenseObjectDetector", "Detector"]


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
    if name == "DenseObjectDetector":
        from shusheng.detection.dense import DenseObjectDetector

        return DenseObjectDetector
    raise AttributeError(f"module 'shusheng.detection' has no attribute {name!r}")
