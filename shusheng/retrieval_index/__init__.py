"""Image-text search over image and video collections: embedders, the index store (FAISS + SQLite) and folder
ingest.

Quick start::

    from shusheng.retrieval_index import Index, index_folder

    report = index_folder("~/Pictures")                 # incremental: only new or changed files are embedded
    print(report.summary())
    with Index.open("~/Pictures/.shusheng-index") as index:
        for hit in index.search(text="a red car at night", k=5, threshold=0.2):
            print(f"{hit.score:.3f} {hit.path} {hit.box}")

Everything here imports lazily: ``import shusheng.retrieval_index`` pulls in neither torch nor FAISS, and
``resolve_index_path``, ``read_embedder_info``/``EmbedderInfo`` and the errors not even numpy.

Modules (each imports only those above it in this list):

* ``errors`` — the exceptions; ``layout`` — the index folder: file names, ``embedder.json`` (:class:`EmbedderInfo`),
  the write lock, :func:`resolve_index_path`; ``embedders`` — the :class:`Embedder` protocol and the registry;
* ``store`` — ``meta.sqlite`` (files, entries, info); ``prepare`` — reading, hashing, decoding, dating and
  cropping one file; ``video`` — videos: frames sampled at a set rate, near-identical frames collapsed, one frame
  read back at its time; ``vectors`` — the FAISS index (type, training, reconciling, saving); ``search`` — hits and
  filters; ``duplicates`` — exact and near duplicates;
* ``index`` — :class:`Index`, the facade composing them; ``ingest`` — :func:`index_folder`;
* ``cli`` — ``shusheng index`` / ``shusheng search``.

See ``docs/retrieval.md`` for the on-disk layout, crash safety, the index-selection rule and the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Embedder": "embedders",
    "OpenClipEmbedder": "embedders",
    "create_embedder": "embedders",
    "list_embedders": "embedders",
    "register_embedder": "embedders",
    "EmbedderMismatchError": "errors",
    "IndexLockedError": "errors",
    "IndexNotFoundError": "errors",
    "RetrievalIndexError": "errors",
    "DEFAULT_INDEX_DIRNAME": "layout",
    "EmbedderInfo": "layout",
    "read_embedder_info": "layout",
    "resolve_index_path": "layout",
    "DuplicateGroup": "duplicates",
    "SearchHit": "search",
    "choose_index_spec": "vectors",
    "VideoSampling": "video",
    "Index": "index",
    "IngestReport": "ingest",
    "index_folder": "ingest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"shusheng.retrieval_index.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'shusheng.retrieval_index' has no attribute {name!r}")
