"""``cpu`` backend of the DCNv3 core: a fused C++ kernel (``csrc/dcnv3_cpu.cpp``) compiled on first use.

The kernel is built with the machine's C++ compiler through ``torch.utils.cpp_extension.load`` the first time
``is_available`` is asked about a CPU device, and registers ``torch.ops.shusheng_cpu.dcnv3_forward`` and
``torch.ops.shusheng_cpu.dcnv3_backward``. It is compiled with ``-march=native``, so the build directory is
keyed by a hash of the source, the flags, the torch version and the CPU model: a shared cache never serves a
binary built for another CPU or another torch. The cache lives in ``$SHUSHENG_CACHE_DIR/torch_extensions``
(default ``~/.cache/shusheng/torch_extensions``). One build attempt per process; if it fails (no compiler,
compile error) one warning says why and the dispatcher falls back to the ``reference`` backend.

Interface (called by ``shusheng.ops.dcnv3``): ``is_available(device)``, ``forward(input, offset, mask,
*params)`` and ``backward(grad_output, input, offset, mask, *params)`` with the 12 scalar parameters of
``dcnv3_core``; tensors arrive validated, contiguous, of one floating dtype, on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "csrc" / "dcnv3_cpu.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
_LDFLAGS = ["-fopenmp"]
_NAME = "shusheng_dcnv3_cpu"

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def _cpu_signature() -> str:
    """CPU model plus its feature flags (what ``-march=native`` depends on)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in ("vendor_id", "cpu family", "model", "model name", "flags", "Features",
                                   "CPU implementer", "CPU part") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    described = "|".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return f"{platform.machine()}|{platform.processor()}|{described}"


def _build_key() -> str:
    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    for part in (" ".join(_CFLAGS), " ".join(_LDFLAGS), torch.__version__, _cpu_signature()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    from shusheng._cache import cache_dir

    return cache_dir() / "torch_extensions"


def _ops_registered() -> bool:
    return hasattr(torch.ops, "shusheng_cpu") and hasattr(torch.ops.shusheng_cpu, "dcnv3_forward")


def _import_cpp_extension():
    # Importing it on a machine without CUDA logs a warning about CUDA_HOME, which is irrelevant for a CPU build.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def _load() -> bool:
    """Compile (or reuse the cached build) and load the kernel; True when the ops are registered."""
    build_dir = _cache_root() / f"dcnv3_cpu_{_build_key()}"
    library = build_dir / f"{_NAME}.so"
    if library.exists() and not os.access(build_dir, os.W_OK):
        # A read-only shared cache: nothing to build (the key guarantees the binary fits), just load it.
        torch.ops.load_library(str(library))
        return _ops_registered()
    cpp_extension = _import_cpp_extension()
    build_dir.mkdir(parents=True, exist_ok=True)
    cached = library.exists()
    if not cached:
        logger.info("compiling DCNv3 CPU kernel, once, cached in %s", build_dir)
    start = time.perf_counter()
    cpp_extension.load(
        name=_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    if not cached:
        logger.info("DCNv3 CPU kernel compiled in %.1f s", time.perf_counter() - start)
    return _ops_registered()


def _ensure_loaded() -> bool:
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        try:
            ok = _ops_registered() or _load()
            error = None if ok else "the compiled library did not register torch.ops.shusheng_cpu"
        except (OSError, RuntimeError, subprocess.CalledProcessError, ImportError) as exc:
            ok, error = False, f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
        if not ok:
            logger.warning("DCNv3 CPU kernel unavailable, the reference backend will be used instead: %s", error)
        _state.update(tried=True, ok=ok, error=error)
        return ok


def is_available(device: torch.device | str | None = None) -> bool:
    """True for CPU devices once the kernel has compiled and loaded (compiles on the first call)."""
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return False
    return _ensure_loaded()


def build_error() -> str | None:
    """Why the kernel could not be built or loaded (None if it was, or was not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


def forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
            group, group_channels, offset_scale, remove_center) -> torch.Tensor:
    """DCNv3 forward on CPU tensors; returns ``(N, H_out, W_out, group * group_channels)`` in the input dtype."""
    if not _ensure_loaded():
        raise RuntimeError(f"the DCNv3 CPU kernel is not available: {build_error()}")
    return torch.ops.shusheng_cpu.dcnv3_forward(
        input, offset, mask, int(kernel_h), int(kernel_w), int(stride_h), int(stride_w), int(pad_h), int(pad_w),
        int(dilation_h), int(dilation_w), int(group), int(group_channels), float(offset_scale),
        bool(remove_center))


def backward(grad_output, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
             dilation_w, group, group_channels, offset_scale, remove_center
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DCNv3 backward on CPU tensors; returns ``(grad_input, grad_offset, grad_mask)`` in the input dtype."""
    if not _ensure_loaded():
        raise RuntimeError(f"the DCNv3 CPU kernel is not available: {build_error()}")
    return tuple(torch.ops.shusheng_cpu.dcnv3_backward(
        grad_output, input, offset, mask, int(kernel_h), int(kernel_w), int(stride_h), int(stride_w), int(pad_h),
        int(pad_w), int(dilation_h), int(dilation_w), int(group), int(group_channels), float(offset_scale),
        bool(remove_center)))
