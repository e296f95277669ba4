"""DCNv3 core operator: validation, backend selection and the ``torch.library`` custom op.

``dcnv3_core`` is the one entry point every model uses. It validates its arguments (with messages that say
what to do), picks a backend for the input's device, and runs it:

* ``reference`` — pure PyTorch (``dcnv3_reference.py``); differentiable to any order; used for ONNX export.
* ``cpu`` — fused C++ kernel compiled on first use with the machine's compiler (``dcnv3_cpu.py``).
* ``triton`` — GPU kernels (``dcnv3_triton.py``); on CPU tensors only under ``TRITON_INTERPRET=1``.

The compiled backends run inside the custom op ``torch.ops.shusheng.dcnv3`` (with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it, and autograd through ``shusheng.dcnv3_backward``).
Every backend module exposes ``is_available(device) -> bool``, ``forward(input, offset, mask, *params)`` and
``backward(grad_output, input, offset, mask, *params) -> (grad_input, grad_offset, grad_mask)`` where
``params`` are the 12 scalar arguments of ``dcnv3_core`` in order, and receives contiguous tensors of one
floating dtype on one device.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from shusheng.ops.dcnv3_reference import dcnv3_core_pytorch, kernel_points, output_size

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton")
_MODULES = {"cpu": "shusheng.ops.dcnv3_cpu", "triton": "shusheng.ops.dcnv3_triton"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DCNv3ArgumentError(ValueError):
    """Raised for arguments of ``dcnv3_core`` that cannot be right (wrong layout, shape, dtype or device)."""


def _backend_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device if device is not None else "cpu").type


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that run on ``device`` (default CPU), fastest first; ``reference`` always last.

    Checking ``cpu`` compiles its kernel on first call (cached between runs).
    """
    dev = torch.device(device if device is not None else "cpu")
    # on CPU tensors triton only runs in its (slow) interpreter, so the C++ kernel comes first there
    order = ("triton", "cpu") if dev.type == "cuda" else ("cpu", "triton")
    names = [n for n in order if _backend_module(n).is_available(dev)]
    return names + ["reference"]


@torch.compiler.assume_constant_result
def default_backend(device: torch.device | str | None = None) -> str:
    """The backend ``dcnv3_core(..., backend=None)`` uses on ``device``."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and _backend_module("triton").is_available(dev):
        return "triton"
    if dev.type == "cpu" and _backend_module("cpu").is_available(dev):
        return "cpu"
    return "reference"


def _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                dilation_w, group, group_channels, offset_scale, remove_center) -> tuple[int, int, int]:
    """Validate ``dcnv3_core`` arguments; returns ``(H_out, W_out, P)``."""
    for name, t in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise DCNv3ArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise DCNv3ArgumentError(
                f"{name} must be 4-D channels-last (N, H, W, C), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise DCNv3ArgumentError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}; convert it with .float()")
    for name, v in (("kernel_h", kernel_h), ("kernel_w", kernel_w), ("stride_h", stride_h),
                    ("stride_w", stride_w), ("dilation_h", dilation_h), ("dilation_w", dilation_w),
                    ("group", group), ("group_channels", group_channels)):
        if int(v) != v or v < 1:
            raise DCNv3ArgumentError(f"{name} must be a positive integer, got {v!r}")
    if pad_h < 0 or pad_w < 0:
        raise DCNv3ArgumentError(f"padding must be >= 0, got pad_h={pad_h}, pad_w={pad_w}")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise DCNv3ArgumentError(
            f"remove_center needs an odd kernel (it drops the centre tap), got {kernel_h}x{kernel_w}")
    if offset.device != input.device or mask.device != input.device:
        raise DCNv3ArgumentError(
            f"input, offset and mask must be on one device, got {input.device}, {offset.device}, {mask.device}; "
            "move them with .to(input.device)")
    N, H_in, W_in, C = input.shape
    if C != group * group_channels:
        hint = ""
        if input.shape[1] == group * group_channels:
            hint = (" The tensor looks channels-first (N, C, H, W): DCNv3 takes channels-last input, "
                    "use input.permute(0, 2, 3, 1).")
        raise DCNv3ArgumentError(
            f"input has {C} channels in its last dimension but group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}.{hint}")
    H_out = output_size(H_in, kernel_h, stride_h, pad_h, dilation_h)
    W_out = output_size(W_in, kernel_w, stride_w, pad_w, dilation_w)
    if H_out < 1 or W_out < 1:
        raise DCNv3ArgumentError(
            f"input of {H_in}x{W_in} is too small for kernel {kernel_h}x{kernel_w}, dilation "
            f"{dilation_h}x{dilation_w}, padding {pad_h}x{pad_w}: the output would be {H_out}x{W_out}")
    P = kernel_h * kernel_w - (1 if remove_center else 0)
    want_off = (N, H_out, W_out, group * P * 2)
    want_mask = (N, H_out, W_out, group * P)
    geometry = (f"kernel {kernel_h}x{kernel_w}, stride {stride_h}x{stride_w}, pad {pad_h}x{pad_w}, "
                f"dilation {dilation_h}x{dilation_w}, group {group}, remove_center {bool(remove_center)}")
    if tuple(offset.shape) != want_off:
        raise DCNv3ArgumentError(
            f"offset has shape {tuple(offset.shape)} but input {tuple(input.shape)} with {geometry} needs "
            f"{want_off}: (N, H_out, W_out, group * points * 2) with {P} points per group, (dx, dy) each")
    if tuple(mask.shape) != want_mask:
        raise DCNv3ArgumentError(
            f"mask has shape {tuple(mask.shape)} but input {tuple(input.shape)} with {geometry} needs "
            f"{want_mask}: (N, H_out, W_out, group * points) with {P} points per group")
    return H_out, W_out, P


# --------------------------------------------------------------------------------------------------------
# Custom op wrapping the compiled backends.
# --------------------------------------------------------------------------------------------------------

@torch.library.custom_op("shusheng::dcnv3", mutates_args=())
def _dcnv3_op(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
    kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
    dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
    remove_center: bool, backend: str,
) -> torch.Tensor:
    return _backend_module(backend).forward(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


@_dcnv3_op.register_fake
def _dcnv3_op_fake(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                   dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, backend):
    return input.new_empty((input.shape[0], offset.shape[1], offset.shape[2], group * group_channels))


@torch.library.custom_op("shusheng::dcnv3_backward", mutates_args=())
def _dcnv3_backward_op(
    grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
    kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
    dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
    remove_center: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend_module(backend).backward(
        grad_output.contiguous(), input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


@_dcnv3_backward_op.register_fake
def _dcnv3_backward_op_fake(grad_output, input, offset, mask, *args):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    gi, go, gm = _dcnv3_backward_op(grad_output, input, offset, mask, *ctx.params)
    return (gi, go, gm) + (None,) * len(ctx.params)


_dcnv3_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public functional entry point.
# --------------------------------------------------------------------------------------------------------

def _exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def dcnv3_core(
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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Deformable convolution v3 core (official argument order and semantics).

    Args:
        input: value tensor, channels-last ``(N, H_in, W_in, group * group_channels)``.
        offset: ``(N, H_out, W_out, group * P * 2)``, per point ``(dx, dy)`` in input pixels, points ordered
            column-major over the kernel; ``P = kernel_h * kernel_w`` (minus 1 with ``remove_center``).
        mask: ``(N, H_out, W_out, group * P)`` modulation weights (softmax-normalised by the DCNv3 module).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w: convolution geometry.
        group, group_channels: channel grouping; every channel of a group shares sampling points and weights.
        offset_scale: multiplies both the learned offsets and the fixed kernel displacement.
        remove_center: drop the centre tap of the kernel.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``None`` for the fastest one available for the
            input's device (see ``available_backends``). Exporting (ONNX, ``torch.jit.trace``, ``torch.export``)
            always uses ``reference``, which lowers to standard ops.

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype. offset and mask are cast to the
        input's dtype; low-precision inputs accumulate in float32.

    Raises:
        DCNv3ArgumentError: for arguments that cannot be right, with a message saying what is expected.
    """
    if not torch.jit.is_tracing():  # the TorchScript tracer would bake each shape check into the graph
        _check_args(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
    if input.device.type == "meta":  # shape-only (FLOP counting, meta-device model building)
        return input.new_empty((input.shape[0], offset.shape[1], offset.shape[2], group * group_channels))
    if offset.dtype != input.dtype:
        offset = offset.to(input.dtype)
    if mask.dtype != input.dtype:
        mask = mask.to(input.dtype)
    params = (int(kernel_h), int(kernel_w), int(stride_h), int(stride_w), int(pad_h), int(pad_w),
              int(dilation_h), int(dilation_w), int(group), int(group_channels), float(offset_scale),
              bool(remove_center))
    if backend is None:
        backend = "reference" if _exporting() else default_backend(input.device)
    elif backend not in BACKENDS:
        raise DCNv3ArgumentError(f"unknown DCNv3 backend {backend!r}; choose one of {BACKENDS} or None")
    elif backend != "reference" and not _backend_module(backend).is_available(input.device):
        raise RuntimeError(
            f"DCNv3 backend {backend!r} cannot run on {input.device} here; available: "
            f"{available_backends(input.device)}")
    if backend == "reference":
        return dcnv3_core_pytorch(input, offset, mask, *params)
    return _dcnv3_op(input.contiguous(), offset.contiguous(), mask.contiguous(), *params, backend)


__all__ = [
    "BACKENDS", "DCNv3ArgumentError", "available_backends", "dcnv3_core", "dcnv3_core_pytorch",
    "default_backend", "kernel_points",
]
