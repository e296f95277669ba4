"""Config dataclasses built from a dataclass, a plain mapping (a parsed ``config.json``) and keyword overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_any(cls: type[T], config: T | Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """``cls(**fields)`` from ``config`` (an instance of ``cls`` or a mapping) updated with ``overrides``.

    Raises:
        TypeError: for a config of another type, or for names that are not fields of ``cls`` (listing the valid
            ones), so that a typo in a config file fails loudly instead of being ignored.
    """
    base: dict[str, Any] = {}
    if isinstance(config, cls):
        base = asdict(config)
    elif isinstance(config, Mapping):
        base = dict(config)
    elif config is not None:
        raise TypeError(f"config must be a {cls.__name__} or a mapping, got {type(config).__name__}")
    base.update(overrides)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(base) - names)
    if unknown:
        what = cls.__name__.removesuffix("Config")
        raise TypeError(f"unknown {what} argument(s) {unknown}; valid names: {sorted(names)}")
    return cls(**base)
