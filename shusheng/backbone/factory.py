"""``create_backbone(name)``: the one place that turns a name into a headless image tower.

Model families (the unified decoder, the LLM bridge, detection) sit on any tower that provides
``forward_features(x) -> (B, C, h, w)`` and ``num_features``. A name is looked up in this order:

1. towers registered here with :func:`register_tower` (``"shusheng-mini-clip-tower"``: the dense-pretrained
   image tower of the bundled ``shusheng-mini-clip``, :class:`~shusheng.backbone.dense_tower.DenseTowerBackbone`);
2. the shusheng backbone registry (``internimage_t``, ..., ``internimage_test``);
3. timm (any ``timm.create_model`` name; needs the ``backbone`` extra).

Towers are built headless (``num_classes=0``) with random weights unless ``pretrained`` names local weights
the way the builder understands them; nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from shusheng._deps import require
from shusheng.backbone.dense_tower import DenseTowerBackbone
from shusheng.backbone.registry import create_model, is_model, list_models

__all__ = ["create_backbone", "list_backbones", "register_tower"]

_towers: dict[str, Callable[..., nn.Module]] = {"shusheng-mini-clip-tower": DenseTowerBackbone}


def register_tower(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``builder(**kwargs) -> nn.Module`` available to :func:`create_backbone` as ``name``."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _towers:
            warnings.warn(f"tower {name!r} is already registered; overwriting it", stacklevel=2)
        _towers[name] = builder
        return builder

    return deco


def list_backbones() -> list[str]:
    """Names :func:`create_backbone` resolves without timm: registered towers, then registry backbones."""
    return sorted(_towers) + list_models()


def create_backbone(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A headless image tower by name (see the module docstring for the lookup order).

    Args:
        name: a tower, a shusheng backbone or a timm model name.
        pretrained: passed to registry and timm builders (local weights only); towers take their weights from
            the checkpoint of the model that holds them.
        **kwargs: builder arguments (``channels=...``, ``grid=...``); ``num_classes`` defaults to 0.

    Raises:
        ValueError: a tower asked for ``pretrained=True``.
        ImportError: a name unknown here and timm not installed.
    """
    kwargs.setdefault("num_classes", 0)
    if name in _towers:
        if pretrained:
            raise ValueError(f"tower {name!r} has no pretrained weights of its own: load the checkpoint that holds it")
        return _towers[name](**kwargs)
    if is_model(name):
        return create_model(name, pretrained=pretrained, **kwargs)
    timm = require("timm", extra="backbone")
    return timm.create_model(name, pretrained=pretrained, **kwargs)
