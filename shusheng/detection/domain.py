"""The in-domain features of the dense models (detectors and segmenters): statistics of the tower levels their
head reads, shared by :class:`~shusheng.detection.pipelines.DetectionPipeline` and
:class:`~shusheng.detection.pipelines.SegmentationPipeline`.

    >>> feats = tower_level_stats(levels)                      # (B, 2 * sum(C_l)): per-channel means, then stds
    >>> feats = tower_level_stats(levels, strides, sizes)      # a zero-padded batch: each image's own cells only

The features of an image are the per-channel mean and standard deviation of every level map the head reads
(strides 4-32 for InternImage). On the tower the bundled detector starts from, pooled last-level features
flagged only 45 % of the photographs tried, these level statistics all of them (``docs/detection.md``). The check (:class:`~shusheng.pipelines.DomainCheck`) is fitted on
them by ``shusheng train domain-check --model DIR``.

Both models hand their level maps back from their own inference pass (``InternImageDetector(images,
return_levels=True)``, ``InternImageSegmenter.segment``), so a pipeline scores an image without a second tower
pass and without module hooks (state on a shared module that two threads running one pipeline would overwrite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["LevelStatsDomain", "tower_level_stats"]


def tower_level_stats(levels: Sequence[torch.Tensor], strides: Sequence[int] | None = None,
                      sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The in-domain features of a dense model: ``(B, 2 * sum(C_l))``, the per-channel means of every level map
    ``(B, C_l, h_l, w_l)`` and then their (biased) standard deviations, over the cells of each image.

    Args:
        levels: the level maps the head reads, finest first.
        strides: the stride of each level (needed with ``sizes``).
        sizes: ``(height, width)`` in pixels of each image of a zero-padded batch (torchvision's
            ``ImageList.image_sizes``): only its ``ceil(h / stride) x ceil(w / stride)`` cells count, not the
            padding. None: the whole maps (a batch of images of one size).
    """
    if sizes is not None and (strides is None or len(strides) < len(levels)):
        raise ValueError("tower_level_stats needs the stride of every level to leave a batch's padding out")
    means, stds = [], []
    for k, f in enumerate(levels):
        f = f.float()
        if sizes is None:
            flat = [f.flatten(2)]
        else:
            stride = strides[k]
            flat = [f[i:i + 1, :, :math.ceil(h / stride), :math.ceil(w / stride)].flatten(2)
                    for i, (h, w) in enumerate(sizes)]
        means.append(torch.cat([x.mean(-1) for x in flat]))  # (B, C_l)
        stds.append(torch.cat([x.std(-1, unbiased=False) for x in flat]))
    return torch.cat(means + stds, dim=1)


class LevelStatsDomain:
    """The in-domain check of a pipeline whose model reads tower levels (a mixin before
    :class:`~shusheng.pipelines.Pipeline`). The model has ``forward_features(pixels)`` (the level maps its head
    reads) and ``level_strides``."""

    def domain_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` in-domain features of a batch of transformed images (the pipeline's ``transform``):
        :func:`tower_level_stats` of the tower levels the head reads. ``__call__`` computes the same from its own
        pass."""
        with torch.inference_mode():
            return tower_level_stats(self.model.forward_features(pixels))

    def score_levels(self, levels: Sequence[torch.Tensor], n: int,
                     sizes: Sequence[tuple[int, int]] | None = None) -> tuple[list[bool], list[float]]:
        """``(in_domain, domain_score)`` of ``n`` images from the level maps of the model's own pass (``sizes``:
        see :func:`tower_level_stats`); without a check: in-domain with a NaN score (nothing is computed)."""
        if self.domain_check is None:
            return self.score_features(None, n)
        return self.score_features(tower_level_stats(levels, self.model.level_strides, sizes), n)
