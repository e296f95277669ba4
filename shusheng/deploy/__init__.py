"""Deployment: ``shusheng export`` (checked ONNX, int8 ONNX and TensorRT files of every model) and int8
quantisation. Runtimes for the pipelines live one layer down, in :mod:`shusheng.runtimes`; nothing below this
layer imports ``shusheng.deploy``.

    >>> from shusheng.deploy import export_model, resolve_target
    >>> export_model(resolve_target("internimage_t"), "internimage_t.onnx").max_abs_error
"""

from shusheng.deploy.export import (
    BUNDLED,
    FORMATS,
    ExportCheckError,
    ExportResult,
    ExportTarget,
    export_model,
    resolve_target,
    sample_pixels,
)
from shusheng.deploy.quantize import quantize_dynamic, quantize_static

__all__ = ["BUNDLED", "FORMATS", "ExportCheckError", "ExportResult", "ExportTarget", "export_model",
           "quantize_dynamic", "quantize_static", "resolve_target", "sample_pixels"]
