"""Embedders: turn images and texts into L2-normalised vectors in one shared space.

Any object with the :class:`Embedder` shape works with the index (a ``typing.Protocol``, nothing to inherit).
Two families are built in and reachable by name through :func:`create_embedder`:

* ``"shusheng-mini-clip"`` — the bundled dual encoder (``shusheng.miniclip``), trained on
  SynthDrive; ``checkpoint=DIR`` swaps in another ``save_pretrained`` folder of the same model.
* ``"open_clip:<arch>"`` (or a bare open_clip architecture name such as ``"ViT-B-32"``) — any open_clip model,
  wrapped by :class:`OpenClipEmbedder`. Weights always come from a local file given as ``checkpoint``; nothing is
  ever downloaded.

``runtime="onnxruntime"`` / ``"tensorrt"`` / ``"auto"`` (:func:`create_embedder`, :func:`with_runtime`) runs the
image tower of a ``shusheng-mini-clip`` embedder outside eager PyTorch (:mod:`shusheng.runtimes`); its vectors
match eager PyTorch's to ~1e-6, so an index mixes them freely. Texts always run in PyTorch.

More names can be added with :func:`register_embedder`, the way timm registers models::

    @register_embedder("my-model")
    def _my_model(checkpoint=None, device=None):
        return MyEmbedder(checkpoint, device)
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from shusheng._deps import require

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EMBEDDER", "Embedder", "OpenClipEmbedder", "RuntimeEmbedder", "create_embedder", "list_embedders",
    "register_embedder", "with_runtime",
]

DEFAULT_EMBEDDER = "shusheng-mini-clip"
_OPEN_CLIP_PREFIX = "open_clip:"
# open_clip's file names inside a checkpoint folder, in the order they are tried.
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                           "pytorch_model.bin", "model.pt")


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from a model: a name, a dimension and two batched, normalised encoders.

    Attributes:
        name: registry name recorded in the index (``"shusheng-mini-clip"``, ``"open_clip:ViT-B-32"``); an index
            refuses vectors from an embedder with another name or dimension.
        dim: length of every vector.
    """

    name: str
    dim: int

    def embed_images(self, images: list[Image.Image], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Returns ``(len(images), dim)`` float32, each row L2-normalised."""
        ...

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Returns ``(len(texts), dim)`` float32, each row L2-normalised."""
        ...


EmbedderFactory = Callable[..., Embedder]
_EMBEDDERS: dict[str, EmbedderFactory] = {}


def register_embedder(name: str) -> Callable[[EmbedderFactory], EmbedderFactory]:
    """Decorator recording ``factory(checkpoint=None, device=None) -> Embedder`` under ``name``.

    Registering a name twice replaces the first factory and warns.
    """

    def deco(factory: EmbedderFactory) -> EmbedderFactory:
        if name in _EMBEDDERS and _EMBEDDERS[name] is not factory:
            warnings.warn(f"embedder {name!r} registered twice; the later factory wins", stacklevel=2)
        _EMBEDDERS[name] = factory
        return factory

    return deco


def list_embedders(include_open_clip: bool = False) -> list[str]:
    """Registered embedder names; with ``include_open_clip`` also ``open_clip:<arch>`` for every open_clip
    architecture (each needs a local ``checkpoint``)."""
    names = sorted(_EMBEDDERS)
    if include_open_clip:
        open_clip = require("open_clip", extra="retrieval", package="open_clip_torch")
        names += [_OPEN_CLIP_PREFIX + arch for arch in open_clip.list_models()]
    return names


def create_embedder(name: str = DEFAULT_EMBEDDER, checkpoint: str | os.PathLike | None = None,
                    device: str | None = None, runtime: str = "torch") -> Embedder:
    """Builds an embedder by name.

    Args:
        name: a registered name (see :func:`list_embedders`), ``"open_clip:<arch>"``, or a bare open_clip
            architecture name.
        checkpoint: local weights: a folder for ``shusheng-mini-clip`` (overrides the bundled weights), a file
            (or a folder holding ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``) for open_clip.
        device: torch device string; default CUDA when available, else CPU.
        runtime: what runs the image side (``"torch"``, ``"onnxruntime"``, ``"tensorrt"``, ``"auto"``; see
            :func:`with_runtime`).

    Raises:
        ValueError: unknown name, or a runtime the embedder cannot use.
        ImportError: the runtime's package is missing.
        FileNotFoundError: an open_clip model without a local checkpoint, or a checkpoint path that does not exist.
    """
    from shusheng.runtimes import check_runtime

    check_runtime(runtime)  # before any model is loaded
    if name in _EMBEDDERS:
        return with_runtime(_EMBEDDERS[name](checkpoint=checkpoint, device=device), runtime)
    if name.startswith(_OPEN_CLIP_PREFIX):
        return with_runtime(OpenClipEmbedder.from_checkpoint(name[len(_OPEN_CLIP_PREFIX):], checkpoint,
                                                             device=device), runtime)
    open_clip = require("open_clip", extra="retrieval", package="open_clip_torch")
    if name in open_clip.list_models():
        return with_runtime(OpenClipEmbedder.from_checkpoint(name, checkpoint, device=device), runtime)
    raise ValueError(
        f"unknown embedder {name!r}: registered are {sorted(_EMBEDDERS)}, plus 'open_clip:<arch>' for any "
        f"open_clip architecture (shusheng.retrieval_index.list_embedders(include_open_clip=True) lists them)"
    )


@register_embedder(DEFAULT_EMBEDDER)
def _shusheng_mini_clip(checkpoint: str | os.PathLike | None = None, device: str | None = None) -> Embedder:
    from shusheng import miniclip

    if checkpoint is None:
        return miniclip.load_bundled(device=device)
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"shusheng-mini-clip checkpoint {os.fspath(checkpoint)!r} is not a folder "
                                "(expected a save_pretrained directory with config.json + model.safetensors)")
    return miniclip.MiniClip.from_pretrained(checkpoint, device=device)


def with_runtime(embedder: Embedder, runtime: str = "torch") -> Embedder:
    """``embedder`` with its image side on ``runtime``: ``"torch"`` returns it unchanged; a
    :class:`~shusheng.miniclip.MiniClip` is wrapped in a :class:`RuntimeEmbedder`; other embedders run only in
    PyTorch (``"auto"`` then keeps them as they are).

    Raises:
        ValueError: a runtime other than torch/auto for an embedder that has no exportable image side.
    """
    from shusheng.miniclip import MiniClip
    from shusheng.runtimes import check_runtime

    check_runtime(runtime)
    if runtime == "torch" or isinstance(embedder, RuntimeEmbedder):
        return embedder
    if isinstance(embedder, MiniClip):
        return RuntimeEmbedder(embedder, runtime)
    if runtime == "auto":
        return embedder
    raise ValueError(f"runtime {runtime!r} is available for shusheng-mini-clip embedders, not for "
                     f"{getattr(embedder, 'name', type(embedder).__name__)!r}; use runtime 'torch' or 'auto'")


class RuntimeEmbedder:
    """A :class:`~shusheng.miniclip.MiniClip` whose images go through an
    :class:`~shusheng.miniclip.pipelines.EmbeddingPipeline` on another runtime (same preprocessing, same
    vectors within the runtime's tolerance); texts go through the model.

    Args:
        model: the mini-clip model.
        runtime: ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (the runner is made on the first images).
    """

    def __init__(self, model, runtime: str):
        from shusheng.miniclip.pipelines import EmbeddingPipeline

        self.model = model
        self.name, self.dim = model.name, model.dim
        self.runtime = runtime
        self.pipeline = EmbeddingPipeline(model, None, runtime=runtime)

    def embed_images(self, images: list[Image.Image], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Images → ``(n, dim)`` float32 unit rows (raises ``shusheng.data.ImageLoadError`` for a bad image)."""
        if not len(images):
            return np.empty((0, self.dim), np.float32)
        return self.pipeline(list(images), batch_size=batch_size, on_error="raise").embeddings

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.model.embed_texts(texts, batch_size=batch_size)

    def __repr__(self) -> str:
        return f"RuntimeEmbedder(name={self.name!r}, dim={self.dim}, runtime={self.runtime!r})"


def _resolve_open_clip_checkpoint(arch: str, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is None:
        raise FileNotFoundError(
            f"open_clip model {arch!r} needs local weights and nothing is downloaded: pass --checkpoint FILE "
            f"(Python: create_embedder('open_clip:{arch}', checkpoint='path/to/open_clip_model.safetensors'))"
        )
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for fname in _OPEN_CLIP_WEIGHT_FILES:
            if (path / fname).is_file():
                return path / fname
        raise FileNotFoundError(f"no open_clip weights in folder {os.fspath(path)!r} "
                                f"(looked for {', '.join(_OPEN_CLIP_WEIGHT_FILES)})")
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint {os.fspath(path)!r} does not exist "
                                "(a local .safetensors/.bin/.pt file is required; nothing is downloaded)")
    return path


class OpenClipEmbedder:
    """An open_clip model as an :class:`Embedder`: batched, no-grad, channels-last image encoding.

    Build it with :meth:`from_checkpoint` (or :func:`create_embedder`), or wrap a model you already hold.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` model.
        preprocess: its eval image transform (PIL image -> CHW tensor).
        tokenizer: its tokenizer (list of str -> LongTensor or BatchEncoding-like tensor).
        name: recorded name, ``"open_clip:<arch>"``.
        device: where to run; default the model's device.
    """

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, name: str, device: str | None = None):
        torch = require("torch", extra="retrieval")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.model.to(memory_format=torch.channels_last)  # NHWC convolutions (patch embedding, conv towers)
        with torch.inference_mode():
            probe = self.model.encode_text(self._tokenize(["a photo"]))
        self.dim = int(probe.shape[-1])

    @classmethod
    def from_checkpoint(cls, arch: str, checkpoint: str | os.PathLike | None,
                        device: str | None = None) -> OpenClipEmbedder:
        """Builds open_clip architecture ``arch`` with weights from the local ``checkpoint`` (file or folder).

        Raises:
            FileNotFoundError: no checkpoint given, or it does not exist (nothing is ever downloaded).
            ValueError: ``arch`` is not an open_clip architecture.
        """
        open_clip = require("open_clip", extra="retrieval", package="open_clip_torch")
        torch = require("torch", extra="retrieval")
        if arch not in open_clip.list_models():
            raise ValueError(f"{arch!r} is not an open_clip architecture (open_clip.list_models() lists them; "
                             "custom ones are added with open_clip.add_model_config)")
        path = _resolve_open_clip_checkpoint(arch, checkpoint)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
        tokenizer = open_clip.get_tokenizer(arch)
        logger.info("loaded open_clip %s from %s on %s", arch, path, device)
        return cls(model, preprocess, tokenizer, name=_OPEN_CLIP_PREFIX + arch, device=device)

    def _tokenize(self, texts: list[str]):
        tokens = self.tokenizer(texts)
        return tokens.to(self.device) if hasattr(tokens, "to") else tokens

    def embed_images(self, images: list[Image.Image], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        torch = require("torch", extra="retrieval")
        from tqdm.auto import tqdm

        out = np.empty((len(images), self.dim), np.float32)
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="embedding images", unit="batch", disable=not progress):
            chunk = images[start:start + batch_size]
            batch = torch.stack([self.preprocess(im) for im in chunk]).to(self.device)  # (B, 3, H, W)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                feats = self.model.encode_image(batch, normalize=True)  # (B, dim)
            out[start:start + len(chunk)] = feats.float().cpu().numpy()
        return out

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        torch = require("torch", extra="retrieval")

        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            with torch.inference_mode():
                feats = self.model.encode_text(self._tokenize(chunk), normalize=True)  # (B, dim)
            out[start:start + len(chunk)] = feats.float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"OpenClipEmbedder(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"
