"""The **Search** tab: image-text search over your folders, on :mod:`shusheng.retrieval_index`.

* a folder box and an *Index folder* button: indexes the folder incrementally (only new or changed files are
  embedded), with a progress bar and a report of what was added, updated, removed and skipped (with the reason
  of every skipped file). Only folders below the app's allowed folders are accepted (``..`` and symbolic links
  that lead out are refused before anything is read or written); the index goes where the app's
  :class:`~shusheng.apps.safety.FolderPolicy` says (the user's cache for folders the app does not own). A run
  stops at the time limit, keeps what it indexed, and the next run continues;
* a text query, an image query (upload or paste; size and pixel limits are checked before it is decoded), or
  both (the query is then the normalised sum of the two),
  the number of results ``k``, a cosine-score threshold and an optional folder glob (``*/night/*``);
* a gallery of the hits, best first, captioned ``score 0.83 · path``; a region hit (a box inside an image that
  beat the whole image) is shown with its box drawn on the picture. A video hit is shown as its frame, read from
  the video at the hit's time when it is shown (only from videos inside the index's own collection and the app's
  allowed folders), captioned ``score 0.83 · path @ 12.0 s``, with region boxes drawn as on images.

Bad input (no query, an unreadable image or a decompression bomb, a folder outside the allowed ones, a missing
folder, an index built with another embedder, a locked index) is reported with ``gr.Error`` / ``gr.Warning``
messages, never a traceback; unexpected failures are logged with their traceback on the server and shown to the
user as one line. Event API names: ``/search``, ``/index_folder``.

The :class:`SearchApp` object behind the tab holds the app's embedders and open index readers; the tab puts it
in the app context (``ctx.search_app``) and ``build_demo`` hands it out as ``demo.search_app``; nothing is
global. The app is a local tool: the index chosen by *Index folder* becomes the current index of every browser
tab connected to it. Gradio is imported in :meth:`SearchTab.build` only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shusheng.apps.tabs import (
    AppContext,
    FolderPolicy,
    UserInputError,
    image_input,
    import_gradio,
    shown_to_user,
    upload_error,
)

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index import Embedder, Index, SearchHit

logger = logging.getLogger(__name__)

__all__ = ["TAB", "SearchApp", "SearchResult", "SearchTab", "render_hit"]

#: Gallery pictures are scaled so that their longer side is at least / at most this many pixels.
DISPLAY_MIN_SIDE = 256
DISPLAY_MAX_SIDE = 512
MAX_K = 100
MAX_QUERY_CHARS = 2000
#: How many skipped files the ingest report lists (all are counted).
REPORT_MAX_SKIPPED = 30
BOX_COLOR = (255, 200, 0)
BOX_OUTLINE = (0, 0, 0)


# ---------------------------------------------------------------------------------------------------- rendering
def _display_scale(width: int, height: int) -> float:
    longest = max(width, height)
    if longest > DISPLAY_MAX_SIDE:
        return DISPLAY_MAX_SIDE / longest
    if longest < DISPLAY_MIN_SIDE:
        return DISPLAY_MIN_SIDE / longest
    return 1.0


def render_hit(hit: SearchHit) -> Image.Image:
    """The picture of a hit for the gallery: loaded upright (a video hit: its frame at ``hit.time``), scaled for
    display, with the box of a region hit drawn on it.

    The caller checks that the file may be read (:meth:`SearchApp.search` does).

    Raises:
        shusheng.data.ImageLoadError: the image cannot be read any more (moved, deleted, damaged).
        shusheng.data.VideoLoadError: the same for a video, or it has no frame at that time.
        ImportError: a video hit without PyAV installed.
    """
    from PIL import Image, ImageDraw

    if hit.is_video:
        from shusheng.retrieval_index.video import read_frame

        img = read_frame(hit.path, hit.time)
    else:
        from shusheng.data import load_image

        img = load_image(hit.path)
    s = _display_scale(*img.size)
    if s != 1.0:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
    if hit.box is not None:
        # boxes are in pixels of the upright image as indexed; scale them to what is displayed
        sx = img.width / (hit.width or img.width)
        sy = img.height / (hit.height or img.height)
        x, y, w, h = hit.box
        x0, y0, x1, y1 = x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1
        line = max(2, round(min(img.size) / 120))
        draw = ImageDraw.Draw(img)
        draw.rectangle((x0 - line, y0 - line, x1 + line, y1 + line), outline=BOX_OUTLINE, width=line + 2)
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=line)
    return img


def _short_path(path: str, root: str | None) -> str:
    if root:
        with contextlib.suppress(ValueError):
            rel = os.path.relpath(path, root)
            if not rel.startswith(".."):
                return rel
    return path


def _caption(hit: SearchHit, root: str | None) -> str:
    text = f"score {hit.score:.2f} · {_short_path(hit.path, root)}"
    if hit.is_video:
        text += f" @ {hit.when}"
    if hit.box is not None:
        x, y, w, h = hit.box
        text += f" · region {w}×{h} at ({x}, {y})"
    return text


# ---------------------------------------------------------------------------------------------------- the backend
@dataclass
class SearchResult:
    """What one search returns to the UI.

    Attributes:
        items: ``(picture, caption)`` per hit, best first (the gallery value).
        hits: the :class:`~shusheng.retrieval_index.SearchHit` objects behind ``items``.
        status: one line of Markdown: how many results, for what, how fast.
        warnings: messages for ``gr.Warning`` (no result above the threshold, unreadable result files).
    """

    items: list[tuple[Image.Image, str]]
    hits: list[SearchHit]
    status: str
    warnings: list[str]


class SearchApp:
    """The state behind the Search tab: embedders (loaded once, shared) and index readers (reopened when the
    index changes).

    Args:
        index: the index to search at start: an open :class:`~shusheng.retrieval_index.Index` (still owned by the
            caller), an index folder, or a collection folder holding ``.shusheng-index``; ``None`` to start empty
            and let the user index a folder.
        embedder: an :class:`~shusheng.retrieval_index.Embedder` object, a registered name, or ``None``: the
            embedder recorded in each index (``shusheng-mini-clip`` for new ones), loaded on first use.
        folder: the collection folder shown in the folder box (default: the folder holding ``index``).
        device: torch device for embedders built by name.
        policy: the folders that may be indexed and searched, and where their indexes go (default: ``folder``
            (else the folders the index was built from) and ``allow_dirs``; indexes of folders the app does not
            own under ``index_root``).
        allow_dirs, index_root: for the default ``policy``.
    """

    def __init__(self, index: Index | str | os.PathLike | None = None, embedder: Embedder | str | None = None,
                 folder: str | os.PathLike | None = None, device: str | None = None,
                 policy: FolderPolicy | None = None, allow_dirs: Sequence[str | os.PathLike] = (),
                 index_root: str | os.PathLike | None = None):
        self.device = device
        self._lock = threading.RLock()
        self._query_lock = threading.Lock()  # tokenizers are not re-entrant: one query embedding at a time
        self._embedders: dict[tuple[str, str | None], Embedder] = {}  # (name, checkpoint) -> built by name
        self._readers: dict[str, tuple[Index, int]] = {}  # index path -> (reader, generation it was opened at)
        self._given = embedder if embedder is not None and not isinstance(embedder, str) else None
        self._embedder_name: str | None = embedder if isinstance(embedder, str) else getattr(embedder, "name", None)
        self.index_path: str | None = None
        self._callers_index = None  # an Index passed in stays the caller's to close
        if index is not None and not isinstance(index, (str, os.PathLike)):  # an open Index
            self._callers_index = index
            self.index_path = os.fspath(index.path)
            self._readers[self.index_path] = (index, index.generation)
        elif index is not None:
            from shusheng.retrieval_index import resolve_index_path

            self.index_path = os.fspath(resolve_index_path(index))
        if folder is not None:
            self.folder: str | None = os.fspath(Path(folder).expanduser().absolute())
        elif self.index_path is not None and Path(self.index_path).name == ".shusheng-index":
            self.folder = os.fspath(Path(self.index_path).parent)
        else:
            self.folder = None
        if policy is None:
            policy = FolderPolicy([*([self.folder] if self.folder else self._index_roots()), *allow_dirs],
                                  index_root)
        self.policy = policy

    def _index_roots(self) -> list[str]:
        """The folders the current index was built from (none without an index)."""
        if self.index_path is None:
            return []
        try:
            return list(self.reader().stats().get("roots", []))
        except UserInputError:
            return []

    # -- embedders and readers ---------------------------------------------------------------------------------
    def embedder_for(self, name: str | None = None, checkpoint: str | None = None) -> Embedder:
        """The embedder called ``name`` (default: the app's), built once and shared.

        Raises:
            UserInputError: the embedder cannot be built (missing bundled weights, unknown name, missing extra).
        """
        from shusheng.retrieval_index import create_embedder

        name = name or self._embedder_name or "shusheng-mini-clip"
        if self._given is not None and self._given.name == name:  # the caller's object serves every index of it
            return self._given
        with self._lock:
            key = (name, checkpoint)
            if key not in self._embedders:
                logger.info("loading embedder %s%s", name, f" from {checkpoint}" if checkpoint else "")
                try:
                    self._embedders[key] = create_embedder(name, checkpoint=checkpoint, device=self.device)
                except (FileNotFoundError, ValueError, ImportError) as e:
                    raise UserInputError(f"cannot load the embedder {name!r}: {e}") from e
            return self._embedders[key]

    def reader(self, index_path: str | None = None) -> Index:
        """An open reader of ``index_path`` (default the current index), reopened if the index changed on disk.

        Raises:
            UserInputError: no index chosen yet, or none at that path.
        """
        from shusheng.retrieval_index import Index, IndexNotFoundError

        path = index_path or self.index_path
        if path is None:
            raise UserInputError("No index yet: enter a folder of images and press “Index folder” first.")
        with self._lock:
            cached = self._readers.get(path)
            if cached is not None:
                reader, generation = cached
                if reader.generation == generation:
                    return reader
                logger.info("index %s changed (generation %d -> %d): reopening", path, generation,
                            reader.generation)
            try:
                reader = Index.open(path)
            except IndexNotFoundError as e:
                raise UserInputError(f"No index at {path}: index its folder first ({e}).") from e
            # a replaced reader is dropped, not closed: a search in another thread may still be using it
            self._readers[path] = (reader, reader.generation)
            return reader

    def _query_embedder(self, reader: Index) -> Embedder:
        info = reader.embedder_info
        return self.embedder_for(info.name, info.checkpoint)

    def describe(self, index_path: str | None = None) -> str:
        """One Markdown line about the index: path, images, entries, embedder."""
        path = index_path or self.index_path
        if path is None:
            return "No index yet: enter a folder of images and press **Index folder**."
        try:
            stats = self.reader(path).stats()
        except UserInputError as e:
            return str(e)
        regions = f" + {stats['region_entries']} regions" if stats["region_entries"] else ""
        videos = stats.get("videos", 0)
        files = (f"{stats['files'] - videos} images + {videos} videos ({stats['frame_entries']} frames)" if videos
                 else f"{stats['files']} images")
        return (f"Index `{stats['path']}`: {files}{regions}, embedder `{stats['embedder']}`, "
                f"{stats['index_type']}")

    # -- actions ----------------------------------------------------------------------------------------------
    def index_folder(self, folder: str | None, progress: Callable[..., Any] | None = None,
                     deadline: float | None = None) -> tuple[str, str]:
        """Indexes ``folder`` (incrementally) and makes it the current index. The folder must lie below the
        allowed folders of :attr:`policy` (checked before it is looked at); files below it that are symbolic
        links leading out are skipped. The index goes to ``policy.index_path_for(folder)``.

        Args:
            folder: the folder, an absolute path on the server.
            progress: Gradio progress callback.
            deadline: ``time.monotonic()`` value at which indexing stops (what was indexed is kept; the next run
                continues).

        Returns:
            ``(report_markdown, index_path)``.

        Raises:
            UserInputError: no folder, outside the allowed folders, not a folder, the index is locked, another
                embedder built the index.
        """
        from shusheng.retrieval_index import (
            EmbedderMismatchError,
            IndexLockedError,
            index_folder,
            read_embedder_info,
        )

        root = self.policy.check_folder(folder)
        index_path = self.policy.index_path_for(root)
        try:
            recorded = read_embedder_info(index_path, missing_ok=True)
        except ValueError as e:  # a damaged embedder.json
            raise UserInputError(f"{e}. Delete that index folder to rebuild it.") from e
        if recorded is not None and self._embedder_name is not None and recorded.name != self._embedder_name:
            raise UserInputError(
                f"{os.fspath(index_path)} was built with embedder {recorded.name!r}, but this app embeds with "
                f"{self._embedder_name!r}; vectors of different embedders cannot be mixed. Delete that index "
                f"folder to rebuild it, or start the app with embedder {recorded.name!r}.")
        name = recorded.name if recorded else self._embedder_name
        embedder = self.embedder_for(name, recorded.checkpoint if recorded else None)
        if progress is not None:
            progress(0.0, desc=f"indexing {root.name or root}")
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            report = index_folder(root, index_path, embedder=embedder, progress=True, within=self.policy.allowed,
                                  deadline=deadline)
        except (IndexLockedError, EmbedderMismatchError, PermissionError) as e:
            raise UserInputError(str(e)) from e
        with self._lock:
            self.index_path, self.folder = os.fspath(index_path), os.fspath(root)
        unfinished = [reason for path, reason in report.skipped if path == os.fspath(root)]
        skipped = [(path, reason) for path, reason in report.skipped if path != os.fspath(root)]
        lines = [f"**Indexed `{os.fspath(root)}`** in {report.seconds:.1f} s: **{report.added} added**, "
                 f"{report.updated} updated, {report.unchanged} unchanged, {report.removed} removed, "
                 f"{len(skipped)} skipped ({report.embedded} images and {report.regions} regions embedded, "
                 f"{report.reused} reused from identical files). Index: `{os.fspath(index_path)}`."]
        lines += [f"\n**Not finished:** {reason}" for reason in unfinished]
        if skipped:
            lines.append("")
            lines.append("Skipped:")
            for path, reason in skipped[:REPORT_MAX_SKIPPED]:
                lines.append(f"- `{_short_path(path, os.fspath(root))}`: {reason}")
            if len(skipped) > REPORT_MAX_SKIPPED:
                lines.append(f"- … and {len(skipped) - REPORT_MAX_SKIPPED} more")
        return "\n".join(lines), os.fspath(index_path)

    def search(self, text: str | None = None, image: str | os.PathLike | Image.Image | None = None, k: int = 12,
               threshold: float | None = 0.0, folder_glob: str | None = None,
               index_path: str | None = None) -> SearchResult:
        """Searches the current index (or ``index_path``) by text, image or both.

        Args:
            text: query text (blank = none).
            image: query image: a path (what ``gr.Image(type="filepath")`` gives) or a PIL image.
            k: number of results, 1..``MAX_K``.
            threshold: drop hits whose cosine score is below it (``-1..1``; ``None`` keeps all).
            folder_glob: keep only paths matching this ``fnmatch`` pattern (blank = all).
            index_path: the index to search (default the current one).

        Raises:
            UserInputError: no query, an unreadable query image, bad ``k``/threshold, no index.
        """
        from shusheng.apps.safety import within
        from shusheng.data import ImageLoadError, VideoLoadError

        text = (text or "").strip() or None
        if text is None and image is None:
            raise UserInputError("Type a text query or upload a query image (or both).")
        if text is not None and len(text) > MAX_QUERY_CHARS:
            raise UserInputError(f"The query text is too long ({len(text)} characters; at most {MAX_QUERY_CHARS}).")
        try:
            k = int(k)
        except (TypeError, ValueError) as e:
            raise UserInputError(f"The number of results must be a whole number, not {k!r}.") from e
        if not 1 <= k <= MAX_K:
            raise UserInputError(f"The number of results must be between 1 and {MAX_K}, not {k}.")
        if threshold is not None:
            try:
                threshold = float(threshold)
            except (TypeError, ValueError) as e:
                raise UserInputError(f"The score threshold must be a number, not {threshold!r}.") from e
            if not -1.0 <= threshold <= 1.0:
                raise UserInputError(f"The score threshold is a cosine between -1 and 1, not {threshold}.")
        folder_glob = (folder_glob or "").strip() or None

        reader = self.reader(index_path)
        embedder = self._query_embedder(reader)
        t0 = time.perf_counter()
        try:
            with self._query_lock:
                vector = reader.query_vector(text, image, embedder=embedder)
        except ImageLoadError as e:
            raise UserInputError(f"Cannot use the query image: {e.reason}.") from e
        hits = reader.search(vector=vector, k=k, threshold=threshold, folder_glob=folder_glob)
        ms = (time.perf_counter() - t0) * 1000

        root = self.folder if index_path is None or index_path == self.index_path else None
        items, warnings, unreadable, shown_hits = [], [], [], []
        collection = None  # the index's own folders: the only places video frames are read from
        for hit in hits:
            if not self.policy.contains(hit.path):
                unreadable.append(f"{hit.path} (outside the folders this app may show)")
                continue
            if hit.is_video:
                collection = reader.roots if collection is None else collection
                if not within(hit.path, collection):
                    unreadable.append(f"{hit.path} (outside the folders this index was built from)")
                    continue
            try:
                items.append((render_hit(hit), _caption(hit, root)))
                shown_hits.append(hit)
            except (ImageLoadError, VideoLoadError) as e:
                unreadable.append(f"{hit.path} ({e.reason})")
            except ImportError as e:  # a video hit without PyAV
                unreadable.append(f"{hit.path} ({e})")
        what = " + ".join(p for p in (f"“{text}”" if text else None, "the query image" if image is not None
                                       else None) if p)
        filters = []
        if threshold is not None:
            filters.append(f"score ≥ {threshold:.2f}")
        if folder_glob:
            filters.append(f"paths matching `{folder_glob}`")
        status = f"**{len(items)} result{'s' if len(items) != 1 else ''}** for {what}"
        status += (f" ({', '.join(filters)})" if filters else "") + f" in {ms:.0f} ms, over {reader.ntotal} entries."
        if not hits:
            hint = (f"Nothing scores above {threshold:.2f}: lower the score threshold"
                    if threshold is not None else "Nothing matched")
            warnings.append(hint + (" or widen the folder filter." if folder_glob else "."))
        if unreadable:
            warnings.append(f"{len(unreadable)} result file(s) could not be shown (moved or deleted since "
                            f"indexing?): {'; '.join(unreadable[:3])}")
        return SearchResult(items, shown_hits, status, warnings)

    def close(self) -> None:
        """Closes the index readers this app opened (not an :class:`Index` passed in by the caller)."""
        with self._lock:
            for reader, _ in self._readers.values():
                if reader is not self._callers_index:
                    reader.close()
            self._readers.clear()


# ---------------------------------------------------------------------------------------------------- the UI
class SearchTab:
    """The Search tab (always available: embedders load on first use and report their own problems)."""

    title = "Search"

    def available(self) -> str | None:
        return None

    def build(self, ctx: AppContext) -> None:
        """Adds the tab and its events (``/search``, ``/index_folder``) to the current ``gr.Blocks``; sets
        ``ctx.search_app``."""
        gr = import_gradio()
        app = SearchApp(ctx.index, ctx.embedder, folder=ctx.folder, device=ctx.device, policy=ctx.policy,
                        allow_dirs=ctx.allow_dirs, index_root=ctx.index_root)
        ctx.search_app = app
        limits = ctx.limits

        def do_index(folder, progress=gr.Progress(track_tqdm=True)):
            with shown_to_user(gr, "Indexing"):
                deadline = time.monotonic() + limits.index_timeout
                report, _ = app.index_folder(folder, progress=progress, deadline=deadline)
                return report, app.describe()

        def search(text, image, k, threshold, folder_glob):
            if isinstance(image, (str, os.PathLike)):  # an upload: limits checked before decoding
                image, error = upload_error(image, limits, "the query image")
                if error:
                    raise UserInputError(error)
            return app.search(text, image, k, threshold, folder_glob)

        def do_search(text, image, k, threshold, folder_glob):
            result = ctx.run(gr, "Search", search, text, image, k, threshold, folder_glob)
            for message in result.warnings:
                gr.Warning(message)
            return result.items, result.status

        with gr.Tab(self.title):
            with gr.Row():
                folder_box = gr.Textbox(value=app.folder or "", label="Folder of images and videos", scale=4,
                                        placeholder="/path/to/pictures", elem_id="folder")
                index_button = gr.Button("Index folder", scale=1, elem_id="index-button")
            index_info = gr.Markdown(app.describe(), label="Index", elem_id="index-info")
            report_box = gr.Markdown(label="Report", elem_id="index-report")
            with gr.Row():
                with gr.Column(scale=3):
                    text_box = gr.Textbox("", label="Text query", placeholder="a red car on a rainy night",
                                          elem_id="query-text")
                    if ctx.examples:
                        gr.Examples(examples=[[e] for e in ctx.examples], inputs=[text_box], label="Try")
                    with gr.Row():
                        k_slider = gr.Slider(1, MAX_K, value=ctx.k, step=1, label="Results (k)", elem_id="k")
                        threshold_slider = gr.Slider(-1.0, 1.0, value=ctx.threshold, step=0.01,
                                                     label="Score threshold (cosine)", elem_id="threshold")
                    glob_box = gr.Textbox("", label="Only paths matching (optional glob)", placeholder="*/night/*",
                                          elem_id="folder-glob")
                with gr.Column(scale=2):
                    image_box = image_input(gr, limits, label="Image query (optional)",
                                            sources=["upload", "clipboard"], height=220, elem_id="query-image")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            status = gr.Markdown(label="Status", elem_id="status")
            gallery = gr.Gallery(label="Results", columns=4, object_fit="contain", height="auto",
                                 elem_id="results-gallery")

        index_button.click(do_index, [folder_box], [report_box, index_info], api_name="index_folder",
                           concurrency_limit=1, concurrency_id="index")
        gr.on([search_button.click, text_box.submit], do_search,
              [text_box, image_box, k_slider, threshold_slider, glob_box], [gallery, status], api_name="search",
              concurrency_id="requests")


TAB = SearchTab()
