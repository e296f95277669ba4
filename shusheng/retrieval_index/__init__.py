"""Image-text search over image collections: embedders, the index store (FAISS + SQLite) and folder ingest.

Quick start::

    from shusheng.retrieval_index import Index, index_folder

    report = index_folder("~/Pictures")                 # incremental: only new or changed files are embedded
    print(report.summary())
    with Index.open("~/Pictures/.shusheng-index") as index:
        for hit in index.search(text="a red car at night", k=5, threshold=0.2):
            print(f"{hit.score:.3f} {hit.path} {hit.box}")

Everything here imports lazily: ``import shusheng.retrieval_index`` pulls in neither torch nor FAISS.
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
    "DuplicateGroup": "index",
    "EmbedderMismatchError": "index",
    "Index": "index",
    "IndexLockedError": "index",
    "IndexNotFoundError": "index",
    "RetrievalIndexError": "index",
    "SearchHit": "index",
    "choose_index_spec": "index",
    "IngestReport": "ingest",
    "index_folder": "ingest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"shusheng.retrieval_index.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'shusheng.retrieval_index' has no attribute {name!r}")
