"""Backbones: InternImage (T/S/B/L/XL/H/G and a tiny test variant) with official-checkpoint loading.

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
    "InternImage",
    "InternImageConfig",
    "LoadReport",
    "PretrainedWeightsNotFound",
    "checkpoint_filter_fn",
    "count_flops",
    "create_model",
    "default_cfgs",
    "filter_state_dict",
    "flop_breakdown",
    "is_model",
    "list_models",
    "load_checkpoint",
    "model_entrypoint",
    "read_checkpoint",
    "register_model",
    "register_timm_models",
    "resolve_data_config",
]
