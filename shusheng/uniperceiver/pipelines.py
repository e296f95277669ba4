"""Pipelines with one ``__call__`` each: :class:`CaptionPipeline` and :class:`VQAPipeline`.

    >>> from shusheng.uniperceiver import CaptionPipeline, VQAPipeline
    >>> cap = CaptionPipeline.from_pretrained()                 # bundled shusheng-mini-uniperceiver
    >>> out = cap(["a.png", "b.png"])                           # greedy; num_beams > 1: beam search
    >>> out.captions, out.scores
    >>> vqa = VQAPipeline(cap.model)                            # the same model answers questions
    >>> vqa(["a.png"], "Is there a red car?").answers

Images go through ``shusheng.data.load_image`` (paths, bytes, file objects or PIL images; a non-image raises
``ImageLoadError``) and are resized to the model's input size with its own mean/std. Everything runs under
``torch.inference_mode()`` on the model's device and dtype (CPU float32 by default; move it with ``.to()``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shusheng.uniperceiver.decoding import generate
from shusheng.uniperceiver.model import UniPerceiver

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODEL", "CaptionOutput", "CaptionPipeline", "VQAOutput", "VQAPipeline", "bundled_model_path",
           "load_images"]

BUNDLED_MODEL = "shusheng-mini-uniperceiver"


def bundled_model_path(name: str = BUNDLED_MODEL) -> Path:
    """Folder of a bundled model: ``shusheng.weights.bundled_path`` when that registry exists, else the folder
    ``shusheng/weights/<name>`` next to the package."""
    try:
        from shusheng.weights import bundled_path
    except ImportError:
        bundled_path = None
    if bundled_path is not None:
        try:
            return Path(bundled_path(name))
        except KeyError:
            logger.debug("%s is not in the weights registry; using the package folder", name)
    import shusheng

    return Path(shusheng.__file__).parent / "weights" / name


def load_images(images: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, list]:
    """Load, validate and normalise images: ``(B, 3, size, size)`` float32 and the PIL images.

    Args:
        images: one image or a list: paths, bytes, binary files or ``PIL.Image`` objects.
    """
    from PIL import Image

    from shusheng.data import load_image

    if isinstance(images, (str, Path, bytes, Image.Image)) or hasattr(images, "read"):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    pils = [load_image(im) for im in images]
    arr = np.stack([np.asarray(p.resize((size, size), Image.Resampling.BICUBIC) if p.size != (size, size) else p,
                               dtype=np.float32) for p in pils])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, pils


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@dataclass
class CaptionOutput:
    """Captions and their scores.

    Attributes:
        captions: one caption per image.
        scores: per caption ``exp(mean token log-probability)`` in (0, 1] (EOS included).
        logprobs: summed log-probability of each caption.
    """

    captions: list[str]
    scores: list[float]
    logprobs: list[float] = field(default_factory=list)


@dataclass
class VQAOutput:
    """Answers and their scores.

    Attributes:
        answers: one answer per (image, question).
        scores: matching mode: the answer's softmax probability over the answer list; generation mode:
            ``exp(mean token log-probability)``.
        top_k: matching mode: the ``top_k`` ``(answer, probability)`` pairs per question; generation: one pair.
        mode: ``"match"`` or ``"generate"``.
    """

    answers: list[str]
    scores: list[float]
    top_k: list[list[tuple[str, float]]]
    mode: str


class _Pipeline:
    def __init__(self, model: UniPerceiver):
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu"):
        """Load a model folder (default: the bundled ``shusheng-mini-uniperceiver``) into a pipeline."""
        path = Path(path) if path is not None else bundled_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path} (expected config.json and model.safetensors)")
        return cls(UniPerceiver.from_pretrained(path).to(device))

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return self

    def _images(self, images: Any) -> tuple[torch.Tensor, list]:
        cfg = self.model.config
        x, pils = load_images(images, cfg.image_size, cfg.image_mean, cfg.image_std)
        p = next(self.model.parameters())
        return x.to(device=p.device, dtype=p.dtype), pils


class CaptionPipeline(_Pipeline):
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
                 batch_size: int = 64) -> CaptionOutput:
        """Caption images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            max_new_tokens: longest caption in tokens.
            num_beams: 1 = greedy (the default: with the bundled model it scores higher CIDEr-D than beam
                search, which prefers shorter captions); more = beam search.
            length_penalty: beams are ranked by ``logprob / len**length_penalty``.
            batch_size: images per forward pass.

        Returns:
            :class:`CaptionOutput`.
        """
        # 1. check inputs and load images
        self.check_inputs(max_new_tokens, num_beams)
        max_new_tokens = min(max_new_tokens, self.model.config.max_text_len)
        x, _ = self._images(images)
        captions, scores, logprobs = [], [], []
        with torch.inference_mode():
            # 2. encode the vocabulary targets once
            vocab = self.model.vocab_features()
            for sl in _batches(len(x), batch_size):
                # 3. image tokens and prefix; 4. decode
                prefix = self.model.prefix(self.model.image_tokens(x[sl]))
                gen = generate(self.model, prefix, max_new_tokens, num_beams, "caption", length_penalty,
                               vocab_feats=vocab)
                # 5. detokenise
                for toks, lp, n in zip(gen.tokens, gen.logprob.tolist(), gen.lengths.tolist()):
                    text = self.model.tokenizer.decode(toks)
                    captions.append(text[:1].upper() + text[1:])
                    logprobs.append(float(lp))
                    scores.append(float(np.exp(lp / max(1, n))))
        return CaptionOutput(captions, scores, logprobs)


class VQAPipeline(_Pipeline):
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
                 batch_size: int = 64) -> VQAOutput:
        """Answer questions about images.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images).
            questions: one question for every image, or one per image.
            mode: ``"match"`` (pick from ``answers``, default the model's answer list) or ``"generate"``.
            top_k: candidates reported per question in matching mode.
            answers: candidate answers for matching mode.
            max_new_tokens, num_beams: generation mode settings.
            batch_size: questions per forward pass.

        Returns:
            :class:`VQAOutput`.
        """
        # 1. check inputs and load images
        qs = [questions] if isinstance(questions, str) else list(questions)
        x, _ = self._images(images)
        self.check_inputs(qs, len(x), mode, answers)
        if len(qs) == 1:
            qs = qs * len(x)
        cands = list(answers) if answers is not None else list(self.model.config.answers)
        out_a, out_s, out_k = [], [], []
        with torch.inference_mode():
            # 2. encode the targets once (answers or vocabulary)
            feats = self.model.text_features(cands) if mode == "match" else self.model.vocab_features()
            for sl in _batches(len(x), batch_size):
                tokens = self.model.image_tokens(x[sl])
                if mode == "match":
                    # 3. read the question's <SPE> and match it against the answers
                    p = self.model.vqa_match(None, qs[sl], image_tokens=tokens, answer_features=feats)
                    top = p.topk(min(top_k, len(cands)), dim=-1)
                    for vals, idx in zip(top.values.tolist(), top.indices.tolist()):
                        pairs = [(cands[i], float(v)) for v, i in zip(vals, idx)]
                        out_a.append(pairs[0][0])
                        out_s.append(pairs[0][1])
                        out_k.append(pairs)
                else:
                    # 3. prefix [SPE | image | question | SPE] then decode the answer
                    q = self.model.tokenizer.encode(qs[sl], self.model.config.max_text_len // 2)
                    prefix = self.model.prefix(tokens, q, spe_after_text=True)
                    gen = generate(self.model, prefix, max_new_tokens, num_beams, "vqa", vocab_feats=feats)
                    for toks, lp, n in zip(gen.tokens, gen.logprob.tolist(), gen.lengths.tolist()):
                        text = self.model.tokenizer.decode(toks)
                        s = float(np.exp(lp / max(1, n)))
                        out_a.append(text)
                        out_s.append(s)
                        out_k.append([(text, s)])
        return VQAOutput(out_a, out_s, out_k, mode)
