"""Attention masks of the unified decoder, as pure functions. Convention everywhere: ``True`` = may attend.

The mask is converted exactly once, in :func:`shusheng.uniperceiver.model.attention` (``scaled_dot_product_attention``
also reads a boolean ``True`` as *attend*). Layouts (Uni-Perceiver, ``unified_bert_encoder.py``):

* ``prefix``: ``[SPE | image? | text?]``, every token attends every valid (non-pad) token.
* ``two_stream``: ``[prefix | words w_0..w_{Lw-1} | slots s_0..s_{Ls-1}]``

  - prefix rows see only the prefix (never the words or slots), so a cached prefix never changes;
  - word ``i`` sees the prefix and the words ``j <= i`` (causal);
  - slot ``i`` sees the prefix, the words ``j < i`` and itself; nobody else sees a slot.

  Slot ``i`` is matched against the vocabulary to predict ``w_i``. With a question in the prefix this is the
  prefix-LM layout of open-ended VQA; with the image alone it is captioning.

Pads are never keys; every row keeps at least the (valid) ``<SPE>`` at position 0, so no softmax row is empty.
"""

from __future__ import annotations

import torch

__all__ = ["prefix_mask", "two_stream_mask"]


def prefix_mask(valid: torch.Tensor) -> torch.Tensor:
    """Bidirectional mask over valid tokens.

    Args:
        valid: ``(B, S)`` bool, ``False`` at padding.

    Returns:
        ``(B, S, S)`` bool: row ``q`` may attend key ``k`` iff ``k`` is valid.
    """
    b, s = valid.shape
    return valid[:, None, :].expand(b, s, s).clone()


def two_stream_mask(prefix_valid: torch.Tensor, word_valid: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The two-stream mask of captioning / prefix-LM generation.

    Args:
        prefix_valid: ``(B, P)`` bool validity of the prefix tokens (``<SPE>``, image tokens, optional text).
        word_valid: ``(B, Lw)`` bool validity of the words.
        n_slots: number of slots ``Ls`` (slot ``i`` predicts word ``i``; ``Ls <= Lw + 1``).

    Returns:
        ``(B, P + Lw + Ls, P + Lw + Ls)`` bool.
    """
    b, p = prefix_valid.shape
    lw = word_valid.shape[1]
    ls = n_slots
    dev = prefix_valid.device
    s = p + lw + ls
    m = torch.zeros(b, s, s, dtype=torch.bool, device=dev)
    m[:, :, :p] = prefix_valid[:, None, :]  # everyone sees the valid prefix
    causal = torch.ones(lw, lw, dtype=torch.bool, device=dev).tril()  # word i -> words j <= i
    m[:, p:p + lw, p:p + lw] = causal & word_valid[:, None, :]
    strict = torch.ones(ls, lw, dtype=torch.bool, device=dev).tril(-1)  # slot i -> words j < i
    m[:, p + lw:, p:p + lw] = strict & word_valid[:, None, :]
    m[:, p + lw:, p + lw:] = torch.eye(ls, dtype=torch.bool, device=dev)  # slot i -> itself
    return m
