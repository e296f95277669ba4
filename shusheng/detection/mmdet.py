"""InternImage in mmdet 3 / mmseg 1 (optional): a registered backbone, official-recipe configs, checkpoint conversion.

The official InternImage detection and segmentation code (github.com/OpenGVLab/InternImage, MIT licence) runs on
mmdet 2.28 / mmseg 0.27 with mmcv-full 1.x. This module plugs shusheng's InternImage into the current OpenMMLab
stack instead (mmcv 2.1, mmengine, mmdet 3.3, mmsegmentation 1.2); nothing else in shusheng imports it, and it
imports mmdet/mmseg only where they are used.

    >>> from shusheng.detection import mmdet as ss_mmdet
    >>> ss_mmdet.register()                       # "InternImage" in mmdet's (and mmseg's) MODELS; idempotent
    >>> cfg = ss_mmdet.mask_rcnn_config("t", num_classes=6, pretrained="internimage_t_1k_224.pth")
    >>> from mmengine.config import Config
    >>> from mmengine.runner import Runner
    >>> Runner.from_cfg(Config(dict(cfg, work_dir="runs/mmdet"))).train()

Pieces:

* :class:`InternImageBackbone`, registered as ``type="InternImage"``: the official detection/segmentation backbone's
  arguments (``core_op``, ``channels``, ``depths``, ``groups``, ``mlp_ratio``, ``drop_path_rate``, ``norm_layer``,
  ``layer_scale``, ``offset_scale``, ``post_norm``, ``with_cp``, the H/G arguments, ``out_indices``,
  ``frozen_stages``, ``init_cfg=dict(type="Pretrained", checkpoint=<local file>)``); ``forward`` returns the tuple
  of NCHW level maps, equal to ``InternImage.forward_intermediates`` of the same weights. Its state-dict names are
  the official ones, so official detector/segmentor checkpoints load under ``backbone.``.
* :func:`mask_rcnn_config` / :func:`upernet_config`: the official ``mask_rcnn_internimage_t_fpn_1x_coco.py`` and
  ``upernet_internimage_t_512_160k_ade20k.py`` (any variant) as plain dicts in mmdet 3 / mmseg 1 syntax.
* :func:`convert_mmdet2_checkpoint`: an official (mmdet 2.x) detector checkpoint → the mmdet 3 Mask R-CNN's names.
* :func:`register`: put the backbone in the registries. Importing this module registers it when mmdet or mmseg is
  installed (mmengine's ``custom_imports`` in the configs only imports a module); that is the one side effect.

Not covered: the official layer-wise learning-rate decay for L/XL/H/G (``layer_decay_rate`` 0.94/0.95; T/S/B use 1.0,
which the configs reproduce exactly), the DINO/Cascade/Mask2Former heads of the larger official models, CBNet.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shusheng.backbone.checkpoint import (
    PretrainedWeightsNotFound,
    filter_state_dict,
    load_checkpoint,
    read_checkpoint,
)
from shusheng.backbone.internimage import InternImage, _init_weights

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONE_ARGS", "InternImageBackbone", "backbone_config", "build_model", "convert_mmdet2_checkpoint", "mask_rcnn_config",
    "register", "upernet_config",
]

REGISTERED_NAME = "InternImage"
SCOPES = ("mmdet", "mmseg")

# Backbone arguments of the official detection/segmentation configs (detection/configs/coco/*, segmentation/configs/
# ade20k/*): layer_scale=1.0 for T–XL even where the classifier has none; drop_path_rate 0.2/0.3/0.4/0.4/0.4/0.4/0.5.
_COMMON = dict(core_op="DCNv3", mlp_ratio=4.0, norm_layer="LN", offset_scale=1.0, with_cp=False)
BACKBONE_ARGS: dict[str, dict[str, Any]] = {
    "t": dict(_COMMON, channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], drop_path_rate=0.2,
              layer_scale=1.0, post_norm=False),
    "s": dict(_COMMON, channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], drop_path_rate=0.3,
              layer_scale=1.0, post_norm=True),
    "b": dict(_COMMON, channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], drop_path_rate=0.4,
              layer_scale=1.0, post_norm=True),
    "l": dict(_COMMON, channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], drop_path_rate=0.4,
              layer_scale=1.0, offset_scale=2.0, post_norm=True),
    "xl": dict(_COMMON, channels=192, depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], drop_path_rate=0.4,
               layer_scale=1.0, offset_scale=2.0, post_norm=True),
    "h": dict(_COMMON, channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], drop_path_rate=0.4,
              layer_scale=None, post_norm=False, dw_kernel_size=5, res_post_norm=True, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29], center_feature_scale=True, with_cp=True),
    "g": dict(_COMMON, channels=512, depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], drop_path_rate=0.5,
              layer_scale=None, post_norm=True, dw_kernel_size=5, res_post_norm=False, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47], center_feature_scale=True, with_cp=True),
}
# Official classification checkpoints the detection/segmentation configs start from (informational: pass the path
# of your local copy as ``pretrained``; nothing is downloaded).
PRETRAINED_FILES = {"t": "internimage_t_1k_224.pth", "s": "internimage_s_1k_224.pth",
                    "b": "internimage_b_1k_224.pth", "l": "internimage_l_22k_192to384.pth",
                    "xl": "internimage_xl_22k_192to384.pth", "h": "internimage_h_jointto22k_384.pth",
                    "g": "internimage_g_pretrainto22k_384.pth"}

# Arguments of the official backbone that only concern the classifier (accepted and ignored here).
_HEAD_ONLY = ("num_classes", "cls_scale", "use_clip_projector", "global_pool")
_CLASSIFIER_KEY = re.compile(r"^(module\.)?(conv_head|dcnv3_head_x[34]|clip_projector|fc_norm|head)\.")
_URL_PREFIXES = ("http://", "https://", "open-mmlab://", "torchvision://", "modelzoo://", "mmcls://")


# --------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------

class InternImageBackbone(InternImage):
    """shusheng's InternImage as an mmdet/mmseg backbone (registered as ``type="InternImage"``).

    The classifier head is removed, so the state dict holds exactly the official detection backbone's entries
    (``patch_embed.*``, ``levels.*``): an official detector or segmentor checkpoint loads under ``backbone.``.

    Args:
        out_indices: levels to return (strides 4, 8, 16, 32 for indices 0–3).
        frozen_stages: levels ``[:frozen_stages]`` are kept in eval mode without gradients (official semantics;
            -1 = none, the stem is never frozen).
        init_cfg: ``dict(type="Pretrained", checkpoint=PATH[, prefix=P][, weights_only=False])``:
            :meth:`init_weights` loads the local file (official classification ``.pth``, an mmdet/mmseg checkpoint,
            the HF port, a safetensors file or folder; URLs are refused: nothing is downloaded), only its keys
            starting with ``P`` if given (stripped), with ``torch.load(weights_only=False)`` only if asked (for a
            trusted file holding more than tensors). Missing entries (e.g. the
            ``gamma`` layer scales the classifier T has none of) keep their initial values, as in the official code.
            ``None``: :meth:`init_weights` re-initialises every Linear (truncated normal, std 0.02, including the DCN
            offset/mask projections) and LayerNorm, like the official backbone.
        pretrained: deprecated mmcv spelling of ``init_cfg=dict(type="Pretrained", checkpoint=pretrained)``
            (mmseg's ``EncoderDecoder(pretrained=...)`` passes it).
        use_dcn_v4_op: accepted for config compatibility; the DCNv4 kernel computes the same function on DCNv3
            weights, and shusheng's DCNv3 backends are used.
        **kwargs: :class:`~shusheng.backbone.InternImageConfig` fields (official names), e.g. ``core_op``,
            ``channels``, ``depths``, ``groups``, ``mlp_ratio``, ``drop_path_rate``, ``norm_layer``, ``layer_scale``,
            ``offset_scale``, ``post_norm``, ``with_cp``, ``dw_kernel_size``, ``res_post_norm``,
            ``level2_post_norm(_block_ids)``, ``center_feature_scale``, ``remove_center``, ``backend``. Classifier
            arguments (``num_classes``, ``cls_scale``, ``use_clip_projector``) are ignored.

    Shapes: ``forward(x)``: ``(B, 3, H, W)`` → tuple of ``(B, C·2^i, ⌈H/2^(i+2)⌉, ⌈W/2^(i+2)⌉)`` for i in
    ``out_indices`` (contiguous NCHW, as the official backbone returns them).
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        init_cfg: Mapping[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        use_dcn_v4_op: bool = False,
        **kwargs: Any,
    ):
        for name in _HEAD_ONLY:
            kwargs.pop(name, None)
        kwargs.setdefault("drop_path_rate", 0.2)  # the official backbone's default
        super().__init__(num_classes=0, use_clip_projector=False, **kwargs)
        self.prune_intermediate_layers(len(self.levels), prune_head=True)  # drop conv_head; keep every level
        self.out_indices = tuple(int(i) for i in out_indices)
        bad = [i for i in self.out_indices if not 0 <= i < len(self.levels)]
        if bad or not self.out_indices:
            raise ValueError(f"out_indices {tuple(out_indices)} must be level indices 0..{len(self.levels) - 1}")
        self.frozen_stages = int(frozen_stages)
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("give either init_cfg or pretrained, not both")
            init_cfg = dict(type="Pretrained", checkpoint=str(pretrained))
        self.init_cfg = dict(init_cfg) if init_cfg is not None else None
        if self.init_cfg is not None and self.init_cfg.get("type") != "Pretrained":
            raise ValueError(f"InternImage supports init_cfg=dict(type='Pretrained', checkpoint=...) only, got "
                             f"{self.init_cfg}")
        self.use_dcn_v4_op = use_dcn_v4_op
        self.is_init = False
        self._freeze_stages()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.forward_intermediates(x, indices=list(self.out_indices))  # NCHW views of channels-last maps
        return tuple(o.contiguous() for o in outs)

    def train(self, mode: bool = True) -> InternImageBackbone:
        super().train(mode)
        self._freeze_stages()
        return self

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            for level in self.levels[:self.frozen_stages]:
                level.eval()
                for p in level.parameters():
                    p.requires_grad = False

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (a local file), or re-initialise like the official backbone without one."""
        if self.init_cfg is None:
            logger.warning("InternImage: no pretrained weights (init_cfg=None); training starts from scratch")
            self.apply(_init_weights)
        else:
            checkpoint = self.init_cfg.get("checkpoint")
            if checkpoint is None:
                raise ValueError("init_cfg=dict(type='Pretrained') needs checkpoint=<path of a local file>")
            if str(checkpoint).startswith(_URL_PREFIXES):
                raise PretrainedWeightsNotFound(
                    f"InternImage: init_cfg names {checkpoint!r}; shusheng never downloads weights. Download the "
                    "file yourself and give its local path as init_cfg.checkpoint (or pretrained=... in the "
                    "shusheng.detection.mmdet config builders).")
            sd, _ = read_checkpoint(checkpoint, weights_only=self.init_cfg.get("weights_only", True))
            prefix = self.init_cfg.get("prefix")
            if prefix:
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            sd = {k: v for k, v in sd.items() if not _CLASSIFIER_KEY.match(k)}  # a classification checkpoint's head
            report = load_checkpoint(self, sd, strict=False)
            report.source = str(checkpoint)
            level = logging.WARNING if (report.unexpected_keys or report.mismatched_keys) else logging.INFO
            logger.log(level, "InternImage init_weights: %s", report)
        self.is_init = True


# --------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------

def _installed(scope: str) -> bool:
    return importlib.util.find_spec(scope) is not None


def register(force: bool = False) -> list[str]:
    """Register :class:`InternImageBackbone` as ``"InternImage"`` in mmdet's and mmseg's ``MODELS`` registries.

    Idempotent. Registries of packages that are not installed are skipped.

    Args:
        force: replace another class already registered under ``"InternImage"`` (e.g. the official
            ``mmdet_custom`` one); without it that is an error.

    Returns:
        The scopes it is registered in (``["mmdet"]``, ``["mmdet", "mmseg"]``, ...).

    Raises:
        ImportError: neither mmdet 3 nor mmseg 1 is installed (README: "mmdet 3 / mmseg 1").
        RuntimeError: another class holds the name and ``force`` is False.
    """
    done = []
    for scope in SCOPES:
        if not _installed(scope):
            continue
        registry = importlib.import_module(f"{scope}.registry").MODELS
        current = registry.module_dict.get(REGISTERED_NAME)
        if current is not InternImageBackbone:
            if current is not None and not force:
                raise RuntimeError(f"{scope}'s MODELS already has {REGISTERED_NAME!r} = {current!r}; pass "
                                   "force=True to replace it with shusheng's")
            registry.register_module(name=REGISTERED_NAME, module=InternImageBackbone, force=True)
        done.append(scope)
    if not done:
        raise ImportError("shusheng.detection.mmdet needs mmdet 3 (and/or mmsegmentation 1) with mmcv 2.1: see "
                          "README.md, 'mmdet 3 / mmseg 1' (pip install ../shared/wheels/mmcv-2.1.0-*.whl "
                          "mmdet==3.3.0 mmengine mmsegmentation==1.2.2)")
    return done


def build_model(cfg: Mapping[str, Any], scope: str | None = None) -> nn.Module:
    """Build a detector/segmentor from a config (or its ``model`` entry) in the OpenMMLab scope it belongs to.

    Registers the backbone (:func:`register`) and the scope's own modules (``register_all_modules``), then builds
    under that default scope, which mmengine needs to find ``DetDataPreprocessor`` & co.

    Args:
        cfg: a :func:`mask_rcnn_config` / :func:`upernet_config` dict (its ``default_scope`` picks the scope) or a
            bare model dict.
        scope: ``"mmdet"`` or ``"mmseg"``; default: ``cfg["default_scope"]``, else ``"mmdet"``.

    Returns:
        The model (weights not initialised yet: call ``model.init_weights()`` to load ``pretrained``).
    """
    model_cfg = cfg["model"] if "model" in cfg else cfg
    scope = scope or cfg.get("default_scope") or "mmdet"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    register()
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope

    registry = importlib.import_module(f"{scope}.registry").MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(ConfigDict(copy.deepcopy(dict(model_cfg))))  # mmdet reads cfg.attr


# --------------------------------------------------------------------------------------------------------
# Configs (official recipes in mmdet 3 / mmseg 1 syntax)
# --------------------------------------------------------------------------------------------------------

def _variant(variant: str) -> str:
    v = str(variant).lower().removeprefix("internimage_").removeprefix("internimage-")
    if v not in BACKBONE_ARGS:
        raise ValueError(f"unknown InternImage variant {variant!r}; choose one of {sorted(BACKBONE_ARGS)}")
    return v


def backbone_config(variant: str = "t", pretrained: str | os.PathLike | None = None, **overrides: Any) -> dict:
    """The ``backbone`` entry of the official det/seg configs for ``variant`` (t, s, b, l, xl, h, g).

    Args:
        pretrained: local checkpoint loaded by ``init_weights`` (``init_cfg=dict(type="Pretrained", ...)``); the
            official configs start from ``PRETRAINED_FILES[variant]``. None: random init.
        **overrides: replace any backbone argument (e.g. ``core_op="DCNv3_pytorch"``, ``with_cp=True``, or a whole
            tiny layout: ``channels``, ``depths``, ``groups``).
    """
    cfg = dict(type=REGISTERED_NAME, **BACKBONE_ARGS[_variant(variant)], out_indices=(0, 1, 2, 3))
    cfg["init_cfg"] = dict(type="Pretrained", checkpoint=str(pretrained)) if pretrained is not None else None
    cfg.update(overrides)
    return cfg


def _level_channels(backbone: Mapping[str, Any]) -> list[int]:
    return [int(backbone["channels"]) * 2 ** i for i in backbone["out_indices"]]


def _custom_imports() -> dict:
    return dict(imports=[__name__], allow_failed_imports=False)


def _optimizer(lr: float, betas: tuple[float, float] | None = None) -> dict:
    # The official CustomLayerDecayOptimizerConstructor with layer_decay_rate 1.0 (T/S/B): AdamW, weight decay
    # 0.05 except for 1-D parameters and biases (norms, layer scales); mmengine's paramwise_cfg says the same.
    opt = dict(type="AdamW", lr=lr, weight_decay=0.05)
    if betas is not None:
        opt["betas"] = betas
    return dict(type="OptimWrapper", optimizer=opt,
                paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0))


def mask_rcnn_config(
    variant: str = "t",
    num_classes: int = 80,
    pretrained: str | os.PathLike | None = None,
    backbone: Mapping[str, Any] | None = None,
    data_root: str = "data/coco/",
    batch_size: int = 2,
    max_epochs: int = 12,
) -> dict:
    """``mask_rcnn_internimage_<variant>_fpn_1x_coco.py`` as an mmdet 3 config dict.

    mmdet's ``mask-rcnn_r50_fpn_1x_coco.py`` (model, COCO instance data, 1x schedule, runtime) with the official
    changes: the InternImage backbone, ``FPN(in_channels=[C, 2C, 4C, 8C], out_channels=256, num_outs=5)``, AdamW
    (lr 1e-4, weight decay 0.05, none on 1-D parameters), checkpoints every epoch keeping 3 plus the best. 2 images
    per GPU on 8 GPUs (16 in total) as in the official runs. The official T/S/B configs are Mask R-CNN; for
    L/XL/H/G (Cascade/DINO officially) this is the same recipe with their backbone.

    Args:
        variant: t, s, b, l, xl, h, g.
        num_classes: classes of the box and mask heads (COCO 80).
        pretrained: local backbone checkpoint (official classification ``.pth``); None = random init.
        backbone: overrides of the backbone arguments (a tiny layout for tests, ``core_op``, ``with_cp``...).
        data_root, batch_size, max_epochs: COCO folder (``annotations/instances_{train,val}2017.json``,
            ``train2017/``, ``val2017/``), images per GPU, epochs (the LR drops at 8/12 and 11/12 of them).

    Returns:
        A plain dict: ``mmengine.config.Config(mask_rcnn_config(...))`` runs with ``Runner.from_cfg``;
        ``MODELS.build(cfg["model"])`` builds the detector (after :func:`register` and mmdet's
        ``register_all_modules``).
    """
    bb = backbone_config(variant, pretrained, **dict(backbone or {}))
    roi_feat = [4, 8, 16, 32]
    model = dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
        backbone=bb,
        neck=dict(type="FPN", in_channels=_level_channels(bb), out_channels=256, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=256, feat_channels=256,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                    out_channels=256, featmap_strides=roi_feat),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=256, fc_out_channels=1024, roi_feat_size=7,
                num_classes=num_classes,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            mask_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                    out_channels=256, featmap_strides=roi_feat),
            mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=256, conv_out_channels=256,
                           num_classes=num_classes,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)),
    )
    train_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=(1333, 800), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="Resize", scale=(1333, 800), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    val_dataloader = dict(
        batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(type="CocoDataset", data_root=data_root, ann_file="annotations/instances_val2017.json",
                     data_prefix=dict(img="val2017/"), test_mode=True, pipeline=test_pipeline, backend_args=None))
    evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/instances_val2017.json",
                     metric=["bbox", "segm"], format_only=False, backend_args=None)
    return dict(
        default_scope="mmdet",
        custom_imports=_custom_imports(),
        model=model,
        train_dataloader=dict(
            batch_size=batch_size, num_workers=2, persistent_workers=True,
            sampler=dict(type="DefaultSampler", shuffle=True), batch_sampler=dict(type="AspectRatioBatchSampler"),
            dataset=dict(type="CocoDataset", data_root=data_root, ann_file="annotations/instances_train2017.json",
                         data_prefix=dict(img="train2017/"), filter_cfg=dict(filter_empty_gt=True, min_size=32),
                         pipeline=train_pipeline, backend_args=None)),
        val_dataloader=val_dataloader,
        test_dataloader=val_dataloader,
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
            dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True,
                 milestones=[round(max_epochs * 8 / 12), round(max_epochs * 11 / 12)], gamma=0.1),
        ],
        optim_wrapper=_optimizer(1e-4),
        auto_scale_lr=dict(enable=False, base_batch_size=16),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=50),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=3, save_last=True, save_best="auto"),
            sampler_seed=dict(type="DistSamplerSeedHook"),
            visualization=dict(type="DetVisualizationHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        vis_backends=[dict(type="LocalVisBackend")],
        visualizer=dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_processor=dict(type="LogProcessor", window_size=50, by_epoch=True),
        log_level="INFO",
        load_from=None,
        resume=False,
    )


def upernet_config(
    variant: str = "t",
    num_classes: int = 150,
    pretrained: str | os.PathLike | None = None,
    backbone: Mapping[str, Any] | None = None,
    crop_size: tuple[int, int] = (512, 512),
    norm_cfg: Mapping[str, Any] | None = None,
    data_root: str = "data/ade/ADEChallengeData2016",
    batch_size: int = 2,
    max_iters: int = 160000,
) -> dict:
    """``upernet_internimage_<variant>_512_160k_ade20k.py`` as an mmseg 1 config dict.

    mmseg's ``upernet_r50_4xb4-160k_ade20k-512x512.py`` with the official changes: the InternImage backbone,
    ``decode_head.in_channels=[C, 2C, 4C, 8C]``, ``auxiliary_head.in_channels=4C`` (level 2), ``test_cfg`` whole
    image, test images resized to a multiple of 32, AdamW (lr 6e-5, betas (0.9, 0.999), weight decay 0.05, none on
    1-D parameters), linear warm-up over 1500 iterations from 1e-6 then poly decay (power 1, to 0), 2 images per GPU
    on 8 GPUs, a checkpoint every 1000 iterations keeping the last and the best mIoU.

    Args:
        variant: t, s, b, l, xl, h, g (crop 512 for all; the official L/XL use 640, H/G 896: pass ``crop_size``).
        num_classes: ADE20K 150.
        pretrained, backbone: as in :func:`mask_rcnn_config`.
        norm_cfg: norm of the heads; the official ``SyncBN`` by default (it runs as plain BatchNorm outside a
            distributed run), ``dict(type="BN", requires_grad=True)`` for a single process.
        data_root, batch_size, max_iters: ADE20K folder, images per GPU, iterations.
    """
    bb = backbone_config(variant, pretrained, **dict(backbone or {}))
    norm = dict(norm_cfg) if norm_cfg is not None else dict(type="SyncBN", requires_grad=True)
    chans = _level_channels(bb)
    crop = tuple(crop_size)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=crop),
        pretrained=None,
        backbone=bb,
        decode_head=dict(type="UPerHead", in_channels=chans, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=512, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm,
                         align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=chans[2], in_index=2, channels=256, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=dict(norm),
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    scale = (crop[1] * 4, crop[0])  # (2048, 512) for a 512 crop
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="ResizeToMultiple", size_divisor=32),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="PackSegInputs"),
    ]
    val_dataloader = dict(
        batch_size=1, num_workers=4, persistent_workers=True, sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(type="ADE20KDataset", data_root=data_root,
                     data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
                     pipeline=test_pipeline))
    evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    return dict(
        default_scope="mmseg",
        custom_imports=_custom_imports(),
        model=model,
        train_dataloader=dict(
            batch_size=batch_size, num_workers=4, persistent_workers=True,
            sampler=dict(type="InfiniteSampler", shuffle=True),
            dataset=dict(type="ADE20KDataset", data_root=data_root,
                         data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                         pipeline=train_pipeline)),
        val_dataloader=val_dataloader,
        test_dataloader=val_dataloader,
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=16000),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        param_scheduler=[
            dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
            dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=max_iters, by_epoch=False),
        ],
        optim_wrapper=_optimizer(6e-5, betas=(0.9, 0.999)),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=1000, max_keep_ckpts=1,
                            save_best="mIoU"),
            sampler_seed=dict(type="DistSamplerSeedHook"),
            visualization=dict(type="SegVisualizationHook")),
        env_cfg=dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        vis_backends=[dict(type="LocalVisBackend")],
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        load_from=None,
        resume=False,
    )


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

def _state_dict_of(checkpoint: Any, weights_only: bool = True) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        return read_checkpoint(Path(checkpoint), weights_only=weights_only)[0]  # {'meta', 'state_dict', ...}
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a mapping, got {type(checkpoint).__name__}")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in ("state_dict", "model"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    raise ValueError(f"no state dict in the checkpoint (top-level keys: {sorted(map(str, checkpoint))[:10]})")


def convert_mmdet2_checkpoint(checkpoint: Any, model: nn.Module | None = None, *,
                              weights_only: bool = True) -> dict[str, torch.Tensor]:
    """An official InternImage detector checkpoint (mmdet 2.x) → the state dict of the mmdet 3 model.

    * container: ``{'meta', 'state_dict', 'optimizer'}`` (or a path to it, or a bare state dict) → the state dict;
      a DDP ``module.`` prefix is removed.
    * ``backbone.*``: the official names are shusheng's InternImage names (the registered backbone keeps them).
      With ``model`` given they go through ``shusheng.backbone.filter_state_dict`` against ``model.backbone``, which
      also adapts ``remove_center`` models, Hugging Face ``layer_scale`` names and the stem's input channels, and
      fails on shapes it cannot adapt.
    * ``neck.*``, ``rpn_head.*``, ``roi_head.*``: unchanged. mmdet 3.3 keeps mmdet 2.28's module names for Mask
      R-CNN (FPN ``lateral_convs.i.conv`` / ``fpn_convs.i.conv``; RPNHead ``rpn_conv``, ``rpn_cls``, ``rpn_reg``;
      Shared2FCBBoxHead ``shared_fcs.{0,1}``, ``fc_cls`` with the background class last, ``fc_reg``; FCNMaskHead
      ``convs.i.conv``, ``upsample``, ``conv_logits``) and its data preprocessor has no state, so nothing to rename
      (tests/test_mmdet.py checks this on the 2.28 key list with ``strict=True``).

    Args:
        checkpoint: the loaded checkpoint, its state dict, or a file path.
        model: the mmdet 3 detector (or anything with a ``backbone``) to check and adapt the backbone against.
        weights_only: ``torch.load(weights_only=...)`` for a path. mmdet 2 files may keep numpy scalars in their
            ``meta`` that the safe loader refuses; pass False only for a file you trust.

    Returns:
        The state dict for ``model.load_state_dict(..., strict=True)``. mmdet 3's ``init_detector`` still reads the
        class names of an old checkpoint's ``meta['CLASSES']``; keep the meta if you save the result.
    """
    sd = _state_dict_of(checkpoint, weights_only)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    if model is not None and backbone:
        target = getattr(model, "backbone", model)
        backbone, report = filter_state_dict(backbone, target)
        if report.mismatched_keys:
            raise ValueError(f"backbone weights do not fit model.backbone:\n{report}")
        if report.converted_keys:
            logger.info("convert_mmdet2_checkpoint: %s", report)
    out = {f"backbone.{k}": v for k, v in backbone.items()}
    out.update(rest)
    return out


def _register_on_import() -> None:
    # custom_imports=dict(imports=["shusheng.detection.mmdet"]) in the configs relies on this
    if not any(_installed(scope) for scope in SCOPES):
        return
    try:
        register()
    except RuntimeError as e:  # another InternImage (e.g. the official mmdet_custom one) was registered first
        logger.warning("shusheng.detection.mmdet: not registered: %s", e)


_register_on_import()
