"""Plugin-free ONNX export (DCNv3 lowered to standard ops) and an ONNX Runtime runner to check it.

The implementation lives in :mod:`shusheng.runtimes.onnx` (layer 4), where the pipelines' ``runtime=`` option
can reach it; this module is the deployment-side name for the same functions.
"""

from shusheng.runtimes.onnx import MIN_OPSET, OnnxRunner, export_onnx, max_abs_error, output_errors

__all__ = ["MIN_OPSET", "OnnxRunner", "export_onnx", "max_abs_error", "output_errors"]
