"""Semantic segmentation: an UperNet head on any ``create_backbone`` tower with level outputs (every InternImage).

    >>> from shusheng.detection.segment import InternImageSegmenter, SegmenterConfig
    >>> model = InternImageSegmenter(SegmenterConfig(backbone="internimage_t"))   # random init
    >>> logits = model(pixels)                        # (B, K, H, W), pixels normalised with the tower's mean/std
    >>> losses = model(pixels, masks)                 # {"loss_seg", "loss_aux"}: cross-entropy, masks (B, H, W)
    >>> ids = model.predict([image])                  # [(H, W) int64 class ids], image (H, W, 3) uint8
    >>> model.save_pretrained("out/seg"); InternImageSegmenter.from_pretrained("out/seg")

The head is UperNet's (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018), as the
official InternImage segmentation configs use it (mmseg's ``UPerHead`` + ``FCNHead``), written here in plain
PyTorch: a pyramid pooling module (PPM) on the last level, 1x1 laterals and a top-down path over the others, a
3x3 conv per level, a 3x3 conv fusing all levels upsampled to the first (stride 4), dropout and a 1x1 classifier.
The logits are upsampled bilinearly to the input size. In training an auxiliary FCN head on the second-to-last
level (stride 16 for InternImage) adds ``aux_weight`` times its own cross-entropy, as UperNet does; it is not
used at inference. Class id ``k`` is ``config.labels[k]`` (default: SynthDrive's 12 classes,
``shusheng.data.synthdrive.CLASSES``). Nothing is downloaded: the head is randomly initialised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shusheng._config import config_from_any
from shusheng.backbone import create_backbone
from shusheng.modeling import Preprocess, PretrainedMixin

__all__ = ["IGNORE_INDEX", "PALETTE", "InternImageSegmenter", "SegmenterConfig", "SegmenterImageSide", "colorize", "logits_to_ids",
           "overlay", "palette", "resize_logits"]

#: target value that the loss ignores
IGNORE_INDEX = 255

#: colour of each SynthDrive class (``CLASSES`` order), Cityscapes-like; more classes get :func:`palette` colours
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # other
    (128, 64, 128),  # road
    (255, 255, 255),  # lane_marking
    (157, 234, 50),  # crosswalk
    (244, 35, 232),  # sidewalk
    (70, 130, 180),  # sky
    (70, 70, 70),  # building
    (107, 142, 35),  # vegetation
    (0, 0, 142),  # vehicle
    (220, 20, 60),  # person
    (250, 170, 30),  # traffic_light
    (220, 220, 0),  # sign
)


def _synthdrive_classes() -> list[str]:
    from shusheng.data.synthdrive import CLASSES

    return list(CLASSES)


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours: :data:`PALETTE` first, then fixed pseudo-random colours (the same every time)."""
    extra = np.random.default_rng(12345).integers(0, 256, (max(0, n - len(PALETTE)), 3))
    return np.concatenate([np.array(PALETTE, dtype=np.uint8), extra.astype(np.uint8)])[:n]


def colorize(ids: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 image of a class-id map in the :func:`palette` colours."""
    ids = np.asarray(ids, dtype=np.int64)
    top = int(ids.max()) + 1 if ids.size else 1
    return palette(max(top, num_classes or 0))[ids]


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.5, num_classes: int | None = None) -> np.ndarray:
    """``image`` (H, W, 3) uint8 blended with the colours of ``ids`` (H, W): ``(1 - alpha) image + alpha colour``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] != np.shape(ids):
        raise ValueError(f"image {image.shape[:2]} and class map {np.shape(ids)} differ in size")
    mixed = (1.0 - alpha) * image + alpha * colorize(ids, num_classes).astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


@dataclass
class SegmenterConfig:
    """Constructor arguments of :class:`InternImageSegmenter` (stored in ``config.json``).

    Args:
        backbone: a ``create_backbone`` name whose tower has ``forward_intermediates`` and ``feature_info``.
        backbone_args: builder arguments of the tower (``{"channels": 8}``, ...).
        backbone_indices: the tower levels the head reads (None = all: strides 4-32 for InternImage).
        channels: width of the head (mmseg's UperNet uses 512; small models here use 64-128).
        pool_scales: output sides of the PPM's adaptive average pools on the last level.
        labels: class names; class id ``k`` is ``labels[k]``. Default: SynthDrive's ``CLASSES``.
        image_size: side of the square the model sees (:meth:`InternImageSegmenter.predict` and the pipelines
            resize every image to it, and the class map back to the image's own size).
        aux_weight: weight of the auxiliary FCN head's loss in training (0: no auxiliary head).
        dropout: dropout before the classifiers (UperNet's 0.1).
    """

    backbone: str = "internimage_t"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    backbone_indices: list[int] | None = None
    channels: int = 128
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    labels: list[str] = field(default_factory=_synthdrive_classes)
    image_size: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1

    def __post_init__(self):
        self.labels = [str(v) for v in self.labels]
        self.backbone_args = dict(self.backbone_args)
        self.pool_scales = [int(s) for s in self.pool_scales]
        if self.backbone_indices is not None:
            self.backbone_indices = [int(i) for i in self.backbone_indices]
        if len(self.labels) < 2:
            raise ValueError(f"a segmenter needs at least two classes, got labels {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        if int(self.channels) < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels}")
        if not self.pool_scales or min(self.pool_scales) < 1:
            raise ValueError(f"pool_scales must be positive integers, got {self.pool_scales}")
        if int(self.image_size) < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @classmethod
    def from_any(cls, config: SegmenterConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> SegmenterConfig:
        """Build from a config, a plain dict (e.g. a parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU: mmseg's ``ConvModule`` as UperNet uses it."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _pool_matrix(n: int, s: int, like: torch.Tensor) -> torch.Tensor:
    """``(s, n)``: row ``i`` averages cells ``floor(i n / s) .. ceil((i + 1) n / s) - 1``, the bins of
    ``adaptive_avg_pool``."""
    m = torch.zeros(s, n, dtype=like.dtype, device=like.device)
    for i in range(s):
        a, b = (i * n) // s, -(-((i + 1) * n) // s)
        m[i, a:b] = 1.0 / (b - a)
    return m


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)``; while exporting to ONNX, the same bins as two matrix products (the ONNX
    exporter refuses adaptive pools whose output size does not divide the input size, e.g. the PPM's 3 and 6 on a
    small last level). The input size of an export is fixed, so the matrices are constants of the graph."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return F.adaptive_avg_pool2d(x, self.size)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return _pool_matrix(h, self.size, x) @ x @ _pool_matrix(w, self.size, x).T

    def extra_repr(self) -> str:
        return f"output_size={self.size}"


class PPM(nn.Module):
    """Pyramid pooling: the input and its ``scales`` average pools (1x1 conv each, upsampled back), fused by a 3x3
    conv."""

    def __init__(self, in_ch: int, channels: int, scales: Sequence[int]):
        super().__init__()
        self.pools = nn.ModuleList(nn.Sequential(AdaptiveAvgPool(s), ConvNormAct(in_ch, channels))
                                   for s in scales)
        self.bottleneck = ConvNormAct(in_ch + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x, *(_resize(p(x), size) for p in self.pools)], 1))


class UperHead(nn.Module):
    """UperNet's decode head over level maps of strides ``s_0 < s_1 < ...``: logits at the first level's stride.

    Args:
        in_channels: channels of each level map.
        channels: width of the head.
        num_classes: output classes.
        pool_scales: the PPM's pool sides (on the last level).
        dropout: before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.laterals, feats)] + [self.ppm(feats[-1])]  # each (B, C, H_i, W_i)
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse maps added into finer ones
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], 1))  # (B, C, H_0, W_0)
        return self.classifier(self.dropout(x))  # (B, K, H_0, W_0)


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 conv, dropout, 1x1 classifier."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvNormAct(in_ch, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


def _tower_levels(tower: nn.Module, indices: Sequence[int] | None) -> tuple[list[int], list[int], list[int]]:
    """``(indices, channels, strides)`` of the levels read from a tower with ``forward_intermediates`` +
    ``feature_info``."""
    info = getattr(tower, "feature_info", None)
    if not callable(getattr(tower, "forward_intermediates", None)) or info is None:
        raise TypeError(f"{type(tower).__name__} has no forward_intermediates()/feature_info: a segmenter needs a "
                        "tower with level outputs (InternImage or a timm model)")
    info = [dict(i) for i in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    n = len(info)
    indices = list(range(n)) if indices is None else [i % n for i in indices]
    if not indices or sorted(set(indices)) != indices:
        raise ValueError(f"backbone_indices must be distinct increasing levels of the {n} the tower has, got "
                         f"{indices}")
    return indices, [int(info[i]["num_chs"]) for i in indices], [int(info[i]["reduction"]) for i in indices]


def _tower_preprocess(tower: nn.Module) -> Preprocess:
    if hasattr(tower, "preprocess_config"):
        return tower.preprocess_config()
    return Preprocess.from_timm(getattr(tower, "pretrained_cfg", {}) or {})


def resize_logits(logits: torch.Tensor, size: tuple[int, int], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, as ``F.interpolate``) of ``logits`` ``(K, h, w)`` to ``size`` =
    ``(W, H)``, computing only output rows ``rows = (r0, r1)`` (default all): ``(K, r1 - r0, W)``. Rows let a
    class map of a large image be made strip by strip."""
    w_out, h_out = size
    r0, r1 = (0, h_out) if rows is None else rows
    dev, dt = logits.device, logits.dtype
    xs = (torch.arange(w_out, device=dev, dtype=torch.float32) + 0.5) * (2.0 / w_out) - 1.0
    ys = (torch.arange(r0, r1, device=dev, dtype=torch.float32) + 0.5) * (2.0 / h_out) - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None].to(dt)  # (1, r1 - r0, W, 2) as (x, y)
    return F.grid_sample(logits[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def logits_to_ids(logits: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 24) -> np.ndarray:
    """``(H, W)`` int64 class ids of ``logits`` ``(K, h, w)`` resized to ``size`` = ``(W, H)`` (bilinear, then
    argmax), in strips of at most ``max_elements`` resized logits so large images stay within memory."""
    k = logits.shape[0]
    w_out, h_out = size
    step = max(1, max_elements // max(1, k * w_out))
    out = np.empty((h_out, w_out), dtype=np.int64)
    for r0 in range(0, h_out, step):
        r1 = min(h_out, r0 + step)
        out[r0:r1] = resize_logits(logits, size, (r0, r1)).argmax(0).cpu().numpy()
    return out


class InternImageSegmenter(PretrainedMixin, nn.Module):
    """UperNet (+ auxiliary FCN head in training) on a tower's level outputs (see the module docstring).

    Args:
        config: a :class:`SegmenterConfig` or a dict of its fields.
        **overrides: config fields.

    Attributes:
        backbone: the tower (its classifier head pruned).
        indices, level_strides: the tower levels the heads read (:meth:`forward_features`) and their strides.
        decode_head: the :class:`UperHead`.
        aux_head: the :class:`FCNHead` on the second-to-last level read, or None (``aux_weight == 0``).
    """

    model_type = "segmenter"
    config_class = SegmenterConfig

    def __init__(self, config: SegmenterConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__()
        self.config = c = SegmenterConfig.from_any(config, **overrides)
        tower = create_backbone(c.backbone, **c.backbone_args)
        pre = _tower_preprocess(tower)
        self._mean, self._std, self._interpolation = pre.mean, pre.std, pre.interpolation
        self.indices, in_channels, self.level_strides = _tower_levels(tower, c.backbone_indices)
        if hasattr(tower, "prune_intermediate_layers"):
            tower.prune_intermediate_layers(self.indices, prune_head=True)
        self.backbone = tower
        self.decode_head = UperHead(in_channels, c.channels, c.num_classes, c.pool_scales, c.dropout)
        self.aux_index = max(0, len(in_channels) - 2)
        self.aux_head = (FCNHead(in_channels[self.aux_index], c.channels, c.num_classes, c.dropout)
                         if c.aux_weight > 0 else None)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def preprocess_config(self) -> Preprocess:
        return Preprocess(size=self.config.image_size, resize="squash", interpolation=self._interpolation,
                          mean=self._mean, std=self._std)

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The level maps the head reads: ``[(B, C_i, H / s_i, W / s_i), ...]``."""
        return self.backbone.forward_intermediates(pixels, self.indices, intermediates_only=True)

    def forward(self, pixels: torch.Tensor, targets: torch.Tensor | None = None,
                class_weights: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits, or the losses when ``targets`` are given.

        Args:
            pixels: ``(B, 3, H, W)`` images normalised with the tower's mean/std.
            targets: ``(B, H, W)`` int64 class ids (:data:`IGNORE_INDEX` is ignored).
            class_weights: ``(K,)`` cross-entropy class weights (None: all 1).

        Returns:
            ``(B, K, H, W)`` logits without ``targets``; with them ``{"loss_seg"(, "loss_aux")}``, the auxiliary
            loss already multiplied by ``aux_weight``.
        """
        feats = self.forward_features(pixels)
        size = pixels.shape[-2:]
        logits = _resize(self.decode_head(feats), size)  # (B, K, H, W)
        if targets is None:
            return logits
        targets = targets.long()
        losses = {"loss_seg": F.cross_entropy(logits, targets, weight=class_weights, ignore_index=IGNORE_INDEX)}
        if self.aux_head is not None:
            aux = _resize(self.aux_head(feats[self.aux_index]), size)
            losses["loss_aux"] = self.config.aux_weight * F.cross_entropy(aux, targets, weight=class_weights,
                                                                          ignore_index=IGNORE_INDEX)
        return losses

    def segment(self, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None
                ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        """Class maps of a batch of transformed images (no gradients, the mode left as it is).

        Args:
            pixels: ``(B, 3, S, S)`` images as :func:`~shusheng.modeling.resolve_transform` makes them.
            sizes: ``(W, H)`` of each original image (default: the input size): the logits are resized to it.

        Returns:
            ``(class_ids, features)``: ``(H, W)`` int64 class ids per image, and the tower's level maps
            (:meth:`forward_features` of ``pixels``, from the same pass; the pipeline's in-domain check reads them).
        """
        with torch.no_grad():
            logits, *feats = SegmenterImageSide(self)(pixels)
        return self.class_maps(logits, sizes or [(pixels.shape[-1], pixels.shape[-2])] * len(pixels)), feats

    @staticmethod
    def class_maps(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """``(H, W)`` int64 class ids per image from head logits ``(B, K, h, w)``, resized to ``sizes`` ``(W, H)``."""
        return [logits_to_ids(lg.float(), (int(w), int(h))) for lg, (w, h) in zip(logits, sizes)]

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Class ids of images at their own sizes.

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays (any sizes).
            batch_size: images per forward pass.

        Returns:
            ``(H, W)`` int64 class-id maps, one per image.
        """
        from PIL import Image

        from shusheng.modeling import resolve_transform

        transform = resolve_transform(self)
        p = next(self.parameters())
        was_training = self.training
        self.eval()
        out: list[np.ndarray] = []
        try:
            for b in range(0, len(images), batch_size):
                chunk = [np.asarray(im, dtype=np.uint8) for im in images[b:b + batch_size]]
                if any(im.ndim != 3 or im.shape[2] != 3 for im in chunk):
                    raise ValueError("predict takes (H, W, 3) uint8 RGB arrays")
                pixels = torch.stack([transform(Image.fromarray(im)) for im in chunk]).to(p.device, p.dtype)
                out.extend(self.segment(pixels, [(im.shape[1], im.shape[0]) for im in chunk])[0])
        finally:
            self.train(was_training)
        return out

    @staticmethod
    def class_shares(ids: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
        """Share of the pixels of each class (all classes, summing to 1)."""
        counts = np.bincount(np.asarray(ids).reshape(-1), minlength=len(labels))[:len(labels)]
        total = max(1, int(np.asarray(ids).size))
        return {name: float(c) / total for name, c in zip(labels, counts)}


class SegmenterImageSide(nn.Module):
    """``pixels -> (logits, level_0, ...)``: the head's logits at the first level's stride ``(B, K, S / 4, S / 4)``
    and the tower levels it read (the in-domain check's input), from one pass. What
    ``SegmentationPipeline(runtime=...)`` runs; the resize to each image's size and the argmax stay in PyTorch.
    It holds the segmenter without registering it anywhere else."""

    def __init__(self, model: InternImageSegmenter):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.forward_features(pixels)
        return (self.model.decode_head(feats), *feats)
