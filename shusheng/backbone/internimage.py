"""InternImage: large-scale vision backbones built on deformable convolution v3 (DCNv3).

Paper: Wang et al., "InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions",
CVPR 2023 (arXiv:2211.05778). Re-implemented from the behaviour of the official code
(https://github.com/OpenGVLab/InternImage, MIT licence) as described in ``shared/specs/internimage.md``; no
official code is copied. Module and parameter names equal the official ones, so the official checkpoints
(``internimage_t_1k_224.pth`` ... ``internimage_g_22kto1k_512.pth``, MIT licence) load unchanged with
``strict=True``. Official weights are never downloaded: pass the path of a local file.

Layout (timm style): helper layers → block → level → ``InternImage`` → ``_init_weights`` /
``checkpoint_filter_fn`` → ``_create_internimage`` → ``default_cfgs`` → variants (``internimage_t/s/b/l/xl/h/g``
and the tiny ``internimage_test`` for CI) registered at the bottom.

Tensor layout: the stem turns the NCHW image into **channels-last (N, H, W, C)** feature maps, which every
block and level keeps; the public outputs (``forward_features``, ``forward_intermediates``) are NCHW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shusheng._config import config_from_any
from shusheng._deps import require
from shusheng.backbone.checkpoint import (
    PretrainedWeightsNotFound,
    filter_state_dict,
    load_checkpoint,
)
from shusheng.backbone.registry import register_model
from shusheng.modeling import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_NAME, Preprocess, PretrainedMixin
from shusheng.ops import BACKENDS, DCNv3, build_act_layer, build_norm_layer

logger = logging.getLogger(__name__)

__all__ = ["InternImage", "InternImageConfig", "checkpoint_filter_fn", "default_cfgs"]

IMAGENET_DEFAULT_MEAN = IMAGENET_MEAN
IMAGENET_DEFAULT_STD = IMAGENET_STD

# core_op names of the official code -> shusheng.ops DCNv3 backend (None = fastest available on the device).
CORE_OPS = {"DCNv3": None, "DCNv3_pytorch": "reference"}


# --------------------------------------------------------------------------------------------------------
# Helper layers
# --------------------------------------------------------------------------------------------------------

def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample, with timm's semantics (kept samples are scaled by ``1 / keep_prob``)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    """Stochastic depth (same behaviour as ``timm.layers.DropPath``, kept here because timm is optional)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class StemLayer(nn.Module):
    """``patch_embed``: two 3x3 stride-2 convs (total stride 4); NCHW image in, channels-last map out."""

    def __init__(self, in_chans: int = 3, out_chans: int = 96, act_layer: str = "GELU", norm_layer: str = "LN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, norm_layer, "channels_first", "channels_first")
        self.act = build_act_layer(act_layer)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))  # (N, C/2, H/2, W/2)
        return self.norm2(self.conv2(x))  # (N, H/4, W/4, C)


class DownsampleLayer(nn.Module):
    """3x3 stride-2 conv without bias (C -> 2C) and a norm; channels-last in and out."""

    def __init__(self, channels: int, norm_layer: str = "LN"):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, norm_layer, "channels_first", "channels_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))  # (N, H, W, C) -> (N, H/2, W/2, 2C)


class MLPLayer(nn.Module):
    """fc1 → activation → dropout → fc2 → dropout (on the last dimension)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "GELU", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_act_layer(act_layer)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if _inference(h) and type(self.act) is nn.GELU and self.act.approximate == "none":
            h = torch.ops.aten.gelu_(h)  # in place: no second (..., 4C) buffer when nothing needs the input
        else:
            h = self.act(h)
        return self.drop(self.fc2(self.drop(h)))


# torch.fx symbolic tracing in progress (newer torch: is_fx_symbolic_tracing; is_fx_tracing logs a warning there)
_is_fx_tracing = (getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
                  or torch.fx._symbolic_trace.is_fx_tracing)


def _inference(t: torch.Tensor) -> bool:
    """True when autograd will not need ``t`` (no grad mode, or a tensor outside the graph): in-place ops are
    then safe. Not under tracing/export (TorchScript, torch.fx, torch.compile, ONNX), which expect the functional
    graph."""
    if _is_fx_tracing():  # a Proxy cannot be read as a bool
        return False
    return not (t.requires_grad or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` where ``y`` is a fresh branch output: accumulate into ``y`` in place at inference (one
    (N, H, W, C) allocation fewer per branch)."""
    if _inference(y) and not x.requires_grad and y.shape == x.shape and y.dtype == x.dtype:
        return y.add_(x)
    return x + y


class CrossAttention(nn.Module):
    """Multi-head cross attention whose q/k/v biases are separate parameters (``q_bias``, ``k_bias``, ``v_bias``).

    The q/k/v projections are bias-free ``nn.Linear`` modules used through ``F.linear`` with those biases, as in
    the official code (so their state_dict keys are ``q.weight`` and ``q_bias``).
    """

    def __init__(self, dim: int, num_heads: int = 8, out_dim: int | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, out_dim if out_dim is not None else dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.num_heads
        q = F.linear(x, self.q.weight, self.q_bias).reshape(B, N, h, -1).transpose(1, 2)  # (B, h, N, d)
        k = F.linear(k, self.k.weight, self.k_bias).reshape(B, k.shape[1], h, -1).transpose(1, 2)  # (B, h, L, d)
        v = F.linear(v, self.v.weight, self.v_bias).reshape(B, v.shape[1], h, -1).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, L)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)  # (B, N, dim)
        return self.proj(x)


class AttentionPoolingBlock(nn.Module):
    """Attention pooling of InternImage-H/G (``clip_projector``): the mean token attends to all tokens."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = build_norm_layer(dim, "LN")
        self.norm1_k = build_norm_layer(dim, "LN")
        self.norm1_v = build_norm_layer(dim, "LN")
        self.cross_dcn = CrossAttention(dim, num_heads=num_heads, out_dim=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.norm1_q(x.mean(1, keepdim=True))  # (B, 1, dim); the official positional terms are 0
        out = self.cross_dcn(q, k=self.norm1_k(x), v=self.norm1_v(x))  # (B, 1, out_dim)
        return out.squeeze(1)


# --------------------------------------------------------------------------------------------------------
# Block (official ``InternImageLayer``)
# --------------------------------------------------------------------------------------------------------

class InternImageBlock(nn.Module):
    """One InternImage block: DCNv3 token mixer and MLP, each in a residual branch (official ``InternImageLayer``).

    Exactly one of five update rules applies (``layer_scale`` is checked first, then ``post_norm``, then
    ``res_post_norm``; DP = drop path):

    ============  =========  =============  ======================================================
    layer_scale   post_norm  res_post_norm  update
    ============  =========  =============  ======================================================
    None          True       (ignored)      x += DP(norm1(dcn(x))); x += DP(norm2(mlp(x)))
    None          False      True           x += DP(rpn1(dcn(norm1(x)))); x += DP(rpn2(mlp(norm2(x))))
    None          False      False          x += DP(dcn(norm1(x))); x += DP(mlp(norm2(x)))
    set           True       --             x += DP(γ1·norm1(dcn(x))); x += DP(γ2·norm2(mlp(x)))
    set           False      --             x += DP(γ1·dcn(norm1(x))); x += DP(γ2·mlp(norm2(x)))
    ============  =========  =============  ======================================================

    With ``layer_scale`` set, ``res_post_norm1/2`` still exist (as in the official code) but are unused.

    Shapes: ``(N, H, W, C) -> (N, H, W, C)``.
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        post_norm: bool = False,
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.with_cp = with_cp
        self.norm1 = build_norm_layer(channels, "LN")
        self.dcn = DCNv3(
            channels=channels, kernel_size=3, dw_kernel_size=dw_kernel_size, stride=1, pad=1, dilation=1,
            group=groups, offset_scale=offset_scale, act_layer=act_layer, norm_layer=norm_layer,
            center_feature_scale=center_feature_scale, remove_center=remove_center, backend=backend,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, "LN")
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), act_layer=act_layer, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))
        if res_post_norm:
            self.res_post_norm1 = build_norm_layer(channels, "LN")
            self.res_post_norm2 = build_norm_layer(channels, "LN")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_scale:
            if self.post_norm:
                x = _residual(x, self.drop_path(self.norm1(self.dcn(x))))
                return _residual(x, self.drop_path(self.norm2(self.mlp(x))))
            if self.res_post_norm:
                x = _residual(x, self.drop_path(self.res_post_norm1(self.dcn(self.norm1(x)))))
                return _residual(x, self.drop_path(self.res_post_norm2(self.mlp(self.norm2(x)))))
            x = _residual(x, self.drop_path(self.dcn(self.norm1(x))))
            return _residual(x, self.drop_path(self.mlp(self.norm2(x))))
        if self.post_norm:
            x = _residual(x, self.drop_path(self.gamma1 * self.norm1(self.dcn(x))))
            return _residual(x, self.drop_path(self.gamma2 * self.norm2(self.mlp(x))))
        x = _residual(x, self.drop_path(self.gamma1 * self.dcn(self.norm1(x))))
        return _residual(x, self.drop_path(self.gamma2 * self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


# --------------------------------------------------------------------------------------------------------
# Level (official ``InternImageBlock``)
# --------------------------------------------------------------------------------------------------------

class InternImageLevel(nn.Module):
    """A stage of ``depth`` blocks at one resolution, then the level norm and the downsampling.

    The level norm ``norm`` exists iff ``(not post_norm) or center_feature_scale``. ``post_norm_block_ids``
    (InternImage-H/G, level 2) adds an extra LayerNorm ``post_norms[k]`` after block ``post_norm_block_ids[k]``.

    Shapes: ``forward(x)``: ``(N, H, W, C) -> (N, H/2, W/2, 2C)`` (or ``(N, H, W, C)`` without downsample);
    with ``return_wo_downsample=True`` it returns ``(downsampled, before_downsample)``.
    """

    def __init__(
        self,
        channels: int,
        depth: int,
        groups: int,
        downsample: bool = True,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float | list[float] = 0.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        post_norm: bool = False,
        offset_scale: float = 1.0,
        layer_scale: float | None = None,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        post_norm_block_ids: tuple[int, ...] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.depth = depth
        dprs = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            InternImageBlock(
                channels, groups, mlp_ratio=mlp_ratio, drop=drop, drop_path=dprs[i], act_layer=act_layer,
                norm_layer=norm_layer, post_norm=post_norm, layer_scale=layer_scale, offset_scale=offset_scale,
                with_cp=with_cp, dw_kernel_size=dw_kernel_size, res_post_norm=res_post_norm,
                center_feature_scale=center_feature_scale, remove_center=remove_center, backend=backend,
            )
            for i in range(depth)
        ])
        self.norm = build_norm_layer(channels, "LN") if (not post_norm or center_feature_scale) else None
        self.post_norm_block_ids = tuple(post_norm_block_ids) if post_norm_block_ids is not None else None
        if self.post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList([build_norm_layer(channels, "LN") for _ in self.post_norm_block_ids])
            self._post_norm_index = {b: k for k, b in enumerate(self.post_norm_block_ids)}
        else:
            self._post_norm_index = {}
        self.downsample = DownsampleLayer(channels, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, return_wo_downsample: bool = False):
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            k = self._post_norm_index.get(i)
            if k is not None:
                x = self.post_norms[k](x)
        if self.norm is not None:
            x = self.norm(x)
        x_pre = x  # (N, H, W, C): what detection/segmentation take from this level
        if self.downsample is not None:
            x = self.downsample(x)  # (N, H/2, W/2, 2C)
        return (x, x_pre) if return_wo_downsample else x


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------

@dataclass
class InternImageConfig:
    """Constructor arguments of :class:`InternImage` (official keyword names; defaults give InternImage-T).

    Args:
        core_op: ``"DCNv3"`` (fastest available DCNv3 backend) or ``"DCNv3_pytorch"`` (``reference`` backend).
        channels: channels ``C`` of level 0; level ``i`` has ``C * 2**i``.
        depths, groups: blocks and DCNv3 groups per level.
        num_classes: classifier classes (0 = no classifier, ``head`` is Identity).
        global_pool: ``"avg"`` (pooled head, the official model) or ``""`` (timm's pass-through: ``forward``
            returns the unpooled NCHW map of the head, ``(B, head_hidden_size, H/32, W/32)`` for T–XL).
        in_chans: image channels.
        mlp_ratio: MLP hidden width / channels.
        drop_rate: dropout after the stem and inside the MLPs.
        drop_path_rate, drop_path_type: stochastic depth, ``"linear"`` (0 → rate over all blocks) or ``"uniform"``.
        act_layer, norm_layer: ``"GELU"``/``"ReLU"``/``"SiLU"``; ``"LN"``/``"BN"`` for stem, downsample and the DCN's
            depth-wise branch (block norms are always LayerNorm).
        layer_scale: initial γ of the per-channel layer scale (None = no layer scale).
        offset_scale: DCNv3 offset scale (2.0 for L/XL).
        post_norm: res-post-norm style blocks (norm on the branch output); removes the level norms unless
            ``center_feature_scale``.
        cls_scale: conv-head width factor (``int(8C * cls_scale)``).
        with_cp: gradient checkpointing per block (only while gradients are being recorded).
        dw_kernel_size: kernel of the DCN's depth-wise conv (None = 3).
        use_clip_projector: InternImage-H/G attention-pooling head instead of the conv head.
        level2_post_norm, level2_post_norm_block_ids: extra LayerNorms after these blocks of level 2.
        res_post_norm: pre-norm blocks with an extra LayerNorm on each branch output (InternImage-H).
        center_feature_scale: DCNv3 gate between sampled output and projected input.
        remove_center: DCNv3 without the centre sampling point.
        clip_embed_dim, clip_num_heads, clip_out_dim: sizes of the H/G head (official 1024, 16, 768; shusheng
            extension so tests can build small H/G-style models).
        backend: DCNv3 backend (``"reference"``, ``"cpu"``, ``"triton"``); overrides the one ``core_op`` implies.
    """

    core_op: str = "DCNv3"
    channels: int = 64
    depths: tuple[int, ...] = (4, 4, 18, 4)
    groups: tuple[int, ...] = (4, 8, 16, 32)
    num_classes: int = 1000
    global_pool: str = "avg"
    in_chans: int = 3
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    drop_path_type: str = "linear"
    act_layer: str = "GELU"
    norm_layer: str = "LN"
    layer_scale: float | None = None
    offset_scale: float = 1.0
    post_norm: bool = False
    cls_scale: float = 1.5
    with_cp: bool = False
    dw_kernel_size: int | None = None
    use_clip_projector: bool = False
    level2_post_norm: bool = False
    level2_post_norm_block_ids: tuple[int, ...] | None = None
    res_post_norm: bool = False
    center_feature_scale: bool = False
    remove_center: bool = False
    clip_embed_dim: int = 1024
    clip_num_heads: int = 16
    clip_out_dim: int = 768
    backend: str | None = None

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.groups = tuple(int(g) for g in self.groups)
        if self.level2_post_norm_block_ids is not None:
            self.level2_post_norm_block_ids = tuple(int(i) for i in self.level2_post_norm_block_ids)
        if self.core_op not in CORE_OPS:
            raise ValueError(f"core_op must be one of {sorted(CORE_OPS)}, got {self.core_op!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {self.backend!r}")
        if not self.depths or len(self.depths) != len(self.groups):
            raise ValueError(f"depths {self.depths} and groups {self.groups} must be non-empty and of equal length")
        for i, g in enumerate(self.groups):
            c = self.channels * 2 ** i
            if g < 1 or c % g:
                raise ValueError(f"level {i} has {c} channels, not divisible by groups[{i}] = {g}")
        if self.drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"drop_path_type must be 'linear' or 'uniform', got {self.drop_path_type!r}")
        if self.level2_post_norm:
            if len(self.depths) < 3 or not self.level2_post_norm_block_ids:
                raise ValueError("level2_post_norm needs level2_post_norm_block_ids and at least 3 levels")
            bad = [i for i in self.level2_post_norm_block_ids if not 0 <= i < self.depths[2]]
            if bad:
                raise ValueError(f"level2_post_norm_block_ids {bad} are not blocks of level 2 (depth {self.depths[2]})")
        if self.use_clip_projector and len(self.depths) < 2:
            raise ValueError("use_clip_projector needs at least 2 levels")

    @classmethod
    def from_any(cls, config: InternImageConfig | Mapping[str, Any] | None = None, **overrides) -> InternImageConfig:
        """Build from a config, a plain dict (e.g. a parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    @property
    def dcn_backend(self) -> str | None:
        """The DCNv3 backend the model uses: ``backend`` if set, else the one ``core_op`` maps to."""
        return self.backend if self.backend is not None else CORE_OPS[self.core_op]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the constructor arguments."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _take_indices(num_levels: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None = all, int n = last n, sequence = those (negative from the end)."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_levels})")
        take = list(range(num_levels - indices, num_levels))
    else:
        take = []
        for i in indices:
            idx = num_levels + i if i < 0 else i
            if not 0 <= idx < num_levels:
                raise ValueError(f"feature index {i} is out of range (0 to {num_levels - 1})")
            take.append(idx)
    return take, max(take)


class InternImage(PretrainedMixin, nn.Module):
    """InternImage classifier / backbone with the official module names and timm's model interface.

    Build it with the official keyword names (``InternImage(channels=64, depths=[4, 4, 18, 4], ...)``), from an
    :class:`InternImageConfig` or a dict, or through ``shusheng.backbone.create_model("internimage_t")``.

    Interface (timm conventions):
        * ``forward_features(x)``: ``(B, in_chans, H, W)`` → NCHW pre-pool map. T–XL: the last level output
          ``(B, 8C, H/32, W/32)``; H/G: the fused stride-16 map fed to attention pooling ``(B, 1024, H/16, W/16)``.
          ``num_features`` is that channel count.
        * ``forward_head(x, pre_logits=False)``: T–XL: 1x1 conv + BN + GELU, average pool, ``head``;
          H/G: attention pooling, ``fc_norm``, ``head``. ``pre_logits`` gives ``(B, head_hidden_size)``.
        * ``forward_intermediates(x, indices=None, ...)``: the NCHW level outputs at strides 4/8/16/32 (before
          downsampling, after the level norm) — what the official detection/segmentation backbones return.
        * ``feature_info``, ``reset_classifier``, ``get_classifier``, ``set_grad_checkpointing``,
          ``prune_intermediate_layers``, ``group_matcher``; ``save_pretrained`` / ``from_pretrained``.
        * ``pretrained_cfg``: input size, mean/std, interpolation, crop_pct and provenance of the weights.

    Internally every level works on channels-last ``(N, H, W, C)`` tensors; the NCHW outputs above are permuted
    views of them (shape NCHW, ``torch.channels_last`` memory layout), which convolutions consume without a copy;
    call ``.contiguous()`` before ``.view()``.
    """

    model_type = "internimage"
    config_class = InternImageConfig

    def __init__(self, config: InternImageConfig | Mapping[str, Any] | None = None, **kwargs):
        super().__init__()
        cfg = InternImageConfig.from_any(config, **kwargs)
        self.config = cfg
        if cfg.global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {cfg.global_pool!r}")
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_levels = len(cfg.depths)
        self.depths = list(cfg.depths)
        self.channels = cfg.channels
        self.level_channels = [cfg.channels * 2 ** i for i in range(self.num_levels)]
        self.use_clip_projector = cfg.use_clip_projector
        self.remove_center = cfg.remove_center
        self.grad_checkpointing = cfg.with_cp
        self.pretrained_cfg: dict[str, Any] = _cfg()
        backend = cfg.dcn_backend

        self.patch_embed = StemLayer(cfg.in_chans, cfg.channels, cfg.act_layer, cfg.norm_layer)
        self.pos_drop = nn.Dropout(p=cfg.drop_rate)
        total = sum(cfg.depths)
        if cfg.drop_path_type == "uniform":
            dpr = [cfg.drop_path_rate] * total
        else:
            dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, total, device="cpu")]
        self.levels = nn.ModuleList()
        for i in range(self.num_levels):
            start = sum(cfg.depths[:i])
            self.levels.append(InternImageLevel(
                channels=self.level_channels[i], depth=cfg.depths[i], groups=cfg.groups[i],
                downsample=i < self.num_levels - 1, mlp_ratio=cfg.mlp_ratio, drop=cfg.drop_rate,
                drop_path=dpr[start:start + cfg.depths[i]], act_layer=cfg.act_layer, norm_layer=cfg.norm_layer,
                post_norm=cfg.post_norm, offset_scale=cfg.offset_scale, layer_scale=cfg.layer_scale,
                with_cp=cfg.with_cp, dw_kernel_size=cfg.dw_kernel_size,
                post_norm_block_ids=cfg.level2_post_norm_block_ids if (cfg.level2_post_norm and i == 2) else None,
                res_post_norm=cfg.res_post_norm, center_feature_scale=cfg.center_feature_scale,
                remove_center=cfg.remove_center, backend=backend,
            ))
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"levels.{i}")
                             for i, c in enumerate(self.level_channels)]

        last = self.level_channels[-1]
        if not cfg.use_clip_projector:  # T/S/B/L/XL
            hidden = int(last * cfg.cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(last, hidden, kernel_size=1, bias=False),
                build_norm_layer(hidden, "BN", "channels_first", "channels_first"),
                build_act_layer(cfg.act_layer),
            )
            self.num_features = last
            self.head_hidden_size = hidden
            self._head_type = "conv"
        else:  # H/G: upsample level 3 to stride 16, add level 2, attention-pool the tokens
            e = cfg.clip_embed_dim
            self.dcnv3_head_x4 = nn.Sequential(nn.Conv2d(last, e * 4, kernel_size=1), nn.PixelShuffle(2))
            self.dcnv3_head_x3 = nn.Conv2d(self.level_channels[-2], e, kernel_size=1)
            self.clip_projector = AttentionPoolingBlock(e, cfg.clip_num_heads, cfg.clip_out_dim)
            self.fc_norm = build_norm_layer(cfg.clip_out_dim, "LN")
            self.num_features = e
            self.head_hidden_size = cfg.clip_out_dim
            self._head_type = "clip"
        self.head = nn.Linear(self.head_hidden_size, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self._pruned = False

        self.apply(_init_weights)
        for m in self.modules():  # the official model re-runs the DCN init after its own
            if isinstance(m, DCNv3):
                m._reset_parameters()

    # -- timm-style accessors ----------------------------------------------------------------------------

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of ``pretrained_cfg`` (older timm name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict[str, Any]) -> None:
        self.pretrained_cfg = value

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final ``head`` Linear with a freshly initialised one (``num_classes=0``: Identity).

        The conv head / attention pooling before it are kept (they are the pre-logits layers). ``global_pool=""``
        turns the pooling off (timm's convention): ``forward`` then returns the head's unpooled NCHW map and
        needs ``num_classes=0``.
        """
        if global_pool not in (None, "avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            ref = next(self.parameters())
            head = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            _init_weights(head)
            self.head = head
        else:
            self.head = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant) while training."""
        self.grad_checkpointing = enable
        for level in self.levels:
            for blk in level.blocks:
                blk.with_cp = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay (stem, then levels/blocks in depth order)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.(?:norm|post_norms)", (99998,)),
                (r"^levels\.(\d+)\.downsample", (99999,)),
            ],
        )

    # -- forward ------------------------------------------------------------------------------------------

    def _forward_levels(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """Run stem and levels ``0..last``; returns each level's pre-downsample output, channels-last."""
        x = self.pos_drop(self.patch_embed(x))  # (B, H/4, W/4, C)
        outs = []
        levels = self.levels if last is None else self.levels[:last + 1]
        for level in levels:
            x, x_pre = level(x, return_wo_downsample=True)
            outs.append(x_pre)  # (B, H_i, W_i, C_i)
        return outs

    def _features(self, level_outs: list[torch.Tensor]) -> torch.Tensor:
        if self._head_type != "clip":
            return level_outs[-1].permute(0, 3, 1, 2)  # (B, 8C, H/32, W/32)
        x3 = self.dcnv3_head_x3(level_outs[-2].permute(0, 3, 1, 2))  # (B, E, H/16, W/16)
        x4 = self.dcnv3_head_x4(level_outs[-1].permute(0, 3, 1, 2))  # (B, E, 2*ceil(H/32), 2*ceil(W/32))
        # Equal sizes for inputs divisible by 32 (the official requirement); otherwise crop the upsampled map.
        return x4[..., :x3.shape[-2], :x3.shape[-1]] + x3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, in_chans, H, W)`` → NCHW feature map before pooling (see the class docstring)."""
        return self._features(self._forward_levels(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW output of ``forward_features`` → logits ``(B, num_classes)`` or pre-logits features."""
        if self.global_pool == "" and not pre_logits:
            if self.num_classes:
                raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled "
                                 "features")
            return self.conv_head(x) if self._head_type == "conv" else x  # (B, C', H/32, W/32) unpooled
        if self._head_type == "conv":
            x = torch.flatten(self.avgpool(self.conv_head(x)), 1)  # (B, 1.5 * 8C)
        elif self._head_type == "clip":
            x = x.flatten(2).transpose(1, 2)  # (B, L, E) tokens
            x = self.fc_norm(self.clip_projector(x))  # (B, clip_out_dim)
        else:  # pruned head: plain average pooling
            x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Level outputs (strides 4, 8, 16, 32; before downsampling, after the level norm).

        Follows timm's signature, but ``intermediates_only`` defaults to True (this project's convention): pass
        ``intermediates_only=False`` to get ``(forward_features output, intermediates)`` as in timm.

        Args:
            x: image ``(B, in_chans, H, W)``.
            indices: None = all levels, int n = last n, sequence = those levels (negative from the end).
            norm: accepted for timm compatibility; the level norms are part of every level already.
            stop_early: stop after the last requested level (implied when ``intermediates_only``); the final
                map is then that level's output.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = _take_indices(len(self.levels), indices)
        early = intermediates_only or stop_early
        outs = self._forward_levels(x, last=max_index if early else None)
        inter = [outs[i] if output_fmt == "NHWC" else outs[i].permute(0, 3, 1, 2) for i in take]
        if intermediates_only:
            return inter
        if len(outs) < len(self.levels):  # stopped early: like timm, the last computed level is the final map
            return outs[-1].permute(0, 3, 1, 2), inter
        return self._features(outs), inter

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the levels after the last requested one and (optionally) the classifier; timm's semantics.

        After pruning, ``forward_features`` returns the last kept level's output and ``forward_head`` is an
        average pool (plus ``head`` if ``reset_classifier`` adds one). ``prune_norm`` is accepted for timm
        compatibility (level norms stay: they are part of the levels' outputs).
        """
        take, max_index = _take_indices(len(self.levels), indices)
        prune_end = max_index < len(self.levels) - 1
        if prune_end:
            self.levels = self.levels[:max_index + 1]
            self.levels[-1].downsample = None
            self.feature_info = self.feature_info[:max_index + 1]
        if prune_head or prune_end:
            for name in ("conv_head", "dcnv3_head_x4", "dcnv3_head_x3", "clip_projector", "fc_norm"):
                if hasattr(self, name):
                    delattr(self, name)
            self._head_type = "pool"
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
            self.reset_classifier(0)
        self._pruned = True
        return take

    # -- persistence (shusheng.modeling.PretrainedMixin) ---------------------------------------------------

    def preprocess_config(self) -> Preprocess:
        return Preprocess.from_timm(self.pretrained_cfg)

    def _config_dict(self) -> dict[str, Any]:
        if self._pruned:
            raise ValueError("a model changed by prune_intermediate_layers cannot be rebuilt from its config; "
                             "save its state_dict instead")
        return replace(self.config, num_classes=self.num_classes, global_pool=self.global_pool,
                       with_cp=self.grad_checkpointing).to_dict()

    def _extra_config(self) -> dict[str, Any]:
        # timm reads these keys: timm.create_model("local-dir:<folder>", pretrained=True)
        pcfg = {k: v for k, v in self.pretrained_cfg.items() if k not in ("file", "state_dict", "source")}
        pcfg["num_classes"] = self.num_classes
        return {"architecture": self.pretrained_cfg.get("architecture"), "num_classes": self.num_classes,
                "num_features": self.num_features, "model_args": self._config_dict(), "pretrained_cfg": pcfg}

    @classmethod
    def _legacy_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "model_args" not in raw or "model_type" in raw:  # the old InternImage layout had no model_type
            return super()._legacy_config(raw)
        pcfg = raw.get("pretrained_cfg") or {}
        return {**raw, "model_type": cls.model_type, "config": raw["model_args"],
                "preprocess": Preprocess.from_timm({**_cfg(), **pcfg}).to_dict()}

    @classmethod
    def _build(cls, config: dict[str, Any], **overrides: Any) -> InternImage:
        return cls(InternImageConfig.from_any(config, **overrides))

    def _load_state(self, state: dict[str, torch.Tensor], strict: bool, source: Path) -> None:
        # load_checkpoint: official-key remapping and a new classifier when num_classes was overridden
        load_checkpoint(self, state, strict=strict)

    def _after_load(self, meta: dict[str, Any], directory: Path) -> None:
        pcfg = dict(meta.get("pretrained_cfg") or {})
        pcfg.update(file=str(directory / WEIGHTS_NAME), source="local-dir", num_classes=self.num_classes)
        self.pretrained_cfg = {**_cfg(), **pcfg}


# --------------------------------------------------------------------------------------------------------
# Weight init and checkpoint adaptation
# --------------------------------------------------------------------------------------------------------

def _init_weights(m: nn.Module) -> None:
    """Official init: Linear weights truncated normal (std 0.02) and zero bias; LayerNorm weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: InternImage) -> dict[str, torch.Tensor]:
    """Adapt an InternImage checkpoint to ``model`` (timm-style filter; also usable with timm's loaders).

    Accepts the official ``{'model': ...}`` / ``{'state_dict': ...}`` containers or a raw state dict, strips
    ``module.`` / ``backbone.`` (mmdet/mmseg) / ``model.`` (Hugging Face port) prefixes, renames the HF
    ``layer_scale1/2`` to ``gamma1/2``, removes the centre sampling point for ``remove_center`` models, adapts the
    stem to ``in_chans`` and drops a classifier whose class count differs. See
    ``shusheng.backbone.checkpoint.filter_state_dict`` for the report-producing version.
    """
    return filter_state_dict(state_dict, model)[0]


# --------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------

def _resolve_pretrained_cfg(variant: str, pretrained_cfg: Any = None,
                            overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pretrained config of ``variant``: default tag, a tag name, or a dict/PretrainedCfg merged on top."""
    tags = [k.split(".", 1)[1] for k in default_cfgs if k.split(".", 1)[0] == variant]
    tag = tags[0] if tags else None
    extra: dict[str, Any] = {}
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg.split(".", 1)[1] if pretrained_cfg.startswith(variant + ".") else pretrained_cfg
        if tag not in tags:
            raise ValueError(f"unknown pretrained tag {tag!r} for {variant}; available: {tags}")
    elif isinstance(pretrained_cfg, Mapping):
        extra = dict(pretrained_cfg)
    elif pretrained_cfg is not None and hasattr(pretrained_cfg, "to_dict"):  # timm PretrainedCfg
        extra = dict(pretrained_cfg.to_dict())
    elif pretrained_cfg is not None:
        raise TypeError(f"pretrained_cfg must be a tag, a dict or a PretrainedCfg, got {type(pretrained_cfg)}")
    if extra.get("tag") in tags:
        tag = extra["tag"]
    cfg = dict(default_cfgs[f"{variant}.{tag}"]) if tag is not None else _cfg()
    cfg.update({k: v for k, v in extra.items() if v is not None})
    cfg.update(dict(overlay or {}))
    cfg.update(architecture=variant, tag=tag)
    return cfg


def _weights_location(cfg: Mapping[str, Any]) -> Any:
    """File (or in-memory state dict) named by a pretrained cfg; a folder means its ``model.safetensors``."""
    if cfg.get("state_dict") is not None:
        return cfg["state_dict"]
    file = cfg.get("file")
    if file is None:
        return None
    path = Path(file)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise PretrainedWeightsNotFound(f"no model.safetensors or pytorch_model.bin in folder {path}")
    return path


def _missing_weights_message(variant: str, cfg: Mapping[str, Any]) -> str:
    name = cfg.get("checkpoint_filename")
    if not name:
        return (f"{variant}: no official pretrained weights exist for this variant (tag {cfg.get('tag')!r}); "
                "use pretrained=False, or pass your own file with checkpoint_path=...")
    return (
        f"{variant}: pretrained=True needs the official checkpoint {name!r} on local disk; shusheng never "
        f"downloads weights. Get it from the official release ({cfg.get('origin_url')}, also on the Hugging Face "
        f"Hub under OpenGVLab/InternImage) and pass its path: create_model({variant!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/{name}')) or create_model({variant!r}, "
        f"checkpoint_path='/path/to/{name}')."
    )


def _create_internimage(variant: str, pretrained: bool = False, **kwargs) -> InternImage:
    """Build ``variant`` and, if asked, load weights from a local file (never downloads).

    Keyword arguments besides the model's own: ``pretrained_cfg`` (tag, dict or timm ``PretrainedCfg``),
    ``pretrained_cfg_overlay`` (e.g. ``dict(file=path)``), ``checkpoint_path`` (loaded whether or not
    ``pretrained``), ``pretrained_strict`` (default True); timm's ``cache_dir`` and ``pretrained_model_args`` are
    accepted and unused.
    """
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", 4)
    feature_cls = kwargs.pop("feature_cls", "getter")
    output_fmt = kwargs.pop("output_fmt", "NCHW")
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    strict = kwargs.pop("pretrained_strict", True)
    kwargs.pop("cache_dir", None)
    kwargs.pop("pretrained_model_args", None)
    cfg = _resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    kwargs.setdefault("num_classes", cfg.get("num_classes", 1000))
    in_chans = kwargs.get("in_chans", 3)
    if in_chans != cfg["input_size"][0]:
        cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    source = checkpoint_path if checkpoint_path is not None else (_weights_location(cfg) if pretrained else None)
    if pretrained and source is None:
        raise PretrainedWeightsNotFound(_missing_weights_message(variant, cfg))
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise PretrainedWeightsNotFound(f"checkpoint file {str(source)!r} does not exist. "
                                        + _missing_weights_message(variant, cfg))
    model = InternImage(**kwargs)
    if source is not None:
        load_checkpoint(model, source, strict=strict)
        if isinstance(source, (str, Path)):
            cfg.update(file=str(source), source="file")
    cfg.pop("state_dict", None)
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg
    if features_only:  # timm's feature-extraction contract, through forward_intermediates
        if feature_cls not in ("getter", None):
            raise ValueError(f"InternImage features_only supports feature_cls='getter' only, got {feature_cls!r}")
        features = require("timm.models._features", extra="backbone", package="timm")
        return features.FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    return model


def _cfg(checkpoint_filename: str | None = None, input_size: tuple[int, int, int] = (3, 224, 224),
         num_classes: int = 1000, **kwargs) -> dict[str, Any]:
    """Pretrained-config record (timm ``PretrainedCfg`` field names) describing an official checkpoint.

    ``checkpoint_filename`` is the official file name (informational); ``file`` is the local path the user
    names. No ``url``/``hf_hub_id`` is given on purpose: weights are never downloaded.
    """
    cfg = dict(
        file=None, checkpoint_filename=checkpoint_filename, input_size=input_size,
        pool_size=(math.ceil(input_size[1] / 32), math.ceil(input_size[2] / 32)), crop_pct=1.0,
        crop_mode="center", interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_classes=num_classes, first_conv="patch_embed.conv1", classifier="head", license="mit",
        origin_url="https://github.com/OpenGVLab/InternImage",
        paper_name="InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions",
        paper_ids="arXiv:2211.05778",
    )
    cfg.update(kwargs)
    return cfg


# Keys are ``variant.tag``; the first tag of a variant is its default.
default_cfgs: dict[str, dict[str, Any]] = {
    "internimage_test.untrained": _cfg(None, input_size=(3, 64, 64), license=None),
    "internimage_t.in1k": _cfg("internimage_t_1k_224.pth"),
    "internimage_s.in1k": _cfg("internimage_s_1k_224.pth"),
    "internimage_b.in1k": _cfg("internimage_b_1k_224.pth"),
    "internimage_l.in22k_ft_in1k": _cfg("internimage_l_22kto1k_384.pth", input_size=(3, 384, 384)),
    "internimage_l.in22k": _cfg("internimage_l_22k_192to384.pth", input_size=(3, 384, 384), num_classes=21841),
    "internimage_xl.in22k_ft_in1k": _cfg("internimage_xl_22kto1k_384.pth", input_size=(3, 384, 384)),
    "internimage_xl.in22k": _cfg("internimage_xl_22k_192to384.pth", input_size=(3, 384, 384), num_classes=21841),
    "internimage_h.in22k_ft_in1k_640": _cfg("internimage_h_22kto1k_640.pth", input_size=(3, 640, 640)),
    "internimage_h.in22k_ft_in1k_384": _cfg("internimage_h_22kto1k_384.pth", input_size=(3, 384, 384)),
    "internimage_h.jointto22k": _cfg("internimage_h_jointto22k_384.pth", input_size=(3, 384, 384),
                                     num_classes=21841),
    "internimage_g.in22k_ft_in1k": _cfg("internimage_g_22kto1k_512.pth", input_size=(3, 512, 512)),
    "internimage_g.jointto22k": _cfg("internimage_g_jointto22k_384.pth", input_size=(3, 384, 384),
                                     num_classes=21841),
}


# --------------------------------------------------------------------------------------------------------
# Variants (official classification configs; see spec §10)
# --------------------------------------------------------------------------------------------------------

@register_model
def internimage_test(pretrained: bool = False, **kwargs) -> InternImage:
    """Tiny InternImage for CI (97k params): the T layout (pre-norm blocks, level norms, conv head)."""
    args = dict(channels=8, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), mlp_ratio=2.0, drop_path_rate=0.0,
                cls_scale=1.5, num_classes=10)
    return _create_internimage("internimage_test", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_t(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-T (30M params, 4.9 GMACs @224)."""
    args = dict(core_op="DCNv3", channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), layer_scale=None,
                offset_scale=1.0, post_norm=False, mlp_ratio=4.0, drop_path_rate=0.1)
    return _create_internimage("internimage_t", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_s(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-S (50M params, 8.3 GMACs @224)."""
    args = dict(core_op="DCNv3", channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5,
                offset_scale=1.0, post_norm=True, mlp_ratio=4.0, drop_path_rate=0.4)
    return _create_internimage("internimage_s", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_b(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-B (97M params, 16.2 GMACs @224)."""
    args = dict(core_op="DCNv3", channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5,
                offset_scale=1.0, post_norm=True, mlp_ratio=4.0, drop_path_rate=0.5)
    return _create_internimage("internimage_b", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_l(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-L (223M params, 108 GMACs @384)."""
    args = dict(core_op="DCNv3", channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), layer_scale=1e-5,
                offset_scale=2.0, post_norm=True, mlp_ratio=4.0, drop_path_rate=0.1)
    return _create_internimage("internimage_l", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_xl(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-XL (335M params, 163 GMACs @384)."""
    args = dict(core_op="DCNv3", channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), layer_scale=1e-5,
                offset_scale=2.0, post_norm=True, mlp_ratio=4.0, drop_path_rate=0.2)
    return _create_internimage("internimage_xl", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_h(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-H (1.09B params, 1.49 TMACs @640) with the attention-pooling (clip projector) head."""
    args = dict(core_op="DCNv3", channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), layer_scale=None,
                offset_scale=1.0, post_norm=False, mlp_ratio=4.0, drop_path_rate=0.2, dw_kernel_size=5,
                res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                center_feature_scale=True, use_clip_projector=True)
    return _create_internimage("internimage_h", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def internimage_g(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-G (3.08B params, 2.70 TMACs @512) with the attention-pooling (clip projector) head."""
    args = dict(core_op="DCNv3", channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128), layer_scale=None,
                offset_scale=1.0, post_norm=True, mlp_ratio=4.0, drop_path_rate=0.4, dw_kernel_size=5,
                res_post_norm=False, level2_post_norm=True,
                level2_post_norm_block_ids=(5, 11, 17, 23, 29, 35, 41, 47), center_feature_scale=True,
                use_clip_projector=True)
    return _create_internimage("internimage_g", pretrained=pretrained, **dict(args, **kwargs))
