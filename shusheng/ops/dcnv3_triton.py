"""Triton backend of the DCNv3 core: fused forward and backward GPU kernels.

Semantics are those of ``dcnv3_reference.dcnv3_core_pytorch`` (spec §6): channels-last value ``(N, H_in, W_in,
G*gc)``, offsets ``[group][point][(dx, dy)]``, column-major kernel points, bilinear sampling with zeros outside
the image, ``out = sum_p mask * sample``.

Tiling: one program per (block of ``BLOCK_Q`` output pixels, group); the group's channels are a vector of
``BLOCK_C = next_power_of_2(group_channels)`` lanes (masked), so one program holds ``BLOCK_Q x BLOCK_C`` tiles
and loops over the sampling points at run time. The backward pass uses the same tiling: ``grad_mask`` and
``grad_offset`` of a (pixel, group, point) are owned by one program and reduced over channels with ``tl.sum``;
``grad_input`` is scattered with ``tl.atomic_add`` into a float32 buffer (float64 for float64 inputs) and cast
back to the input dtype. Arithmetic is float32 for float16/bfloat16/float32 inputs and float64 for float64.

Interpreter: triton decides between compiled and interpreted functions (``TRITON_INTERPRET=1``) when it wraps
them, and its own ``@jit`` library functions (``tl.sum``, ...) are wrapped when triton is first imported, so
``TRITON_INTERPRET=1`` must be set before that import (``tests/conftest.py`` does). The kernels here are plain
functions wrapped on first use in the mode triton was imported in, and importing this module never needs triton.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

try:  # triton is optional: without it the backend just reports itself unavailable.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    _HAS_TRITON = False


logger = logging.getLogger(__name__)
_warned_late_interpret = False


def _interpreted() -> bool:
    """Whether triton was imported in interpreter mode (``TRITON_INTERPRET=1`` at its import)."""
    return not isinstance(tl.sum, triton.JITFunction)


def is_available(device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with triton, or CPU under ``TRITON_INTERPRET=1``."""
    global _warned_late_interpret
    if not _HAS_TRITON:
        return False
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if not _interpreted():
            if not _warned_late_interpret:
                logger.warning("TRITON_INTERPRET=1 was set after triton was imported, so the DCNv3 triton "
                               "kernels cannot run on CPU tensors; set it before importing triton")
                _warned_late_interpret = True
            return False
        return True
    return False


# --------------------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by ``_kernels``; they only ever run through that wrapper).
# --------------------------------------------------------------------------------------------------------

def _dcnv3_fwd_kernel(
    in_ptr, off_ptr, mask_ptr, out_ptr,
    Q, H_in, W_in, H_out, W_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, c_h, c_w,
    G, GC, scale_hi, scale_lo,
    KERNEL_H: tl.constexpr, P: tl.constexpr, SKIP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    C = G * GC

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    c = tl.arange(0, BLOCK_C)
    c_ok = c < GC
    qc_ok = q_ok[:, None] & c_ok[None, :]
    wo = q % W_out
    ho = (q // W_out) % H_out
    n = q // (W_out * H_out)
    base_x = tl.cast(wo * stride_w - pad_w + c_w, ACC)
    base_y = tl.cast(ho * stride_h - pad_h + c_h, ACC)
    q64 = q.to(tl.int64)
    n64 = n.to(tl.int64)
    chan = (g * GC + c)[None, :]
    off_row = q64 * (G * P * 2) + g * P * 2
    msk_row = q64 * (G * P) + g * P

    acc = tl.full([BLOCK_Q, BLOCK_C], 0.0, ACC)
    for p in range(P):  # a loop, not unrolled: keeps compile time and code size small for 5x5 kernels
        pf = tl.where(p >= SKIP, p + 1, p)  # index in the full kernel (remove_center skips the centre)
        i = pf // KERNEL_H  # horizontal tap (points are column-major)
        j = pf % KERNEL_H
        dx = tl.load(off_ptr + off_row + 2 * p, mask=q_ok, other=0.0).to(ACC)
        dy = tl.load(off_ptr + off_row + 2 * p + 1, mask=q_ok, other=0.0).to(ACC)
        m = tl.load(mask_ptr + msk_row + p, mask=q_ok, other=0.0).to(ACC)
        x = base_x + (tl.cast(i * dil_w - c_w, ACC) + dx) * scale
        y = base_y + (tl.cast(j * dil_h - c_h, ACC) + dy) * scale
        valid = q_ok & (y > -1.0) & (x > -1.0) & (y < H_in) & (x < W_in)
        x = tl.where(valid, x, 0.0)  # keep the integer conversion below in range
        y = tl.where(valid, y, 0.0)
        y0f = tl.floor(y)
        x0f = tl.floor(x)
        lh = y - y0f
        lw = x - x0f
        hh = 1.0 - lh
        hw = 1.0 - lw
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        ok_y0 = valid & (y0 >= 0)
        ok_y1 = valid & (y0 + 1 < H_in)
        ok_x0 = x0 >= 0
        ok_x1 = x0 + 1 < W_in
        row0 = (n64 * H_in + y0) * W_in + x0  # pixel index of the top-left neighbour
        p00 = in_ptr + (row0 * C)[:, None] + chan
        p01 = p00 + C
        p10 = p00 + W_in * C
        p11 = p10 + C
        v00 = tl.load(p00, mask=(ok_y0 & ok_x0)[:, None] & qc_ok, other=0.0).to(ACC)
        v01 = tl.load(p01, mask=(ok_y0 & ok_x1)[:, None] & qc_ok, other=0.0).to(ACC)
        v10 = tl.load(p10, mask=(ok_y1 & ok_x0)[:, None] & qc_ok, other=0.0).to(ACC)
        v11 = tl.load(p11, mask=(ok_y1 & ok_x1)[:, None] & qc_ok, other=0.0).to(ACC)
        w00 = (m * hh * hw)[:, None]
        w01 = (m * hh * lw)[:, None]
        w10 = (m * lh * hw)[:, None]
        w11 = (m * lh * lw)[:, None]
        acc += w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11

    out_ptrs = out_ptr + (q64 * C)[:, None] + chan
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=qc_ok)


def _dcnv3_bwd_kernel(
    gout_ptr, in_ptr, off_ptr, mask_ptr, gin_ptr, goff_ptr, gmask_ptr,
    Q, H_in, W_in, H_out, W_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, c_h, c_w,
    G, GC, scale_hi, scale_lo,
    KERNEL_H: tl.constexpr, P: tl.constexpr, SKIP: tl.constexpr,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    C = G * GC

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    c = tl.arange(0, BLOCK_C)
    c_ok = c < GC
    qc_ok = q_ok[:, None] & c_ok[None, :]
    wo = q % W_out
    ho = (q // W_out) % H_out
    n = q // (W_out * H_out)
    base_x = tl.cast(wo * stride_w - pad_w + c_w, ACC)
    base_y = tl.cast(ho * stride_h - pad_h + c_h, ACC)
    q64 = q.to(tl.int64)
    n64 = n.to(tl.int64)
    chan = (g * GC + c)[None, :]
    off_row = q64 * (G * P * 2) + g * P * 2
    msk_row = q64 * (G * P) + g * P

    go = tl.load(gout_ptr + (q64 * C)[:, None] + chan, mask=qc_ok, other=0.0).to(ACC)
    for p in range(P):
        pf = tl.where(p >= SKIP, p + 1, p)
        i = pf // KERNEL_H
        j = pf % KERNEL_H
        dx = tl.load(off_ptr + off_row + 2 * p, mask=q_ok, other=0.0).to(ACC)
        dy = tl.load(off_ptr + off_row + 2 * p + 1, mask=q_ok, other=0.0).to(ACC)
        m = tl.load(mask_ptr + msk_row + p, mask=q_ok, other=0.0).to(ACC)
        x = base_x + (tl.cast(i * dil_w - c_w, ACC) + dx) * scale
        y = base_y + (tl.cast(j * dil_h - c_h, ACC) + dy) * scale
        valid = q_ok & (y > -1.0) & (x > -1.0) & (y < H_in) & (x < W_in)
        x = tl.where(valid, x, 0.0)
        y = tl.where(valid, y, 0.0)
        y0f = tl.floor(y)
        x0f = tl.floor(x)
        lh = y - y0f
        lw = x - x0f
        hh = 1.0 - lh
        hw = 1.0 - lw
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        ok_y0 = valid & (y0 >= 0)
        ok_y1 = valid & (y0 + 1 < H_in)
        ok_x0 = x0 >= 0
        ok_x1 = x0 + 1 < W_in
        m00 = (ok_y0 & ok_x0)[:, None] & qc_ok
        m01 = (ok_y0 & ok_x1)[:, None] & qc_ok
        m10 = (ok_y1 & ok_x0)[:, None] & qc_ok
        m11 = (ok_y1 & ok_x1)[:, None] & qc_ok
        row0 = (n64 * H_in + y0) * W_in + x0
        o00 = (row0 * C)[:, None] + chan
        o01 = o00 + C
        o10 = o00 + W_in * C
        o11 = o10 + C
        v00 = tl.load(in_ptr + o00, mask=m00, other=0.0).to(ACC)
        v01 = tl.load(in_ptr + o01, mask=m01, other=0.0).to(ACC)
        v10 = tl.load(in_ptr + o10, mask=m10, other=0.0).to(ACC)
        v11 = tl.load(in_ptr + o11, mask=m11, other=0.0).to(ACC)

        hh2 = hh[:, None]
        hw2 = hw[:, None]
        lh2 = lh[:, None]
        lw2 = lw[:, None]
        sample = hh2 * hw2 * v00 + hh2 * lw2 * v01 + lh2 * hw2 * v10 + lh2 * lw2 * v11
        grad_m = tl.sum(go * sample, axis=1)
        gom = go * m[:, None]
        grad_x = tl.sum(gom * (hh2 * (v01 - v00) + lh2 * (v11 - v10)), axis=1) * scale
        grad_y = tl.sum(gom * (hw2 * (v10 - v00) + lw2 * (v11 - v01)), axis=1) * scale
        tl.store(gmask_ptr + msk_row + p, grad_m.to(gmask_ptr.dtype.element_ty), mask=q_ok)
        tl.store(goff_ptr + off_row + 2 * p, grad_x.to(goff_ptr.dtype.element_ty), mask=q_ok)
        tl.store(goff_ptr + off_row + 2 * p + 1, grad_y.to(goff_ptr.dtype.element_ty), mask=q_ok)

        tl.atomic_add(gin_ptr + o00, gom * (hh2 * hw2), mask=m00, sem="relaxed")
        tl.atomic_add(gin_ptr + o01, gom * (hh2 * lw2), mask=m01, sem="relaxed")
        tl.atomic_add(gin_ptr + o10, gom * (lh2 * hw2), mask=m10, sem="relaxed")
        tl.atomic_add(gin_ptr + o11, gom * (lh2 * lw2), mask=m11, sem="relaxed")


_KERNELS: tuple | None = None


def _kernels():
    """The ``(forward, backward)`` kernels, compiled or interpreted like the rest of the imported triton."""
    global _KERNELS
    if not _HAS_TRITON:
        raise RuntimeError("the DCNv3 triton backend needs triton: pip install triton")
    if _KERNELS is None:
        if _interpreted():
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            wrap = triton.JITFunction
        _KERNELS = (wrap(_dcnv3_fwd_kernel), wrap(_dcnv3_bwd_kernel))
    return _KERNELS


# --------------------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------------------

def _launch_config(Q: int, group_channels: int, backward: bool, interpret: bool) -> tuple[int, int, int]:
    """``(BLOCK_Q, BLOCK_C, num_warps)``: tiles of ~2K (forward) / ~1K (backward) elements on a GPU."""
    block_c = triton.next_power_of_2(group_channels)
    if interpret:  # the interpreter runs programs one after another: few, large programs are fastest
        block_q = max(1, min(triton.next_power_of_2(Q), 16384 // block_c))
        return block_q, block_c, 4
    tile = 1024 if backward else 2048
    block_q = max(16, min(128, tile // block_c))
    num_warps = 4 if block_q * block_c <= 2048 else 8
    return block_q, block_c, num_warps


def _scale_parts(offset_scale: float) -> tuple[float, float]:
    """``offset_scale`` as a float32 pair whose sum is ~float64-exact (triton passes Python floats as fp32)."""
    hi = float(torch.tensor(offset_scale, dtype=torch.float32))
    lo = float(torch.tensor(offset_scale - hi, dtype=torch.float32))
    return hi, lo


def _common(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
            group, group_channels, offset_scale, remove_center):
    N, H_in, W_in, _ = input.shape
    H_out, W_out = offset.shape[1], offset.shape[2]
    P = kernel_h * kernel_w - (1 if remove_center else 0)
    # Full-kernel index of the centre tap; points at or after it shift by one when it is removed.
    skip = (kernel_w // 2) * kernel_h + kernel_h // 2 if remove_center else P + 1
    c_h = dilation_h * (kernel_h - 1) // 2
    c_w = dilation_w * (kernel_w - 1) // 2
    hi, lo = _scale_parts(offset_scale)
    acc = tl.float64 if input.dtype == torch.float64 else tl.float32
    Q = N * H_out * W_out
    args = (Q, H_in, W_in, H_out, W_out,
            stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, c_h, c_w,
            group, group_channels, hi, lo)
    meta = dict(KERNEL_H=kernel_h, P=P, SKIP=skip, ACC=acc)
    return Q, (N, H_out, W_out), args, meta


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not _interpreted():
        raise RuntimeError("the DCNv3 triton kernels run on CPU tensors only through the triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported")


def _device_guard(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
            group, group_channels, offset_scale, remove_center):
    """DCNv3 core forward on contiguous tensors of one dtype; returns ``(N, H_out, W_out, G*gc)``."""
    fwd_kernel, _ = _kernels()
    _check_device(input)
    Q, (N, H_out, W_out), args, meta = _common(
        input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        group, group_channels, offset_scale, remove_center)
    C = group * group_channels
    if Q == 0 or input.numel() == 0:  # nothing to sample: every output is zero
        return input.new_zeros((N, H_out, W_out, C))
    out = torch.empty((N, H_out, W_out, C), dtype=input.dtype, device=input.device)
    block_q, block_c, num_warps = _launch_config(Q, group_channels, False, _interpreted())
    grid = (math.ceil(Q / block_q), group)
    with _device_guard(input):
        fwd_kernel[grid](input, offset, mask, out, *args,
                         **meta, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=num_warps)
    return out


def backward(grad_output, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
             dilation_h, dilation_w, group, group_channels, offset_scale, remove_center):
    """Gradients ``(grad_input, grad_offset, grad_mask)`` of the forward, in the input dtype."""
    _, bwd_kernel = _kernels()
    _check_device(input)
    Q, _, args, meta = _common(
        input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        group, group_channels, offset_scale, remove_center)
    if Q == 0 or input.numel() == 0:
        return torch.zeros_like(input), torch.zeros_like(offset), torch.zeros_like(mask)
    grad_output = grad_output.to(input.dtype).contiguous()
    buf_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad_input = torch.zeros(input.shape, dtype=buf_dtype, device=input.device)
    grad_offset = torch.empty_like(offset)
    grad_mask = torch.empty_like(mask)
    block_q, block_c, num_warps = _launch_config(Q, group_channels, True, _interpreted())
    grid = (math.ceil(Q / block_q), group)
    with _device_guard(input):
        bwd_kernel[grid](grad_output, input, offset, mask, grad_input, grad_offset, grad_mask, *args,
                         **meta, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=num_warps)
    return grad_input.to(input.dtype), grad_offset, grad_mask


__all__ = ["backward", "forward", "is_available"]
