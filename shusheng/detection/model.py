"""Detectors on a feature pyramid over any ``create_backbone`` tower: torchvision's Mask R-CNN or FCOS.

    >>> from shusheng.detection.model import DetectorConfig, InternImageDetector
    >>> model = InternImageDetector(DetectorConfig(backbone="internimage_t", head="maskrcnn"))   # random init
    >>> losses = model(images, targets)             # train mode: {"loss_classifier": ..., ...}
    >>> model.eval(); found = model(images)          # [{"boxes", "labels", "scores"(, "masks")}, ...]
    >>> found, levels, sizes = model(images, return_levels=True)   # + the tower levels of the same pass
    >>> model.save_pretrained("out/det"); InternImageDetector.from_pretrained("out/det")

``forward`` is torchvision's: ``images`` is a list of ``(3, H, W)`` float tensors in [0, 1], each at its own size;
the model normalises them with the backbone's mean/std, resizes them keeping the aspect ratio (shorter side
``min_size``, longer side at most ``max_size``) and reports boxes ``[x0, y0, x1, y1]`` (and masks) in the pixels
of each input tensor. ``return_levels=True`` (inference only) also hands back the tower level maps the pyramid read
and the ``(height, width)`` of each image inside the padded batch, as the in-domain check reads them
(``shusheng.detection.domain``). Labels are ``1..num_classes`` (0 is the background); ``config.labels[k - 1]`` names
label ``k``. Nothing is downloaded: heads are randomly initialised and the tower comes from
``create_backbone`` (its own local weights, if asked for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from shusheng._config import config_from_any
from shusheng.backbone import create_backbone
from shusheng.detection.fpn import BackboneFPN
from shusheng.modeling import Preprocess, PretrainedMixin

__all__ = ["HEADS", "DetectorConfig", "DetectorDense", "InternImageDetector"]

HEADS = ("maskrcnn", "fcos")


def _synthdrive_labels() -> list[str]:
    from shusheng.data.synthdrive import COCO_CATEGORIES

    return [c["name"] for c in sorted(COCO_CATEGORIES, key=lambda c: c["id"])]


@dataclass
class DetectorConfig:
    """Constructor arguments of :class:`InternImageDetector` (stored in ``config.json``).

    Args:
        backbone: a ``create_backbone`` name whose tower has ``forward_intermediates`` and ``feature_info``.
        backbone_args: builder arguments of the tower (``{"channels": 8}``, ...).
        backbone_indices: the tower levels the pyramid reads (None = all: strides 4-32 for InternImage; for a
            timm ResNet ``[1, 2, 3, 4]`` skips its stride-2 level).
        head: ``"maskrcnn"`` (boxes + instance masks) or ``"fcos"`` (boxes; one stage, lighter).
        labels: class names; label ``k`` (1-based) is ``labels[k - 1]``. Default: SynthDrive's COCO categories
            (car, truck, bus, person, traffic light, sign), whose ids are the same 1-based labels.
        num_classes: foreground classes; 0 = ``len(labels)``. Without labels, classes are named ``class_<k>``.
        fpn_channels: channels of the pyramid maps (for ``"fcos"`` a multiple of 32, at least 64).
        min_size, max_size: inputs are resized (aspect kept) so the shorter side is ``min_size`` unless the
            longer side would exceed ``max_size``.
        score_threshold: detections scoring lower are never reported.
        detections_per_image: at most this many detections per image.
        anchor_scale: anchors (Mask R-CNN) / FCOS sizes are ``anchor_scale x stride`` on each pyramid level.
            FCOS assigns an object to the level whose size range (4-8x the size) holds its largest box-edge
            distance, so the scale sets which level learns which objects.
        box_head_dim: width of Mask R-CNN's two-layer box head (torchvision's default 1024).
        mask_head_dim: channels of Mask R-CNN's four mask-head convolutions (torchvision's default 256).
        rpn_proposals: proposals kept per image after NMS in training (torchvision's default 2000); inference
            keeps half as many. Small images with few objects need far fewer.
        roi_batch: sampled RoIs per image for the box-head losses (torchvision's default 512).
        head_convs: 3x3 convolutions in each of FCOS's two head branches (torchvision's default 4). The head runs
            at every position of every pyramid level, so on a small tower it costs more than the tower.
        topk_candidates: FCOS keeps at most this many of the best-scoring cells per pyramid level before NMS
            (torchvision's default 1000). Above 1000 boxes in all, torchvision's CPU NMS runs once per class, which
            cost a small detector more time than its head; a few objects per image need far fewer.
    """

    backbone: str = "internimage_t"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    backbone_indices: list[int] | None = None
    head: str = "maskrcnn"
    labels: list[str] = field(default_factory=_synthdrive_labels)
    num_classes: int = 0
    fpn_channels: int = 256
    min_size: int = 256
    max_size: int = 512
    score_threshold: float = 0.05
    detections_per_image: int = 100
    anchor_scale: int = 8
    box_head_dim: int = 1024
    mask_head_dim: int = 256
    rpn_proposals: int = 2000
    roi_batch: int = 512
    head_convs: int = 4
    topk_candidates: int = 1000

    def __post_init__(self):
        self.labels = [str(v) for v in self.labels]
        self.backbone_args = dict(self.backbone_args)
        if self.backbone_indices is not None:
            self.backbone_indices = [int(i) for i in self.backbone_indices]
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.num_classes == 0:
            self.num_classes = len(self.labels)
        if self.num_classes < 1:
            raise ValueError("a detector needs at least one class: give labels or num_classes")
        if not self.labels:
            self.labels = [f"class_{k}" for k in range(1, self.num_classes + 1)]
        if len(self.labels) != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but {len(self.labels)} labels given")
        if self.head == "fcos" and (self.fpn_channels % 32 or self.fpn_channels < 64):
            # with one channel per group, a 1 x 1 pyramid map (small images) cannot be normalised
            raise ValueError(f"the fcos head group-normalises in 32 groups: fpn_channels must be a multiple of 32 "
                             f"and at least 64, got {self.fpn_channels}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        for name in ("anchor_scale", "box_head_dim", "mask_head_dim", "rpn_proposals", "roi_batch", "head_convs",
                     "topk_candidates"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {self.score_threshold}")

    @classmethod
    def from_any(cls, config: DetectorConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DetectorConfig:
        """Build from a config, a plain dict (e.g. a parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _tower_preprocess(tower: nn.Module) -> Preprocess:
    if hasattr(tower, "preprocess_config"):
        return tower.preprocess_config()
    return Preprocess.from_timm(getattr(tower, "pretrained_cfg", {}) or {})


class InternImageDetector(PretrainedMixin, nn.Module):
    """Mask R-CNN or FCOS (torchvision) on a :class:`~shusheng.detection.fpn.BackboneFPN` (see the module
    docstring for ``forward``).

    Args:
        config: a :class:`DetectorConfig` or a dict of its fields.
        **overrides: config fields.

    Attributes:
        detector: the torchvision model (its ``backbone`` is the pyramid).
    """

    model_type = "detector"
    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__()
        self.config = c = DetectorConfig.from_any(config, **overrides)
        tower = create_backbone(c.backbone, **c.backbone_args)
        pre = _tower_preprocess(tower)
        self._mean, self._std = pre.mean, pre.std
        fpn = BackboneFPN(tower, c.fpn_channels, indices=c.backbone_indices)
        self.detector = _build_head(c, fpn, list(pre.mean), list(pre.std))

    @property
    def fpn(self) -> BackboneFPN:
        """The feature pyramid (held once, as ``detector.backbone``)."""
        return self.detector.backbone

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def level_strides(self) -> list[int]:
        """Stride of each tower level the pyramid reads (:meth:`forward_features`)."""
        return self.fpn.strides[:-1]

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The tower level maps the pyramid reads, ``[(B, C_l, H / s_l, W / s_l), ...]``, of a batch of images
        already normalised and resized (as the detector's transform would)."""
        return self.fpn.levels(pixels)

    def label_name(self, label: int) -> str:
        """Name of torchvision label ``label`` (1-based)."""
        return self.config.labels[int(label) - 1]

    def set_inference(self, score_threshold: float | None = None, proposals: int | None = None) -> InternImageDetector:
        """Tighten inference without retraining (returns ``self``). ``config.score_threshold`` follows; the
        proposal count is a run-time setting (``rpn_proposals`` stays the training value).

        Args:
            score_threshold: detections scoring no higher are dropped before NMS. Raising it to the lowest score
                a caller keeps anyway changes none of the kept detections (a box is suppressed only by a better one)
                and spares Mask R-CNN the masks of the rest.
            proposals: Mask R-CNN's RPN proposals per image at inference (default ``rpn_proposals // 2``); the
                RoI heads' cost grows with them. Fewer can lose objects: measure before choosing.
        """
        c = self.config
        if score_threshold is not None:
            if not 0.0 <= float(score_threshold) < 1.0:
                raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
            c.score_threshold = float(score_threshold)
            if c.head == "fcos":
                self.detector.score_thresh = c.score_threshold
            else:
                self.detector.roi_heads.score_thresh = c.score_threshold
        if proposals is not None:
            if c.head == "fcos":
                raise ValueError("proposals are Mask R-CNN's (the RPN); an FCOS detector has none")
            if int(proposals) < 1:
                raise ValueError(f"proposals must be a positive integer, got {proposals}")
            rpn = self.detector.rpn
            rpn._pre_nms_top_n = {**rpn._pre_nms_top_n, "testing": max(int(proposals), rpn._pre_nms_top_n["testing"])}
            rpn._post_nms_top_n = {**rpn._post_nms_top_n, "testing": int(proposals)}
        return self

    def preprocess_config(self) -> Preprocess:
        # the detector resizes by itself (aspect kept); this records the mean/std and the shorter side
        return Preprocess(size=self.config.min_size, resize="shorter_crop", interpolation="bilinear",
                          mean=self._mean, std=self._std)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                return_levels: bool = False):
        """torchvision's: losses (train mode, ``targets`` needed) or per-image detections (eval mode).

        With ``return_levels`` (eval mode, no targets): ``(detections, levels, image_sizes)``, the same detections
        with the tower level maps the pyramid read (:meth:`forward_features` of the padded batch) and the
        ``(height, width)`` of each resized image inside that batch, from one pass.
        """
        if return_levels:
            if self.training or targets is not None:
                raise ValueError("return_levels is for inference: eval mode, without targets")
            found, levels, sizes = self._inference(images)
            if self.config.head == "fcos":
                found = [{**r, "labels": r["labels"] + 1} for r in found]
            return found, levels, sizes
        if self.config.head != "fcos":
            return self.detector(images, targets)
        # FCOS scores classes with sigmoids and has no background class: its classes 0..K-1 are labels 1..K
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = self.detector(images, targets)
        if isinstance(out, list):
            out = [{**r, "labels": r["labels"] + 1} for r in out]
        return out

    def dense_module(self) -> DetectorDense:
        """The dense part as a module ``pixels -> tuple of maps`` (what ``shusheng export`` writes for a
        detector; see :class:`DetectorDense`)."""
        return DetectorDense(self)

    def detections_from_dense(self, outputs: Sequence[torch.Tensor], pixels_shape: Sequence[int],
                              image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """What stays in PyTorch after :class:`DetectorDense`: box decoding, NMS (and for Mask R-CNN the RPN,
        RoIAlign, box and mask heads), in the pixels of the padded batch (FCOS labels 0-based; not yet mapped to
        the images' own sizes, see ``detector.transform.postprocess``).

        Args:
            outputs: :class:`DetectorDense`'s outputs (from PyTorch or from an exported file).
            pixels_shape: shape of the padded batch ``(B, 3, H, W)``.
            image_sizes: ``(height, width)`` of each resized image inside the batch.
        """
        from torchvision.models.detection.image_list import ImageList

        d = self.detector
        n = len(self.fpn.indices)
        levels, rest = list(outputs[:n]), list(outputs[n:])
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        shape = tuple(int(v) for v in pixels_shape)
        # the anchor generators read only the shapes of the batch and of the maps
        batch = ImageList(levels[0].new_empty((shape[0], 0, *shape[2:])), sizes)
        if self.config.head == "fcos":
            head = dict(zip(DetectorDense.FCOS_OUTPUTS, rest))
            last = levels[-1].shape[-2:]  # the max-pooled level halves the last one (kernel 1, stride 2)
            hw = [tuple(f.shape[-2:]) for f in levels] + [((last[0] + 1) // 2, (last[1] + 1) // 2)]
            maps = [levels[0].new_empty((shape[0], 0, h, w)) for h, w in hw]
            anchors = d.anchor_generator(batch, maps)
            per_level = [h * w for h, w in hw]
            split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
            return d.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], sizes)
        features = OrderedDict(zip(self.fpn.names, rest))
        proposals, _ = d.rpn(batch, features)
        found, _ = d.roi_heads(features, proposals, sizes)
        return found

    def _inference(self, images: list[torch.Tensor]
                   ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], list[tuple[int, int]]]:
        """torchvision's eval-mode ``forward`` of the two heads (``GeneralizedRCNN``, ``FCOS``), step by step, so
        the tower levels under the pyramid can be handed back (FCOS labels still 0-based): the dense part
        (:class:`DetectorDense`), then :meth:`detections_from_dense`.
        ``tests/test_detection_pipeline.py`` checks it gives what ``self.detector(images)`` gives."""
        d = self.detector
        original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = d.transform(images)
        dense = self.dense_module()(batch.tensors)
        found = self.detections_from_dense(dense, batch.tensors.shape, batch.image_sizes)
        found = d.transform.postprocess(found, batch.image_sizes, original)
        return found, list(dense[:len(self.fpn.indices)]), [(int(h), int(w)) for h, w in batch.image_sizes]


class DetectorDense(nn.Module):
    """The dense part of an :class:`InternImageDetector`: ``pixels (B, 3, H, W)``, a normalised batch padded as
    torchvision's transform pads it (sides multiples of 32), to ``(level_0, ..., fpn_0, ..., fpn_pool)`` (Mask
    R-CNN: the tower levels, then the pyramid maps) or ``(level_0, ..., cls_logits, bbox_regression,
    bbox_ctrness)`` (FCOS: the tower levels, then the head's outputs over all pyramid cells). The rest
    (:meth:`InternImageDetector.detections_from_dense`) stays in PyTorch. It holds the detector without
    registering it anywhere else (a view, not a copy)."""

    FCOS_OUTPUTS = ("cls_logits", "bbox_regression", "bbox_ctrness")

    def __init__(self, model: InternImageDetector):
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> list[str]:
        fpn = self.model.fpn
        levels = [f"level_{i}" for i in range(len(fpn.indices))]
        if self.model.config.head == "fcos":
            return levels + list(self.FCOS_OUTPUTS)
        return levels + [f"fpn_{n}" for n in fpn.names]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fpn = self.model.fpn
        levels = fpn.levels(pixels)
        maps = list(fpn.pyramid(levels).values())
        if self.model.config.head == "fcos":
            head = self.model.detector.head(maps)
            return (*levels, *(head[k] for k in self.FCOS_OUTPUTS))
        return (*levels, *maps)


def _build_head(c: DetectorConfig, fpn: BackboneFPN, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection import FCOS, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    common = dict(min_size=c.min_size, max_size=c.max_size, image_mean=mean, image_std=std)
    sizes = tuple((c.anchor_scale * s,) for s in fpn.strides)  # default: 32 px at stride 4, doubling per level
    if c.head == "fcos":
        anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        from torchvision.models.detection.fcos import FCOSHead

        head = FCOSHead(fpn.out_channels, 1, c.num_classes, num_convs=c.head_convs)
        return FCOS(fpn, num_classes=c.num_classes, anchor_generator=anchors, head=head, score_thresh=c.score_threshold,
                    topk_candidates=c.topk_candidates, detections_per_img=c.detections_per_image, **common)
    levels = fpn.names[:-1]  # RoI pooling reads the pyramid levels, not the max-pooled one
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    ch, k = fpn.out_channels, c.num_classes + 1
    proposals = dict(rpn_pre_nms_top_n_train=c.rpn_proposals, rpn_post_nms_top_n_train=c.rpn_proposals,
                     rpn_pre_nms_top_n_test=max(1, c.rpn_proposals // 2),
                     rpn_post_nms_top_n_test=max(1, c.rpn_proposals // 2), box_batch_size_per_image=c.roi_batch)
    return MaskRCNN(fpn, rpn_anchor_generator=anchors, **proposals,
                    box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                    box_head=TwoMLPHead(ch * 7 * 7, c.box_head_dim),
                    box_predictor=FastRCNNPredictor(c.box_head_dim, k),
                    mask_head=MaskRCNNHeads(ch, (c.mask_head_dim,) * 4, 1),
                    mask_predictor=MaskRCNNPredictor(c.mask_head_dim, c.mask_head_dim, k),
                    box_score_thresh=c.score_threshold, box_detections_per_img=c.detections_per_image, **common)
