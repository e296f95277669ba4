"""FLOP (multiply-accumulate) counting with the official InternImage accounting (spec §10).

The official numbers come from ``detection/get_flops.py``: mmcv's ``get_model_complexity_info`` hooks plus a
hand-added DCNv3 core term. Reproduced rules, per module call:

* ``Conv*d``: ``k_h·k_w·C_in·C_out/groups`` per output position, plus ``C_out`` per position for the bias;
* ``Linear``: ``numel(input) · out_features`` (no bias term);
* norms (BatchNorm, LayerNorm, GroupNorm, InstanceNorm): ``numel(input)``, doubled with affine parameters;
* pooling: ``numel(input)``; ``Upsample``: ``numel(output)``; ReLU-family activations: ``numel(output)``;
* not counted (as in mmcv): GELU, softmax, ``F.linear`` calls (the attention-pooling q/k/v), matmuls,
  PixelShuffle, elementwise ops;
* DCNv3 core, per ``DCNv3`` module: ``5 · H_out · W_out · P · C`` (``P`` = sampling points, 9 for 3x3).

The model is run on the **meta device** (a parameter-free twin is made), so counting InternImage-G at 512 px
needs no memory and no compute.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from shusheng.ops import DCNv3

__all__ = ["count_flops", "flop_breakdown"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ACTS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)


def _meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _conv(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    positions = out.shape[0] * math.prod(out.shape[2:])
    per_position = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    return per_position * positions + (m.out_channels * positions if m.bias is not None else 0)


def _norm(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return inp.numel() * (2 if affine else 1)


def flop_breakdown(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict[str, float]:
    """GMACs per category for one image of ``input_size`` (C, H, W), official InternImage accounting.

    Returns:
        ``{"conv": ..., "linear": ..., "norm": ..., "pool": ..., "act": ..., "upsample": ..., "dcn_core": ...,
        "total": ...}`` in GMACs. ``total - dcn_core`` is what mmcv's hooks alone report.
    """
    twin = _meta_twin(model).eval()
    counts = dict.fromkeys(("conv", "linear", "norm", "pool", "act", "upsample", "dcn_core"), 0)

    def hook_for(kind):
        def hook(m, inputs, out):
            inp = inputs[0]
            if kind == "conv":
                counts[kind] += _conv(m, inp, out)
            elif kind == "linear":
                counts[kind] += inp.numel() * out.shape[-1]
            elif kind == "norm":
                counts[kind] += _norm(m, inp, out)
            elif kind == "pool":
                counts[kind] += inp.numel()
            elif kind in ("act", "upsample"):
                counts[kind] += out.numel()
            else:  # DCNv3 core: 5 * H_out * W_out * P * C per image
                n, h, w, c = out.shape
                counts[kind] += 5 * n * h * w * m.points * c
        return hook

    handles = []
    for m in twin.modules():
        kind = None
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv"
        elif isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, _NORMS):
            kind = "norm"
        elif isinstance(m, _POOLS):
            kind = "pool"
        elif isinstance(m, _ACTS):
            kind = "act"
        elif isinstance(m, nn.Upsample):
            kind = "upsample"
        elif isinstance(m, DCNv3):
            kind = "dcn_core"
        if kind is not None:
            handles.append(m.register_forward_hook(hook_for(kind)))
    try:
        with torch.no_grad():
            twin(torch.empty(1, *input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    result = {k: v / 1e9 for k, v in counts.items()}
    result["total"] = sum(counts.values()) / 1e9
    return result


def count_flops(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> float:
    """GMACs of one forward pass of one image, counted like the official InternImage numbers.

    Args:
        model: any module (InternImage or not); it is not run or modified: a meta-device twin is.
        input_size: ``(C, H, W)`` of the image.

    Returns:
        Giga multiply-accumulates (e.g. about 4.90 for InternImage-T at 224x224).
    """
    return flop_breakdown(model, input_size)["total"]
