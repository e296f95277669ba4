"""Uni-Perceiver-style unified decoder: captioning, VQA, retrieval and classification with one shared encoder.

    >>> from shusheng.uniperceiver import CaptionPipeline, VQAPipeline
    >>> cap = CaptionPipeline.from_pretrained()            # the bundled shusheng-mini-uniperceiver
    >>> cap(["street.png"]).captions
    >>> VQAPipeline.from_pretrained()(["street.png"], "What color is the traffic light?").answers

Importing this package is light; torch models and Hugging Face tokenizers load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UniPerceiverConfig": "shusheng.uniperceiver.config",
    "UniPerceiver": "shusheng.uniperceiver.model",
    "TextTokenizer": "shusheng.uniperceiver.tokenizers",
    "prefix_mask": "shusheng.uniperceiver.masks",
    "two_stream_mask": "shusheng.uniperceiver.masks",
    "generate": "shusheng.uniperceiver.decoding",
    "greedy_decode": "shusheng.uniperceiver.decoding",
    "beam_search": "shusheng.uniperceiver.decoding",
    "reference_decode": "shusheng.uniperceiver.decoding",
    "CaptionPipeline": "shusheng.uniperceiver.pipelines",
    "CaptionOutput": "shusheng.uniperceiver.pipelines",
    "VQAPipeline": "shusheng.uniperceiver.pipelines",
    "VQAOutput": "shusheng.uniperceiver.pipelines",
    "bundled_model_path": "shusheng.uniperceiver.pipelines",
    "bleu4": "shusheng.uniperceiver.metrics",
    "cider_d": "shusheng.uniperceiver.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shusheng.uniperceiver' has no attribute {name!r}")
