"""Backbones: InternImage (T/S/B/L/XL/H/G and a tiny test variant) with official-checkpoint loading, dense
towers, and ``create_backbone(name)``: the one factory every model family builds its image tower with.

    >>> from shusheng.backbone import create_model
    >>> model = create_model("internimage_t")                        # random init
    >>> model = create_model("internimage_t", pretrained=True,       # official weights from a local file
    ...                      pretrained_cfg_overlay=dict(file="internimage_t_1k_224.pth"))

The variants are also registered with timm (``timm.create_model("internimage_t")``) when timm is installed;
importing this package does not import timm.
"""

from shusheng.backbone.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    PretrainedWeightsNotFound,
    filter_state_dict,
    load_checkpoint,
    read_checkpoint,
)
from shusheng.backbone.dense_tower import DenseTower, DenseTowerBackbone, count_components
from shusheng.backbone.factory import create_backbone, list_backbones, register_tower
from shusheng.backbone.flops import count_flops, flop_breakdown
from shusheng.backbone.internimage import InternImage, InternImageConfig, checkpoint_filter_fn, default_cfgs
from shusheng.backbone.registry import (
    create_model,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
    register_timm_models,
    resolve_data_config,
)

__all__ = [
    "CheckpointMismatchError",
    "DenseTower",
    "DenseTowerBackbone",
    "InternImage",
    "InternImageConfig",
    "LoadReport",
    "PretrainedWeightsNotFound",
    "checkpoint_filter_fn",
    "count_components",
    "count_flops",
    "create_backbone",
    "create_model",
    "default_cfgs",
    "filter_state_dict",
    "flop_breakdown",
    "is_model",
    "list_backbones",
    "list_models",
    "load_checkpoint",
    "model_entrypoint",
    "read_checkpoint",
    "register_model",
    "register_tower",
    "register_timm_models",
    "resolve_data_config",
]
