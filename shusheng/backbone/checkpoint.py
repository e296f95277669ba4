"""Loading InternImage checkpoints in every published layout, with a readable report.

Handled (see ``shared/specs/internimage.md`` §9):

* official classification ``.pth``: ``{'model': sd}`` (optionally ``'model_ema'``), ``{'state_dict': sd}`` or a raw
  state dict, read with ``torch.load(weights_only=True)``;
* the Hugging Face port: ``model.`` prefix and ``layer_scale1/2`` instead of ``gamma1/2``;
* mmdet/mmseg checkpoints: ``backbone.`` prefix (neck/head keys are dropped) and ``module.`` (DDP);
* ``.safetensors`` files and folders written by ``InternImage.save_pretrained``;
* classifier heads with another class count (21841 vs 1000 vs yours): dropped, kept (``keep_head``), or mapped
  with a row index list (``class_map``, e.g. the official ``map22kto1k.txt``);
* ``remove_center`` models from checkpoints trained with the centre point (the centre rows of ``dcn.mask`` and
  ``dcn.offset`` are deleted per group, for any odd square kernel);
* stems with another ``in_chans`` (timm's rule: sum for 1 channel, repeat and rescale otherwise).

The functions work from the model's ``state_dict`` shapes only, so they serve any module laid out like
``InternImage`` (and models on the meta device, with ``assign=True``).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatchError", "LoadReport", "PretrainedWeightsNotFound", "filter_state_dict", "load_checkpoint",
    "read_checkpoint",
]

HEAD_KEYS = ("head.weight", "head.bias")
_CONTAINER_KEYS = ("model", "state_dict", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema")
_HF_LAYER_SCALE = re.compile(r"\.layer_scale([12])$")
_DCN_ROWS = re.compile(r"dcn\.(offset|mask)\.(weight|bias)$")


class PretrainedWeightsNotFound(FileNotFoundError):
    """Raised when pretrained weights are requested but no local file was named (nothing is ever downloaded)."""


class CheckpointMismatchError(RuntimeError):
    """Raised by a strict load when keys are missing, unexpected or of the wrong shape; carries the report."""

    def __init__(self, report: LoadReport):
        super().__init__(f"checkpoint does not fit the model (strict=True):\n{report}")
        self.report = report


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did.

    Attributes:
        source: file name (or ``"<state_dict>"``).
        container_key: the checkpoint entry holding the weights (``"model"``, ``"state_dict"``, ...) or None.
        formats: layouts recognised (``"official"``, ``"huggingface"``, ``"mmdet/mmseg"``, ``"ddp"``).
        loaded: number of tensors copied into the model.
        missing_keys: model entries the checkpoint did not provide (they keep their initial values).
        unexpected_keys: checkpoint entries the model has no place for (not loaded).
        mismatched_keys: ``key -> (checkpoint shape, model shape)`` for entries not loaded for their shape.
        dropped_keys: ``key -> reason`` for checkpoint entries deliberately left out (e.g. another classifier).
        reinitialized_keys: model entries left at their fresh init on purpose (a dropped classifier).
        converted_keys: ``key -> what was done`` (renames, remove_center, stem adaptation, class map).
    """

    source: str = "<state_dict>"
    container_key: str | None = None
    formats: list[str] = field(default_factory=list)
    loaded: int = 0
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dropped_keys: dict[str, str] = field(default_factory=dict)
    reinitialized_keys: list[str] = field(default_factory=list)
    converted_keys: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every model entry was loaded or deliberately re-initialised and nothing was left over."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        def short(keys, n=8):
            keys = list(keys)
            more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
            return ", ".join(keys[:n]) + more

        where = f" [{self.container_key}]" if self.container_key else ""
        lines = [f"loaded {self.loaded} tensors from {self.source}{where} "
                 f"(format: {', '.join(self.formats) or 'official'})"]
        if self.converted_keys:
            kinds: dict[str, int] = {}
            for what in self.converted_keys.values():
                kinds[what] = kinds.get(what, 0) + 1
            lines.append("converted: " + "; ".join(f"{w} ({n} keys)" for w, n in kinds.items()))
        if self.dropped_keys:
            reasons: dict[str, list[str]] = {}
            for k, why in self.dropped_keys.items():
                reasons.setdefault(why, []).append(k)
            for why, keys in reasons.items():
                lines.append(f"dropped {len(keys)}: {why}: {short(keys)}")
        if self.reinitialized_keys:
            lines.append(f"re-initialised (not in checkpoint on purpose): {short(self.reinitialized_keys)}")
        if self.missing_keys:
            lines.append(f"missing {len(self.missing_keys)}: {short(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"unexpected {len(self.unexpected_keys)}: {short(self.unexpected_keys)}")
        for k, (a, b) in list(self.mismatched_keys.items())[:8]:
            lines.append(f"shape mismatch {k}: checkpoint {list(a)} vs model {list(b)}")
        if len(self.mismatched_keys) > 8:
            lines.append(f"... (+{len(self.mismatched_keys) - 8} more shape mismatches)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def _unwrap(obj: Any, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the state dict inside a checkpoint object; returns it and the container key used."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a mapping of tensors, got {type(obj).__name__}")
    order = (_EMA_KEYS + _CONTAINER_KEYS) if use_ema else (_CONTAINER_KEYS + _EMA_KEYS)
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner), key
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(map(str, obj))[:10]})")
    return tensors, None


def read_checkpoint(path: str | os.PathLike, *, use_ema: bool = False, weights_only: bool = True,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (or a ``save_pretrained`` folder) into a state dict.

    Args:
        path: the file, or a folder holding ``model.safetensors`` / ``pytorch_model.bin``.
        use_ema: prefer the EMA weights (``model_ema`` / ``state_dict_ema``) when the file has both.
        weights_only: ``torch.load(weights_only=...)``; leave True unless you trust the file (pickles can run code).
        map_location: device the tensors are loaded to.

    Returns:
        ``(state_dict, container_key)``.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in folder {p}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        device = str(map_location) if not isinstance(map_location, str) else map_location
        return load_file(str(p), device=device), None
    try:
        obj = torch.load(p, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{p} holds objects that torch.load(weights_only=True) refuses ({e}). If you trust the file, load it "
            "with weights_only=False, or re-save just its tensors.") from e
    return _unwrap(obj, use_ema)


# --------------------------------------------------------------------------------------------------------
# Adapting a state dict to a model
# --------------------------------------------------------------------------------------------------------

def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str], report: LoadReport) -> dict[str, torch.Tensor]:
    def strip(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in d.items()}

    def has_prefix(d, prefix):
        return any(k.startswith(prefix) for k in d) and not any(k.startswith(prefix) for k in model_keys)

    if has_prefix(sd, "module."):
        sd = strip(sd, "module.")
        report.formats.append("ddp")
    if has_prefix(sd, "backbone."):
        for k in [k for k in sd if not k.startswith("backbone.")]:
            report.dropped_keys[k] = "not part of the backbone (detector/segmentor neck or head)"
            del sd[k]
        sd = strip(sd, "backbone.")
        report.formats.append("mmdet/mmseg")
    if has_prefix(sd, "model.") and all(k.startswith("model.") for k in sd):
        sd = strip(sd, "model.")
        report.formats.append("huggingface")
    renamed = {}
    for k, v in sd.items():
        new = _HF_LAYER_SCALE.sub(r".gamma\1", k) if k not in model_keys else k
        if new != k:
            report.converted_keys[new] = "renamed layer_scale1/2 -> gamma1/2 (Hugging Face port)"
            if "huggingface" not in report.formats:
                report.formats.append("huggingface")
        renamed[new] = v
    return renamed


def _remove_center(t: torch.Tensor, target_rows: int, per_point: int) -> torch.Tensor | None:
    """Delete the centre point's rows of a ``dcn.offset`` (per_point=2) or ``dcn.mask`` (1) weight/bias.

    Rows are ordered ``[group][point][per_point]``; with ``P = K*K`` points (odd K) the centre is point ``P // 2``
    (column-major kernel order). Returns None if the shapes are not a with/without-centre pair.
    """
    diff = t.shape[0] - target_rows
    if diff <= 0 or diff % per_point:
        return None
    groups = diff // per_point
    if t.shape[0] % (groups * per_point):
        return None
    points = t.shape[0] // (groups * per_point)
    k = math.isqrt(points)
    if k * k != points or k % 2 == 0 or groups * (points - 1) * per_point != target_rows:
        return None
    c = points // 2
    v = t.reshape(groups, points, per_point, *t.shape[1:])
    v = torch.cat([v[:, :c], v[:, c + 1:]], dim=1)
    return v.reshape(target_rows, *t.shape[1:])


def _adapt_in_chans(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's ``adapt_input_conv``: RGB stem weights for another number of input channels."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def _read_class_map(class_map: str | os.PathLike | Sequence[int]) -> list[int]:
    if isinstance(class_map, (str, os.PathLike)):
        return [int(line.split()[0]) for line in Path(class_map).read_text().splitlines() if line.strip()]
    return [int(i) for i in class_map]


def _normalize(state_dict: Mapping[str, Any], model_keys: set[str], report: LoadReport,
               class_map: str | os.PathLike | Sequence[int] | None) -> dict[str, torch.Tensor]:
    """Container, prefixes, Hugging Face names and class map: everything that does not need target shapes."""
    if any(not isinstance(v, torch.Tensor) for v in state_dict.values()):
        state_dict, key = _unwrap(state_dict)
        report.container_key = report.container_key or key
    sd = _strip_prefixes(dict(state_dict), model_keys, report)
    if class_map is not None and "head.weight" in sd:
        rows = _read_class_map(class_map)
        for k in HEAD_KEYS:
            if k in sd:
                sd[k] = sd[k][rows]
                report.converted_keys[k] = f"classifier rows selected by class_map ({len(rows)} classes)"
    return sd


def _fit(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Convert entries whose shapes differ from ``target`` where a known rule applies; leave the rest out."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in target:
            if k in HEAD_KEYS:
                report.dropped_keys[k] = "the model has no classifier (num_classes=0)"
            else:
                out[k] = v  # reported as unexpected by load_checkpoint
            continue
        want = tuple(target[k].shape)
        if tuple(v.shape) != want:
            m = _DCN_ROWS.search(k)
            if m is not None:
                converted = _remove_center(v, want[0], 2 if m.group(1) == "offset" else 1)
                if converted is not None and tuple(converted.shape) == want:
                    v = converted
                    report.converted_keys[k] = "removed the centre sampling point (remove_center)"
            elif (k == "patch_embed.conv1.weight" and v.dim() == 4 and v.shape[0] == want[0]
                    and tuple(v.shape[2:]) == want[2:]):
                report.converted_keys[k] = f"stem adapted from {v.shape[1]} to {want[1]} input channels"
                v = _adapt_in_chans(v, want[1])
            elif k in HEAD_KEYS:
                report.dropped_keys[k] = (f"classifier has {v.shape[0]} classes, the model {want[0]}: the model "
                                          "keeps its freshly initialised classifier")
                report.reinitialized_keys.append(k)
                continue
        if tuple(v.shape) != want:
            report.mismatched_keys[k] = (tuple(v.shape), want)
            continue
        out[k] = v
    return out


def filter_state_dict(
    state_dict: Mapping[str, Any],
    model: nn.Module,
    *,
    class_map: str | os.PathLike | Sequence[int] | None = None,
    report: LoadReport | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Adapt a checkpoint's state dict to ``model`` (see the module docstring for what is handled).

    Args:
        state_dict: a raw state dict or a checkpoint container (``{'model': ...}``, ``{'state_dict': ...}``).
        model: the target; only its ``state_dict()`` names and shapes are used.
        class_map: rows of the checkpoint classifier to keep (indices or a text file with one per line).
        report: report to fill (a new one by default).

    Returns:
        ``(state_dict, report)``: entries whose shape still differs from the model are left out and listed in
        ``report.mismatched_keys``; a classifier of another size is left out and listed in ``dropped_keys``.
    """
    report = report if report is not None else LoadReport()
    target = model.state_dict()
    sd = _normalize(state_dict, set(target), report, class_map)
    return _fit(sd, target, report), report


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    num_classes: int | None = None,
    *,
    keep_head: bool = False,
    class_map: str | os.PathLike | Sequence[int] | None = None,
    use_ema: bool = False,
    weights_only: bool = True,
    assign: bool = False,
) -> LoadReport:
    """Load an InternImage checkpoint (any published layout) into ``model`` and report what happened.

    Args:
        model: the model (``InternImage`` or anything with the same names).
        checkpoint: a file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``), a ``save_pretrained`` folder, or an
            in-memory state dict / checkpoint container.
        strict: raise :class:`CheckpointMismatchError` if any model entry is missing, any checkpoint entry is
            unused or has the wrong shape. A classifier dropped for its class count does not count as missing.
        num_classes: first ``model.reset_classifier(num_classes)`` (if it differs from the model's).
        keep_head: when the checkpoint classifier has another class count, resize the model's classifier to it
            (``reset_classifier``) and load it instead of dropping it.
        class_map: keep only these classifier rows (e.g. 22k→1k with the official ``map22kto1k.txt``).
        use_ema: prefer EMA weights when the file holds both.
        weights_only: passed to ``torch.load``.
        assign: ``load_state_dict(assign=True)``: adopt the checkpoint tensors (materialises a meta-device model).

    Returns:
        The :class:`LoadReport` (also logged at INFO level).
    """
    if isinstance(checkpoint, Mapping):
        report = LoadReport()
        if any(not isinstance(v, torch.Tensor) for v in checkpoint.values()):
            sd, report.container_key = _unwrap(checkpoint, use_ema)
        else:
            sd = dict(checkpoint)
    else:
        report = LoadReport(source=str(checkpoint))
        sd, report.container_key = read_checkpoint(checkpoint, use_ema=use_ema, weights_only=weights_only)
    if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
        model.reset_classifier(num_classes)
    sd = _normalize(sd, set(model.state_dict()), report, class_map)
    head = sd.get("head.weight")
    if keep_head and head is not None and head.shape[0] != getattr(model, "num_classes", head.shape[0]):
        model.reset_classifier(head.shape[0])
    sd = _fit(sd, model.state_dict(), report)

    target_keys = set(model.state_dict())
    loadable = {k: v for k, v in sd.items() if k in target_keys}
    report.unexpected_keys = sorted(k for k in sd if k not in target_keys)
    given = set(loadable) | set(report.mismatched_keys)
    report.missing_keys = sorted(k for k in target_keys if k not in given and k not in report.reinitialized_keys)
    report.reinitialized_keys = sorted(k for k in report.reinitialized_keys if k in target_keys)
    if strict and not report.ok:
        raise CheckpointMismatchError(report)
    model.load_state_dict(loadable, strict=False, assign=assign)
    report.loaded = len(loadable)
    logger.info("%s", report)
    return report
