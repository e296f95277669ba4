"""Plugin-free ONNX export of models that use DCNv3, and an ONNX Runtime session to run them.

The official InternImage export emits a custom ``mmdeploy::TRTDCNv3`` node that only a patched TensorRT build
runs. Here ``shusheng.ops.dcnv3_core`` switches to its pure-PyTorch reference while exporting, which lowers to
``GridSample`` plus elementwise ops and reductions (opset >= 16), so the file runs in any ONNX runtime.
Data-dependent loops (the object counts of :class:`~shusheng.backbone.DenseTowerBackbone`) export as ONNX
``Loop`` nodes, so the graph is exact for every input, not only for the one it was traced with.

This module sits next to the pipelines (layer 4) so that ``runtime="onnxruntime"`` works without
:mod:`shusheng.deploy`; ``shusheng.deploy.onnx`` re-exports it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["MIN_OPSET", "OnnxRunner", "export_onnx", "max_abs_error", "output_errors"]

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
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file that uses only standard-domain operators.

    Args:
        model: any module; put it in eval mode first if it has dropout/batch norm.
        example_inputs: a tensor or tuple of tensors used for tracing.
        path: output file.
        opset: ONNX opset (>= 16, needed for ``GridSample``).
        dynamic_batch: make the first dimension of every input and output symbolic.
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one (both give standard ops
            for DCNv3; only the TorchScript one exports the dense towers' counting loop).
        input_names, output_names: graph names (default ``input_i`` / ``output_i``).
        metadata: strings stored in the model's ``metadata_props`` (ONNX Runtime:
            ``session.get_modelmeta().custom_metadata_map``).

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
    with torch.no_grad(), warnings.catch_warnings():
        # expected while tracing: sizes fixed as constants on purpose (the input size of an export is fixed),
        # and the exporter's notes about slices it does not fold
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(model, inputs, str(path), **kwargs)
    graph = onnx.load(str(path))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ValueError(f"exported graph {path} contains non-standard operators: {foreign}")
    if metadata:
        for k, v in metadata.items():
            graph.metadata_props.add(key=str(k), value=str(v))
        onnx.save(graph, str(path))
    logger.info("exported %s (opset %d, %d nodes)", path, opset, len(graph.graph.node))
    return path


@dataclass
class OnnxRunner:
    """Runs an ONNX file with ONNX Runtime on numpy or torch inputs; returns numpy arrays.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers (default CPU).
        threads: intra-op threads (default: torch's thread count, so that both runtimes use the same cores).
    """

    path: str | Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    session: object = field(init=False, repr=False)

    def __post_init__(self):
        ort = require("onnxruntime", extra="onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        providers = [p for p in self.providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(os.fspath(self.path), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``metadata_props``."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, *inputs) -> list:
        feeds = {name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                 for name, x in zip(self.input_names, inputs)}
        return self.session.run(None, feeds)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def output_errors(refs: Sequence[torch.Tensor], outs: Sequence) -> list[float]:
    """Largest absolute difference per output between reference tensors and another runtime's outputs.

    Raises:
        ValueError: the outputs differ in number or shape.
    """
    refs, outs = _as_tuple(refs), _as_tuple(outs)
    if len(refs) != len(outs):
        raise ValueError(f"{len(outs)} outputs, expected {len(refs)}")
    errs = []
    for r, o in zip(refs, outs):
        o = torch.as_tensor(o).detach().cpu().float()
        r = r.detach().cpu().float()
        if tuple(o.shape) != tuple(r.shape):
            raise ValueError(f"output of shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        errs.append(float((o - r).abs().max()) if r.numel() else 0.0)
    return errs


def max_abs_error(model: torch.nn.Module, runner, *inputs: torch.Tensor) -> float:
    """Largest absolute difference between ``model`` in PyTorch and ``runner`` (an :class:`OnnxRunner` or
    any callable on the same inputs) over all outputs."""
    with torch.no_grad():
        ref = model(*inputs)
    return max(output_errors(_as_tuple(ref), runner(*inputs)))
