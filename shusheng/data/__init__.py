"""Data: the project's one image loader and SynthDrive, procedural driving scenes with exact ground truth.

``load_image``/``ImageLoadError``/``IMAGE_EXTENSIONS`` are imported eagerly (Pillow and NumPy only). The SynthDrive
API (``SynthDrive``, ``sample_spec``, ``render``, ``generate``, ...) lives in :mod:`shusheng.data.synthdrive`
and is imported on first attribute access, so ``import shusheng.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from shusheng.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, load_image

_SYNTHDRIVE = (
    "DENSE_LABELS", "SPLITS", "TEST_IMAGE_SIZE", "TEST_SEED", "TEST_SIZE", "TRAIN_SEED", "VAL_SEED", "Annotation",
    "SynthDrive", "dense_labels",
    "answer", "collate", "generate", "image_rng", "image_seed", "preview_grid", "render", "sample", "sample_spec",
    "synthdrive_split",
)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "load_image", *_SYNTHDRIVE]


def __getattr__(name: str) -> Any:
    if name in _SYNTHDRIVE:
        return getattr(importlib.import_module("shusheng.data.synthdrive"), name)
    raise AttributeError(f"module 'shusheng.data' has no attribute {name!r}")
