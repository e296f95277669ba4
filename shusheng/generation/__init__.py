"""Text-to-image generation (diffusers): a conditional UNet on frozen MiniLM text features, PNG parameters.

    >>> from shusheng.generation import Text2ImagePipeline
    >>> pipe = Text2ImagePipeline.from_pretrained("runs/t2i/final")      # a model from `shusheng train t2i`
    >>> out = pipe("a red car on a wet street at night", num_images_per_prompt=2, seed=123)
    >>> out.images, out.seeds, out.parameters
    >>> from shusheng.generation import load_pipeline
    >>> sd = load_pipeline("path/to/stable-diffusion")                    # diffusers' own class, offline

Every generated PNG carries AUTOMATIC1111-style ``parameters`` (:mod:`shusheng.generation.png`), from which
``shusheng generate --from-png FILE`` makes the identical image again. There is no bundled trained model yet:
``Text2ImagePipeline.from_pretrained()`` and ``shusheng generate`` without ``--model`` refuse with a message
naming ``shusheng train t2i``. Importing this package is light; diffusers loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUNDLED_MODEL": "shusheng.generation.config",
    "DEFAULT_TEXT_ENCODER": "shusheng.generation.config",
    "SAMPLER_LABELS": "shusheng.generation.config",
    "SCHEDULERS": "shusheng.generation.config",
    "UNetConfig": "shusheng.generation.config",
    "make_scheduler": "shusheng.generation.config",
    "make_unet": "shusheng.generation.config",
    "GenerationParameters": "shusheng.generation.png",
    "read_parameters": "shusheng.generation.png",
    "save_png": "shusheng.generation.png",
    "Text2ImageOutput": "shusheng.generation.pipeline",
    "Text2ImagePipeline": "shusheng.generation.pipeline",
    "UntrainedGeneratorError": "shusheng.generation.pipeline",
    "check_pipeline_folder": "shusheng.generation.pipeline",
    "load_pipeline": "shusheng.generation.pipeline",
    "load_text_encoder": "shusheng.generation.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shusheng.generation' has no attribute {name!r}")
