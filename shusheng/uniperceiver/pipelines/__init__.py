"""Pipelines with one ``__call__`` each: :class:`CaptionPipeline` and :class:`VQAPipeline`.

    >>> from shusheng.uniperceiver import CaptionPipeline, VQAPipeline
    >>> cap = CaptionPipeline.from_pretrained()                 # bundled shusheng-mini-uniperceiver
    >>> out = cap(["a.png", "b.png"])                           # greedy; num_beams > 1: beam search
    >>> out.captions, out.scores, out.in_domain
    >>> vqa = VQAPipeline(cap.model, cap.domain_check)          # the same model answers questions
    >>> vqa(["a.png"], "Is there a red car?").answers

Images are decoded batch by batch through ``shusheng.data.load_image`` and the model's own transform (see
:mod:`shusheng.pipelines`); an image that cannot be loaded gets ``None`` results and its reason in ``errors``
(``on_error="raise"`` raises ``ImageLoadError`` instead). Every item carries ``in_domain``/``domain_score``: the
bundled model knows only SynthDrive's driving scenes and says so for anything else. Everything runs under
``torch.inference_mode()`` on the model's device and dtype (CPU float32 by default; move it with ``.to()``).
``runtime="onnxruntime"`` / ``"tensorrt"`` / ``"auto"`` runs the image side (:class:`ImageSide`: backbone + image
tokenizer) outside eager PyTorch (:mod:`shusheng.runtimes`); the decoder stays in PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shusheng.pipelines import Pipeline, PipelineOutput, as_image_list
from shusheng.uniperceiver.decoding import generate
from shusheng.uniperceiver.model import UniPerceiver

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODEL", "CaptionOutput", "CaptionPipeline", "ImageSide", "VQAOutput", "VQAPipeline",
           "bundled_model_path"]

BUNDLED_MODEL = "shusheng-mini-uniperceiver"


def bundled_model_path(name: str = BUNDLED_MODEL) -> Path:
    """Folder of a bundled model (``shusheng.weights.bundled_path``)."""
    from shusheng.weights import bundled_path

    return bundled_path(name)


@dataclass
class CaptionOutput(PipelineOutput):
    """Captions and their scores (``None`` for an image that failed; see ``errors``).

    Attributes:
        captions: one caption per image.
        scores: per caption ``exp(mean token log-probability)`` in (0, 1] (EOS included).
        logprobs: summed log-probability of each caption.
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    captions: list[str | None]
    scores: list[float | None]
    logprobs: list[float | None] = field(default_factory=list)


@dataclass
class VQAOutput(PipelineOutput):
    """Answers and their scores (``None`` for an image that failed; see ``errors``).

    Attributes:
        answers: one answer per (image, question).
        scores: matching mode: the answer's softmax probability over the answer list; generation mode:
            ``exp(mean token log-probability)``.
        top_k: matching mode: the ``top_k`` ``(answer, probability)`` pairs per question; generation: one pair.
        mode: ``"match"`` or ``"generate"``.
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    answers: list[str | None]
    scores: list[float | None]
    top_k: list[list[tuple[str, float]] | None]
    mode: str


class ImageSide(torch.nn.Module):
    """The image side of a :class:`UniPerceiver`: normalised pixels ``(B, 3, S, S)`` → ``(image_tokens,
    pooled)``, the ``(B, N, D)`` tokens the decoder reads and the pooled ``(B, N, C)`` backbone features they are
    made from (the domain check reads those). What ``shusheng export shusheng-mini-uniperceiver`` writes; shares
    the model's weights."""

    def __init__(self, model: UniPerceiver):
        super().__init__()
        self.image = model.image
        self.type_embedding = model.text.token_type  # row 1: the image token type

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_features(self.image.backbone.forward_features(pixels))

    def from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features ``(B, C, h, w)`` → ``(image_tokens, pooled)``, as :meth:`forward` gives them."""
        pooled = self.image.pool(features)  # (B, N, C)
        return self.image.tokens(pooled, self.type_embedding.weight[1]), pooled  # (B, N, D), (B, N, C)


class _UniPerceiverPipeline(Pipeline):
    model_class = UniPerceiver
    bundled_model = BUNDLED_MODEL

    def image_module(self) -> ImageSide:
        return ImageSide(self.model)

    def domain_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._domain_from_pooled(self.model.image.pooled_features(pixels))

    @staticmethod
    def _domain_from_pooled(pooled: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, N, C)`` → ``(B, 3C)``: mean, max and standard deviation over the
        image-token grid (what the decoder sees of the image, read in the same backbone pass)."""
        return torch.cat([pooled.mean(1), pooled.amax(1), pooled.std(1, unbiased=False)], dim=-1)

    def _encode(self, pixels: torch.Tensor, out: dict[str, list], batch) -> torch.Tensor:
        """Image tokens of a batch; fills its in-domain fields (the check reads the same backbone pass)."""
        tokens, pooled = self.image_outputs(pixels)
        self._fill(out, batch, *self.score_features(self._domain_from_pooled(pooled), len(pixels)))
        return tokens

    def _encode_with_dense(self, pixels: torch.Tensor, out: dict[str, list], batch
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_encode` plus the backbone's dense-head probabilities ``(B, L, h, w)``: one backbone pass in
        eager PyTorch; with another runtime the image side runs there and the dense head once more in PyTorch.
        The backbone must have a dense head (``features_and_dense``, e.g. ``DenseTowerBackbone``)."""
        backbone = self.model.image.backbone
        if not hasattr(backbone, "features_and_dense"):
            raise ValueError(f"{type(backbone).__name__} has no dense object head")
        if self.runtime != "torch":
            return self._encode(pixels, out, batch), backbone.features_and_dense(pixels)[1]
        features, prob = backbone.features_and_dense(pixels)
        tokens, pooled = ImageSide(self.model).from_features(features)
        self._fill(out, batch, *self.score_features(self._domain_from_pooled(pooled), len(pixels)))
        return tokens, prob


class CaptionPipeline(_UniPerceiverPipeline):
    """Image captioning by matching each slot against the vocabulary (cached greedy or beam decoding).

    Args:
        model: a :class:`UniPerceiver`.
    """

    def check_inputs(self, max_new_tokens: int, num_beams: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")

    def __call__(self, images: Any, max_new_tokens: int = 64, num_beams: int = 1, length_penalty: float = 0.0,
                 batch_size: int = 64, on_error: str = "item") -> CaptionOutput:
        """Caption images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            max_new_tokens: longest caption in tokens.
            num_beams: 1 = greedy (the default: with the bundled model it scores higher CIDEr-D than beam
                search, which prefers shorter captions); more = beam search.
            length_penalty: beams are ranked by ``logprob / len**length_penalty``.
            batch_size: images decoded and captioned at a time.
            on_error: ``"item"`` (an image that cannot be loaded gets ``None`` and its reason in ``errors``) or
                ``"raise"`` (its ``ImageLoadError`` ends the call).

        Returns:
            :class:`CaptionOutput`.
        """
        # 1. check inputs
        self.check_inputs(max_new_tokens, num_beams)
        images = as_image_list(images)
        max_new_tokens = min(max_new_tokens, self.model.config.max_text_len)
        n = len(images)
        out = {"captions": [None] * n, "scores": [None] * n, "logprobs": [None] * n, **self._empty(n)}
        with torch.inference_mode():
            # 2. encode the vocabulary targets once
            vocab = self.model.vocab_features()
            for batch in self.batches(images, batch_size, on_error):
                if batch.pixels is None:
                    self._fill(out, batch, [], [])
                    continue
                # 3. image tokens (and the in-domain check) and prefix; 4. decode
                prefix = self.model.prefix(self._encode(batch.pixels, out, batch))
                gen = generate(self.model, prefix, max_new_tokens, num_beams, "caption", length_penalty,
                               vocab_feats=vocab)
                # 5. detokenise
                for i, toks, lp, k in zip(batch.index, gen.tokens, gen.logprob.tolist(), gen.lengths.tolist()):
                    text = self.model.tokenizer.decode(toks)
                    out["captions"][i] = text[:1].upper() + text[1:]
                    out["logprobs"][i] = float(lp)
                    out["scores"][i] = float(np.exp(lp / max(1, k)))
        return CaptionOutput(**out)


class VQAPipeline(_UniPerceiverPipeline):
    """Visual question answering: by matching against the answer list (default) or by open generation.

    Args:
        model: a :class:`UniPerceiver`.
    """

    def check_inputs(self, questions: list[str], n_images: int, mode: str, answers: list[str] | None) -> None:
        if mode not in ("match", "generate"):
            raise ValueError(f"mode must be 'match' or 'generate', got {mode!r}")
        for q in questions:
            if not isinstance(q, str):
                raise TypeError(f"questions must be strings, got {type(q).__name__}")
            if not q.strip():
                raise ValueError("the question is empty; ask something about the image")
        if len(questions) not in (1, n_images):
            raise ValueError(f"give one question for all images or one per image: {len(questions)} questions "
                             f"for {n_images} images")
        if mode == "match" and not (answers if answers is not None else self.model.config.answers):
            raise ValueError("matching mode needs candidate answers (the model has no answer list; pass answers=)")

    def __call__(self, images: Any, questions: str | list[str], mode: str = "match", top_k: int = 3,
                 answers: list[str] | None = None, max_new_tokens: int = 12, num_beams: int = 1,
                 batch_size: int = 64, on_error: str = "item", match_form: bool = True) -> VQAOutput:
        """Answer questions about images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            questions: one question for every image, or one per image.
            mode: ``"match"`` (pick from ``answers``, default the model's answer list) or ``"generate"``.
            top_k: candidates reported per question in matching mode.
            answers: candidate answers for matching mode.
            max_new_tokens, num_beams: generation mode settings.
            batch_size: images decoded and answered at a time.
            on_error: ``"item"`` (an image that cannot be loaded gets ``None`` and its reason in ``errors``) or
                ``"raise"``.
            match_form: matching mode with a model that has an answer typer: each answer is weighed by the
                probability that the question asks for its form (yes/no, one of the options it names, a number,
                a value; see :meth:`UniPerceiver.vqa_match`).

        Returns:
            :class:`VQAOutput`.
        """
        # 1. check inputs
        qs = [questions] if isinstance(questions, str) else list(questions)
        images = as_image_list(images)
        n = len(images)
        self.check_inputs(qs, n, mode, answers)
        if len(qs) == 1:
            qs = qs * n
        cands = list(answers) if answers is not None else list(self.model.config.answers)
        out = {"answers": [None] * n, "scores": [None] * n, "top_k": [None] * n, **self._empty(n)}
        with torch.inference_mode():
            # 2. encode the targets once (answers or vocabulary)
            feats = self.model.text_features(cands) if mode == "match" else self.model.vocab_features()
            for batch in self.batches(images, batch_size, on_error):
                if batch.pixels is None:
                    self._fill(out, batch, [], [])
                    continue
                tokens = self._encode(batch.pixels, out, batch)
                bq = [qs[i] for i in batch.index]
                if mode == "match":
                    # 3. read the question's <SPE> and match it against the answers
                    p = self.model.vqa_match(None, bq, cands, image_tokens=tokens, answer_features=feats,
                                             match_form=match_form)
                    top = p.topk(min(top_k, len(cands)), dim=-1)
                    for i, vals, idx in zip(batch.index, top.values.tolist(), top.indices.tolist()):
                        pairs = [(cands[c], float(v)) for v, c in zip(vals, idx)]
                        out["answers"][i], out["scores"][i], out["top_k"][i] = pairs[0][0], pairs[0][1], pairs
                else:
                    # 3. prefix [SPE | image | question | SPE] then decode the answer
                    q = self.model.tokenizer.encode(bq, self.model.config.max_text_len // 2)
                    prefix = self.model.prefix(tokens, q, spe_after_text=True)
                    gen = generate(self.model, prefix, max_new_tokens, num_beams, "vqa", vocab_feats=feats)
                    for i, toks, lp, k in zip(batch.index, gen.tokens, gen.logprob.tolist(), gen.lengths.tolist()):
                        text = self.model.tokenizer.decode(toks)
                        score = float(np.exp(lp / max(1, k)))
                        out["answers"][i], out["scores"][i], out["top_k"][i] = text, score, [(text, score)]
        return VQAOutput(**out, mode=mode)
