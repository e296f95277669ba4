"""The index's own errors (stdlib only: importing them pulls in neither numpy, torch nor FAISS)."""

from __future__ import annotations

__all__ = ["EmbedderMismatchError", "IndexLockedError", "IndexNotFoundError", "RetrievalIndexError"]


class RetrievalIndexError(RuntimeError):
    """Base class of the index's own errors."""


class IndexNotFoundError(RetrievalIndexError, FileNotFoundError):
    """No index at the given path."""


class IndexLockedError(RetrievalIndexError):
    """Another process holds the index's write lock."""


class EmbedderMismatchError(RetrievalIndexError, ValueError):
    """Vectors or queries from an embedder other than the one the index was built with."""
