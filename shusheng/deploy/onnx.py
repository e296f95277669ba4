"""Plugin-free ONNX export of models that use DCNv3, and an onnxruntime runner to check them.

The official InternImage export emits a custom ``mmdeploy::TRTDCNv3`` node that only a patched TensorRT build
runs. Here ``shusheng.ops.dcnv3_core`` switches to its pure-PyTorch reference while exporting, which lowers to
``GridSample`` plus elementwise ops and reductions (opset >= 16), so the file runs in any ONNX runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from shusheng._deps import require

logger = logging.getLogger(__name__)

MIN_OPSET = 16  # GridSample entered the default domain in opset 16


def export_onnx(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    dynamo: bool = False,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file that uses only standard-domain operators.

    Args:
        model: any module; put it in eval mode first if it has dropout/batch norm.
        example_inputs: a tensor or tuple of tensors used for tracing.
        path: output file.
        opset: ONNX opset (>= 16, needed for ``GridSample``).
        dynamic_batch: make the first dimension of every input and output symbolic.
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one (both give standard ops).
        input_names, output_names: graph names (default ``input_i`` / ``output_i``).

    Returns:
        The path written.

    Raises:
        ValueError: for an opset below 16, or if the exported graph contains a non-standard operator.
    """
    onnx = require("onnx", extra="onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} has no GridSample; use opset >= {MIN_OPSET}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    input_names = input_names or [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = model(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = output_names or [f"output_{i}" for i in range(n_out)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"opset_version": opset, "input_names": input_names, "output_names": output_names,
                    "dynamo": dynamo}
    if dynamic_batch:
        if dynamo:
            batch = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
        else:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in input_names + output_names}
    torch.onnx.export(model, inputs, str(path), **kwargs)
    graph = onnx.load(str(path))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ValueError(f"exported graph {path} contains non-standard operators: {foreign}")
    logger.info("exported %s (opset %d, %d nodes)", path, opset, len(graph.graph.node))
    return path


@dataclass
class OnnxRunner:
    """Runs an exported model with onnxruntime on numpy or torch inputs.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers (default CPU).
    """

    path: str | Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self):
        ort = require("onnxruntime", extra="onnx")
        self.session = ort.InferenceSession(str(self.path), providers=list(self.providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs) -> list:
        feeds = {name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                 for name, x in zip(self.input_names, inputs)}
        return self.session.run(None, feeds)


def max_abs_error(model: torch.nn.Module, runner: OnnxRunner, *inputs: torch.Tensor) -> float:
    """Largest absolute difference between ``model`` in PyTorch and the ONNX file on the same inputs."""
    with torch.no_grad():
        ref = model(*inputs)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = runner(*inputs)
    return max(float((torch.as_tensor(o) - r.detach().cpu()).abs().max()) for o, r in zip(outs, refs))
