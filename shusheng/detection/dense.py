"""Region detection from a dense tower's object head (the bundled ``shusheng-mini-clip``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shusheng.backbone.dense_tower import dense_boxes

if TYPE_CHECKING:
    from shusheng.miniclip import MiniClip

__all__ = ["DenseObjectDetector"]


class DenseObjectDetector:
    """Object boxes from a MiniClip tower's dense head: a region detector for ``index_folder(detector=...)``.

    The image is resized (aspect ratio kept) so that its short side is the model's ``image_size``, with both
    sides rounded to multiples of 32, so the whole picture is seen. Per object group (vehicle, person,
    traffic light, sign), stride-8 cells whose best label probability is at least ``threshold`` are joined
    into 4-connected components. Each component becomes one box: the cells' extent mapped back to image
    pixels, labelled with its most probable label (``shusheng.data.synthdrive.DENSE_LABELS``).

    Boxes are as coarse as the cells: 8 model pixels, i.e. 16 pixels of a 256-pixel image. Touching objects of
    one group merge into one box. The head was trained on SynthDrive only: on other pictures it finds
    SynthDrive-like objects at best.

    Args:
        model: a :class:`~shusheng.miniclip.MiniClip` with a dense head (``num_dense_labels > 0``), e.g.
            :func:`shusheng.miniclip.load_bundled`.
        threshold: minimum cell probability.
        min_cells: smallest component kept.

    Attributes:
        name: ``"<model name>-dense-head"`` (recorded by the index with the region entries).
    """

    def __init__(self, model: MiniClip, threshold: float = 0.5, min_cells: int = 1):
        if model.visual.num_dense_labels == 0:
            raise ValueError(f"{model.name} has no dense object head (num_dense_labels = 0): it cannot detect")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        from shusheng.data.synthdrive import DENSE_LABELS

        if model.visual.num_dense_labels != len(DENSE_LABELS):
            raise ValueError(f"the dense head has {model.visual.num_dense_labels} labels, expected "
                             f"{len(DENSE_LABELS)} (shusheng.data.synthdrive.DENSE_LABELS)")
        self.model, self.threshold, self.min_cells = model, float(threshold), int(min_cells)
        self.labels = DENSE_LABELS
        self.name = f"{model.name}-dense-head"

    @torch.inference_mode()
    def detect(self, image: Any) -> list[dict[str, Any]]:
        """``[{"box": [x, y, w, h], "label": str, "score": float}, ...]`` in pixels of ``image`` (anything
        ``shusheng.data.load_image`` opens), best score first."""
        from PIL import Image

        from shusheng.data import load_image

        img = load_image(image)
        w, h = img.size
        side = self.model.config.image_size
        scale = side / min(w, h)
        in_w, in_h = (max(32, int(round(v * scale / 32)) * 32) for v in (w, h))
        resized = img.resize((in_w, in_h), resample=Image.Resampling[self.model.config.interpolation.upper()])
        u8 = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
        was_training = self.model.training
        self.model.eval()
        try:
            dense = self.model.visual.features_and_dense(self.model.normalize_uint8(u8.to(self.model.device)))[1]
        finally:
            self.model.train(was_training)
        prob = torch.sigmoid(dense[0].float()).cpu().numpy()  # (L, gh, gw)
        return dense_boxes(prob, (w, h), self.labels, self.threshold, self.min_cells)

    def __call__(self, image: Any) -> list[list[int]]:
        """Boxes ``[[x, y, w, h], ...]`` only (the :class:`~shusheng.detection.Detector` protocol)."""
        return [d["box"] for d in self.detect(image)]
