"""A feature pyramid on any tower with ``forward_intermediates`` + ``feature_info`` (InternImage, timm models).

    >>> from shusheng.backbone import create_backbone
    >>> fpn = BackboneFPN(create_backbone("internimage_t"), out_channels=256)
    >>> maps = fpn(images)          # OrderedDict "0".."3" (strides 4, 8, 16, 32) and "pool" (stride 64)
    >>> levels = fpn.levels(images); maps = fpn.pyramid(levels)    # the same, with the tower levels in hand

The output is what torchvision's detection models expect of a backbone: an ``OrderedDict`` of NCHW maps with
``out_channels`` channels each, ``out_channels`` set as an attribute.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BackboneFPN"]


class BackboneFPN(nn.Module):
    """``torchvision.ops.FeaturePyramidNetwork`` (+ ``LastLevelMaxPool``) over a tower's level outputs.

    Args:
        backbone: a tower from ``shusheng.backbone.create_backbone`` exposing ``forward_intermediates(x, indices)``
            (NCHW maps) and ``feature_info`` (``num_chs`` and ``reduction`` per level), e.g. any InternImage.
        out_channels: channels of every pyramid map.
        indices: the levels used (default: all, i.e. strides 4/8/16/32 for InternImage).
        prune: drop what the pyramid does not read (the classifier head, levels after the last used one)
            when the tower supports ``prune_intermediate_layers``.

    Attributes:
        out_channels: channels of every map (torchvision reads it).
        strides: stride of each returned map, in order (the max-pool level last).
        names: the keys of the returned maps.

    Raises:
        TypeError: the tower has no ``forward_intermediates`` or ``feature_info``.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256, indices: Sequence[int] | None = None,
                 prune: bool = True):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        info = getattr(backbone, "feature_info", None)
        if not callable(getattr(backbone, "forward_intermediates", None)) or info is None:
            raise TypeError(f"{type(backbone).__name__} has no forward_intermediates()/feature_info: a feature "
                            "pyramid needs a tower with level outputs (InternImage or a timm model)")
        info = [dict(i) for i in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        n = len(info)
        indices = list(range(n)) if indices is None else [i % n for i in indices]
        if not indices or sorted(set(indices)) != indices:
            raise ValueError(f"indices must be distinct increasing levels of the {n} the tower has, got {indices}")
        if prune and hasattr(backbone, "prune_intermediate_layers"):
            backbone.prune_intermediate_layers(indices, prune_head=True)
        self.backbone = backbone
        self.indices = indices
        in_channels = [int(info[i]["num_chs"]) for i in indices]
        self.strides = [int(info[i]["reduction"]) for i in indices]
        self.strides.append(self.strides[-1] * 2)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = int(out_channels)
        self.names = [str(k) for k in range(len(indices))] + ["pool"]

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tower level maps the pyramid reads: ``[(B, C_l, H / s_l, W / s_l), ...]``, strides ``strides[:-1]``."""
        return self.backbone.forward_intermediates(x, self.indices, intermediates_only=True)

    def pyramid(self, levels: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The pyramid maps of the tower levels :meth:`levels` gives."""
        return self.fpn(OrderedDict((str(k), f) for k, f in enumerate(levels)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.levels(x))
