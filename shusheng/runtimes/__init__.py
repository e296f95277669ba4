"""Runtimes for a model's image side: PyTorch eager, ONNX Runtime, TensorRT, or the fastest of them (``auto``).

    >>> from shusheng.runtimes import create_runner
    >>> run = create_runner(module, (3, 128, 128), "auto")   # measured once per model and machine, then cached
    >>> outputs = run(pixels)                                  # a tuple of tensors, on the pixels' device

A *runner* wraps a module ``pixels (B, 3, H, W) -> tensor or tuple of tensors`` (a pipeline's image side, see
``Pipeline.image_module``) and is called like it:

* ``"torch"``: the module itself, eager, under ``torch.inference_mode()``;
* ``"onnxruntime"``: the module exported once to plugin-free ONNX (:mod:`shusheng.runtimes.onnx`; DCNv3 lowered
  to standard ops), checked against PyTorch on random inputs, cached under ``<cache>/onnx/<fingerprint>.onnx``
  and run by an ONNX Runtime session on as many threads as torch uses;
* ``"tensorrt"``: that ONNX file built into a TensorRT engine (:mod:`shusheng.runtimes.tensorrt`; CUDA only, the
  ``tensorrt`` package); without the package an ``ImportError`` names it;
* ``"auto"``: the fastest runtime that is installed and valid for the module here: every candidate is exported,
  checked against PyTorch and timed at batch 1 and 8 against torch eager in the same process (three rounds, the
  runtimes interleaved, medians); one is chosen over torch only when it is faster at every batch size measured
  (by at least 5 %), so ``auto`` is never slower than eager. The measurement is stored in ``<cache>/runtimes.json``, keyed by the module's fingerprint (class,
  structure, weights, input size, versions) and the machine (host, CPU, threads, device, library versions).

``<cache>`` is ``$SHUSHENG_CACHE_DIR``, else ``$XDG_CACHE_HOME/shusheng``, else ``~/.cache/shusheng``; deleting
its ``onnx/``, ``tensorrt/`` and ``runtimes.json`` only costs a new export and measurement. A runner reads the weights when it is created: it does not follow later changes to the module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shusheng import _cache
from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV", "RUNTIMES", "OnnxRuntimeRunner", "RuntimeChoice", "RuntimeCheckError", "TorchRunner",
    "cache_dir", "cached_onnx", "check_runtime", "choose_runtime", "create_runner", "fingerprint", "installed_runtimes", "machine_info",
    "select_runtime", "verify_runner",
]

RUNTIMES = ("torch", "onnxruntime", "tensorrt", "auto")
CACHE_ENV = _cache.CACHE_ENV
SELECTION_FILE = "runtimes.json"
#: a runtime other than torch is chosen by ``auto`` only when it takes at most this share of eager's time
AUTO_MARGIN = 0.95
AUTO_BATCHES = (1, 8)


class RuntimeCheckError(RuntimeError):
    """A runtime's outputs differ from PyTorch's by more than the tolerance (the export is not used)."""


def cache_dir() -> Path:
    """Where exports and runtime measurements are cached: the shusheng cache folder (``shusheng._cache``)."""
    return _cache.cache_dir()


def check_runtime(runtime: str) -> str:
    """Validate a runtime name; an explicitly requested runtime must be importable.

    Raises:
        ValueError: an unknown name.
        ImportError: ``"onnxruntime"`` or ``"tensorrt"`` is not installed (the message names the package).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        require("onnxruntime", extra="onnx")
        require("onnx", extra="onnx")
    elif runtime == "tensorrt":
        require("tensorrt", extra="tensorrt")
    return runtime


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_runtimes(device: torch.device | str = "cpu") -> list[str]:
    """Runtimes that can run on ``device`` here: always ``torch``; ``onnxruntime`` when it and ``onnx`` are
    installed; ``tensorrt`` when the package is installed and the device is a CUDA GPU."""
    dev = torch.device(device)
    out = ["torch"]
    if _importable("onnxruntime") and _importable("onnx"):
        out.append("onnxruntime")
    if dev.type == "cuda" and _importable("tensorrt"):
        out.append("tensorrt")
    return out


def fingerprint(module: nn.Module, input_shape: Sequence[int]) -> str:
    """A hash of what an export depends on: the module's class and structure, its tensors, the input shape
    ``(C, H, W)`` and the versions of torch and shusheng."""
    from shusheng import __version__

    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|{module!r}|{tuple(input_shape)}|"
             f"{torch.__version__}|{__version__}".encode())
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    if not _importable(module):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a runtime measurement depends on besides the model."""
    dev = torch.device(device)
    return {"host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
            "torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "tensorrt": _version("tensorrt")}


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ------------------------------------------------------------------------------------------------------------
# Runners
# ------------------------------------------------------------------------------------------------------------

class TorchRunner:
    """The module itself, eager, under ``torch.inference_mode()``."""

    name = "torch"

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return _as_tuple(self.module(pixels))


def _random_inputs(input_shape: Sequence[int], batches: Sequence[int], device: torch.device,
                   seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *input_shape, generator=g).to(device) for b in batches]


def verify_runner(module: nn.Module, runner: Callable[[torch.Tensor], Sequence], inputs: Sequence[torch.Tensor],
                  atol: float = 1e-4, relative: bool = True) -> float:
    """Largest absolute difference between ``module`` (PyTorch) and ``runner`` over ``inputs`` and all outputs.

    Args:
        atol: the tolerance; with ``relative`` it is scaled by ``max(1, largest |output|)``.

    Raises:
        RuntimeCheckError: the difference exceeds the tolerance.
    """
    from shusheng.runtimes.onnx import output_errors

    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            refs = _as_tuple(module(x))
        err = max(output_errors(refs, runner(x)))
        scale = max([1.0] + [float(r.detach().abs().max()) for r in refs if r.numel()]) if relative else 1.0
        worst = max(worst, err)
        if err > atol * scale:
            raise RuntimeCheckError(f"outputs differ from PyTorch by {err:.3g} on a batch of {len(x)} "
                                    f"(tolerance {atol * scale:.3g})")
    return worst


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def cached_onnx(module: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> Path:
    """The module's plugin-free ONNX export in the cache (``<cache>/onnx/<fingerprint>.onnx``), made now if
    missing (written under a temporary name, then renamed). Runners check it against PyTorch when they load it."""
    from shusheng.runtimes.onnx import export_onnx

    path = cache_dir() / "onnx" / f"{fingerprint(module, input_shape)}.onnx"
    if not path.is_file():
        tmp = _atomic_target(path)
        try:
            export_onnx(module, _random_inputs(input_shape, (2,), torch.device(device), seed=1)[0], tmp,
                        input_names=["pixels"])
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("exported %s to %s", type(module).__name__, path)
    return path


class OnnxRuntimeRunner:
    """A module exported to ONNX (cached by fingerprint) and run by ONNX Runtime, checked against PyTorch when
    created (batches of 1 and 2: the batch dimension is dynamic).

    Args:
        module: ``pixels -> tensor(s)``.
        input_shape: ``(C, H, W)`` of one input.
        device: where inputs come from and outputs go (CUDA uses ONNX Runtime's CUDA provider when installed).
        path: an ONNX file of this module (default: :func:`cached_onnx`).
        threads: ONNX Runtime intra-op threads (default: torch's).
        atol: check tolerance, relative to ``max(1, largest |output|)``.

    Attributes:
        max_abs_error: the largest difference from PyTorch found by the check.

    Raises:
        RuntimeCheckError: the file does not match PyTorch (a cached file is deleted).
    """

    name = "onnxruntime"

    def __init__(self, module: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu",
                 path: str | os.PathLike | None = None, threads: int | None = None, atol: float = 1e-4):
        from shusheng.runtimes.onnx import OnnxRunner

        self.input_shape = tuple(int(s) for s in input_shape)
        self.device = torch.device(device)
        self.path = Path(path) if path is not None else cached_onnx(module, self.input_shape, self.device)
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if self.device.type == "cuda" else (
            "CPUExecutionProvider",)
        self.runner = OnnxRunner(self.path, providers, threads)
        try:
            self.max_abs_error = verify_runner(module, self, _random_inputs(self.input_shape, (1, 2), self.device),
                                               atol)
        except RuntimeCheckError:
            if path is None:
                self.path.unlink(missing_ok=True)
            raise

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(pixels.shape[1:]) != self.input_shape:
            raise ValueError(f"this ONNX session takes (B, {', '.join(map(str, self.input_shape))}) inputs, got "
                             f"{tuple(pixels.shape)}")
        outs = self.runner(pixels.detach().float())
        dtype = pixels.dtype if pixels.is_floating_point() else torch.float32
        return tuple(torch.from_numpy(o).to(self.device, dtype if o.dtype.kind == "f" else None) for o in outs)


def _make_runner(runtime: str, module: nn.Module, input_shape: Sequence[int], device: torch.device):
    if runtime == "torch":
        return TorchRunner(module)
    check_runtime(runtime)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(module, input_shape, device)
    if runtime == "tensorrt":
        from shusheng.runtimes.tensorrt import TensorRTRunner

        return TensorRTRunner.from_module(module, input_shape, device)
    raise ValueError(f"no runner for {runtime!r}")


# ------------------------------------------------------------------------------------------------------------
# auto: measure once per model and machine
# ------------------------------------------------------------------------------------------------------------

@dataclass
class RuntimeChoice:
    """What ``auto`` chose for a module on this machine, and why.

    Attributes:
        runtime: the runtime chosen.
        times_ms: ``{runtime: {batch: median ms}}`` as measured (the same process, one after another).
        invalid: ``{runtime: reason}`` for installed runtimes that could not run the module or did not match.
        key: the cache key (``<fingerprint>/<machine>``).
        cached: read from ``runtimes.json`` rather than measured now.
    """

    runtime: str
    times_ms: dict[str, dict[str, float]]
    invalid: dict[str, str]
    key: str
    cached: bool = False
    runner: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "times_ms": self.times_ms, "invalid": self.invalid}


def _median_ms(fn: Callable[[], object], budget_s: float = 0.15, min_runs: int = 2) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _read_selection(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_selection(path: Path, key: str, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_selection(path)
    data[key] = entry
    tmp = _atomic_target(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def choose_runtime(times_ms: dict[str, dict[str, float]], margin: float = AUTO_MARGIN) -> str:
    """The runtime ``auto`` picks from measured times ``{runtime: {batch: ms}}``: the one whose worst ratio to
    torch eager is lowest, among those at most ``margin`` times eager's time at every batch; else ``"torch"``."""
    eager = times_ms["torch"]
    best, best_ratio = "torch", 1.0
    for name, t in times_ms.items():
        if name == "torch" or set(t) != set(eager):
            continue
        worst = max(t[b] / eager[b] for b in eager)
        if worst <= margin and worst < best_ratio:
            best, best_ratio = name, worst
    return best


def select_runtime(module: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu", *,
                   batches: Sequence[int] = AUTO_BATCHES, margin: float = AUTO_MARGIN, rounds: int = 3,
                   refresh: bool = False) -> RuntimeChoice:
    """The fastest installed runtime that is valid for ``module`` on this machine (see the module docstring).

    Args:
        module: ``pixels -> tensor(s)``, in eval mode.
        input_shape: ``(C, H, W)`` of one input.
        device: where the module runs.
        batches: batch sizes timed; a runtime must beat torch eager at each of them.
        margin: a runtime is chosen over torch only when its time is at most ``margin`` times eager's.
        rounds: timing rounds, the runtimes interleaved in each (the median per runtime and batch counts).
        refresh: measure again even when ``runtimes.json`` has an answer.
    """
    dev = torch.device(device)
    machine = machine_info(dev)
    mkey = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    key = f"{fingerprint(module, input_shape)}/{mkey}"
    store = cache_dir() / SELECTION_FILE
    if not refresh:
        entry = _read_selection(store).get(key)
        if isinstance(entry, dict) and entry.get("runtime") in installed_runtimes(dev):
            return RuntimeChoice(entry["runtime"], entry.get("times_ms", {}), entry.get("invalid", {}), key, True)
    invalid: dict[str, str] = {}
    runners = {}
    xs = _random_inputs(input_shape, batches, dev, seed=2)
    for name in installed_runtimes(dev):
        try:
            runners[name] = _make_runner(name, module, input_shape, dev)
        except Exception as e:  # noqa: BLE001 - any failure to export or build makes that runtime invalid here
            invalid[name] = f"{type(e).__name__}: {e}"
            logger.info("runtime %s cannot run %s: %s", name, type(module).__name__, invalid[name])
    # rounds interleave the runtimes, so that a burst of load elsewhere on the machine hits all of them alike
    per: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, runner in runners.items():
            for x in xs:
                per.setdefault((name, len(x)), []).append(_median_ms(lambda r=runner, x=x: r(x)))
    times = {name: {str(len(x)): round(statistics.median(per[name, len(x)]), 3) for x in xs} for name in runners}
    best = choose_runtime(times, margin)
    _write_selection(store, key, {"runtime": best, "times_ms": times, "invalid": invalid, "machine": machine,
                                  "model": type(module).__name__, "input_shape": list(input_shape),
                                  "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    logger.info("auto runtime for %s: %s (ms per batch: %s)", type(module).__name__, best, times)
    return RuntimeChoice(best, times, invalid, key, False, runners[best])


def create_runner(module: nn.Module, input_shape: Sequence[int], runtime: str = "torch",
                  device: torch.device | str | None = None):
    """A runner of ``module`` with the given runtime (``"auto"``: :func:`select_runtime`).

    Args:
        module: ``pixels (B, *input_shape) -> tensor or tuple of tensors``, in eval mode.
        input_shape: ``(C, H, W)``.
        runtime: one of :data:`RUNTIMES`.
        device: where inputs live (default: the module's parameters' device).

    Returns:
        A callable ``pixels -> tuple of tensors`` with a ``name`` attribute (the runtime actually used).

    Raises:
        ValueError: unknown runtime. ImportError: the runtime's package is missing.
        RuntimeCheckError: the exported module does not match PyTorch.
    """
    check_runtime(runtime)
    if device is None:
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    dev = torch.device(device)
    if runtime != "auto":
        return _make_runner(runtime, module, input_shape, dev)
    choice = select_runtime(module, input_shape, dev)
    return choice.runner if choice.runner is not None else _make_runner(choice.runtime, module, input_shape, dev)
