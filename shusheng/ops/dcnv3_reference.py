"""Pure-PyTorch DCNv3 core: the exact reference every other backend is tested against.

Semantics follow the official InternImage operator (Wang et al., "InternImage: Exploring Large-Scale Vision
Foundation Models with Deformable Convolutions", CVPR 2023); see ``../shared/specs/internimage.md`` §6:

* ``input`` is channels-last ``(N, H_in, W_in, G*gc)``, channels ordered ``[group][gc]``;
* ``offset`` is ``(N, H_out, W_out, G*P*2)`` ordered ``[group][point][(dx, dy)]`` (x first);
* ``mask`` is ``(N, H_out, W_out, G*P)`` ordered ``[group][point]``;
* points are enumerated column-major over the kernel (``p = i*K_h + j``, ``i`` the horizontal tap);
  with ``remove_center`` the centre tap is dropped and the rest packed;
* the sampling position of point ``(i, j)`` for output ``(ho, wo)`` in input-pixel coordinates is
  ``x = wo*stride_w - pad_w + c_w + (i*dil_w - c_w + dx) * offset_scale`` (``c_w = dil_w*(K_w-1)//2``),
  likewise for ``y``; samples are bilinear with zeros outside the image.

Unlike the official pure-PyTorch core, padding is applied per axis correctly (``pad_h != pad_w`` works), the
sampling grid is built in the input's own precision (float64 stays exact), and no padded copy of the input is
made: coordinates are mapped straight onto the unpadded image, whose outside ``grid_sample`` treats as zero.
The implementation uses only ``grid_sample``, elementwise ops and reductions, so it exports to standard ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kernel_points(
    kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool
) -> list[tuple[int, int]]:
    """The fixed ``(dx, dy)`` displacement of each sampling point relative to the kernel centre, in point order.

    Points are column-major (outer loop over the horizontal tap ``i``), matching the official operator.
    """
    c_w = dilation_w * (kernel_w - 1) // 2
    c_h = dilation_h * (kernel_h - 1) // 2
    pts = []
    for i in range(kernel_w):
        for j in range(kernel_h):
            if remove_center and i == kernel_w // 2 and j == kernel_h // 2:
                continue
            pts.append((i * dilation_w - c_w, j * dilation_h - c_h))
    return pts


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Spatial output size of the operator along one axis (standard convolution arithmetic)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def dcnv3_core_pytorch(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool | int = False,
) -> torch.Tensor:
    """Reference DCNv3 core (differentiable through autograd, any number of times).

    Arguments are those of the official ``dcnv3_core_pytorch``; shapes are documented in the module docstring.
    Inputs are assumed valid (``shusheng.ops.dcnv3_core`` validates them). float16/bfloat16 inputs are computed
    in float32 and the result cast back.

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype.
    """
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):
        input, offset, mask = input.float(), offset.float(), mask.float()
    else:
        offset, mask = offset.to(input.dtype), mask.to(input.dtype)
    N, H_in, W_in, _ = input.shape
    H_out, W_out = offset.shape[1], offset.shape[2]
    G, gc = group, group_channels
    dt, dev = input.dtype, input.device
    c_w = dilation_w * (kernel_w - 1) // 2
    c_h = dilation_h * (kernel_h - 1) // 2

    # Fixed kernel displacement of each point, column-major (p = i*K_h + j); built from aranges rather than
    # Python lists so that tracing for export records no constants.
    kx = (torch.arange(kernel_w, dtype=dt, device=dev) * dilation_w - c_w).repeat_interleave(kernel_h)  # (K*K,)
    ky = (torch.arange(kernel_h, dtype=dt, device=dev) * dilation_h - c_h).repeat(kernel_w)
    if remove_center:
        c = (kernel_w // 2) * kernel_h + kernel_h // 2
        kx, ky = torch.cat((kx[:c], kx[c + 1:])), torch.cat((ky[:c], ky[c + 1:]))
    P = kernel_h * kernel_w - int(bool(remove_center))
    # Fixed part of the sampling positions, in input pixel coordinates.
    base_x = torch.arange(W_out, dtype=dt, device=dev) * stride_w - pad_w + c_w  # (W_out,)
    base_y = torch.arange(H_out, dtype=dt, device=dev) * stride_h - pad_h + c_h  # (H_out,)

    off = offset.reshape(N, H_out, W_out, G, P, 2)
    x = base_x.view(1, 1, W_out, 1, 1) + (kx + off[..., 0]) * offset_scale  # (N, H_out, W_out, G, P)
    y = base_y.view(1, H_out, 1, 1, 1) + (ky + off[..., 1]) * offset_scale
    # grid_sample with align_corners=False maps pixel centre k to (2k + 1) / size - 1.
    grid = torch.stack(((2 * x + 1) / W_in - 1, (2 * y + 1) / H_in - 1), dim=-1)  # (N, Ho, Wo, G, P, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(N * G, H_out * W_out, P, 2)

    value = input.reshape(N, H_in, W_in, G, gc).permute(0, 3, 4, 1, 2).reshape(N * G, gc, H_in, W_in)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, gc, H_out*W_out, P)
    m = mask.reshape(N, H_out * W_out, G, P).permute(0, 2, 1, 3).reshape(N * G, 1, H_out * W_out, P)
    out = (sampled * m).sum(-1)  # (N*G, gc, H_out*W_out)
    out = out.view(N, G * gc, H_out, W_out).permute(0, 2, 3, 1).contiguous()
    return out.to(out_dtype)
