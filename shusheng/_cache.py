"""The one cache folder of shusheng: ``$SHUSHENG_CACHE_DIR``, else ``$XDG_CACHE_HOME/shusheng``, else
``~/.cache/shusheng``. The DCNv3 CPU kernel builds under ``torch_extensions/``, exports and runtime measurements
go under ``onnx/`` and ``runtimes.json``, the app keeps its demo collection and the indexes of folders it does not
own under ``demo/`` and ``indexes/``. Deleting it only costs rebuilding what was there."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "SHUSHENG_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "shusheng"
