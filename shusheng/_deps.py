"""Optional-dependency helper: import an extra where it is used, or fail with the pip command to fix it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming the ``shusheng[extra]`` install that provides it.

    Args:
        module: dotted module name, e.g. ``"faiss"``.
        extra: the optional-dependency group in ``pyproject.toml`` that provides it.
        package: the PyPI name when it differs from the module name (only used in the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = package or module.split(".")[0]
        raise ImportError(
            f"{module!r} is required for this feature but could not be imported ({e}). "
            f"Install it with: pip install 'shusheng[{extra}]'  (or: pip install {name})"
        ) from e
