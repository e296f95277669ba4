"""``ChatPipeline``: multi-turn chat about images with an :class:`~shusheng.llm.LLMBridge`, batched or streamed.

    >>> from shusheng.llm import ChatPipeline
    >>> chat = ChatPipeline.from_pretrained("runs/bridge/final")
    >>> out = chat(["a.png", "b.png"], "What colour is the traffic light?")      # one question for both
    >>> out.answers, out.finish_reasons, out.in_domain
    >>> chat("a.png", "Is it raining?", choices=["yes", "no"]).answers           # constrained answer
    >>> conversation = [{"role": "user", "content": "Describe the scene."},
    ...                 {"role": "assistant", "content": "A street at night with a red car."},
    ...                 {"role": "user", "content": "Is the car moving?"}]
    >>> chat([["a.png", "b.png"]], [conversation])                               # one row, two images
    >>> for d in chat.stream("a.png", "Describe the scene."):                    # text as it is generated
    ...     print(d.text, end="", flush=True)

Inputs. ``images`` is one image or a list of rows, each row one image or a list of images (``[]`` or
``images=None``: text only); ``questions`` is one question or conversation for every row, or one per row. A
conversation is a list of ``{"role", "content"}`` messages ending with the user's; the row's images go at the
start of its first user message, or where its text puts ``<image>`` placeholders.

Every row is answered as it would be alone: prompts are left-padded, every row has its own sampler (greedy by
default) and stop strings, and a row that ends stops producing text while the others go on. ``stop()`` (or a
``threading.Event`` passed as ``stop_event``) ends the answers in progress between two tokens.

Errors. An image that cannot be loaded fails its own row (``errors[i]``, finish reason ``"error"``);
``on_error="raise"`` raises instead. An empty question or a prompt longer than the LM's positions raises a
ValueError before anything is generated.

:meth:`ChatPipeline.stream` streams *text*; images are decoded with the loader every pipeline has
(:meth:`shusheng.pipelines.Pipeline.batches`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shusheng.llm.decoding import SamplingParams, generate, score_choices
from shusheng.llm.model import LLMBridge, pool_tokens
from shusheng.pipelines import DomainCheck, Pipeline, PipelineOutput

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODEL", "ChatDelta", "ChatOutput", "ChatPipeline", "UntrainedBridgeError"]

BUNDLED_MODEL = "shusheng-mini-bridge"
TRAIN_COMMAND = "shusheng train bridge --output runs/bridge"


class UntrainedBridgeError(FileNotFoundError):
    """No trained bridge is available: the projector would be random, so the pipeline refuses to chat."""


@dataclass
class ChatDelta:
    """One piece of a streamed answer.

    Attributes:
        index: the row (input) it belongs to.
        text: new text of that row's answer (the pieces of a row join to its full answer).
        finish_reason: None while the row goes on; then ``"eos"``, ``"stop"``, ``"length"``, ``"interrupted"``,
            ``"choice"`` or ``"error"``.
        error: why the row failed (finish reason ``"error"``).
        in_domain, domain_score: the row's in-domain check (on its last piece): in-domain when all its images
            are; the lowest image score (NaN without a check or without images).
        score: on the last piece, ``exp(mean token log-probability)`` of the answer, or a choice's probability
            among the choices.
        num_tokens: on the last piece, the tokens generated (EOS included).
        choice_scores: with ``choices``, every choice's probability among them.
    """

    index: int
    text: str
    finish_reason: str | None = None
    error: str | None = None
    in_domain: bool | None = None
    domain_score: float = math.nan
    score: float | None = None
    num_tokens: int = 0
    choice_scores: dict[str, float] | None = None


@dataclass
class ChatOutput(PipelineOutput):
    """Answers, one per row (``None`` for a row that failed; see ``errors``).

    Attributes:
        answers: the answer texts.
        finish_reasons: see :class:`ChatDelta`.
        scores: ``exp(mean token log-probability)`` of each answer, or the chosen choice's probability.
        num_tokens: tokens generated per answer.
        choice_scores: with ``choices``: per row every choice's probability; else None per row.
        in_domain, domain_score, errors: see :class:`shusheng.pipelines.PipelineOutput`.
    """

    answers: list[str | None]
    finish_reasons: list[str | None]
    scores: list[float | None]
    num_tokens: list[int] = field(default_factory=list)
    choice_scores: list[dict[str, float] | None] = field(default_factory=list)


class BridgeImageSide(torch.nn.Module):
    """The image side of an :class:`LLMBridge`: normalised pixels ``(B, 3, S, S)`` → pooled tower tokens
    ``(B, N, C)`` (the projector and the LM run after it, in PyTorch)."""

    def __init__(self, model: LLMBridge):
        super().__init__()
        self.tower = model.tower
        self.n = model.num_image_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.tower.forward_features(pixels).float(), self.n)


def _is_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(x, "read")


def _image_rows(images: Any) -> list[list[Any]] | None:
    if images is None:
        return None
    if _is_image(images):
        return [[images]]
    rows = [[x] if _is_image(x) else list(x) for x in images]
    if not rows:
        raise ValueError("no images given")
    return rows


def _is_conversation(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


class ChatPipeline(Pipeline):
    """Chat about images with an :class:`LLMBridge` (see the module docstring).

    Args:
        model: the bridge.
        domain_check: its in-domain check (``from_pretrained`` loads the one stored with the weights).
        runtime: what runs the image tower (see :class:`shusheng.pipelines.Pipeline`).
    """

    model_class = LLMBridge
    bundled_model = BUNDLED_MODEL

    def __init__(self, model: LLMBridge, domain_check: DomainCheck | None = None, runtime: str = "torch"):
        super().__init__(model, domain_check, runtime)
        self._stop = threading.Event()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        runtime: str = "torch", lm: str | None = None, **kwargs: Any) -> ChatPipeline:
        """Load a trained bridge (default: the bundled ``shusheng-mini-bridge``) and its domain check.

        Args:
            path: a folder written by ``shusheng train bridge`` / ``save_pretrained``; None = the bundled one.
            device: where the model runs.
            runtime: what runs the image tower.
            lm: another reference to the bridge's LM (e.g. where it lives on this machine).
            **kwargs: passed to :meth:`LLMBridge.from_pretrained` (``lm_model``, ``tokenizer``, ...).

        Raises:
            UntrainedBridgeError: ``path`` is None and no trained bridge is bundled; the message names
                ``shusheng train bridge``. Chatting with a random projector is never done silently.
        """
        if path is None:
            from shusheng.weights import BundledWeightsNotFound, bundled_path

            try:
                path = bundled_path(cls.bundled_model)
            except BundledWeightsNotFound as e:
                raise UntrainedBridgeError(
                    f"no trained LLM bridge is bundled ({cls.bundled_model}): its projector, which maps image "
                    "features into the LM, is untrained, and a random projector would make the LM answer "
                    f"without seeing the image. Train one with `{TRAIN_COMMAND}` and pass its folder "
                    "(--model runs/bridge/final, or ChatPipeline.from_pretrained('runs/bridge/final'))") from e
        if lm is not None:
            kwargs["lm"] = lm
        model = LLMBridge.from_pretrained(path, **kwargs).to(device)
        return cls(model, DomainCheck.load(path), runtime=runtime)

    def image_module(self) -> BridgeImageSide:
        return BridgeImageSide(self.model)

    def domain_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return LLMBridge.domain_features(self.model.tower_tokens(pixels))

    def stop(self) -> None:
        """End the answers in progress after their current token (thread-safe; the next call starts afresh)."""
        self._stop.set()

    # -- inputs ---------------------------------------------------------------------------------------------

    def _rows(self, images: Any, questions: Any) -> tuple[list[list[Any]], list[Any]]:
        rows = _image_rows(images)
        if questions is None:
            raise ValueError("no question given")
        if isinstance(questions, str) or _is_conversation(questions):
            questions = [questions]
        questions = list(questions)
        if not questions:
            raise ValueError("no question given")
        if rows is None:
            rows = [[] for _ in questions]
        if len(questions) == 1:
            questions = questions * len(rows)
        if len(questions) != len(rows):
            raise ValueError(f"give one question for all rows or one per row: {len(questions)} questions for "
                             f"{len(rows)} rows of images")
        for q in questions:
            if not isinstance(q, str) and not _is_conversation(q):
                raise TypeError(f"a question is a string or a list of {{'role', 'content'}} messages, got {q!r}")
        return rows, questions

    def check_inputs(self, rows: list[list[Any]], questions: list[Any], choices: Sequence[str] | None
                     ) -> list[list[int]]:
        """The prompt ids of every row (validated: non-empty questions, within the LM's positions)."""
        if choices is not None:
            if isinstance(choices, str) or not choices:
                raise ValueError("choices must be a non-empty list of strings")
            if any(not isinstance(c, str) or not c.strip() for c in choices):
                raise ValueError("every choice must be a non-empty string")
        prompts = []
        for imgs, q in zip(rows, questions):
            p = self.model.encode_prompt(q, len(imgs))
            self.model.check_length(p)
            prompts.append(p)
        return prompts

    # -- streaming ------------------------------------------------------------------------------------------

    def stream(self, images: Any = None, questions: Any = None, *, choices: Sequence[str] | None = None,
               max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | str = (), stop_event: threading.Event | None = None, batch_size: int = 8,
               on_error: str = "item") -> Iterator[ChatDelta]:
        """Answer like :meth:`__call__`, yielding the text as it is generated.

        Rows are processed ``batch_size`` at a time; within a batch, the pieces of different rows interleave
        (``ChatDelta.index`` says whose). Every row ends with one piece whose ``finish_reason`` is set.

        Yields:
            :class:`ChatDelta` pieces.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stop)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_error not in ("item", "raise"):
            raise ValueError(f"on_error must be 'item' or 'raise', got {on_error!r}")
        rows, questions = self._rows(images, questions)
        prompts = self.check_inputs(rows, questions, choices)
        self._stop.clear()
        events = [e for e in (self._stop, stop_event) if e is not None]
        any_stop = _AnyEvent(events)
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(len(rows), start + batch_size)))
            yield from self._batch(idx, rows, prompts, params, choices, any_stop, on_error)

    def _load(self, idx: list[int], rows: list[list[Any]], on_error: str):
        """Per row of the batch: its pooled tower tokens ``(n_images * N, C)`` or an error; in-domain fields."""
        flat = [(i, img) for i in idx for img in rows[i]]
        tokens: dict[int, list[torch.Tensor]] = {i: [] for i in idx}
        errors: dict[int, str] = {}
        dom: dict[int, tuple[bool | None, float]] = {i: (True, math.nan) for i in idx}
        if not flat:
            return tokens, errors, dom
        with torch.inference_mode():
            for batch in self.batches([img for _, img in flat], len(flat), on_error):
                for j, msg in batch.errors:
                    errors.setdefault(flat[j][0], msg)
                if batch.pixels is None:
                    continue
                tok = self.image_outputs(batch.pixels)[0]  # (n, N, C)
                ok, scores = self.score_features(LLMBridge.domain_features(tok) if self.domain_check else None,
                                                 len(tok))
                for k, j in enumerate(batch.index):
                    i = flat[j][0]
                    tokens[i].append(tok[k])
                    was_ok, was_score = dom[i]
                    dom[i] = (bool(was_ok and ok[k]), scores[k] if math.isnan(was_score) else min(was_score,
                                                                                                    scores[k]))
        return tokens, errors, dom

    def _batch(self, idx: list[int], rows: list[list[Any]], prompts: list[list[int]], params: SamplingParams,
               choices: Sequence[str] | None, stop_event: threading.Event, on_error: str) -> Iterator[ChatDelta]:
        model = self.model
        tokens, errors, dom = self._load(idx, rows, on_error)
        for i in idx:
            if i in errors:
                yield ChatDelta(i, "", "error", error=errors[i], in_domain=None)
        live = [i for i in idx if i not in errors]
        if not live:
            return
        with torch.inference_mode():
            embeds = [model.project(torch.cat(tokens[i])) if tokens[i]
                      else torch.zeros((0, model.config.lm_hidden_size), device=model.device) for i in live]
            if choices is not None:
                yield from self._choose(live, prompts, embeds, list(choices), dom)
                return
            emb, mask, pos = model.embed([prompts[i] for i in live], embeds)
            limit = model.max_positions
            max_new = [params.max_new_tokens if limit is None else min(params.max_new_tokens, limit - len(prompts[i]))
                       for i in live]
            for steps in generate(model.lm, emb, mask, pos, tokenizer=model.tokenizer, eos_ids=model.eos_ids(),
                                  params=params, max_new=max_new, stop_event=stop_event,
                                  pad_id=model.pad_token_id()):
                for s in steps:
                    i = live[s.row]
                    if s.finish_reason is None:
                        yield ChatDelta(i, s.text)
                    else:
                        score = math.exp(s.logprob / max(1, s.num_tokens))
                        yield ChatDelta(i, s.text, s.finish_reason, None, dom[i][0], dom[i][1], score, s.num_tokens)

    def _choose(self, live: list[int], prompts: list[list[int]], embeds: list[torch.Tensor], choices: list[str],
                dom: dict[int, tuple[bool | None, float]]) -> Iterator[ChatDelta]:
        model = self.model
        eos = model.tokenizer.eos_token_id
        ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
               for c in choices]
        for i, e in zip(live, embeds):
            emb, _, _ = model.embed([prompts[i]], [e])
            lls = torch.tensor(score_choices(model.lm, emb, ids))
            probs = torch.softmax(lls, 0).tolist()
            best = int(lls.argmax())
            yield ChatDelta(i, choices[best], "choice", None, dom[i][0], dom[i][1], probs[best], len(ids[best]),
                            dict(zip(choices, probs)))

    # -- batch call -----------------------------------------------------------------------------------------

    def __call__(self, images: Any = None, questions: Any = None, *, choices: Sequence[str] | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str = (), stop_event: threading.Event | None = None, batch_size: int = 8,
                 on_error: str = "item") -> ChatOutput:
        """Answer questions about images.

        Args:
            images: one image or a list of rows (each an image or a list of images); None = text only.
            questions: one question / conversation for every row, or one per row.
            choices: restrict every answer to one of these strings (the most likely one after the prompt).
            max_new_tokens: longest answer in tokens.
            temperature, top_p, seed: sampling (temperature 0 = greedy, the default).
            stop: strings that end an answer (not included).
            stop_event: a ``threading.Event`` that, when set, ends the answers in progress (as :meth:`stop`).
            batch_size: rows generated together.
            on_error: ``"item"`` (a row whose image cannot be loaded gets ``None`` and its reason in ``errors``)
                or ``"raise"``.

        Returns:
            :class:`ChatOutput`; row ``i``'s answer is the concatenation of :meth:`stream`'s pieces for ``i``.

        Raises:
            ValueError: an empty question, a prompt longer than the LM's positions, bad sampling parameters.
        """
        rows, _ = self._rows(images, questions)
        n = len(rows)
        out = {"answers": [None] * n, "finish_reasons": [None] * n, "scores": [None] * n, "num_tokens": [0] * n,
               "choice_scores": [None] * n, **self._empty(n)}
        parts: list[list[str]] = [[] for _ in range(n)]
        for d in self.stream(images, questions, choices=choices, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed, stop=stop, stop_event=stop_event,
                             batch_size=batch_size, on_error=on_error):
            parts[d.index].append(d.text)
            if d.finish_reason is None:
                continue
            i = d.index
            out["finish_reasons"][i] = d.finish_reason
            if d.finish_reason == "error":
                out["errors"][i] = d.error
                continue
            out["answers"][i] = "".join(parts[i])
            out["scores"][i], out["num_tokens"][i], out["choice_scores"][i] = d.score, d.num_tokens, d.choice_scores
            out["in_domain"][i], out["domain_score"][i] = d.in_domain, d.domain_score
        return ChatOutput(**out)


class _AnyEvent:
    """``is_set()`` of several events (the pipeline's own and the caller's)."""

    def __init__(self, events: Sequence[threading.Event]):
        self.events = list(events)

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)
