"""Data: the project's one image loader and SynthDrive, procedural driving scenes with exact ground truth.

``load_image``/``ImageLoadError``/``IMAGE_EXTENSIONS`` are imported eagerly (Pillow and NumPy only). The SynthDrive
API (``SynthDrive``, ``sample_spec``, ``render``, ``generate``, ...) lives in :mod:`shusheng.data.synthdrive`, the
attribute classes, training targets, query-style phrases and retrieval queries with their ground truth in
:mod:`shusheng.data.synthdrive_queries`, rendered splits cached on disk in :mod:`shusheng.data.synthdrive_cache`,
drives (short rendered driving sequences with per-frame annotations and temporal facts, written as MP4) in
:mod:`shusheng.data.synthdrive_drive` and video reading/writing (PyAV, the ``video`` extra) in
:mod:`shusheng.data.video`; all are imported on first attribute access, so ``import shusheng.data`` stays
light.
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

_QUERIES = (
    "ATTRIBUTE_CLASSES", "PARAPHRASE_QUERIES", "PLAIN_QUERIES", "TAG_GROUPS", "Query", "attribute_labels",
    "attribute_phrases", "attribute_tags", "attribute_targets", "relevance_matrix", "synthdrive_answers",
    "training_texts",
)
_CACHE = ("SplitCache", "load_split_cache")
_DRIVE = ("Drive", "generate_drives", "sample_drive", "write_drive")
_VIDEO = ("VIDEO_EXTENSIONS", "VideoLoadError", "iter_video_frames", "write_video")
_LAZY = {**dict.fromkeys(_SYNTHDRIVE, "shusheng.data.synthdrive"),
         **dict.fromkeys(_QUERIES, "shusheng.data.synthdrive_queries"),
         **dict.fromkeys(_CACHE, "shusheng.data.synthdrive_cache"),
         **dict.fromkeys(_DRIVE, "shusheng.data.synthdrive_drive"),
         **dict.fromkeys(_VIDEO, "shusheng.data.video")}

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "load_image", *_SYNTHDRIVE, *_QUERIES,
           *_CACHE, *_DRIVE, *_VIDEO]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shusheng.data' has no attribute {name!r}")
