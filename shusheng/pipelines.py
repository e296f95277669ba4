"""The pipeline base every family's pipelines build on: loading, streaming batches, per-item errors, devices,
and the in-domain check.

A pipeline wraps a model (a :class:`~shusheng.modeling.PretrainedMixin`) and answers a batched ``__call__`` with
a dataclass of per-item results. What the base gives every pipeline:

* ``from_pretrained(path=None)``: a model folder, or the bundled model when ``path`` is None;
* :meth:`Pipeline.batches`: images are decoded batch by batch through ``shusheng.data.load_image`` and the
  model's own transform (``modeling.resolve_transform``), so memory stays flat however many inputs a call gets;
  a file that cannot be loaded fails its own item (``errors[i]``) instead of the whole call;
* ``in_domain`` / ``domain_score`` for every item, from the :class:`DomainCheck` stored with the weights;
* ``runtime=``: what runs the image side (:meth:`Pipeline.image_module`, the part of the model that reads the
  pixels): ``"torch"`` (eager, the default), ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (the fastest valid one
  on this machine, measured once and cached; never slower than eager). See :mod:`shusheng.runtimes`.

The in-domain check. A bundled model knows only SynthDrive's driving scenes; on a portrait photograph it would
still answer with confidence. :class:`DomainCheck` is fitted once, when a model is trained, on the image
features of training scenes: a Gaussian (mean and a shrunk covariance) whose squared Mahalanobis distance
measures how far an image lies from them, and the distances of a separate calibration set of scenes. An image's
``domain_score`` is the share of calibration scenes lying at least as far out (a conformal p-value: about
uniform on in-domain images, near 0 on unlike ones); it is ``in_domain`` when that share is at least ``alpha``.
It is stored as ``domain_check.safetensors`` next to the weights; a folder without one reports every item as
in-domain with a score of NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["DOMAIN_FILE", "Batch", "DomainCheck", "Pipeline", "PipelineOutput", "as_image_list"]

DOMAIN_FILE = "domain_check.safetensors"


def as_image_list(images: Any) -> list:
    """One image (path, bytes, file object, PIL image) or a sequence of them → a list.

    Raises:
        ValueError: no images.
    """
    from PIL import Image

    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


@dataclass
class Batch:
    """One streamed batch: ``pixels[j]`` is input ``index[j]``; ``errors`` holds ``(input index, message)`` of
    the inputs of this stretch that could not be loaded; ``sizes[j]`` is the ``(width, height)`` of input
    ``index[j]`` as loaded (before the transform). With ``batches(..., own_size=True)`` the images are the list
    ``images`` of ``(3, H_j, W_j)`` tensors in [0, 1] instead."""

    index: list[int]
    pixels: torch.Tensor | None
    errors: list[tuple[int, str]]
    images: list[torch.Tensor] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def _to_unit_tensor(img: Any) -> torch.Tensor:
    """An RGB PIL image → ``(3, H, W)`` float32 in [0, 1], at its own size."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


@dataclass(kw_only=True)
class PipelineOutput:
    """Fields every pipeline output has, one entry per input.

    Attributes:
        in_domain: whether the image looks like the data the model was trained on (True without a check).
        domain_score: the in-domain p-value in [0, 1] (NaN without a check, or for a failed item).
        errors: None, or why the item failed (its results are then None).
    """

    in_domain: list[bool | None] = field(default_factory=list)
    domain_score: list[float] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


class DomainCheck:
    """How far an image's features lie from the training distribution (see the module docstring).

    Args:
        mean: ``(D,)`` mean of the fit features.
        whiten: ``(D, D)``: ``|whiten @ (f - mean)|^2`` is the squared Mahalanobis distance.
        calibration: sorted squared distances of the calibration images.
        alpha: an image is in-domain when its score is at least ``alpha``.
        info: provenance (features used, data, sizes); stored with the tensors.
    """

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, calibration: torch.Tensor, alpha: float = 0.005,
                 info: dict[str, Any] | None = None):
        self.mean = mean.double()
        self.whiten = whiten.double()
        self.calibration = torch.sort(calibration.double()).values
        self.alpha = float(alpha)
        self.info = dict(info or {})

    @classmethod
    def fit(cls, features: torch.Tensor, calibration_features: torch.Tensor, alpha: float = 0.005,
            shrinkage: float = 0.1, info: dict[str, Any] | None = None) -> DomainCheck:
        """Fit the Gaussian on ``features`` ``(N, D)`` and calibrate on other in-domain images ``(M, D)``.

        ``shrinkage`` blends the covariance with its diagonal mean (``(1 - s) C + s tr(C)/D I``), which keeps the
        inverse stable when ``N`` is not much larger than ``D``.
        """
        x = features.double()
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need (N >= 2, D) features, got {tuple(x.shape)}")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (len(x) - 1)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        whiten = (evecs / evals.clamp(min=1e-12).sqrt()).T  # (D, D)
        check = cls(mean, whiten, torch.zeros(1), alpha, info)
        check.calibration = torch.sort(check.distance(calibration_features)).values
        check.info.update(n_fit=len(x), n_calibration=len(calibration_features), dim=d, shrinkage=shrinkage)
        return check

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances ``(N,)`` of features ``(N, D)``."""
        z = (features.double().cpu() - self.mean) @ self.whiten.T
        return (z * z).sum(-1)

    def score(self, features: torch.Tensor) -> tuple[list[bool], list[float]]:
        """``(in_domain, domain_score)`` per row of ``features``."""
        dist = self.distance(features)
        n = len(self.calibration)
        # share of calibration images at least as far out (with the +1 of a conformal p-value)
        at_least = n - torch.searchsorted(self.calibration, dist, right=False)
        p = ((at_least + 1).double() / (n + 1)).tolist()
        return [s >= self.alpha for s in p], [float(s) for s in p]

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / DOMAIN_FILE
        tensors = {"mean": self.mean.float().contiguous(), "whiten": self.whiten.float().contiguous(),
                   "calibration": self.calibration.float().contiguous()}
        save_file(tensors, str(path), metadata={"alpha": repr(self.alpha), "info": json.dumps(self.info)})
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DomainCheck | None:
        """The check stored in a model folder, or None when it has none."""
        from safetensors import safe_open

        path = Path(directory) / DOMAIN_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return cls(t["mean"], t["whiten"], t["calibration"], float(meta.get("alpha", 0.005)),
                   json.loads(meta.get("info", "{}")))


class Pipeline:
    """Base of every pipeline. A family's pipeline sets ``model_class`` and ``bundled_model`` and implements
    ``__call__`` (and ``domain_features`` when its model can be checked).

    A family whose image side can run elsewhere than in eager PyTorch also implements :meth:`image_module` and
    reads the pixels through :meth:`image_outputs`.

    Args:
        model: the model (put in eval mode).
        domain_check: the model's :class:`DomainCheck` (``from_pretrained`` loads the one stored with the weights).
        runtime: ``"torch"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` for the image side (see the module
            docstring); the runner is made on first use.

    Raises:
        ValueError: an unknown runtime. ImportError: a runtime whose package is missing (the message names it).
    """

    model_class: ClassVar[type] = type(None)
    bundled_model: ClassVar[str | None] = None

    def __init__(self, model: Any, domain_check: DomainCheck | None = None, runtime: str = "torch"):
        from shusheng.modeling import resolve_transform
        from shusheng.runtimes import check_runtime

        self.model = model.eval()
        self.domain_check = domain_check
        self.transform = resolve_transform(model)
        self.runtime = check_runtime(runtime)
        self._image_runner = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        runtime: str = "torch", **kwargs: Any):
        """Load a model folder (default: the bundled model) and its domain check into a pipeline.

        Args:
            path: a model folder, or None for the bundled model.
            device: where the model runs.
            runtime: what runs the image side (see :class:`Pipeline`).
            **kwargs: passed to the model's ``from_pretrained``.

        Raises:
            shusheng.weights.BundledWeightsNotFound: ``path`` is None and the bundled folder is missing (the
                message names the command that trains it).
            FileNotFoundError: ``path`` is not a model folder.
        """
        if path is None:
            from shusheng.weights import bundled_path

            path = bundled_path(cls.bundled_model)
        model = cls.model_class.from_pretrained(path, **kwargs).to(device)
        return cls(model, DomainCheck.load(path), runtime=runtime)

    def to(self, *args: Any, **kwargs: Any) -> Pipeline:
        self.model.to(*args, **kwargs)
        self._image_runner = None  # made again for the new device/dtype on next use
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- image side and its runtime -----------------------------------------------------------------------

    def image_module(self) -> torch.nn.Module | None:
        """The part of the model that reads the pixels, as a module ``pixels (B, 3, S, S) -> tensor(s)`` (what
        ``runtime=`` runs and ``shusheng export`` writes); None when the family has none."""
        return None

    def input_shape(self) -> tuple[int, int, int]:
        """``(3, S, S)``: the shape of one transformed image."""
        from shusheng.modeling import Preprocess

        m = self.model
        p = m.preprocess_config() if hasattr(m, "preprocess_config") else Preprocess.from_timm(m.pretrained_cfg)
        return (3, p.size, p.size)

    @property
    def image_runner(self):
        """The runner of :meth:`image_module` (made on first use; ``image_runner.name`` is the runtime that
        ``"auto"`` chose)."""
        if self._image_runner is None:
            from shusheng.runtimes import TorchRunner, create_runner

            module = self.image_module()
            if module is None:
                if self.runtime not in ("torch", "auto"):
                    raise ValueError(f"{type(self).__name__} has no image side that can run on {self.runtime}; "
                                     "use runtime='torch'")
                raise NotImplementedError(f"{type(self).__name__} defines no image_module()")
            module.eval()
            if self.runtime == "torch":
                self._image_runner = TorchRunner(module)
            else:
                self._image_runner = create_runner(module, self.input_shape(), self.runtime, self.device)
        return self._image_runner

    def image_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`image_module`'s outputs for a batch of transformed images, from the pipeline's runtime."""
        return self.image_runner(pixels)

    # -- inputs ---------------------------------------------------------------------------------------------

    def batches(self, images: Sequence[Any], batch_size: int, on_error: str = "item",
               own_size: bool = False, prepare: Callable[[Any], Any] | None = None) -> Iterator[Batch]:
        """Decode and transform ``images`` ``batch_size`` at a time.

        Args:
            images: a list from :func:`as_image_list`.
            batch_size: images per batch.
            on_error: ``"item"``: an image that cannot be loaded is reported in ``Batch.errors`` and the others
                go on; ``"raise"``: its ``ImageLoadError`` ends the call.
            own_size: keep every image at its own size, as RGB in [0, 1] without the model's transform, and give
                them as the list ``Batch.images`` (``pixels`` is then None): for models that resize and
                normalise themselves (torchvision's detectors).
            prepare: with ``own_size``, a function applied to each loaded PIL image before it becomes a tensor
                (e.g. a downscale); ``Batch.sizes`` keeps the size as loaded.
        """
        from shusheng.data import ImageLoadError, load_image

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_error not in ("item", "raise"):
            raise ValueError(f"on_error must be 'item' or 'raise', got {on_error!r}")
        for start in range(0, len(images), batch_size):
            index, tensors, errors, sizes = [], [], [], []
            for i in range(start, min(len(images), start + batch_size)):
                try:
                    img = load_image(images[i])
                except ImageLoadError as e:
                    if on_error == "raise":
                        raise
                    errors.append((i, str(e)))
                    continue
                if own_size:
                    tensors.append(_to_unit_tensor(img if prepare is None else prepare(img)))
                else:
                    tensors.append(self.transform(img))
                index.append(i)
                sizes.append(img.size)
            if own_size:
                yield Batch(index, None, errors, [t.to(device=self.device, dtype=self.dtype) for t in tensors], sizes)
                continue
            pixels = torch.stack(tensors).to(device=self.device, dtype=self.dtype) if tensors else None
            yield Batch(index, pixels, errors, sizes=sizes)

    # -- in-domain check ------------------------------------------------------------------------------------

    def domain_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` image features the domain check reads (a family defines them)."""
        raise NotImplementedError(f"{type(self).__name__} has no domain features")

    def check_domain(self, pixels: torch.Tensor) -> tuple[list[bool], list[float]]:
        """``(in_domain, domain_score)`` of a batch of transformed images."""
        if self.domain_check is None:
            return self.score_features(None, len(pixels))
        return self.score_features(self.domain_features(pixels), len(pixels))

    def score_features(self, features: torch.Tensor | None, n: int) -> tuple[list[bool], list[float]]:
        """``(in_domain, domain_score)`` of ``n`` items from their domain features (computed by the caller as
        part of its own forward pass); without a check: in-domain with a NaN score."""
        if self.domain_check is None:
            return [True] * n, [math.nan] * n
        return self.domain_check.score(features.float())

    @staticmethod
    def _empty(n: int) -> dict[str, list]:
        """Per-item result lists of an output, pre-filled for ``n`` inputs (failed items keep the fill)."""
        return {"in_domain": [None] * n, "domain_score": [math.nan] * n, "errors": [None] * n}

    @staticmethod
    def _fill(out: dict[str, list], batch: Batch, in_domain: list[bool], scores: list[float]) -> None:
        for j, i in enumerate(batch.index):
            out["in_domain"][i], out["domain_score"][i] = in_domain[j], scores[j]
        for i, msg in batch.errors:
            out["errors"][i] = msg
