"""The index store: FAISS vectors + SQLite metadata in one folder, safe against crashes and concurrent writers.

:class:`Index` is the facade over the parts of an index folder (layout in :mod:`shusheng.retrieval_index.layout`):

* :class:`~shusheng.retrieval_index.store.MetaStore` — ``meta.sqlite``: files, entries (one per whole image, kept
  video frame or region box, with its float32 vector), info (generation, last commit, folders, video sampling);
* :class:`~shusheng.retrieval_index.vectors.VectorIndex` — ``vectors.faiss`` + ``commit.json``: the FAISS index
  over every entry (ids = entry ids), its type, training, reconciling and saving;
* :class:`~shusheng.retrieval_index.layout.EmbedderInfo` — ``embedder.json``: the embedder that built it;
* ``lock`` — flock'ed by the one writer; holds its PID.

Consistency rules:

* SQLite (WAL mode) is the source of truth. Every change happens in a transaction; :meth:`Index.commit` commits
  it, bumps ``generation`` and only then touches the FAISS file: written to a temporary name, fsync'ed,
  ``os.replace``'d over ``vectors.faiss``, followed by ``commit.json``.
* A reader trusts ``vectors.faiss`` when ``commit.json`` names SQLite's current generation and the entry count
  matches. Otherwise (an interrupted commit, a ``kill -9`` mid-ingest, a writer still running) it reconciles the
  FAISS index in memory with SQLite: ids FAISS lacks are added from the stored vectors and ids SQLite no longer
  has are removed. So the last committed state is always what a reader sees, whatever instant a writer died.
* One writer at a time: :meth:`Index.open` with ``write=True`` takes an exclusive ``fcntl.flock`` on ``lock``
  (released by the kernel if the process dies); a second writer gets :class:`IndexLockedError` naming the PID.
  Readers take no lock.

Index type: see :func:`~shusheng.retrieval_index.vectors.choose_index_spec`. Search scores are always exact
cosines, recomputed from the stored float32 vectors of the candidates FAISS returns.

Indexes bigger than RAM (:meth:`Index.set_on_disk`, ``shusheng index --on-disk``): the IVF lists live in
``vectors.<generation>.<token>.ivfdata``, memory-mapped read-only by searches. A commit writes a new ivfdata file
before it replaces ``vectors.faiss`` and removes the old file only after, so the rules above hold unchanged; see
:mod:`shusheng.retrieval_index.vectors`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng.retrieval_index.duplicates import DuplicateGroup, find_duplicates
from shusheng.retrieval_index.errors import (
    EmbedderMismatchError,
    IndexLockedError,
    IndexNotFoundError,
    RetrievalIndexError,
)
from shusheng.retrieval_index.layout import (
    COMMIT_FILE,
    DEFAULT_INDEX_DIRNAME,
    EMBEDDER_FILE,
    FORMAT_VERSION,
    LOCK_FILE,
    META_FILE,
    VECTORS_FILE,
    EmbedderInfo,
    acquire_lock,
    index_exists,
    read_embedder_info,
    write_embedder_info,
)
from shusheng.retrieval_index.prepare import prepare_file
from shusheng.retrieval_index.search import DateLike, SearchHit, parse_date, rank_entries
from shusheng.retrieval_index.store import Box, FileRecord, FrameSpan, MetaStore, normalise
from shusheng.retrieval_index.vectors import (
    FLAT_MAX_ENTRIES,
    ON_DISK_KEY,
    RETRAIN_FACTOR,
    TRAIN_PER_LIST,
    IndexSpec,
    VectorIndex,
    choose_index_spec,
    on_disk_requested,
)
from shusheng.retrieval_index.video import VideoSampling, is_video

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index.embedders import Embedder

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INDEX_DIRNAME", "FLAT_MAX_ENTRIES", "DuplicateGroup", "EmbedderInfo", "EmbedderMismatchError",
    "FileRecord", "Index", "IndexLockedError", "IndexNotFoundError", "IndexSpec", "RetrievalIndexError",
    "SearchHit", "choose_index_spec",
    # defined in layout / vectors; still importable from here, where they lived before (bench/, older callers)
    "COMMIT_FILE", "EMBEDDER_FILE", "FORMAT_VERSION", "LOCK_FILE", "META_FILE", "RETRAIN_FACTOR", "TRAIN_PER_LIST",
    "VECTORS_FILE",
]


class Index:
    """An image/region vector index in a folder. Open it with :meth:`open`; use it as a context manager.

    Read-only use (no lock)::

        with Index.open("photos/.shusheng-index") as index:
            hits = index.search(text="a dog on a beach", k=10, threshold=0.25)

    Writing (one writer at a time; changes become visible at :meth:`commit`)::

        with Index.open(path, write=True, create=True, embedder=emb) as index:
            index.add("photos/a.jpg")
            index.remove("photos/b.jpg")
            index.commit()

    Folders are best indexed with :func:`shusheng.retrieval_index.index_folder`, which only embeds new or
    changed files.
    """

    def __init__(self, path: Path, store: MetaStore, writable: bool, lock_fd: int | None,
                 embedder_info: EmbedderInfo):
        self.path = path
        self.writable = writable
        self._store = store
        self._lock_fd = lock_fd
        self._embedder_info = embedder_info
        self._embedder: Embedder | None = None
        self._mutex = threading.RLock()
        self._vectors = VectorIndex.load(path, store)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, write: bool = False, create: bool = False,
             embedder: Embedder | None = None, embedder_name: str | None = None, dim: int | None = None,
             checkpoint: str | os.PathLike | None = None) -> Index:
        """Opens (or with ``create=True`` creates) the index folder ``path``.

        Args:
            path: the index folder.
            write: take the write lock (exclusive; fails at once if another process holds it).
            create: create the index if missing (implies ``write``); needs the embedder's name and dim.
            embedder: the embedder whose vectors will be added; its ``name``/``dim`` are recorded at creation
                and checked against an existing index. Also used for queries.
            embedder_name, dim: the same check without an embedder object.
            checkpoint: the embedder's local weights, recorded at creation so that searches can rebuild it.

        Raises:
            IndexNotFoundError: no index at ``path`` and ``create`` is false.
            IndexLockedError: ``write`` and another process is writing the index.
            EmbedderMismatchError: the index was built with another embedder or dimension.
        """
        path = Path(path).expanduser().absolute()
        write = write or create
        name = embedder.name if embedder is not None else embedder_name
        dim = int(embedder.dim) if embedder is not None else dim
        if not index_exists(path) and not create:
            raise IndexNotFoundError(f"no index at {os.fspath(path)!r} (build one with: shusheng index FOLDER "
                                     "[--index PATH])")
        lock_fd = None
        if write:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = acquire_lock(path)
        try:
            if not index_exists(path):
                # create: the schema first and embedder.json last, so readers never see a half-made index
                if name is None or dim is None:
                    raise ValueError("creating an index needs the embedder (or embedder_name and dim)")
                MetaStore.create(path / META_FILE)
                write_embedder_info(path, EmbedderInfo(
                    name=name, dim=dim, checkpoint=os.fspath(checkpoint) if checkpoint else None,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S")))
            info = read_embedder_info(path)
            if not info.accepts(name, dim):
                raise EmbedderMismatchError(
                    f"index {os.fspath(path)!r} was built with embedder {info.name!r} (dim {info.dim}), "
                    f"not {name!r} (dim {dim}); vectors of different embedders cannot be mixed. Use "
                    f"--embedder {info.name} for this index, or a new --index path for {name!r}."
                )
            store = None
            try:
                store = MetaStore.open(path / META_FILE, info.dim, write)
                index = cls(path, store, write, lock_fd, info)
            except sqlite3.DatabaseError as e:
                if store is not None:
                    store.close()
                raise RetrievalIndexError(f"cannot read the index metadata {os.fspath(path / META_FILE)!r} ({e}); "
                                          "is the index still being created, or is the file damaged?") from e
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if embedder is not None:
            index._embedder = embedder
        return index

    def close(self) -> None:
        """Rolls back uncommitted changes, closes the database and releases the write lock."""
        with self._mutex:
            if self._store is None:
                return
            if self._store.in_txn:
                logger.warning("closing %s with uncommitted changes: rolled back", self.path)
                self.rollback()
            self._store.close()
            self._store = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Index({os.fspath(self.path)!r}, embedder={self.embedder_name!r}, entries={self.ntotal}, "
                f"{'writable' if self.writable else 'read-only'})")

    # ------------------------------------------------------------------ properties
    @property
    def embedder_info(self) -> EmbedderInfo:
        """The embedder record of this index (``embedder.json``): name, dim, checkpoint, format, created.
        :func:`~shusheng.retrieval_index.read_embedder_info` reads it without opening the index."""
        return self._embedder_info

    @property
    def embedder_name(self) -> str:
        return self._embedder_info.name

    @property
    def dim(self) -> int:
        return self._embedder_info.dim

    @property
    def ntotal(self) -> int:
        """Number of committed entries (whole images + regions) in the vector index."""
        return self._vectors.ntotal

    @property
    def generation(self) -> int:
        return self._store.generation

    @property
    def spec(self) -> IndexSpec:
        return self._vectors.spec

    @property
    def embedder(self) -> Embedder:
        """The embedder for queries: the one given at :meth:`open`, else rebuilt from ``embedder.json``."""
        if self._embedder is None:
            from shusheng.retrieval_index.embedders import create_embedder

            self._embedder = create_embedder(self.embedder_name, checkpoint=self._embedder_info.checkpoint)
            self._check_embedder(self._embedder)
        return self._embedder

    def _check_embedder(self, embedder: Embedder) -> None:
        if embedder.name != self.embedder_name or int(embedder.dim) != self.dim:
            raise EmbedderMismatchError(
                f"index {os.fspath(self.path)!r} holds {self.embedder_name!r} vectors (dim {self.dim}); "
                f"embedder {embedder.name!r} (dim {embedder.dim}) cannot query or extend it")

    # ------------------------------------------------------------------ records
    def _require_writable(self) -> MetaStore:
        if not self.writable:
            raise RetrievalIndexError(f"index {os.fspath(self.path)!r} was opened read-only; "
                                      "use Index.open(path, write=True)")
        self._store.begin_write()
        return self._store

    def file_record(self, path: str | os.PathLike) -> FileRecord | None:
        """The stored metadata of ``path`` (absolute or relative to the current directory), or ``None``."""
        return self._store.file_record(path)

    def files_with_hash(self, digest: str) -> list[FileRecord]:
        return self._store.files_with_hash(digest)

    def paths_under(self, folder: str | os.PathLike) -> list[str]:
        """Indexed paths inside ``folder`` (recursively)."""
        return self._store.paths_under(folder)

    def boxes_of(self, file_id: int, source: str) -> list[Box]:
        return self._store.boxes_of(file_id, source)

    def frame_spans(self, file_id: int) -> list[FrameSpan]:
        """``(frame index, time, time_end)`` of each kept frame of an indexed video, in time order."""
        return self._store.frame_spans(file_id)

    @property
    def roots(self) -> list[str]:
        """The folders (and files given directly) this index was built from, absolute."""
        with self._mutex:
            return self._store.roots()

    @property
    def video_sampling(self) -> VideoSampling | None:
        """How videos were last sampled into this index (``None``: never)."""
        with self._mutex:
            return VideoSampling.from_key(self._store.info("video_sampling"))

    def set_video_sampling(self, sampling: VideoSampling) -> None:
        """Records the video sampling of this index (the default of the next ingest)."""
        self._require_writable().set_info("video_sampling", sampling.key())

    @property
    def on_disk(self) -> bool:
        """Whether this index keeps its IVF inverted lists on disk (see :meth:`set_on_disk`)."""
        with self._mutex:
            return on_disk_requested(self._store)

    def set_on_disk(self, on_disk: bool = True) -> None:
        """Keeps the IVF inverted lists of this index in a memory-mapped file (``vectors.<generation>.<token>
        .ivfdata``) instead of in memory, or (``False``) in memory again; recorded in the index, so later runs keep
        it. Takes effect at the latest at the next ``commit()`` that writes the vectors. Exact (flat) indexes, below
        ``FLAT_MAX_ENTRIES`` entries, stay in memory; an on-disk index becomes IVF on disk when it grows past it.
        Searching then holds only the quantizer, the lists a query visits (paged in by the kernel) and the
        entries added since the last write of the lists."""
        if self.on_disk != bool(on_disk):
            self._require_writable().set_info(ON_DISK_KEY, "1" if on_disk else "0")

    def put_file(self, path: str | os.PathLike, *, size: int, mtime_ns: int, digest: str, date: str,
                 date_source: str, width: int, height: int, detector: str | None = None,
                 sampling: str | None = None) -> int:
        """Inserts or replaces the metadata of one file; a replaced file loses all its entries. Returns its id.
        ``sampling`` (:meth:`VideoSampling.key`) marks a video."""
        return self._require_writable().put_file(path, size=size, mtime_ns=mtime_ns, digest=digest, date=date,
                                                 date_source=date_source, width=width, height=height,
                                                 detector=detector, sampling=sampling)

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        """Records a new size/mtime for a file whose content (hash) did not change."""
        self._require_writable().touch_file(file_id, size, mtime_ns)

    def set_detector(self, file_id: int, detector: str | None) -> None:
        self._require_writable().set_detector(file_id, detector)

    def add_entries(self, file_id: int, vectors: np.ndarray, boxes: Sequence[Box | None],
                    source: str | Sequence[str] = "image", spans: Sequence[FrameSpan | None] | None = None
                    ) -> list[int]:
        """Adds one entry per row of ``vectors`` to file ``file_id``: ``box=None`` for the whole image.

        Args:
            vectors: ``(n, dim)`` float32; rows are re-normalised.
            boxes: ``n`` boxes ``(x, y, w, h)`` or ``None``.
            source: ``"image"`` (a whole image or video frame), ``"user"`` or ``"detector"`` (one for all, or one
                per row).
            spans: video entries: ``(frame index, time s, time_end s)`` per row (``None`` for images).
        """
        return self._require_writable().add_entries(file_id, vectors, boxes, source, spans)

    def remove_entries(self, file_id: int, source: str | None = None) -> int:
        """Removes the entries of a file (only those of ``source`` if given). Returns how many."""
        return self._require_writable().remove_entries(file_id, source)

    def copy_entries(self, src_file_id: int, dst_file_id: int) -> int:
        """Gives ``dst`` copies of all entries of ``src`` (an identical file): no embedding. Returns how many."""
        return self._require_writable().copy_entries(src_file_id, dst_file_id)

    def remove(self, path: str | os.PathLike) -> bool:
        """Removes a file and all its entries. Returns whether it was indexed."""
        return self._require_writable().remove_file(path)

    def set_root(self, folder: str | os.PathLike) -> None:
        """Records ``folder`` among the folders this index covers (shown by :meth:`stats`)."""
        self._require_writable().add_root(folder)

    # ------------------------------------------------------------------ embedding files
    def add(self, path: str | os.PathLike, *, boxes: Iterable[Sequence[float]] | None = None,
            embedder: Embedder | None = None, max_pixels: int | None = None) -> list[int]:
        """Adds or updates one image file (whole image, plus region entries for ``boxes``). Returns entry ids.

        The file is loaded with :func:`shusheng.data.load_image` (which raises ``ImageLoadError`` on bad
        input); an unchanged file (same hash) keeps its entries and returns them.
        """
        from shusheng.data.images import DEFAULT_MAX_PIXELS

        if is_video(path):
            raise ValueError(f"{os.fspath(path)!r} is a video: index it with index_folder(path) (or shusheng "
                             "index PATH), which samples its frames")
        store = self._require_writable()
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        prepared = prepare_file(os.path.abspath(path), None if boxes is None else list(boxes),
                                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        if prepared.invalid_boxes:
            raise ValueError(f"{path}: {'; '.join(prepared.invalid_boxes)}")
        old = store.file_record(prepared.path)
        if old is not None and old.hash == prepared.digest and boxes is None:
            store.touch_file(old.id, prepared.size, prepared.mtime_ns)
            return store.entry_ids_of(old.id)
        vecs = embedder.embed_images([prepared.image, *prepared.crops])
        fid = store.put_file(prepared.path, size=prepared.size, mtime_ns=prepared.mtime_ns, digest=prepared.digest,
                             date=prepared.date, date_source=prepared.date_source, width=prepared.width,
                             height=prepared.height)
        return store.add_entries(fid, vecs, [None, *prepared.boxes], ["image"] + ["user"] * len(prepared.boxes))

    update = add

    def add_regions(self, path: str | os.PathLike, boxes: Iterable[Sequence[float]], *,
                    embedder: Embedder | None = None, replace: bool = True) -> list[int]:
        """Adds region entries for ``boxes`` (``[x, y, w, h]`` pixels of the upright image) of an indexed file.

        Each region embeds the crop with 10 % context padding. ``replace`` drops the file's previous user boxes.
        Returns the new entry ids.

        Raises:
            KeyError: the file is not in the index (add it first).
            ValueError: a box lies outside the image or is empty.
        """
        store = self._require_writable()
        rec = store.file_record(path)
        if rec is None:
            raise KeyError(f"{os.fspath(path)!r} is not in the index; add the image first")
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        prepared = prepare_file(rec.path, [list(b) for b in boxes])
        if prepared.invalid_boxes:
            raise ValueError(f"{rec.path}: {'; '.join(prepared.invalid_boxes)}")
        if replace:
            store.remove_entries(rec.id, "user")
        if not prepared.crops:
            return []
        vecs = embedder.embed_images(prepared.crops)
        return store.add_entries(rec.id, vecs, prepared.boxes, "user")

    # ------------------------------------------------------------------ committing
    def commit(self, write_vectors: bool = True) -> int:
        """Commits pending changes (one SQLite transaction) and applies them to the vector index.

        Args:
            write_vectors: also write ``vectors.faiss`` (atomically) and ``commit.json``, retraining the index
                type first if the collection outgrew it. Ingest commits every few hundred files with ``False``
                (cheap; readers reconcile from SQLite) and writes the file once at the end.

        Returns:
            The new generation number.
        """
        with self._mutex:
            if not self.writable:
                raise RetrievalIndexError("read-only index: nothing to commit")
            if self._store.in_txn:
                _, added, removed = self._store.commit()
                self._vectors.apply(added, removed, self._store)
            if write_vectors:
                self._vectors.rebuild_if_outgrown(self._store)
                self._vectors.persist(self.generation, self._store)
            return self.generation

    def rollback(self) -> None:
        """Discards uncommitted changes."""
        with self._mutex:
            self._store.rollback()

    # ------------------------------------------------------------------ querying
    def query_vector(self, text: str | None = None, image: Image.Image | str | os.PathLike | None = None,
                     embedder: Embedder | None = None) -> np.ndarray:
        """The normalised query vector: of the text, of the image, or the normalised sum of both."""
        if text is None and image is None:
            raise ValueError("give a text, an image, or both")
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        parts = []
        if text is not None:
            parts.append(embedder.embed_texts([text])[0])
        if image is not None:
            from shusheng.data.images import load_image

            parts.append(embedder.embed_images([load_image(image)])[0])
        return normalise(np.sum(normalise(np.stack(parts)), axis=0))

    def search(self, text: str | None = None, image: Image.Image | str | os.PathLike | None = None, k: int = 10,
               threshold: float | None = None, folder_glob: str | None = None, date_from: DateLike | None = None,
               date_to: DateLike | None = None, regions: bool = True, *, vector: np.ndarray | None = None,
               group_by_image: bool = True, nprobe: int | None = None, modality: str | None = None,
               embedder: Embedder | None = None) -> list[SearchHit]:
        """Text-to-image, image-to-image or text+image search over images and video frames.

        Args:
            text: query text.
            image: query image (path or PIL image). With ``text`` too, the query is the normalised sum of both.
            k: number of hits.
            threshold: drop hits whose cosine score is below it.
            folder_glob: keep paths matching this ``fnmatch`` pattern (``*`` crosses folders; a relative
                pattern such as ``"2023/*"`` matches below any folder).
            date_from, date_to: keep pictures taken in this range (inclusive; ``YYYY-MM-DD`` covers the day).
            regions: also search region entries (boxes inside images).
            vector: a ready query vector instead of ``text``/``image``.
            group_by_image: one hit per image, or per kept frame of a video — its best entry (whole image or
                frame, or a region, whose box is then set). With ``False``, every (path, frame, box) entry is its
                own hit. Video hits carry ``video``, ``time``, ``time_end`` and ``frame``.
            nprobe: IVF lists to visit (default: the index's own for the query's modality, see ``modality``);
                ignored by exact indexes.
            modality: what the query is, which sets the default ``nprobe``: ``"text"`` (text queries sit across
                the modality gap from the image clusters, so IVF indexes visit ``TEXT_NPROBE_FACTOR`` times more
                lists for them) or ``"image"``. Default: ``"text"`` when ``text`` is given (alone or with an
                image), ``"image"`` for an image alone or a ``vector``.
            embedder: embedder for the query (default the index's).

        Returns:
            Up to ``k`` hits, best first, each with its exact cosine score.
        """
        if vector is None:
            q = self.query_vector(text, image, embedder)
        else:
            q = normalise(np.asarray(vector, np.float32).reshape(-1))
            if q.shape[0] != self.dim:
                raise EmbedderMismatchError(f"query vector has dim {q.shape[0]}, index has {self.dim}")
        modality = modality or ("text" if text is not None and vector is None else "image")
        if nprobe is None:  # None keeps the index's own setting (and a GPU copy, if any) for image queries
            spec = self.spec
            wanted = spec.nprobe_for(modality)
            nprobe = wanted if wanted != spec.nprobe else None
        lo, hi = parse_date(date_from, end=False), parse_date(date_to, end=True)
        with self._mutex:
            ntotal = self.ntotal
            if ntotal == 0 or k <= 0:
                return []
            fetch = min(ntotal, max(4 * k, k + 32))  # filters apply after retrieval: over-fetch, widen by 4x
            while True:
                scores, ids = self._vectors.search(q[None, :], fetch, nprobe)  # (1, fetch) each
                found = [int(i) for i in ids[0][ids[0] >= 0]]
                hits = rank_entries(q, found, self._store.entry_rows(found), k, threshold, folder_glob, lo, hi,
                                    regions, group_by_image)
                exhausted = fetch >= ntotal or len(found) < fetch
                below = threshold is not None and len(found) and float(scores[0][len(found) - 1]) < threshold
                if len(hits) >= k or exhausted or below:
                    return hits[:k]
                fetch = min(ntotal, fetch * 4)

    # ------------------------------------------------------------------ duplicates and stats
    def duplicates(self, near: float | None = None, neighbours: int = 10) -> list[DuplicateGroup]:
        """Groups of duplicate files.

        Args:
            near: also find near-duplicates: whole images whose cosine similarity is >= ``near`` (e.g. 0.97);
                identical files count once. ``None``: exact duplicates (same content hash) only.
            neighbours: nearest neighbours examined per image for near-duplicates.

        Returns:
            Exact groups first, then near groups; paths sorted within each group.
        """
        with self._mutex:
            return find_duplicates(self._store, self._vectors, near=near, neighbours=neighbours)

    def stats(self) -> dict[str, Any]:
        """Counts (files, videos, whole-image, video-frame and region entries), embedder, index type, video sampling,
        size on disk and last commit, as a JSON-friendly dict. ``storage`` is ``"on-disk"`` when the IVF lists are
        memory-mapped from an ivfdata file (``in_memory_entries``: those added since, held in memory) and
        ``"in-RAM"`` otherwise; ``on_disk``: the index is set to keep them on disk (:meth:`set_on_disk`)."""
        with self._mutex:
            store = self._store
            by_source = store.entry_counts_by_source()
            videos, frame_entries = store.video_counts()
            sampling = VideoSampling.from_key(store.info("video_sampling"))
            spec = self.spec
            size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            return {
                "path": os.fspath(self.path),
                "files": store.file_count(),
                "videos": videos,
                "entries": sum(by_source.values()),
                "image_entries": by_source.get("image", 0) - frame_entries,
                "frame_entries": frame_entries,
                "region_entries": by_source.get("user", 0) + by_source.get("detector", 0),
                "video_sampling": sampling.to_dict() if sampling is not None else None,
                "embedder": self.embedder_name,
                "dim": self.dim,
                "index_type": spec.factory,
                "nprobe": spec.nprobe,
                "vectors_in_index": self.ntotal,
                "on_disk": on_disk_requested(store),
                "storage": "on-disk" if self._vectors.lists_on_disk else "in-RAM",
                "in_memory_entries": self._vectors.in_memory_entries,
                "size_on_disk_bytes": size,
                "generation": self.generation,
                "last_commit": store.info("last_commit"),
                "roots": store.roots(),
                "gpu": self._vectors.on_gpu,
            }
