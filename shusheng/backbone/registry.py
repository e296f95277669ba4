"""Backbone registry: ``@register_model`` records name → builder; ``create_model(name, ...)`` builds one.

Every registered builder is also made available to timm (``timm.create_model("internimage_t")``) when timm is
installed. timm is an optional extra and takes seconds to import, so it is never imported here: if it is
already imported the builders are registered with it at once, otherwise a one-shot import hook registers them
right after ``import timm`` finishes. ``register_timm_models()`` does it explicitly.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from shusheng.modeling import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = ["create_model", "is_model", "list_models", "model_entrypoint", "register_model",
           "register_timm_models", "resolve_data_config"]

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder ``fn(pretrained=False, **kwargs)`` under ``fn.__name__``.

    Registering a name twice warns and keeps the newer builder. The builder is also registered with timm when
    timm is (or later gets) imported.
    """
    name = fn.__name__
    if name in _model_entrypoints:
        warnings.warn(f"backbone {name!r} is already registered (by {_model_entrypoints[name].__module__}); "
                      f"overwriting it with {fn.__module__}.{name}", stacklevel=2)
    _model_entrypoints[name] = fn
    timm = sys.modules.get("timm")
    if timm is not None and hasattr(timm, "create_model"):  # timm fully imported
        _register_with_timm(fn)
    return fn


def list_models(filter: str = "") -> list[str]:
    """Sorted names of the registered backbones, optionally matching a wildcard ``filter`` (``"internimage_*"``)."""
    names = sorted(_model_entrypoints)
    return [n for n in names if fnmatch.fnmatchcase(n, filter)] if filter else names


def is_model(name: str) -> bool:
    """Whether ``name`` (with or without a ``.tag``) is a registered backbone."""
    return name.split(".", 1)[0] in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (a ``.tag`` suffix is ignored)."""
    arch = name.split(".", 1)[0]
    if arch not in _model_entrypoints:
        close = difflib.get_close_matches(arch, list(_model_entrypoints), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint} Registered: {list_models()}")
    return _model_entrypoints[arch]


def create_model(model_name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered backbone.

    Args:
        model_name: ``"internimage_t"`` or ``"internimage_t.<tag>"`` (a tag selects the pretrained config).
        pretrained: load the pretrained weights named by the config. Nothing is downloaded: name the local file
            with ``pretrained_cfg_overlay=dict(file=...)`` or ``checkpoint_path=...``.
        **overrides: constructor arguments (``num_classes=10``, ``drop_path_rate=0.2``, ``backend="reference"``)
            and loader options (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``checkpoint_path``,
            ``pretrained_strict``). Unlike ``timm.create_model``, ``None`` values are passed on (``layer_scale=None``).

    Returns:
        The model, with ``model.pretrained_cfg`` describing its weights and preprocessing.
    """
    fn = model_entrypoint(model_name)
    _, _, tag = model_name.partition(".")
    if tag:
        overrides.setdefault("pretrained_cfg", tag)
    return fn(pretrained=pretrained, **overrides)


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """Preprocessing of a model's weights (timm ``resolve_data_config`` keys), from ``model.pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return dict(
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center"),
    )


# --------------------------------------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------------------------------------

def _register_with_timm(fn: Callable[..., nn.Module]) -> None:
    from timm.models import is_model as timm_is_model
    from timm.models import model_entrypoint as timm_entrypoint
    from timm.models import register_model as timm_register

    _register_fx_leaves()
    name = fn.__name__
    if timm_is_model(name) and timm_entrypoint(name) is fn:
        return
    timm_register(fn)


def _register_fx_leaves() -> None:
    """Make the DCNv3 module a leaf of timm's torch.fx tracing (its input checks and the kernel dispatch are
    Python control flow), so ``create_feature_extractor`` and timm's FX tooling trace InternImage."""
    from timm.layers import register_notrace_module

    from shusheng.ops import DCNv3

    register_notrace_module(DCNv3)


def register_timm_models() -> list[str]:
    """Register every backbone with timm now (imports timm; raises ImportError naming the extra if missing)."""
    from shusheng._deps import require

    require("timm", extra="backbone")
    for fn in list(_model_entrypoints.values()):
        _register_with_timm(fn)
    return list_models()


def _on_timm_imported() -> None:
    try:
        for fn in list(_model_entrypoints.values()):
            _register_with_timm(fn)
    except (ImportError, AttributeError) as e:  # an incompatible timm must not break `import timm`
        logger.warning("could not register shusheng backbones with timm: %s", e)
    else:
        logger.debug("registered %d shusheng backbones with timm", len(_model_entrypoints))


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the normal finders locate ``timm`` and registers our builders once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _on_timm_imported()

        loader.exec_module = exec_and_register
        return spec


def _install_timm_hook() -> None:
    if "timm" in sys.modules:
        return  # already imported (or blocked): register_model registers directly
    try:
        found = importlib.util.find_spec("timm") is not None
    except (ImportError, ValueError):
        found = False
    if found and not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


_install_timm_hook()
