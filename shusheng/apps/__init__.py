"""The Gradio app: :func:`~shusheng.apps.gradio_app.build_demo` over the tabs of :mod:`shusheng.apps.tabs`, and
the ``shusheng demo`` command (:mod:`shusheng.apps.demo`). The command line itself is :mod:`shusheng.cli`.

Nothing here holds model logic; the tabs call the public APIs of the other subpackages. Importing this package
(or any module in it) imports neither Gradio nor torch: they load when the app is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_demo": "shusheng.apps.gradio_app",
    "launch_demo": "shusheng.apps.gradio_app",
    "SearchApp": "shusheng.apps.tabs.search",
    "AppLimits": "shusheng.apps.safety",
    "FolderPolicy": "shusheng.apps.safety",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shusheng.apps' has no attribute {name!r}")
