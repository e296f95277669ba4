"""The tabs of the Gradio app, one module each, behind the small :class:`Tab` protocol.

A tab is an object with

* ``title``: the label of its ``gr.Tab``;
* ``available() -> None | str``: ``None`` when it can be built, else the reason it cannot (missing weights and the
  command that makes them, a missing extra and its ``pip install``); cheap, it loads no model;
* ``build(ctx)``: adds its ``gr.Tab`` to the current ``gr.Blocks``, reading what it needs from the shared
  :class:`AppContext`. A problem found only while loading (weights that do not load) is raised as
  :class:`TabUnavailable` before any component is made.

:func:`shusheng.apps.gradio_app.build_demo` loops over :func:`load_tabs`; a tab that is not available becomes a
tab that says why, instead of vanishing. Add a tab by writing ``apps/tabs/<name>.py`` with a module-level
``TAB`` and listing it in :data:`TAB_MODULES`. Nothing here imports Gradio at import time (:func:`import_gradio`
does, inside ``build``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from shusheng._deps import require

if TYPE_CHECKING:
    from shusheng.retrieval_index import Embedder, Index

logger = logging.getLogger(__name__)

__all__ = ["TAB_MODULES", "AppContext", "Tab", "TabUnavailable", "UserInputError", "import_gradio", "load_tabs",
           "shown_to_user", "unavailable_tab"]

#: The app's tabs, in order; each module has a ``TAB``. The first one (Search) is the app's main tab.
TAB_MODULES: tuple[str, ...] = ("shusheng.apps.tabs.search", "shusheng.apps.tabs.caption_vqa")


@dataclass
class AppContext:
    """What the tabs share: the app's settings (from ``build_demo``) and the objects tabs expose to the app.

    Attributes:
        index: the index searched at start (an open ``Index``, an index folder or a collection folder), or ``None``.
        embedder: an ``Embedder`` object, a registered name, or ``None`` (each index's recorded embedder).
        folder: the collection folder pre-filled in the Search tab (default: the folder of ``index``).
        examples: example text queries for the Search tab.
        k: initial number of search results.
        threshold: initial cosine-score threshold.
        device: torch device for models the tabs load (``None``: CPU, or each loader's default).
        search_app: set by the Search tab: its :class:`~shusheng.apps.tabs.search.SearchApp`.
    """

    index: Index | str | os.PathLike | None = None
    embedder: Embedder | str | None = None
    folder: str | os.PathLike | None = None
    examples: Sequence[str] = ()
    k: int = 12
    threshold: float = 0.0
    device: str | None = None
    search_app: Any = None


@runtime_checkable
class Tab(Protocol):
    """One tab of the app (see the module docstring)."""

    title: str

    def available(self) -> str | None: ...

    def build(self, ctx: AppContext) -> None: ...


class TabUnavailable(Exception):
    """Raised by ``Tab.build`` (before it makes any component) when the tab cannot be built; the message is the
    reason shown in its place."""


class UserInputError(ValueError):
    """Bad input from the user; its message is shown in the app as it is."""


def import_gradio():
    """``import gradio`` with analytics off (nothing may leave the machine), or an ImportError naming
    ``pip install 'shusheng[apps]'``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    return require("gradio", extra="apps")


def load_tabs() -> list[Tab]:
    """The ``TAB`` of every module in :data:`TAB_MODULES`, in order."""
    return [importlib.import_module(name).TAB for name in TAB_MODULES]


def unavailable_tab(gr, title: str, reason: str):
    """A tab that only says why it is not available (inside the current ``gr.Blocks``)."""
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    with gr.Tab(title) as tab:
        gr.Markdown(f"**{title} is not available here.**\n\n{reason}", elem_id=f"{slug}-unavailable")
    return tab


@contextlib.contextmanager
def shown_to_user(gr, action: str) -> Iterator[None]:
    """Turns known errors into one-line ``gr.Error`` messages; anything else is logged with its traceback and
    shown as one line too."""
    try:
        yield
    except gr.Error:
        raise
    except UserInputError as e:
        raise gr.Error(str(e), title=action, print_exception=False) from e
    except Exception as e:  # the UI boundary: the server log keeps the traceback, the user gets one line
        logger.exception("%s failed", action)
        raise gr.Error(f"{action} failed: {type(e).__name__}: {e}", title=action, print_exception=False) from e
