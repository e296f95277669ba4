"""``shusheng search``: query an index by text and/or image (implemented in :mod:`shusheng.retrieval_index.cli`)."""

from __future__ import annotations

from shusheng.retrieval_index.cli import add_search_arguments as add_arguments
from shusheng.retrieval_index.cli import run_search as run

__all__ = ["add_arguments", "run"]
