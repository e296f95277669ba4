"""TensorRT engines built from the plugin-free ONNX export, and a runner for them.

The ONNX graph uses only standard operators (DCNv3 is ``GridSample`` plus elementwise ops; the dense towers'
counting loop is an ONNX ``Loop``), so TensorRT's own ONNX parser builds it: no ``TRTDCNv3`` plugin, no patched
TensorRT. Needs a CUDA GPU and NVIDIA's ``tensorrt`` Python package (``pip install tensorrt``); without it every
entry point raises an ``ImportError`` naming the package. Written against the TensorRT 10 tensor API
(``execute_async_v3``, named I/O tensors); checked only where a GPU is lent (``bench/gpu_check.py``).

Precision: fp32 engines are built with TF32 off (so that they match PyTorch's fp32 within ~1e-4); ``fp16=True``
lets TensorRT pick fp16 kernels; ``int8=True`` expects an explicitly quantised graph (Q/DQ nodes, e.g. from
``shusheng.deploy.quantize_static(..., symmetric=True)``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["TensorRTRunner", "build_engine", "engine_path_for"]

DEFAULT_MAX_BATCH = 64


def _trt():
    return require("tensorrt", extra="tensorrt")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, input_shape: Sequence[int], *,
                 fp16: bool = False, int8: bool = False, tf32: bool = False, min_batch: int = 1, opt_batch: int = 8,
                 max_batch: int = DEFAULT_MAX_BATCH, workspace_gib: float = 4.0) -> Path:
    """Build and serialise a TensorRT engine from an ONNX file (written under a temporary name, then renamed).

    Args:
        onnx_path: a plugin-free export (:func:`shusheng.runtimes.onnx.export_onnx`).
        engine_path: where to write the engine.
        input_shape: ``(C, H, W)``; a dynamic batch dimension gets the profile ``min/opt/max_batch``.
        fp16, int8, tf32: allowed reduced precisions (int8 needs Q/DQ nodes in the graph).
        workspace_gib: the builder's workspace limit.

    Raises:
        ImportError: no ``tensorrt`` package.
        ValueError: TensorRT's ONNX parser rejects the file (its messages are included).
        RuntimeError: the build fails.
    """
    trt = _trt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {os.fspath(onnx_path)}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = tuple(inp.shape)
        if shape and shape[0] == -1:
            rest = tuple(input_shape)
            profile.set_shape(inp.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
        else:
            profile.set_shape(inp.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {os.fspath(onnx_path)} (see its log above)")
    out = Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("built TensorRT engine %s (fp16=%s, int8=%s, batch %d..%d)", out, fp16, int8, min_batch, max_batch)
    return out


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dt]


class TensorRTRunner:
    """Runs a serialised engine on CUDA tensors; ``runner(pixels) -> tuple of tensors`` (batches above the
    engine's profile maximum are split).

    Args:
        engine_path: a file written by :func:`build_engine`.
        device: a CUDA device.

    Raises:
        ImportError: no ``tensorrt`` package. ValueError: a device that is not CUDA.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: torch.device | str = "cuda"):
        trt = _trt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, not {self.device}")
        self._trt = trt
        self.path = Path(engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the engine {self.path} (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise ValueError(f"expected an engine with one input, got {self.inputs}")
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.inputs[0]))

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        name = self.inputs[0]
        x = x.to(self.device, self.input_dtype).contiguous()
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for out in self.outputs:
            o = torch.empty(tuple(self.context.get_tensor_shape(out)), device=self.device,
                            dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(out)))
            self.context.set_tensor_address(out, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        return outs

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [self._run(pixels[s:s + self.max_batch]) for s in range(0, len(pixels), self.max_batch)]
        outs = [torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts)]
        return tuple(o.to(pixels.dtype) if o.is_floating_point() and pixels.is_floating_point() else o
                     for o in outs)

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cuda", *,
                    fp16: bool = False, max_batch: int = DEFAULT_MAX_BATCH, atol: float | None = None
                    ) -> TensorRTRunner:
        """Export ``module`` (cached ONNX), build an engine for this GPU (cached beside it), check it against
        PyTorch (tolerance ``atol``, relative to ``max(1, largest |output|)``; default 1e-3 fp32, 2e-2 fp16).

        Raises:
            shusheng.runtimes.RuntimeCheckError: the engine does not match PyTorch (it is deleted).
        """
        from shusheng.runtimes import RuntimeCheckError, _random_inputs, cached_onnx, verify_runner

        _trt()
        dev = torch.device(device)
        onnx_path = cached_onnx(module, input_shape, dev)
        engine = engine_path_for(onnx_path, dev, fp16=fp16, max_batch=max_batch)
        if not engine.is_file():
            build_engine(onnx_path, engine, input_shape, fp16=fp16, max_batch=max_batch)
        runner = cls(engine, dev)
        tol = atol if atol is not None else (2e-2 if fp16 else 1e-3)
        try:
            runner.max_abs_error = verify_runner(module, runner, _random_inputs(input_shape, (1, 2), dev), tol)
        except RuntimeCheckError:
            engine.unlink(missing_ok=True)
            raise
        return runner


def engine_path_for(onnx_path: Path, device: torch.device, *, fp16: bool, max_batch: int) -> Path:
    """Cache name of an engine: the ONNX file's name + precision + batch limit + GPU and TensorRT version
    (engines are specific to both)."""
    trt = _trt()
    gpu = torch.cuda.get_device_name(device)
    tag = hashlib.sha256(f"{gpu}|{trt.__version__}".encode()).hexdigest()[:10]
    return onnx_path.parent.parent / "tensorrt" / (
        f"{onnx_path.stem}-{'fp16' if fp16 else 'fp32'}-b{max_batch}-{tag}.engine")
