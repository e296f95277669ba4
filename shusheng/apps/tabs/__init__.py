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

import base64
import binascii
import concurrent.futures
import contextlib
import contextvars
import importlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from shusheng._deps import require
from shusheng.apps.safety import AppLimits, FolderPolicy, UserInputError

if TYPE_CHECKING:
    from shusheng.retrieval_index import Embedder, Index

logger = logging.getLogger(__name__)

__all__ = ["TAB_MODULES", "AppContext", "AppLimits", "FolderPolicy", "SessionStops", "Tab", "TabUnavailable",
           "UserInputError", "image_input", "import_gradio", "load_tabs", "session_key", "shown_to_user",
           "trained_model_reason", "unavailable_tab", "upload_error"]

#: The app's tabs, in order; each module has a ``TAB``. The first one (Search) is the app's main tab.
TAB_MODULES: tuple[str, ...] = ("shusheng.apps.tabs.search", "shusheng.apps.tabs.caption_vqa",
                               "shusheng.apps.tabs.chat", "shusheng.apps.tabs.detect", "shusheng.apps.tabs.generate")


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
        policy: the folders the app may index and search, and where indexes go (``None``: the folder of
            ``index``/``folder`` and ``allow_dirs``, indexes of other folders under ``index_root``).
        allow_dirs: more folders the app may index and search (when ``policy`` is ``None``).
        index_root: where indexes of folders the app does not own go (when ``policy`` is ``None``; default
            ``$SHUSHENG_CACHE_DIR/indexes``).
        limits: upload sizes, time limits and concurrency (:class:`~shusheng.apps.safety.AppLimits`).
        search_app: set by the Search tab: its :class:`~shusheng.apps.tabs.search.SearchApp`.
    """

    index: Index | str | os.PathLike | None = None
    embedder: Embedder | str | None = None
    folder: str | os.PathLike | None = None
    examples: Sequence[str] = ()
    k: int = 12
    threshold: float = 0.0
    device: str | None = None
    policy: FolderPolicy | None = None
    allow_dirs: Sequence[str | os.PathLike] = ()
    index_root: str | os.PathLike | None = None
    limits: AppLimits = field(default_factory=AppLimits)
    search_app: Any = None
    _pool: concurrent.futures.ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def run(self, gr, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for one request: in the app's pool of ``limits.concurrency`` workers, given up after
        ``limits.request_timeout`` seconds, with errors turned into one ``gr.Error`` line (:func:`shown_to_user`).
        A request that fails or times out leaves the others alone."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.limits.concurrency,
                                                               thread_name_prefix="shusheng-request")
        with shown_to_user(gr, action):
            future = self._pool.submit(contextvars.copy_context().run, fn, *args)
            try:
                return future.result(timeout=self.limits.request_timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()  # not started yet: never runs; running: its result is dropped
                logger.warning("%s gave up after %g s", action, self.limits.request_timeout)
                raise UserInputError(f"{action} took longer than {self.limits.request_timeout:g} s and was given up; "
                                     "the server is busy or the input too large. Try again.") from None


@runtime_checkable
class Tab(Protocol):
    """One tab of the app (see the module docstring)."""

    title: str

    def available(self) -> str | None: ...

    def build(self, ctx: AppContext) -> None: ...


class TabUnavailable(Exception):
    """Raised by ``Tab.build`` (before it makes any component) when the tab cannot be built; the message is the
    reason shown in its place."""


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


def upload_error(image: Any, limits: AppLimits, what: str = "the image") -> tuple[Any, str | None]:
    """``(decoded image, None)`` for an uploaded file path (:func:`~shusheng.apps.safety.load_upload`: size and
    pixel limits before decoding), ``(None, message)`` when it cannot be used; anything that is not a path (a
    PIL image from a sample, ``None``) passes through as it is."""
    from shusheng.apps.safety import load_upload

    if not isinstance(image, (str, os.PathLike)):
        return image, None
    try:
        return load_upload(image, limits, what), None
    except UserInputError as e:
        return None, str(e)


def _path_only_preprocess(gr, component):
    """``component.preprocess`` for an image input: the uploaded file's path, never decoded here (Gradio's own
    preprocessing opens every upload with Pillow, which raises on bombs and non-images before the app can answer);
    a ``data:`` URL is written to a file first, within the upload size limit."""

    def preprocess(payload):
        if payload is None:
            return None
        if payload.path is not None:
            return str(payload.path)
        url = payload.url or ""
        if not url.startswith("data:") or "," not in url:
            raise gr.Error("No image file was received; upload one.", print_exception=False)
        encoded = url.partition(",")[2]
        if len(encoded) * 3 // 4 > component.max_upload_bytes:
            raise gr.Error(f"The image is larger than the upload limit of {component.max_upload_bytes / 2**20:.0f} "
                           "MB.", print_exception=False)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise gr.Error("The image data is not valid base64.", print_exception=False) from None
        fd, path = tempfile.mkstemp(suffix=".upload", dir=component.GRADIO_CACHE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        component.temp_files.add(path)
        return path

    return preprocess


def _no_url_fetch(gr, component):
    """``component.async_move_resource_to_block_cache`` that refuses ``http(s)://`` inputs instead of downloading
    them."""
    move = component.async_move_resource_to_block_cache

    async def async_move_resource_to_block_cache(url_or_file_path):
        if isinstance(url_or_file_path, str) and url_or_file_path.lower().startswith(("http://", "https://")):
            raise gr.Error("Upload the image from your computer; this app does not fetch URLs.",
                           print_exception=False)
        return await move(url_or_file_path)

    return async_move_resource_to_block_cache


def image_input(gr, limits: AppLimits | None = None, **kwargs):
    """An image input (``gr.Image`` in the page) whose events receive the uploaded file's path, undecoded; decode
    it with :func:`upload_error` (or :func:`shusheng.apps.safety.load_upload`). Every tab's image inputs are
    made here."""
    limits = limits or AppLimits()
    component = gr.Image(type="filepath", **kwargs)
    # on the instance, not in a subclass: Gradio writes a .pyi stub next to the source of every component class
    component.max_upload_bytes = limits.max_upload_bytes
    component.preprocess = _path_only_preprocess(gr, component)
    component.async_move_resource_to_block_cache = _no_url_fetch(gr, component)
    return component


class SessionStops:
    """The stop events of the requests in progress, per browser session (a Stop ends only its own session's)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[Any, set[threading.Event]] = {}

    def start(self, key: Any) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._events.setdefault(key, set()).add(ev)
        return ev

    def end(self, key: Any, ev: threading.Event) -> None:
        with self._lock:
            events = self._events.get(key, set())
            events.discard(ev)
            if not events:
                self._events.pop(key, None)

    def stop(self, key: Any) -> int:
        with self._lock:
            events = list(self._events.get(key, ()))
        for ev in events:
            ev.set()
        return len(events)


def session_key(request: Any) -> Any:
    """The browser session of a Gradio request (None outside one): what Stop buttons and per-visitor state key on."""
    return getattr(request, "session_hash", None)


def trained_model_reason(given: str | None, *, index_file: str, bundled: str, modules: Sequence[str], needs: str,
                         folder_kind: str, train_command: str, flag: str, missing: str) -> str | None:
    """Why a tab over a trained model cannot be built, or None: ``needs`` when one of ``modules`` is not
    installed; for a folder ``given`` by the app's operator, when it lacks ``index_file`` (it is not
    ``folder_kind``); otherwise ``missing`` when the bundled model ``bundled`` is not there. Cheap: loads nothing."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in modules):
        return needs
    if given is not None:
        if not (Path(given).expanduser() / index_file).is_file():
            return (f"`{given}` is not {folder_kind} (it has no {index_file}). Train one with `{train_command}` and "
                    f"pass `{flag}`.")
        return None
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        bundled_path(bundled)
    except BundledWeightsNotFound:
        return missing
    return None
