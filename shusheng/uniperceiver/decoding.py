"""Sequence generation by matching: cached greedy and beam search, and a no-cache reference decoder.

Each step matches one slot token against the vocabulary targets (v1's ``CaptionBeamSearcherV3``):

1. encode the prefix ``[SPE | image | question?]`` once, keeping every layer's K/V;
2. for t = 0, 1, ...: run **one slot** at text position ``t`` over the cache (its K/V is never kept), match it
   against the cached vocabulary features, pick the word; then run **the chosen word** at position ``t`` and
   append its K/V to the cache.

The two-stream mask makes this exact: the prefix never attends to text and words only attend backwards, so no
cached state ever changes. :func:`reference_decode` rebuilds the whole two-stream sequence at every step and is
the yardstick the cached decoders are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shusheng.uniperceiver.model import Cache, Prefix, UniPerceiver

__all__ = ["Generation", "beam_search", "generate", "greedy_decode", "reference_decode"]


@dataclass
class Generation:
    """Decoded sequences.

    Attributes:
        tokens: per sequence the token ids, EOS excluded.
        logprob: (B,) summed log-probability of the tokens and the EOS (if reached).
        lengths: (B,) scored tokens (EOS included when reached).
        score: (B,) the ranking score: ``logprob / lengths**length_penalty`` (``logprob`` when 0).
    """

    tokens: list[list[int]]
    logprob: torch.Tensor
    lengths: torch.Tensor
    score: torch.Tensor


def _vocab_logprobs(model: UniPerceiver, h: torch.Tensor, vocab_feats: torch.Tensor, task: str) -> torch.Tensor:
    return F.log_softmax((model.scale(task) * model.head(h) @ vocab_feats.T).float(), -1)  # (B, V)


def _slot_step(model: UniPerceiver, cache: Cache, key_valid: torch.Tensor, pos: torch.Tensor,
               vocab_feats: torch.Tensor, task: str) -> torch.Tensor:
    """One slot at text position ``pos`` (B,) over the cache -> log-probs (B, V); the cache is not extended."""
    x = model.slot_inputs(1, pos)  # (B, 1, D)
    allowed = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], 1)[:, None, :]  # (B, 1, T + 1)
    h, _ = model.encoder(x, allowed, cache)
    return _vocab_logprobs(model, h[:, 0], vocab_feats, task)


def _word_step(model: UniPerceiver, cache: Cache, key_valid: torch.Tensor, ids: torch.Tensor,
               pos: torch.Tensor) -> tuple[Cache, torch.Tensor]:
    """Append the K/V of word ``ids`` (B,) at position ``pos`` (B,) to the cache."""
    x = model.word_inputs(ids[:, None], pos)  # (B, 1, D)
    key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], 1)
    _, cache = model.encoder(x, key_valid[:, None, :], cache)
    return cache, key_valid


def _finish(tokens: torch.Tensor, logprob: torch.Tensor, lengths: torch.Tensor, eos: int,
            length_penalty: float) -> Generation:
    out = []
    for row in tokens.tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    lengths = lengths.clamp_min(1)
    score = logprob / lengths.float() ** length_penalty if length_penalty else logprob.clone()
    return Generation(out, logprob, lengths, score)


@torch.no_grad()
def greedy_decode(model: UniPerceiver, prefix: Prefix, max_len: int = 32, task: str = "caption",
                  vocab_feats: torch.Tensor | None = None) -> Generation:
    """Cached greedy decoding (two single-token passes per step)."""
    vocab_feats = model.vocab_features() if vocab_feats is None else vocab_feats
    b, dev = prefix.x.shape[0], prefix.x.device
    eos_t = int(model.vocab_index[model.eos_id])
    _, cache = model.encode_prefix(prefix)
    key_valid = prefix.valid
    logprob = torch.zeros(b, device=dev)
    lengths = torch.zeros(b, dtype=torch.long, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    chosen = []
    for t in range(max_len):
        pos = prefix.next_pos + t
        lp = _slot_step(model, cache, key_valid, pos, vocab_feats, task)  # (B, V)
        best = lp.argmax(-1)
        best = torch.where(finished, torch.full_like(best, eos_t), best)
        logprob += torch.where(finished, torch.zeros_like(logprob), lp.gather(1, best[:, None])[:, 0])
        lengths += (~finished).long()
        ids = model.vocab_ids[best]
        chosen.append(ids)
        finished |= best == eos_t
        if bool(finished.all()) or t == max_len - 1:
            break
        cache, key_valid = _word_step(model, cache, key_valid, ids, pos)
    return _finish(torch.stack(chosen, 1), logprob, lengths, model.eos_id, 0.0)


@torch.no_grad()
def beam_search(model: UniPerceiver, prefix: Prefix, num_beams: int = 2, max_len: int = 32, task: str = "caption",
                length_penalty: float = 0.0, vocab_feats: torch.Tensor | None = None) -> Generation:
    """Cached beam search.

    Candidate score = beam score + log-softmax over the vocabulary, top-``num_beams`` over beams x vocabulary;
    finished beams may only extend with EOS at no cost (v1); the best beam is chosen by
    ``logprob / len**length_penalty``. ``num_beams=1`` is greedy decoding.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    vocab_feats = model.vocab_features() if vocab_feats is None else vocab_feats
    b, k, dev = prefix.x.shape[0], num_beams, prefix.x.device
    v = vocab_feats.shape[0]
    eos_t = int(model.vocab_index[model.eos_id])
    pre = prefix.repeat_interleave(k)
    _, cache = model.encode_prefix(pre)
    key_valid = pre.valid
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first
    lengths = torch.zeros(b, k, dtype=torch.long, device=dev)
    finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
    tokens = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
    only_eos = torch.full((v,), float("-inf"), device=dev)
    only_eos[eos_t] = 0.0
    for t in range(max_len):
        pos = pre.next_pos + t
        lp = _slot_step(model, cache, key_valid, pos, vocab_feats, task).view(b, k, v)
        lp = torch.where(finished[..., None], only_eos, lp)
        top, idx = (scores[..., None] + lp).view(b, k * v).topk(k, dim=1)  # (B, K)
        beam, word = idx // v, idx % v
        flat = (torch.arange(b, device=dev)[:, None] * k + beam).view(-1)
        cache = [(kk[flat], vv[flat]) for kk, vv in cache]
        key_valid = key_valid[flat]
        was_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was_finished).long()
        finished = was_finished | (word == eos_t)
        tokens = torch.cat([tokens.gather(1, beam[..., None].expand(-1, -1, tokens.shape[2])),
                            model.vocab_ids[word][..., None]], 2)
        scores = top
        if bool(finished.all()) or t == max_len - 1:
            break
        cache, key_valid = _word_step(model, cache, key_valid, model.vocab_ids[word].view(-1), pos)
    norm = scores / lengths.clamp_min(1).float() ** length_penalty if length_penalty else scores
    best = norm.argmax(1)  # (B,)
    ar = torch.arange(b, device=dev)
    return _finish(tokens[ar, best], scores[ar, best], lengths[ar, best], model.eos_id, length_penalty)


@torch.no_grad()
def reference_decode(model: UniPerceiver, prefix: Prefix, max_len: int = 32, task: str = "caption",
                     vocab_feats: torch.Tensor | None = None) -> Generation:
    """Greedy decoding without a cache: the full two-stream sequence is rebuilt and encoded at every step."""
    vocab_feats = model.vocab_features() if vocab_feats is None else vocab_feats
    b, dev = prefix.x.shape[0], prefix.x.device
    eos_t = int(model.vocab_index[model.eos_id])
    words = torch.zeros(b, 0, dtype=torch.long, device=dev)
    logprob = torch.zeros(b, device=dev)
    lengths = torch.zeros(b, dtype=torch.long, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    for t in range(max_len):
        logits, _ = model.generation_logits(prefix, words, torch.ones_like(words, dtype=torch.bool), vocab_feats,
                                            task, n_slots=t + 1)
        lp = F.log_softmax(logits[:, t].float(), -1)
        best = torch.where(finished, torch.full((b,), eos_t, device=dev), lp.argmax(-1))
        logprob += torch.where(finished, torch.zeros_like(logprob), lp.gather(1, best[:, None])[:, 0])
        lengths += (~finished).long()
        words = torch.cat([words, model.vocab_ids[best][:, None]], 1)
        finished |= best == eos_t
        if bool(finished.all()):
            break
    return _finish(words, logprob, lengths, model.eos_id, 0.0)


def generate(model: UniPerceiver, prefix: Prefix, max_len: int = 32, num_beams: int = 1, task: str = "caption",
             length_penalty: float = 0.0, use_cache: bool = True,
             vocab_feats: torch.Tensor | None = None) -> Generation:
    """Decode from a prefix: greedy (``num_beams=1``) or beam search; ``use_cache=False`` = reference decoder."""
    if not use_cache:
        if num_beams != 1:
            raise ValueError("the no-cache reference decoder is greedy only (num_beams=1)")
        return reference_decode(model, prefix, max_len, task, vocab_feats)
    if num_beams == 1:
        return greedy_decode(model, prefix, max_len, task, vocab_feats)
    return beam_search(model, prefix, num_beams, max_len, task, length_penalty, vocab_feats)
