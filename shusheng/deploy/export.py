"""``export_model``: any shusheng model to a checked ONNX, int8 ONNX or TensorRT file.

    >>> from shusheng.deploy import export_model, resolve_target
    >>> target = resolve_target("shusheng-mini-clip")          # a bundled model, a registered name or a folder
    >>> result = export_model(target, "mini-clip.onnx")          # format="onnx" | "onnx-int8" | "tensorrt"
    >>> result.max_abs_error                                     # against PyTorch, on SynthDrive + random inputs

What is exported (one input, ``pixels``: normalised ``(B, 3, H, W)``; the batch dimension dynamic unless fixed):

* a registered backbone (``internimage_t``, ``internimage_test``, ... ; random weights, nothing is downloaded)
  → its forward (``logits``, or ``features`` for a headless model);
* ``shusheng-mini-clip`` (or a ``miniclip`` folder) → its image tower: ``embedding`` (L2-normalised) and the
  ``features`` the in-domain check reads (:class:`shusheng.miniclip.pipelines.ImageTower`);
* ``shusheng-mini-uniperceiver`` (or an ``uniperceiver`` folder) → its image side, backbone + image tokenizer:
  ``image_tokens`` and the ``pooled`` backbone features (:class:`shusheng.uniperceiver.pipelines.ImageSide`);
* a saved ``internimage`` / ``dense-tower-backbone`` folder → its forward / ``forward_features``;
* a ``segmenter`` folder (:class:`shusheng.detection.segment.InternImageSegmenter`) → its forward: ``logits``
  ``(B, K, S, S)`` at the input size (argmax and the resize to each image's own size stay in PyTorch);
* a ``detector`` folder (:class:`shusheng.detection.model.InternImageDetector`) → its dense part
  (:class:`shusheng.detection.model.DetectorDense`) on a normalised padded batch of fixed size (default
  ``min_size`` rounded up to a multiple of 32, square; ``size`` sets another, multiples of 32): the tower levels
  ``level_i``, then the pyramid maps ``fpn_*`` (Mask R-CNN) or the FCOS head's ``cls_logits``,
  ``bbox_regression``, ``bbox_ctrness``. Resize/normalise/pad, box decoding, NMS (and Mask R-CNN's RPN, RoIAlign,
  box and mask heads) stay in PyTorch: ``InternImageDetector.detections_from_dense`` on the file's outputs.

Every export is written under a temporary name next to ``out``, run by its runtime on sample inputs (SynthDrive
test scenes through the model's own preprocessing, plus random inputs; two batch sizes when the batch is
dynamic) and compared with PyTorch on the same inputs. Only when the check passes is the file renamed to
``out``; otherwise nothing is left behind and :class:`ExportCheckError` says by how much it missed. fp32 files
must match within ``atol`` (1e-4 absolute by default); int8 files within ``int8_tol`` relative L2 error, since
quantisation changes outputs by design (their effect on task metrics is measured by ``bench/deploy.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shusheng.modeling import Preprocess

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED", "FORMATS", "ExportCheckError", "ExportResult", "ExportTarget", "export_model",
           "resolve_target", "sample_pixels"]

FORMATS = ("onnx", "onnx-int8", "tensorrt")
BUNDLED = ("shusheng-mini-clip", "shusheng-mini-uniperceiver")


class ExportCheckError(RuntimeError):
    """The exported file does not match PyTorch within the tolerance (nothing was written)."""


@dataclass
class ExportTarget:
    """A module ready to export and how to feed it.

    Attributes:
        name: what the user named (registered name, bundled name or folder).
        module: ``pixels (B, 3, H, W) -> output(s)`` in eval mode.
        input_shape: ``(3, H, W)``.
        output_names: one name per output.
        preprocess: the preprocessing of the weights (``size`` is overridden by ``input_shape``).
        kind: ``"backbone"``, ``"miniclip"``, ``"uniperceiver"``, ``"segmenter"``, ``"detector"``, ...
        notes: more ``metadata_props`` (e.g. what stays in PyTorch).
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, int, int]
    output_names: list[str]
    preprocess: Preprocess
    kind: str
    notes: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """What travels inside the exported file (ONNX ``metadata_props``)."""
        from shusheng import __version__

        return {"shusheng.model": self.name, "shusheng.kind": self.kind,
                "shusheng.input": f"pixels: float32 (B, {', '.join(map(str, self.input_shape))}), RGB normalised",
                "shusheng.outputs": ", ".join(self.output_names),
                "shusheng.preprocess": json.dumps(self.preprocess.to_dict()), "shusheng.version": __version__,
                **self.notes}


class _Forward(nn.Module):
    """``model.forward_features`` as a module (headless towers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)


def _from_model(name: str, model: nn.Module, kind: str, size: tuple[int, int] | None) -> ExportTarget:
    model.eval()
    notes: dict[str, str] = {}
    if kind == "detector":
        return _detector_target(name, model, size)
    if kind == "segmenter":
        module, outputs = model, ["logits"]
        notes["shusheng.pytorch_side"] = "argmax and resize to each image's size (InternImageSegmenter.segment)"
    elif kind == "miniclip":
        from shusheng.miniclip.pipelines import ImageTower

        module, outputs = ImageTower(model), ["embedding", "features"]
    elif kind == "uniperceiver":
        from shusheng.uniperceiver.pipelines import ImageSide

        module, outputs = ImageSide(model), ["image_tokens", "pooled"]
    elif kind == "dense-tower-backbone":
        module, outputs = _Forward(model), ["features"]
    else:
        module, outputs = model, ["logits" if getattr(model, "num_classes", 0) else "features"]
    if hasattr(model, "preprocess_config"):
        pre = model.preprocess_config()
    else:
        pre = Preprocess.from_timm(model.pretrained_cfg)
    h, w = size if size is not None else (pre.size, pre.size)
    return ExportTarget(name, module.eval(), (3, int(h), int(w)), outputs, pre, kind, notes)


def _detector_target(name: str, model: nn.Module, size: tuple[int, int] | None) -> ExportTarget:
    """The dense part of a detector on a fixed padded canvas (torchvision pads batches to multiples of 32)."""
    div = int(model.detector.transform.size_divisible)
    side = -(-int(model.config.min_size) // div) * div
    h, w = size if size is not None else (side, side)
    if h % div or w % div:
        raise ValueError(f"a detector's dense part takes a padded batch whose sides are multiples of {div} (as its "
                         f"transform pads them), got --size {h} {w}")
    module = model.dense_module().eval()
    notes = {"shusheng.input_note": f"a batch as the detector's transform makes it: resized (shorter side "
                                    f"{model.config.min_size}, longer at most {model.config.max_size}), normalised, "
                                    f"zero-padded to {h}x{w}",
             "shusheng.pytorch_side": "box decoding and NMS" + ("" if model.config.head == "fcos" else
                                       ", RPN, RoIAlign, box and mask heads")
                                      + ": InternImageDetector.detections_from_dense"}
    return ExportTarget(name, module, (3, int(h), int(w)), module.output_names, model.preprocess_config(),
                        "detector", notes)


def resolve_target(model: str | os.PathLike, size: tuple[int, int] | None = None) -> ExportTarget:
    """What ``shusheng export MODEL`` exports (see the module docstring).

    Args:
        model: a registered backbone name, a bundled model name, or a ``save_pretrained`` folder.
        size: ``(H, W)`` input size (default: the size the weights expect).

    Raises:
        ValueError: an unknown name or model type.
        FileNotFoundError: a folder without ``config.json``, or a bundled model whose weights are missing.
    """
    from shusheng.modeling import model_class_for

    text = os.fspath(model)
    path = Path(text).expanduser()
    if text in BUNDLED:
        from shusheng.weights import bundled_path

        path = bundled_path(text)
    if path.is_dir():
        # the families shusheng export knows; model_class_for reads older folder layouts too
        from shusheng.backbone import DenseTowerBackbone, InternImage
        from shusheng.detection.model import InternImageDetector
        from shusheng.detection.segment import InternImageSegmenter
        from shusheng.miniclip import MiniClip
        from shusheng.uniperceiver.model import UniPerceiver

        known = (MiniClip, UniPerceiver, InternImage, DenseTowerBackbone, InternImageSegmenter, InternImageDetector)
        try:
            cls = model_class_for(path)
        except ValueError as e:
            raise ValueError(f"{e}: shusheng export does not know it; known: "
                             f"{', '.join(c.model_type for c in known)}") from e
        if cls not in known:
            raise ValueError(f"{path} holds a {cls.model_type!r} model, which shusheng export does not know; "
                             f"known: {', '.join(c.model_type for c in known)}")
        return _from_model(text, cls.from_pretrained(path), cls.model_type, size)
    from shusheng.backbone import is_model, list_models

    if is_model(text):
        from shusheng.backbone import create_model

        return _from_model(text, create_model(text), "backbone", size)
    raise ValueError(f"unknown model {text!r}: give a registered backbone ({', '.join(list_models())}), a bundled "
                     f"model ({', '.join(BUNDLED)}) or a save_pretrained folder")


def sample_pixels(target: ExportTarget, n: int, seed: int | None = None, start: int = 0) -> torch.Tensor:
    """``(n, 3, H, W)`` SynthDrive scenes through the target's preprocessing (test scenes by default; the
    calibration of int8 files uses train scenes)."""
    from torchvision import transforms as T

    from shusheng.data import TEST_SEED, sample

    pre = target.preprocess
    _, h, w = target.input_shape
    interp = T.InterpolationMode(pre.interpolation.lower())
    tf = T.Compose([T.Resize((h, w), interpolation=interp), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    seed = TEST_SEED if seed is None else seed
    return torch.stack([tf(sample(seed, start + i, max(h, w))[0]) for i in range(n)])


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how well it matched PyTorch.

    Attributes:
        path: the file written.
        format: ``"onnx"``, ``"onnx-int8"`` or ``"tensorrt"``.
        max_abs_error: largest absolute difference from PyTorch over all outputs and check inputs.
        rel_error: largest per-output relative L2 error ``|y - y_torch| / |y_torch|``.
        tolerance: what the check required (absolute for fp32 ONNX, relative L2 for int8 and TensorRT).
        checked_on: the check inputs.
        seconds: wall time of the export (check included).
        details: format-specific facts (opset, quantisation mode, precision, batch).
    """

    path: Path
    format: str
    max_abs_error: float
    rel_error: float
    tolerance: float
    checked_on: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": os.fspath(self.path), "format": self.format, "max_abs_error": self.max_abs_error,
                "rel_error": self.rel_error, "tolerance": self.tolerance, "checked_on": self.checked_on,
                "seconds": round(self.seconds, 2), **self.details}


def _errors(refs: tuple, outs) -> tuple[float, float]:
    from shusheng.runtimes.onnx import output_errors

    abs_err = max(output_errors(refs, outs))
    rel = 0.0
    for r, o in zip(refs, outs):
        r = r.detach().cpu().double()
        o = torch.as_tensor(o).detach().cpu().double()
        rel = max(rel, float((o - r).norm() / r.norm().clamp(min=1e-12)))
    return abs_err, rel


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check(module: nn.Module, run, inputs: list[torch.Tensor]) -> tuple[float, float]:
    abs_err = rel = 0.0
    dev = _device_of(module)
    for x in inputs:
        x = x.to(dev)
        with torch.inference_mode():
            ref = module(x)
        a, r = _errors(ref if isinstance(ref, (tuple, list)) else (ref,), run(x))
        abs_err, rel = max(abs_err, a), max(rel, r)
    return abs_err, rel


def export_model(target: ExportTarget, out: str | os.PathLike, format: str = "onnx", *,
                 batch: int | str = "dynamic", opset: int = 18, atol: float = 1e-4, int8_tol: float = 0.2,
                 quantization: str = "static", calibration_images: int = 64, check_images: int = 4,
                 fp16: bool = False, int8: bool = False, device: str | torch.device | None = None
                 ) -> ExportResult:
    """Export ``target`` to ``out``, checked against PyTorch before it is written (see the module docstring).

    Args:
        target: from :func:`resolve_target`.
        out: the file to write (its folder is created).
        format: ``"onnx"`` (fp32), ``"onnx-int8"`` (ONNX Runtime quantisation) or ``"tensorrt"`` (an engine for
            this machine's GPU).
        batch: ``"dynamic"`` or a fixed batch size.
        opset: ONNX opset (>= 16).
        atol: largest absolute difference allowed for fp32 ONNX.
        int8_tol: largest relative L2 error per output allowed for int8 ONNX and TensorRT fp16/int8 (fp32
            TensorRT: 1e-2).
        quantization: ``"static"`` (activations calibrated on ``calibration_images`` SynthDrive train scenes)
            or ``"dynamic"`` (weights only, activations quantised at run time).
        check_images: SynthDrive test scenes in the check (a random batch is added).
        fp16, int8: TensorRT precisions (``int8`` builds from a statically quantised, symmetric graph).
        device: TensorRT's CUDA device (default ``cuda``).

    Raises:
        ValueError: a bad format, batch or opset. ImportError: a missing runtime package (named).
        ExportCheckError: the file does not match PyTorch (nothing is left at ``out``).
    """
    from shusheng.runtimes.onnx import OnnxRunner, export_onnx

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantization not in ("static", "dynamic"):
        raise ValueError(f"quantization must be 'static' or 'dynamic', got {quantization!r}")
    dynamic = batch == "dynamic"
    if not dynamic and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = target.module
    b1, b2 = (2, 3) if dynamic else (batch, batch)
    quantized = format == "onnx-int8" or int8 or fp16
    scenes = sample_pixels(target, max(check_images, b1, b2 if quantized else 1))
    g = torch.Generator().manual_seed(0)
    # reduced precision is judged on scenes only: its calibration (and purpose) is real images, not noise
    checks = [scenes[:b1], scenes[:b2] if quantized else torch.randn(b2, *target.input_shape, generator=g)]
    if dynamic and len(scenes) > max(b1, b2):
        checks.append(scenes)  # a third batch size
    n_scenes = len(scenes) if dynamic else b1
    checked_on = (f"{n_scenes} SynthDrive test scenes{'' if quantized else f' and {b2} random inputs'} "
                  f"(batches of {', '.join(str(len(x)) for x in checks)})")
    details: dict[str, Any] = {"opset": opset, "batch": batch, "input_shape": list(target.input_shape),
                               "outputs": target.output_names}
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fp32 = export_onnx(module, checks[0][:b1].to(_device_of(module)), tmpdir / "model.onnx", opset=opset, dynamic_batch=dynamic,
                           input_names=["pixels"], output_names=target.output_names, metadata=target.metadata())
        if format in ("onnx", "onnx-int8"):
            final = fp32
            if format == "onnx-int8":
                final = _quantize(target, fp32, tmpdir / "model.int8.onnx", quantization, calibration_images,
                                  b1 if not dynamic else 8)
                details["quantization"] = quantization
            runner = OnnxRunner(final)
            abs_err, rel = _check(module, runner, checks)
            tol, ok = (atol, abs_err <= atol) if format == "onnx" else (int8_tol, rel <= int8_tol)
        else:
            final, abs_err, rel, tol, ok = _tensorrt(target, fp32, tmpdir, checks, fp16=fp16, int8=int8,
                                                     device=device, int8_tol=int8_tol, dynamic=dynamic, batch=b1,
                                                     quantization_images=calibration_images)
            details["precision"] = "int8" if int8 else "fp16" if fp16 else "fp32"
        if not ok:
            measure = "max abs error" if format == "onnx" else "relative L2 error"
            raise ExportCheckError(
                f"{target.name} exported to {format} does not match PyTorch: {measure} "
                f"{abs_err if format == 'onnx' else rel:.3g} > tolerance {tol:.3g} (max abs error {abs_err:.3g}, "
                f"checked on {checked_on}); nothing was written")
        os.replace(final, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    result = ExportResult(out, format, abs_err, rel, tol, checked_on, time.perf_counter() - t0, details)
    logger.info("exported %s to %s (%s): max abs error %.3g, relative %.3g", target.name, out, format, abs_err, rel)
    return result


def _calibration(target: ExportTarget, n: int, batch: int) -> list[np.ndarray]:
    from shusheng.data import TRAIN_SEED

    x = sample_pixels(target, n, seed=TRAIN_SEED)
    return [x[i:i + batch].numpy() for i in range(0, n - batch + 1, batch)] or [x.numpy()]


def _quantize(target: ExportTarget, src: Path, dst: Path, mode: str, n: int, batch: int,
              symmetric: bool = False) -> Path:
    from shusheng.deploy.quantize import quantize_dynamic, quantize_static

    if mode == "dynamic":
        return quantize_dynamic(src, dst)
    return quantize_static(src, dst, _calibration(target, n, batch), symmetric=symmetric)


def _tensorrt(target: ExportTarget, fp32: Path, tmpdir: Path, checks: list[torch.Tensor], *, fp16: bool,
              int8: bool, device, int8_tol: float, dynamic: bool, batch: int, quantization_images: int):
    from shusheng.runtimes import check_runtime
    from shusheng.runtimes.tensorrt import TensorRTRunner, build_engine

    check_runtime("tensorrt")
    dev = torch.device(device or "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("TensorRT engines are built for a CUDA GPU and none is available here")
    src = fp32
    if int8:  # explicit quantisation: TensorRT reads the scales from symmetric Q/DQ nodes
        src = _quantize(target, fp32, tmpdir / "model.qdq.onnx", "static", quantization_images,
                        8 if dynamic else batch, symmetric=True)
    engine = build_engine(src, tmpdir / "model.engine", target.input_shape, fp16=fp16, int8=int8,
                          min_batch=1 if dynamic else batch, opt_batch=8 if dynamic else batch,
                          max_batch=64 if dynamic else batch)
    runner = TensorRTRunner(engine, dev)
    module = target.module.to(dev)
    abs_err, rel = _check(module, runner, [x.to(dev) for x in checks])
    tol = int8_tol if (fp16 or int8) else 1e-2
    return engine, abs_err, rel, tol, rel <= tol
