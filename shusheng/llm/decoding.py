"""Decoding for the LLM bridge: a batched, KV-cached token loop with per-row text streams, and choice scoring.

:func:`generate` runs any Hugging Face causal LM on left-padded ``inputs_embeds`` (the prompt with the image
tokens spliced in) and yields, after every token, the text each row gained. Every row keeps its own sampler
(greedy by default; temperature / top-p with its own seeded generator) and its own :class:`TextStream`, so a row
gives the same tokens in a batch as alone, and a row that ends (EOS, a stop string, its length limit) stops
producing text while the others go on. A ``threading.Event`` is checked between tokens (interrupt).

:func:`score_choices` scores a closed list of answers by their log-likelihood after the prompt (each answer
followed by the end-of-turn token, so "red" and "red car" compete fairly).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FINISH_REASONS", "SamplingParams", "Step", "TextStream", "generate", "score_choices"]

#: why a row ended: its EOS token, a stop string, its token limit, an interrupt, a constrained choice, or an error
FINISH_REASONS = ("eos", "stop", "length", "interrupted", "choice", "error")


@dataclass
class SamplingParams:
    """How tokens are chosen.

    Args:
        max_new_tokens: longest answer in tokens (also bounded by the LM's positions).
        temperature: 0 = greedy (the default); > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to ``top_p``.
        seed: seed of every row's sampler (each row gets its own generator with this seed, so a row samples the
            same tokens in any batch); None = nondeterministic.
        stop: strings that end an answer (not included in it).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class TextStream:
    """One row's answer text, decoded incrementally.

    After each token the whole answer is decoded again (so multi-byte characters split over tokens come out
    whole); what is new is released, except a trailing incomplete character and a tail that could still become
    a stop string. A stop string cuts the answer where it starts.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; returns the text it releases (maybe empty)."""
        self.ids.append(int(token))
        text = self._decode()
        if self.stop:
            start = max(0, self.released - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = text[:max(min(hits), self.released)], True
                return self.flush()
        self.text = text
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)  # an incomplete UTF-8 character
        for s in self.stop:  # hold back a tail that may be the beginning of a stop string
            for k in range(min(len(s) - 1, safe - self.released), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._release(safe)

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released:upto]
        self.released = upto
        return out

    def flush(self) -> str:
        """The rest of the text (the answer is complete)."""
        return self._release(len(self.text))


@dataclass
class Step:
    """What one row gained in one decoding step.

    Attributes:
        row: the row in the batch.
        text: new text (maybe empty when the row just finished).
        finish_reason: None while the row goes on, else one of :data:`FINISH_REASONS`.
        num_tokens: tokens generated so far (EOS included).
        logprob: summed log-probability of those tokens (under the untempered distribution).
    """

    row: int
    text: str
    finish_reason: str | None = None
    num_tokens: int = 0
    logprob: float = 0.0


def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < params.top_p  # the smallest set whose mass reaches top_p (at least one)
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.inference_mode()
def generate(lm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
             tokenizer: Any, eos_ids: set[int], params: SamplingParams, max_new: Sequence[int],
             stop_event: threading.Event | None = None, pad_id: int = 0) -> Iterator[list[Step]]:
    """Decode a left-padded batch token by token with the LM's KV cache.

    Args:
        lm: a Hugging Face causal LM.
        inputs_embeds, attention_mask, position_ids: ``(B, L, D)``, ``(B, L)``, ``(B, L)`` (left padding).
        tokenizer: decodes the answers.
        eos_ids: tokens that end a row.
        params: sampling and stop strings.
        max_new: per row the most tokens it may generate (its share of the LM's positions).
        stop_event: a ``threading.Event`` (anything with ``is_set()``): when set (checked between tokens) every
            row still going ends as ``"interrupted"``.
        pad_id: token fed for rows that have ended.

    Yields:
        Per step, the :class:`Step` of every row that gained text or ended in it.
    """
    b = inputs_embeds.shape[0]
    streams = [TextStream(tokenizer, params.stop) for _ in range(b)]
    gens = None
    if params.temperature > 0:
        gens = []
        for _ in range(b):
            g = torch.Generator(device="cpu")
            if params.seed is None:
                g.seed()
            else:
                g.manual_seed(int(params.seed))
            gens.append(g)
    done = [False] * b
    n_tok, lp = [0] * b, [0.0] * b
    out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1].float().cpu()  # (B, V)
    next_pos = position_ids[:, -1:] + 1  # (B, 1)
    mask = attention_mask
    while not all(done):
        if stop_event is not None and stop_event.is_set():
            yield [Step(i, streams[i].flush(), "interrupted", n_tok[i], lp[i]) for i in range(b) if not done[i]]
            return
        logp = torch.log_softmax(logits, dim=-1)
        feed, steps = [pad_id] * b, []
        for i in range(b):
            if done[i]:
                continue
            tok = _choose(logits[i], params, gens[i] if gens else None)
            feed[i] = tok
            n_tok[i] += 1
            lp[i] += float(logp[i, tok])
            if tok in eos_ids:
                reason, text = "eos", streams[i].flush()
            else:
                text = streams[i].push(tok)
                reason = "stop" if streams[i].stopped else ("length" if n_tok[i] >= max_new[i] else None)
                if reason == "length":
                    text += streams[i].flush()
            if reason is not None:
                done[i] = True
            if text or reason is not None:
                steps.append(Step(i, text, reason, n_tok[i], lp[i]))
        if steps:
            yield steps
        if all(done):
            return
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        ids = torch.tensor(feed, dtype=torch.long, device=inputs_embeds.device)[:, None]
        out = lm(input_ids=ids, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float().cpu()
        next_pos = next_pos + 1


@torch.inference_mode()
def score_choices(lm: Any, prompt_embeds: torch.Tensor, choice_ids: Sequence[Sequence[int]]) -> list[float]:
    """Summed log-likelihood of each choice's tokens after one prompt.

    Args:
        lm: a Hugging Face causal LM.
        prompt_embeds: ``(1, L, D)`` the prompt (no padding).
        choice_ids: per choice its token ids (end-of-turn token included).

    Returns:
        One log-likelihood per choice.
    """
    c, length = len(choice_ids), prompt_embeds.shape[1]
    width = max(len(ids) for ids in choice_ids)
    dev = prompt_embeds.device
    ids = torch.zeros((c, width), dtype=torch.long, device=dev)
    valid = torch.zeros((c, width), dtype=torch.bool, device=dev)
    for i, t in enumerate(choice_ids):
        ids[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
        valid[i, :len(t)] = True
    emb = torch.cat([prompt_embeds.expand(c, -1, -1), lm.get_input_embeddings()(ids)], dim=1)  # (C, L + W, D)
    mask = torch.cat([torch.ones((c, length), dtype=torch.long, device=dev), valid.long()], dim=1)
    pos = torch.arange(length + width, device=dev).expand(c, -1)
    # right padding: the padded tail never influences the real tokens before it (causal attention)
    logits = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, logits_to_keep=width + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (C, W, V): position L-1+j predicts choice token j
    tok = logp.gather(-1, ids[..., None])[..., 0]
    return (tok * valid).sum(1).tolist()
