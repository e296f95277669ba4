"""The Shusheng Gradio app: ``build_demo(index=None, embedder=None, ...) -> gr.Blocks``, one tab per module of
:mod:`shusheng.apps.tabs`:

* **Search** (:mod:`shusheng.apps.tabs.search`): image-text search over your folders;
* **Caption & VQA** (:mod:`shusheng.apps.tabs.caption_vqa`): the bundled unified decoder on one image;
* **Chat** (:mod:`shusheng.apps.tabs.chat`): streamed multi-turn chat about one image with a trained LLM bridge
  (the bundled ``shusheng-mini-bridge`` or ``shusheng demo --bridge DIR``; none is bundled yet, so by default the
  tab says how to train one);
* **Detect** (:mod:`shusheng.apps.tabs.detect`): boxes, instance masks and per-class counts of one image, with the
  semantic segmentation beside them when a segmenter is there (the bundled ``shusheng-mini-det`` /
  ``shusheng-mini-seg``, or ``shusheng demo --detector DIR --segmenter DIR``);
* **Generate** (:mod:`shusheng.apps.tabs.generate`): text to image with live progress, Stop, faithfulness checks
  and PNG downloads (the bundled ``shusheng-mini-t2i`` or ``shusheng demo --t2i DIR``; none is bundled yet).

A tab that cannot be built here (its weights are missing, an extra is not installed) is shown with the reason and
the command that fixes it, instead of vanishing. ``shusheng demo`` (:mod:`shusheng.apps.demo`) launches this app
over a generated SynthDrive collection::

    from shusheng.apps.gradio_app import build_demo, launch_demo
    demo = build_demo(index="~/Pictures", embedder="shusheng-mini-clip")
    launch_demo(demo)                       # 127.0.0.1; a host beyond loopback needs auth=[(user, password)]

The app indexes and searches only the folder of ``index`` and ``allow_dirs``; uploads are decoded by the app's
one image loader within size and pixel limits; :func:`launch_demo` serves it with a bounded queue
(:mod:`shusheng.apps.safety`).

Gradio is imported lazily (``pip install 'shusheng[apps]'``) with its analytics switched off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shusheng.apps.safety import AppLimits, FolderPolicy, check_exposure
from shusheng.apps.tabs import AppContext, Tab, TabUnavailable, import_gradio, load_tabs, unavailable_tab

if TYPE_CHECKING:
    from shusheng.retrieval_index import Embedder, Index

logger = logging.getLogger(__name__)

__all__ = ["build_demo", "launch_demo"]


def build_demo(index: Index | str | os.PathLike | None = None, embedder: Embedder | str | None = None, *,
               folder: str | os.PathLike | None = None, examples: Sequence[str] = (), k: int = 12,
               threshold: float = 0.0, title: str = "Shusheng", extra_tabs: bool = True,
               device: str | None = None, tabs: Sequence[Tab] | None = None,
               allow_dirs: Sequence[str | os.PathLike] = (), index_root: str | os.PathLike | None = None,
               policy: FolderPolicy | None = None, limits: AppLimits | None = None):
    """Builds the app.

    Args:
        index: the index searched at start: an open ``Index``, an index folder, or a collection folder holding
            ``.shusheng-index``; ``None`` to start empty (the user indexes a folder in the app).
        embedder: an ``Embedder`` object, a registered name, or ``None`` for each index's recorded embedder.
        folder: the folder pre-filled in the folder box (default: the folder of ``index``).
        examples: example text queries shown under the query box.
        k, threshold: initial number of results and score threshold.
        title: the page title.
        extra_tabs: also add the tabs after Search (Caption & VQA, Chat, Detect, Generate); ``False``: the Search
            tab only.
        device: torch device for the models the tabs load.
        tabs: the tabs, in order (default :func:`shusheng.apps.tabs.load_tabs`; the first one is the main tab).
        allow_dirs: folders the app may index and search besides the folder of ``index`` (nothing else is;
            ``..`` and symbolic links that lead out are refused).
        index_root: where indexes of folders the app does not own go (default ``$SHUSHENG_CACHE_DIR/indexes``).
        policy: a :class:`~shusheng.apps.safety.FolderPolicy` instead of ``allow_dirs``/``index_root``.
        limits: upload, time and concurrency limits (:class:`~shusheng.apps.safety.AppLimits`); pass the same
            object to :func:`launch_demo`.

    Returns:
        The ``gr.Blocks``; ``demo.search_app`` is the Search tab's
        :class:`~shusheng.apps.tabs.search.SearchApp` (``None`` without that tab) and ``demo.limits`` the
        limits. Serve it with :func:`launch_demo`. Event API names: ``/search``, ``/index_folder``, ``/caption``,
        ``/ask`` (``/checklist`` with a dense head), ``/chat``, ``/stop_chat`` when the Chat tab has a bridge,
        ``/detect`` when the Detect tab has a detector, and
        ``/generate``, ``/stop_generate`` when the Generate tab has a model.
    """
    gr = import_gradio()
    tabs = list(load_tabs() if tabs is None else tabs)
    if not extra_tabs:
        tabs = tabs[:1]
    limits = limits or AppLimits()
    ctx = AppContext(index=index, embedder=embedder, folder=folder, examples=examples, k=k, threshold=threshold,
                     device=device, policy=policy, allow_dirs=allow_dirs, index_root=index_root, limits=limits)

    # files the components put in Gradio's cache (rendered results) are deleted an hour after they were made
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
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
    demo.limits = limits
    return demo


def launch_demo(demo, *, host: str = "127.0.0.1", port: int | None = None,
                auth: Sequence[tuple[str, str]] | None = None, insecure_no_auth: bool = False,
                limits: AppLimits | None = None, inbrowser: bool = False, quiet: bool = True) -> str:
    """Serves ``demo`` without blocking, with the app's safety settings; returns its local URL.

    Beyond loopback a password is required (:func:`~shusheng.apps.safety.check_exposure`). The queue runs at
    most ``limits.concurrency`` requests at once and holds at most ``limits.queue_size``; uploads above
    ``limits.max_upload_bytes`` are refused by Gradio itself; no public share link, no error details, no
    monitoring page, no MCP server.

    Args:
        demo: the app (:func:`build_demo`).
        host, port: where to serve (default ``127.0.0.1``, Gradio's free port from 7860).
        auth: ``[(user, password), ...]``: the login page asks for one of them.
        insecure_no_auth: allow a non-loopback ``host`` without ``auth`` (a warning is logged).
        limits: default ``demo.limits`` (the limits it was built with).
        inbrowser: open a browser tab.
        quiet: no Gradio start-up banner.

    Raises:
        InsecureLaunchError: a non-loopback ``host`` without ``auth`` or ``insecure_no_auth``.
        OSError: the port cannot be bound.
    """
    check_exposure(host, auth, insecure_no_auth)
    limits = limits or getattr(demo, "limits", None) or AppLimits()
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    demo.launch(server_name=host, server_port=port, auth=list(auth) if auth else None,
                auth_message="Shusheng: sign in with the account the operator gave you." if auth else None,
                max_file_size=limits.max_upload_bytes, inbrowser=inbrowser, prevent_thread_lock=True, quiet=quiet,
                share=False, show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False)
    return demo.local_url
