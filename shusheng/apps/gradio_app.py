"""The Shusheng Gradio app: ``build_demo(index=None, embedder=None, ...) -> gr.Blocks``, one tab per module of
:mod:`shusheng.apps.tabs`:

* **Search** (:mod:`shusheng.apps.tabs.search`): image-text search over your folders;
* **Caption & VQA** (:mod:`shusheng.apps.tabs.caption_vqa`): the bundled unified decoder on one image.

A tab that cannot be built here (its weights are missing, an extra is not installed) is shown with the reason and
the command that fixes it, instead of vanishing. ``shusheng demo`` (:mod:`shusheng.apps.demo`) launches this app
over a generated SynthDrive collection::

    from shusheng.apps.gradio_app import build_demo
    demo = build_demo(index="~/Pictures", embedder="shusheng-mini-clip")
    demo.launch(server_name="127.0.0.1")

Gradio is imported lazily (``pip install 'shusheng[apps]'``) with its analytics switched off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shusheng.apps.tabs import AppContext, Tab, TabUnavailable, import_gradio, load_tabs, unavailable_tab

if TYPE_CHECKING:
    from shusheng.retrieval_index import Embedder, Index

logger = logging.getLogger(__name__)

__all__ = ["build_demo"]


def build_demo(index: Index | str | os.PathLike | None = None, embedder: Embedder | str | None = None, *,
               folder: str | os.PathLike | None = None, examples: Sequence[str] = (), k: int = 12,
               threshold: float = 0.0, title: str = "Shusheng", extra_tabs: bool = True,
               device: str | None = None, tabs: Sequence[Tab] | None = None):
    """Builds the app.

    Args:
        index: the index searched at start: an open ``Index``, an index folder, or a collection folder holding
            ``.shusheng-index``; ``None`` to start empty (the user indexes a folder in the app).
        embedder: an ``Embedder`` object, a registered name, or ``None`` for each index's recorded embedder.
        folder: the folder pre-filled in the folder box (default: the folder of ``index``).
        examples: example text queries shown under the query box.
        k, threshold: initial number of results and score threshold.
        title: the page title.
        extra_tabs: also add the tabs after Search (Caption & VQA); ``False``: the Search tab only.
        device: torch device for the models the tabs load.
        tabs: the tabs, in order (default :func:`shusheng.apps.tabs.load_tabs`; the first one is the main tab).

    Returns:
        The ``gr.Blocks``; ``demo.search_app`` is the Search tab's
        :class:`~shusheng.apps.tabs.search.SearchApp` (``None`` without that tab). Launch it with
        ``demo.launch(server_name="127.0.0.1")``. Event API names: ``/search``, ``/index_folder``.
    """
    gr = import_gradio()
    tabs = list(load_tabs() if tabs is None else tabs)
    if not extra_tabs:
        tabs = tabs[:1]
    ctx = AppContext(index=index, embedder=embedder, folder=folder, examples=examples, k=k, threshold=threshold,
                     device=device)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nImage-text search over your folders: index a folder, then search it by text, "
                    "by an example image, or both.")
        for tab in tabs:
            reason = tab.available()
            if reason is None:
                try:
                    tab.build(ctx)
                    continue
                except TabUnavailable as e:
                    reason = str(e)
            logger.info("%s tab not available: %s", tab.title, reason)
            unavailable_tab(gr, tab.title, reason)
    demo.search_app = ctx.search_app
    return demo
