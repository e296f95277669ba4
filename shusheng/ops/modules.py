"""``DCNv3`` module: the deformable-convolution token mixer of InternImage (spec §5).

Parameter names equal the official ``DCNv3``/``DCNv3_pytorch`` modules, so official checkpoints load unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from shusheng.ops.dcnv3 import dcnv3_core

logger = logging.getLogger(__name__)


class DCNv3(nn.Module):
    """Deformable convolution v3 on channels-last input.

    Args:
        channels: input and output channels ``C``.
        kernel_size: sampling kernel size ``K`` (3 in InternImage).
        dw_kernel_size: kernel of the depth-wise conv that predicts offsets and mask (default ``kernel_size``).
        stride, pad, dilation: sampling geometry.
        group: number of groups ``G``; ``C`` must be divisible by it.
        offset_scale: scales offsets and the kernel displacement (2.0 in InternImage-L/XL).
        act_layer, norm_layer: activation and norm of the depth-wise branch (``"GELU"``, ``"LN"`` or ``"BN"``).
        center_feature_scale: gate between the sampled output and the projected input per group.
        remove_center: drop the centre tap (``P = K*K - 1``).
        backend: DCNv3 core backend (``None`` = fastest available for the input's device).

    Shapes:
        ``forward(x)``: ``(N, H, W, C) -> (N, H_out, W_out, C)``.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        gc = channels // group
        if gc & (gc - 1) != 0:
            logger.debug("DCNv3 group_channels=%d is not a power of 2; kernels are less efficient", gc)
        if remove_center and kernel_size % 2 == 0:
            raise ValueError("remove_center needs an odd kernel_size")
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = gc
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.backend = backend
        P = kernel_size * kernel_size - self.remove_center
        self.points = P

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * P * 2)
        self.mask = nn.Linear(channels, group * P)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Zero offsets and mask logits (start as a box filter), Xavier-uniform projections (official init)."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        nn.init.zeros_(self.mask.weight)
        nn.init.zeros_(self.mask.bias)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (input.dim() != 4 or input.shape[-1] != self.channels):
            hint = " (it looks channels-first: use x.permute(0, 2, 3, 1))" if (
                input.dim() == 4 and input.shape[1] == self.channels) else ""
            raise ValueError(
                f"DCNv3 expects channels-last input (N, H, W, {self.channels}), got {tuple(input.shape)}{hint}")
        N, H, W, _ = input.shape
        x_proj = self.input_proj(input)  # (N, H, W, C) value
        q = self.dw_conv(input.permute(0, 3, 1, 2))  # (N, H, W, C), from the block input, not the value
        offset = self.offset(q)  # (N, H, W, G*P*2)
        mask = _softmax_small_last_dim(self.mask(q).reshape(N, H, W, self.group, self.points))
        mask = mask.reshape(N, H, W, self.group * self.points)
        x = dcnv3_core(
            x_proj, offset, mask,
            self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad, self.pad,
            self.dilation, self.dilation, self.group, self.group_channels, self.offset_scale,
            self.remove_center, backend=self.backend,
        )
        if self.center_feature_scale:
            scale = torch.sigmoid(F.linear(q, self.center_feature_scale_proj_weight,
                                           self.center_feature_scale_proj_bias))  # (N, H, W, G)
            scale = scale.repeat_interleave(self.group_channels, dim=-1)  # (N, H, W, C), group-major
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
                f"offset_scale={self.offset_scale}, remove_center={bool(self.remove_center)}")


def _softmax_small_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (the P = 9 sampling points).

    Same result as ``F.softmax(x, -1)``, written out because PyTorch's CPU softmax kernel is slow when the
    reduced dimension is this short (about 5x here, 12% of an InternImage-T forward at batch 8).
    """
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def build_act_layer(name: str) -> nn.Module:
    """Activation by its official config name (``"GELU"`` is the exact erf form)."""
    acts = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
    if name not in acts:
        raise ValueError(f"unknown act_layer {name!r}; choose one of {sorted(acts)}")
    return acts[name]()


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC; a parameter-free slot that keeps the official state_dict indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW; a parameter-free slot that keeps the official state_dict indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def build_norm_layer(channels: int, norm_layer: str = "LN", in_format: str = "channels_last",
                     out_format: str = "channels_last", eps: float = 1e-6) -> nn.Sequential:
    """A norm wrapped with layout permutes, laid out like the official ``build_norm_layer``.

    The permute modules occupy Sequential indices, which is what gives official keys such as
    ``patch_embed.norm1.1.weight`` (LN after a permute) or ``norm1.0.weight`` (LN alone). LayerNorm uses eps
    1e-6 like the official code; BatchNorm keeps PyTorch defaults.
    """
    layers: list[nn.Module] = []
    if norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(ToChannelsLast())
        layers.append(nn.LayerNorm(channels, eps=eps))
        if out_format == "channels_first":
            layers.append(ToChannelsFirst())
    elif norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(ToChannelsFirst())
        layers.append(nn.BatchNorm2d(channels))
        if out_format == "channels_last":
            layers.append(ToChannelsLast())
    else:
        raise ValueError(f"unknown norm_layer {norm_layer!r}; choose 'LN' or 'BN'")
    return nn.Sequential(*layers)
