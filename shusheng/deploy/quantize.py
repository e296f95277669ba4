"""int8 ONNX files with ONNX Runtime's quantisation tools.

* :func:`quantize_dynamic`: weights stored as int8, activations quantised at run time (no calibration data);
  ``MatMul``/``Gemm`` only (ONNX Runtime's CPU ``ConvInteger`` is slower than fp32 convolutions).
* :func:`quantize_static`: weights and activations int8 in QDQ format, activation ranges calibrated (min-max) on
  sample inputs (``shusheng export --format onnx-int8`` uses SynthDrive train scenes); ``Conv``, ``MatMul`` and
  ``Gemm`` are quantised, per output channel. ``symmetric=True`` gives the zero-point-free int8 activations that
  TensorRT's explicit quantisation needs.

DCNv3's sampling (``GridSample``), the normalisations and the softmax stay in fp32 in both modes.

Weights are quantised to 7 bits (ONNX Runtime's ``reduce_range``) in both modes. On x86 CPUs without VNNI (AVX2
only) ONNX Runtime's uint8 x int8 kernels add pairs of products in 16-bit registers, which saturate with 8-bit
weights: on such a machine the test backbone's int8 files came out with relative L2 errors of 0.21-0.57 against
PyTorch (static) and 0.14-0.20 (dynamic); with 7-bit weights 0.033 and 0.019. A file runs wherever it is copied,
so the narrower range is used everywhere rather than only where the quantising machine lacks VNNI.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZED_OPS", "quantize_dynamic", "quantize_static"]

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class _NoPreprocessingHint(logging.Filter):
    """ONNX Runtime's quantiser suggests its shape-inference pre-pass on every call through the root logger; that
    pass fails on graphs with a ``Loop`` (the dense towers' counting) and gains nothing on the others here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in str(record.msg)


@contextlib.contextmanager
def _quiet_hints():
    root, hint = logging.getLogger(), _NoPreprocessingHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _input_name(path: Path) -> str:
    onnx = require("onnx", extra="onnx")
    model = onnx.load(os.fspath(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"expected a model with one input, got {names}")
    return names[0]


def quantize_dynamic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of ``MatMul``/``Gemm`` weights; returns ``dst``."""
    q = require("onnxruntime.quantization", extra="onnx", package="onnxruntime")
    with _quiet_hints():
        q.quantize_dynamic(os.fspath(src), os.fspath(dst), weight_type=q.QuantType.QInt8,
                           op_types_to_quantize=["MatMul", "Gemm"], reduce_range=True)
    return Path(dst)


def quantize_static(src: str | os.PathLike, dst: str | os.PathLike, calibration: Iterable[np.ndarray], *,
                    symmetric: bool = False, per_channel: bool = True) -> Path:
    """Static int8 quantisation (QDQ), calibrated on ``calibration`` (batches for the model's one input).

    Args:
        src, dst: fp32 and int8 files.
        calibration: float32 arrays ``(B, 3, H, W)``, e.g. preprocessed SynthDrive scenes.
        symmetric: int8 activations with zero point 0 (TensorRT); default uint8 activations (ONNX Runtime CPU's
            fastest kernels).
        per_channel: one weight scale per output channel.
    """
    q = require("onnxruntime.quantization", extra="onnx", package="onnxruntime")
    name = _input_name(Path(src))
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    if not batches:
        raise ValueError("static quantisation needs at least one calibration batch")

    class _Reader(q.CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: b} for b in batches])

        def get_next(self):
            return next(self._it, None)

    with _quiet_hints():
        q.quantize_static(os.fspath(src), os.fspath(dst), _Reader(), quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, per_channel=per_channel, reduce_range=True,
                          op_types_to_quantize=list(QUANTIZED_OPS),
                          calibrate_method=q.CalibrationMethod.MinMax,
                          extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    logger.info("quantised %s -> %s on %d calibration batches", src, dst, len(batches))
    return Path(dst)
