"""``UniPerceiverConfig``: every size and option of the unified decoder in one dataclass (written to config.json)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shusheng._config import config_from_any
from shusheng.modeling import IMAGENET_MEAN, IMAGENET_STD
from shusheng.text_encoders import MINILM

__all__ = ["MINILM", "TASKS", "UniPerceiverConfig"]

#: task families; each has its own learnable logit scale (v1 keeps one per family)
TASKS = ("caption", "vqa", "retrieval", "cls")


@dataclass
class UniPerceiverConfig:
    """Constructor arguments of :class:`~shusheng.uniperceiver.model.UniPerceiver`.

    Args:
        backbone: image tower, a ``shusheng.backbone`` registry name or any timm model name; it must provide
            ``forward_features(x) -> (B, C, h, w)`` and ``num_features``.
        backbone_args: keyword arguments of the backbone builder (``channels``, ``depths``, ...).
        image_size: side of the square model input; ``image_mean``/``image_std``: its normalisation.
        image_grid: the feature map is average-pooled to ``image_grid x image_grid`` image tokens.
        d_model, n_heads, n_layers, mlp_ratio: the shared encoder (every input and every target goes through it).
        norm_first: pre-LN blocks (with a final LayerNorm) instead of BERT's post-LN blocks. MiniLM layers are
            post-LN, so ``text_init="minilm"`` needs ``norm_first=False``.
        layer_norm_eps, dropout: as in BERT.
        tokenizer: ``"minilm"`` (the WordPiece tokenizer of all-MiniLM-L6-v2) or a local Hugging Face tokenizer
            folder.
        vocab_size: embedding rows (the tokenizer's vocabulary size).
        max_text_len: longest text (question + answer, or caption) in tokens; the position table has
            ``max_text_len + 2`` rows (``<SPE>`` at 0, text from 1, the question's ``<SPE>`` after it).
        text_init: ``"minilm"`` initialises the word, position and type embeddings, the embedding LayerNorm and the
            first ``n_layers`` encoder layers from all-MiniLM-L6-v2 (needs ``d_model=384``, ``n_heads=12``,
            ``mlp_ratio=4``); ``None`` = random.
        freeze_word_embeddings: keep the word embeddings fixed. With ``text_init="minilm"`` they are then not
            written by ``save_pretrained`` but read back from the package, and words never seen in training keep
            their pretrained place next to the ones that were.
        vocab_targets: how vocabulary words become matching targets for generation: ``"full"`` (v1: each word
            encoded as ``[<SPE>, w]`` by the shared encoder) or ``"shallow"`` (the zero-layer limit: the word's
            embedding through the matching head).
        target_vocab: token ids generation may emit (a restricted vocabulary, e.g. the words of the training
            captions and answers; must contain the EOS id); ``None`` = the whole vocabulary.
        answers: the candidate answers of VQA by matching.
        class_names: attribute group -> class names, for classification by matching.
        class_template: how a class name is phrased before encoding (``"{}"`` = the name itself).
        logit_scale_init, logit_scale_max: initial value and cap of each task's temperature ``exp(s)``.
    """

    backbone: str = "internimage_test"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    image_size: int = 128
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    image_grid: int = 4
    d_model: int = 384
    n_heads: int = 12
    n_layers: int = 2
    mlp_ratio: float = 4.0
    norm_first: bool = False
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    tokenizer: str = MINILM
    vocab_size: int = 30522
    max_text_len: int = 64
    text_init: str | None = MINILM
    freeze_word_embeddings: bool = True
    vocab_targets: str = "full"
    target_vocab: list[int] | None = None
    answers: list[str] = field(default_factory=list)
    class_names: dict[str, list[str]] = field(default_factory=dict)
    class_template: str = "{}"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0

    def __post_init__(self):
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vocab_targets not in ("full", "shallow"):
            raise ValueError(f"vocab_targets must be 'full' or 'shallow', got {self.vocab_targets!r}")
        if self.text_init not in (None, MINILM):
            raise ValueError(f"text_init must be None or {MINILM!r}, got {self.text_init!r}")
        if self.text_init == MINILM:
            if (self.d_model, self.n_heads, self.mlp_ratio, self.norm_first) != (384, 12, 4.0, False):
                raise ValueError("text_init='minilm' needs d_model=384, n_heads=12, mlp_ratio=4, norm_first=False "
                                 "(the MiniLM layer shapes)")
            if not 1 <= self.n_layers <= 6:
                raise ValueError(f"MiniLM has 6 layers; n_layers must be 1..6, got {self.n_layers}")
        if self.image_grid < 1 or self.n_layers < 1 or self.max_text_len < 2:
            raise ValueError("image_grid, n_layers must be >= 1 and max_text_len >= 2")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("answers must be distinct")

    @classmethod
    def from_any(cls, config: UniPerceiverConfig | Mapping[str, Any] | None = None, **overrides) -> UniPerceiverConfig:
        """Build from a config, a plain dict (e.g. a parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d
