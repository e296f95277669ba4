"""Folder ingest: index every image and video below a folder, embedding only what is new or changed.

:func:`index_folder` scans the folder, and for each image or video file:

1. same size and mtime as indexed -> unchanged (nothing read);
2. otherwise its bytes are hashed (BLAKE2b): same hash as indexed -> unchanged (only the mtime is updated);
   same hash as *another* indexed file (renamed, moved or copied) -> its vectors are copied, nothing embedded;
3. otherwise it is decoded by :func:`shusheng.data.load_image` (in a thread pool, overlapping the embedder)
   and embedded with its region crops; a video is sampled, embedded and collapsed frame by frame
   (:mod:`shusheng.retrieval_index.video`) and its entries replace the old ones at once.

A video is also sampled again when the sampling (rate, collapse threshold) differs from the one it was indexed
with.

Indexed files no longer found under the folder are removed at the end. Bad files (corrupt, truncated, empty,
not images, decompression bombs, too large, symlink loops, unreadable) are skipped and listed in the
:class:`IngestReport`; a file that was indexed before and is now unreadable keeps its old entries. Changes are
committed every ``commit_every`` files, so a killed run loses at most that much work and the next run resumes.

With ``engine=RayEngine(...)`` (:mod:`shusheng.retrieval_index.ray_ingest`) the same decisions are made here, and
step 3 for images runs on Ray actors instead, written and committed shard by shard.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError
from shusheng.retrieval_index.errors import EmbedderMismatchError
from shusheng.retrieval_index.index import Index
from shusheng.retrieval_index.layout import DEFAULT_INDEX_DIRNAME, EmbedderInfo, read_embedder_info
from shusheng.retrieval_index.prepare import (
    CONTEXT_PAD,
    EMBED_MIN_SIDE,
    PreparedImage,
    clip_box,
    crop_with_context,
    downscale,
    file_digest,
    hash_file,
    iso_from_mtime,
    prepare_file,
    read_file,
)
from shusheng.retrieval_index.store import Box, FileRecord
from shusheng.retrieval_index.video import (
    DEFAULT_COLLAPSE,
    DEFAULT_VIDEO_FPS,
    VIDEO_EXTENSIONS,
    VideoLoadError,
    VideoSampling,
    embed_video,
    is_video,
)

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.detection import Detector
    from shusheng.retrieval_index.embedders import Embedder
    from shusheng.retrieval_index.ray_ingest import RayEngine

    #: What ``index_folder(detector=...)`` accepts: a :class:`shusheng.detection.Detector`, or any plain
    #: ``callable(PIL.Image) -> [[x, y, w, h], ...]`` (named by its ``name``, else its qualified name).
    BoxDetector = Detector | Callable[[Image.Image], Sequence[Sequence[float]]]

logger = logging.getLogger(__name__)

#: What :func:`index_folder` looks for: images, then videos (lower case, with the dot).
MEDIA_EXTENSIONS: tuple[str, ...] = tuple(IMAGE_EXTENSIONS) + tuple(VIDEO_EXTENSIONS)

__all__ = [
    "CONTEXT_PAD", "EMBED_MIN_SIDE", "MEDIA_EXTENSIONS", "IngestReport", "PreparedImage", "clip_box", "crop_with_context",
    "index_folder", "load_regions", "prepare_file", "resolve_embedder", "resolve_sampling", "scan_folder",
]

@dataclass
class IngestReport:
    """What one :func:`index_folder` run did.

    Attributes:
        added: files new to the index. updated: files whose content (or regions) changed and were re-embedded.
        unchanged: files left as they were. removed: indexed files no longer in the folder.
        reused: added/updated files whose vectors were copied from an identical indexed file (renames, copies).
        embedded: images run through the embedder. regions: region crops run through the embedder.
        frames: sampled video frames run through the embedder. frame_entries: of those, the frames kept as
            entries after collapsing near-identical consecutive ones.
        skipped: ``(path, reason)`` for every file, folder or region box that could not be used.
    """

    index_path: str = ""
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    reused: int = 0
    embedded: int = 0
    regions: int = 0
    frames: int = 0
    frame_entries: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d

    def summary(self) -> str:
        frames = (f" + {self.frames} video frames ({self.frame_entries} kept after collapsing)"
                  if self.frames else "")
        text = (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.removed} removed "
                f"({self.embedded} images{frames} + {self.regions} regions embedded, {self.reused} reused from "
                f"identical files) in {self.seconds:.1f} s")
        if self.skipped:
            text += f"; {len(self.skipped)} skipped:\n" + "\n".join(f"  {p}: {r}" for p, r in self.skipped)
        return text



def load_regions(regions: Mapping[str, Any] | str | os.PathLike | None, root: str | os.PathLike
                 ) -> dict[str, list[list[float]]]:
    """Normalises a region spec to ``{absolute path: [[x, y, w, h], ...]}``.

    ``regions`` is a mapping or a JSON file holding one: keys are image paths (relative ones are relative to
    ``root``), values lists of ``[x, y, w, h]`` boxes or of ``{"box": [x, y, w, h], ...}`` objects.
    """
    if regions is None:
        return {}
    if isinstance(regions, (str, os.PathLike)):
        try:
            regions = json.loads(Path(regions).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the regions file {os.fspath(regions)!r}: {e}") from e
    if not isinstance(regions, Mapping):
        raise ValueError("regions must map image paths to lists of [x, y, w, h] boxes")
    out: dict[str, list[list[float]]] = {}
    for key, boxes in regions.items():
        path = os.path.abspath(os.path.join(os.fspath(root), os.path.expanduser(str(key))))
        if not isinstance(boxes, list):
            raise ValueError(f"regions of {key!r} must be a list of boxes")
        out[path] = [b["box"] if isinstance(b, Mapping) else b for b in boxes]
    return out


def scan_folder(root: str | os.PathLike, skip: Sequence[str | os.PathLike] = (), include_hidden: bool = False,
                within: Sequence[str | os.PathLike] | None = None, extensions: Sequence[str] | None = None
                ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Image and video files (by extension: ``extensions``, lower case with the dot, default
    :data:`MEDIA_EXTENSIONS`) below ``root``, sorted, following symlinks without looping.

    With ``within``, a file or folder whose real path (symbolic links resolved) is not below one of those
    folders is skipped ("symbolic link leads outside the allowed folders") instead of followed.

    Returns:
        ``(files, skipped, unlisted)``: absolute file paths; ``(path, reason)`` for symlink loops and folders that
        cannot be listed; the folders that could not be listed (their indexed files must not be dropped).
    """
    root = os.path.abspath(root)
    extensions = MEDIA_EXTENSIONS if extensions is None else tuple(extensions)
    skip_real = {os.path.realpath(p) for p in skip}
    allowed = None if within is None else [os.path.join(os.path.realpath(d), "") for d in within]

    def outside(path: str) -> bool:
        return allowed is not None and not os.path.join(os.path.realpath(path), "").startswith(tuple(allowed))

    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    unlisted: list[str] = []
    st = os.stat(root)
    visited = {(st.st_dev, st.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((folder, f"cannot list folder ({e.strerror or e})"))
            unlisted.append(folder)
            continue
        subdirs = []
        for entry in entries:
            if not include_hidden and entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as e:
                reason = "symlink loop" if e.errno == errno.ELOOP else f"cannot stat ({e.strerror or e})"
                if os.path.splitext(entry.name)[1].lower() in extensions or e.errno != errno.ELOOP:
                    skipped.append((entry.path, reason))
                continue
            if is_dir:
                try:
                    dst = os.stat(entry.path)
                except OSError as e:
                    skipped.append((entry.path, f"cannot stat ({e.strerror or e})"))
                    continue
                key = (dst.st_dev, dst.st_ino)
                if key in visited:
                    if entry.is_symlink():
                        skipped.append((entry.path, "symlink loop (points to a folder already scanned)"))
                    continue
                visited.add(key)
                if outside(entry.path):
                    skipped.append((entry.path, "symbolic link leads outside the allowed folders"))
                elif os.path.realpath(entry.path) not in skip_real:
                    subdirs.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                if outside(entry.path):
                    skipped.append((entry.path, "symbolic link leads outside the allowed folders"))
                else:
                    files.append(entry.path)
        stack.extend(reversed(subdirs))
    return sorted(files), skipped, unlisted


def _stat_reason(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "broken symlink" if os.path.islink(path) else "file vanished during the scan"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"unreadable ({e.strerror or e})"


def skip_reason(path: str, e: ImageLoadError | OSError) -> str:
    """Why ``path`` is skipped, from the error :func:`~shusheng.retrieval_index.prepare.prepare_file` raised."""
    return e.reason if isinstance(e, ImageLoadError) else _stat_reason(path, e)


def _detector_name(detector: BoxDetector | None) -> str | None:
    if detector is None:
        return None
    return (getattr(detector, "name", None) or getattr(detector, "__qualname__", None)
            or type(detector).__qualname__)


def _embedder_key(name: str) -> str:
    from shusheng.retrieval_index.embedders import _EMBEDDERS, _OPEN_CLIP_PREFIX

    return name if name in _EMBEDDERS or name.startswith(_OPEN_CLIP_PREFIX) else _OPEN_CLIP_PREFIX + name


def resolve_embedder(embedder: Embedder | str | None, index_path: Path, checkpoint: str | os.PathLike | None,
                     device: str | None, runtime: str = "torch") -> tuple[Embedder, str | os.PathLike | None]:
    """The embedder for an ingest: the given object, a name, or the one recorded in an existing index, with its
    image side on ``runtime`` (:func:`~shusheng.retrieval_index.embedders.with_runtime`).

    A name that differs from the recorded one fails before any model is loaded.
    """
    from shusheng.retrieval_index.embedders import create_embedder, with_runtime

    if embedder is None or isinstance(embedder, str):
        name, checkpoint, _ = embedder_choice(embedder, index_path, checkpoint)
        return create_embedder(name, checkpoint=checkpoint, device=device, runtime=runtime), checkpoint
    return with_runtime(embedder, runtime), checkpoint


def embedder_choice(name: str | None, index_path: Path, checkpoint: str | os.PathLike | None
                    ) -> tuple[str, str | os.PathLike | None, EmbedderInfo | None]:
    """The embedder name and checkpoint of an ingest given by name (``None``: the one recorded in the index at
    ``index_path``, else the default), and the recorded :class:`EmbedderInfo` (``None`` for a new index); loads
    no model.

    Raises:
        EmbedderMismatchError: ``name`` differs from the recorded embedder.
    """
    from shusheng.retrieval_index.embedders import DEFAULT_EMBEDDER

    recorded = read_embedder_info(index_path, missing_ok=True)
    name = name or (recorded.name if recorded else DEFAULT_EMBEDDER)
    if recorded is not None and _embedder_key(name) != recorded.name:
        raise EmbedderMismatchError(
            f"index {os.fspath(index_path)!r} was built with embedder {recorded.name!r}, not {name!r}; "
            f"vectors of different embedders cannot be mixed. Use --embedder {recorded.name} "
            "or a new --index path.")
    if checkpoint is None and recorded is not None:
        checkpoint = recorded.checkpoint
    return name, checkpoint, recorded


def resolve_sampling(recorded: VideoSampling | None, video_fps: float | None = None,
                     collapse: float | bool | None = None) -> VideoSampling:
    """The video sampling of an ingest: the given rate and collapse threshold, else the ones recorded in the index
    (``recorded``), else 1 frame/s and 0.98.

    Args:
        video_fps: frames per second to sample; ``None``: recorded, else :data:`DEFAULT_VIDEO_FPS`.
        collapse: a cosine threshold; ``False``: no collapsing; ``True``: :data:`DEFAULT_COLLAPSE`; ``None``:
            recorded, else the default.
    """
    fps = video_fps if video_fps is not None else (recorded.fps if recorded else DEFAULT_VIDEO_FPS)
    if collapse is None:
        threshold = recorded.collapse if recorded else DEFAULT_COLLAPSE
    elif collapse is True:
        threshold = DEFAULT_COLLAPSE
    elif collapse is False:
        threshold = None
    else:
        threshold = float(collapse)
    return VideoSampling(fps=fps, collapse=threshold)


@dataclass
class _Job:
    path: str
    kind: str  # "full": (re)embed the file; "regions": only its user and/or detector regions
    future: Future
    record: FileRecord | None
    user_boxes: list | None  # boxes to (re)embed as user regions; None: keep the stored ones
    run_detector: bool
    digest: str | None = None


class _Ingest:
    """State of one ingest run: the pending jobs, the decode pool, the report."""

    def __init__(self, index: Index, embedder: Embedder, report: IngestReport, *, region_spec: dict,
                 detector: BoxDetector | None, batch_size: int, commit_every: int, max_pixels: int | None,
                 workers: int, sampling: VideoSampling | None = None):
        self.index, self.embedder, self.report = index, embedder, report
        self.sampling = sampling or VideoSampling()
        self.sampling_key = self.sampling.key()
        self.region_spec, self.detector, self.detector_name = region_spec, detector, _detector_name(detector)
        self.batch_size, self.commit_every, self.max_pixels = batch_size, commit_every, max_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shusheng-decode")
        self.batch: list[_Job] = []
        self.queue: deque[list[_Job]] = deque()
        self.changes = 0
        self.pending_digests: set[str] = set()  # contents queued for embedding in this run
        self.failed_digests: dict[str, str] = {}  # content -> why it could not be indexed
        self.deferred: list[tuple[str, os.stat_result, str, FileRecord | None]] = []  # copies of pending contents

    # one file -----------------------------------------------------------
    def _regular_file(self, path: str) -> os.stat_result | None:
        """``os.stat(path)`` of a regular file; otherwise the reason goes to the report and None is returned."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.report.skipped.append((path, _stat_reason(path, e)))
            return None
        if not stat.S_ISREG(st.st_mode):
            self.report.skipped.append((path, "not a regular file"))
            return None
        return st

    def process(self, path: str) -> None:
        if is_video(path):
            self.process_video(path)
            return
        index, report = self.index, self.report
        st = self._regular_file(path)
        if st is None:
            return
        rec = index.file_record(path)
        spec_boxes = self.region_spec.get(path)
        if rec is not None and rec.size == st.st_size and rec.mtime_ns == st.st_mtime_ns:
            if not self._queue_regions(rec):
                report.unchanged += 1
            return
        try:
            data, st = read_file(path)
        except OSError as e:
            report.skipped.append((path, _stat_reason(path, e)))
            return
        digest = file_digest(data)
        if rec is not None and rec.hash == digest:  # touched, content unchanged
            index.touch_file(rec.id, st.st_size, st.st_mtime_ns)
            self._changed()
            if not self._queue_regions(rec):
                report.unchanged += 1
            return
        if data and digest in self.pending_digests:  # a copy of a file queued in this run: copy it afterwards
            self.deferred.append((path, st, digest, rec))
            return
        if data and self._copy_twin(path, st, digest, rec):
            return
        boxes = spec_boxes if spec_boxes is not None else (
            [list(b) for b in index.boxes_of(rec.id, "user")] if rec is not None else None)
        self.pending_digests.add(digest)
        self._queue_image(path, data, st, digest, rec, boxes)

    def _queue_image(self, path: str, data: bytes, st: os.stat_result, digest: str, rec: FileRecord | None,
                     boxes: list | None) -> None:
        """Queues a new or changed image (read, hashed, and neither unchanged nor a copy of an indexed file) for
        decoding in the pool and embedding in this process's batches. The Ray engine
        (:mod:`shusheng.retrieval_index.ray_ingest`) overrides it to send the file to its workers instead."""
        future = self.pool.submit(prepare_file, path, boxes, data=data, st=st, max_pixels=self.max_pixels,
                                  keep_full=self.detector is not None)
        self._push(_Job(path, "full", future, rec, boxes, self.detector is not None, digest))

    def _copy_twin(self, path: str, st: os.stat_result, digest: str, rec: FileRecord | None,
                   sampling: str | None = None) -> bool:
        """Renamed, moved or copied file: reuses the vectors of an indexed identical file (for a video, one
        sampled the same way). Returns whether."""
        index, report = self.index, self.report
        twins = [r for r in index.files_with_hash(digest) if r.path != path and r.sampling == sampling]
        if not twins:
            return False
        src = twins[0]
        date = src.date if src.date_source == "exif" else iso_from_mtime(st.st_mtime_ns)
        fid = index.put_file(path, size=st.st_size, mtime_ns=st.st_mtime_ns, digest=digest, date=date,
                             date_source=src.date_source, width=src.width, height=src.height,
                             detector=src.detector, sampling=src.sampling)
        index.copy_entries(src.id, fid)
        report.reused += 1
        if rec is None:
            report.added += 1
        else:
            report.updated += 1
        self._changed()
        if sampling is None:
            self._queue_regions(index.file_record(path), count_update=False)
        else:
            self._video_regions(index.file_record(path), count_update=False)
        return True

    # one video -------------------------------------------------------------
    def process_video(self, path: str) -> None:
        """Like :meth:`process`, for a video: unchanged (same size and mtime, or same hash, and the same
        sampling) -> nothing embedded; an identical indexed video -> its entries copied; else sampled, embedded
        and collapsed here (not in the decode pool's batches), its entries replacing the old ones at once."""
        index, report = self.index, self.report
        st = self._regular_file(path)
        if st is None:
            return
        if path in self.region_spec:
            report.skipped.append((path, "regions cannot be given for a video; a detector (--detect) finds "
                                         "regions in its frames"))
        rec = index.file_record(path)
        same_sampling = rec is not None and rec.sampling == self.sampling_key
        if same_sampling and rec.size == st.st_size and rec.mtime_ns == st.st_mtime_ns:
            if not self._video_regions(rec):
                report.unchanged += 1
            return
        try:
            digest, st = hash_file(path)
        except OSError as e:
            report.skipped.append((path, _stat_reason(path, e)))
            return
        if same_sampling and rec.hash == digest:  # touched, content unchanged
            index.touch_file(rec.id, st.st_size, st.st_mtime_ns)
            self._changed()
            if not self._video_regions(rec):
                report.unchanged += 1
            return
        if st.st_size and self._copy_twin(path, st, digest, rec, self.sampling_key):
            return
        entries = self._embed_video(path, detect=self.detector is not None)
        if entries is None:
            return
        fid = index.put_file(path, size=st.st_size, mtime_ns=st.st_mtime_ns, digest=digest,
                             date=iso_from_mtime(st.st_mtime_ns), date_source="mtime", width=entries.width,
                             height=entries.height, detector=self.detector_name, sampling=self.sampling_key)
        index.add_entries(fid, entries.vectors, entries.boxes, entries.sources, entries.spans)
        report.frames += entries.sampled
        report.frame_entries += entries.kept
        report.regions += entries.regions
        if rec is None:
            report.added += 1
        else:
            report.updated += 1
        self._changed()

    def _embed_video(self, path: str, detect: bool, only_frames: dict | None = None):
        """:func:`~shusheng.retrieval_index.video.embed_video` on one file; ``None`` (and the file listed as
        skipped, with the reason) when it cannot be read."""
        detector = None
        if detect:
            def detector(img, t):
                return self._detect_image(f"{path} @ {t:.1f} s", img)
        try:
            return embed_video(path, self.embedder, self.sampling, batch_size=self.batch_size, detector=detector,
                               max_pixels=self.max_pixels, pool=self.pool, only_frames=only_frames)
        except VideoLoadError as e:
            self.report.skipped.append((path, e.reason))
        except OSError as e:
            self.report.skipped.append((path, _stat_reason(path, e)))
        except ImportError as e:  # PyAV missing: the images are still indexed
            self.report.skipped.append((path, str(e)))
        return None

    def _video_regions(self, rec: FileRecord, count_update: bool = True) -> bool:
        """Runs a new detector on the kept frames of an indexed video (only its region entries are replaced).
        Returns whether it had to."""
        if self.detector is None or rec.detector == self.detector_name:
            return False
        spans = {span[0]: span for span in self.index.frame_spans(rec.id)}
        entries = self._embed_video(rec.path, detect=True, only_frames=spans)
        if entries is None:
            return True
        self.index.remove_entries(rec.id, "detector")
        self.index.add_entries(rec.id, entries.vectors, entries.boxes, "detector", entries.spans)
        self.index.set_detector(rec.id, self.detector_name)
        self.report.regions += entries.regions
        if count_update:
            self.report.updated += 1
        self._changed()
        return True

    def _queue_regions(self, rec: FileRecord, count_update: bool = True) -> bool:
        """Queues re-embedding of regions that differ from the stored ones. Returns whether it queued."""
        spec_boxes = self.region_spec.get(rec.path)
        user = None
        if spec_boxes is not None:
            wanted = [clip_box(b, rec.width, rec.height)[0] for b in spec_boxes]
            if [b for b in wanted if b is not None] != self.index.boxes_of(rec.id, "user") or None in wanted:
                user = spec_boxes
        run_det = self.detector is not None and rec.detector != self.detector_name
        if user is None and not run_det:
            return False
        future = self.pool.submit(prepare_file, rec.path, user, max_pixels=self.max_pixels, keep_full=run_det)
        self._push(_Job(rec.path, "regions", future, rec, user, run_det))
        if count_update:
            self.report.updated += 1
        return True

    def _changed(self, n: int = 1) -> None:
        self.changes += n
        if self.changes >= self.commit_every:
            self.index.commit(write_vectors=False)
            self.changes = 0

    # batches ---------------------------------------------------------------
    def _push(self, job: _Job) -> None:
        self.batch.append(job)
        if len(self.batch) >= self.batch_size:
            self.queue.append(self.batch)
            self.batch = []
        while len(self.queue) > 1:  # keep one batch decoding while the previous one is embedded
            self._embed(self.queue.popleft())

    def finish(self) -> None:
        for _ in range(2):  # the second round embeds regions queued by deferred copies
            if self.batch:
                self.queue.append(self.batch)
                self.batch = []
            while self.queue:
                self._embed(self.queue.popleft())
            deferred, self.deferred = self.deferred, []
            for path, st, digest, rec in deferred:
                if not self._copy_twin(path, st, digest, rec):
                    reason = self.failed_digests.get(digest, "its identical copy could not be indexed")
                    self.report.skipped.append((path, reason))
        self.pool.shutdown()

    def _detect_image(self, where: str, img: Image.Image) -> Sequence[Sequence[float]]:
        """The detector's boxes on one full-resolution image or frame; none (and ``where`` listed as skipped)
        when it fails."""
        try:
            return self.detector(img)
        except Exception as e:  # noqa: BLE001 - a user-supplied detector failing on one image must not end the run
            self.report.skipped.append((where, f"detector failed ({type(e).__name__}: {e})"))
            return []

    def _detect(self, job: _Job, prepared: PreparedImage) -> tuple[list[Box], list]:
        raw = self._detect_image(job.path, prepared.full)
        boxes, crops = [], []
        for box in raw:
            clipped, _ = clip_box(box, prepared.width, prepared.height)
            if clipped is not None:
                boxes.append(clipped)
                crops.append(downscale(crop_with_context(prepared.full, clipped)))
        return boxes, crops

    def _embed(self, jobs: list[_Job]) -> None:
        ready = []
        for job in jobs:
            try:
                prepared = job.future.result()
            except (ImageLoadError, OSError) as e:
                self._skip_job(job, skip_reason(job.path, e))
                continue
            for reason in prepared.invalid_boxes:
                self.report.skipped.append((job.path, reason))
            det_boxes, det_crops = self._detect(job, prepared) if job.run_detector else ([], [])
            prepared.full = None
            images = ([prepared.image] if job.kind == "full" else []) + prepared.crops + det_crops
            ready.append((job, prepared, det_boxes, images))
        if not ready:
            return
        flat = [im for *_, images in ready for im in images]
        vectors = (self.embedder.embed_images(flat, batch_size=self.batch_size) if flat
                   else np.empty((0, self.index.dim), np.float32))
        at = 0
        for job, prepared, det_boxes, images in ready:
            vecs = vectors[at:at + len(images)]
            at += len(images)
            self._write(job, prepared, det_boxes, vecs)
        self._changed(len(ready))

    def _skip_job(self, job: _Job, reason: str) -> None:
        """``job``'s file could not be prepared (``reason``): listed as skipped; its copies will be too."""
        self.report.skipped.append((job.path, reason))
        if job.kind == "regions":
            self.report.updated -= 1
        elif job.digest is not None:
            self.failed_digests[job.digest] = reason

    def _write(self, job: _Job, p: PreparedImage, det_boxes: list[Box], vecs) -> None:
        index, report = self.index, self.report
        n_user = len(p.boxes) if job.user_boxes is not None else 0
        if job.kind == "full":
            fid = index.put_file(p.path, size=p.size, mtime_ns=p.mtime_ns, digest=p.digest, date=p.date,
                                 date_source=p.date_source, width=p.width, height=p.height,
                                 detector=self.detector_name if job.run_detector else None)
            boxes = [None, *p.boxes, *det_boxes]
            sources = ["image"] + ["user"] * len(p.boxes) + ["detector"] * len(det_boxes)
            index.add_entries(fid, vecs, boxes, sources)
            report.embedded += 1
            report.regions += len(boxes) - 1
            if job.record is None:
                report.added += 1
            else:
                report.updated += 1
            return
        rec = job.record
        if job.user_boxes is not None:
            index.remove_entries(rec.id, "user")
            index.add_entries(rec.id, vecs[:n_user], p.boxes, "user")
        if job.run_detector:
            index.remove_entries(rec.id, "detector")
            index.add_entries(rec.id, vecs[n_user:], det_boxes, "detector")
            index.set_detector(rec.id, self.detector_name)
        report.regions += len(vecs)


def _single_file(path: Path, within: Sequence[str | os.PathLike] | None
                 ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """:func:`scan_folder`'s answer for one file given directly."""
    allowed = None if within is None else [os.path.join(os.path.realpath(d), "") for d in within]
    if allowed is not None and not os.path.realpath(path).startswith(tuple(allowed)):
        return [], [(os.fspath(path), "symbolic link leads outside the allowed folders")], []
    return [os.fspath(path)], [], []


def index_folder(folder: str | os.PathLike, index_path: str | os.PathLike | None = None,
                 embedder: Embedder | str | None = None, *, checkpoint: str | os.PathLike | None = None,
                 device: str | None = None, regions: Mapping[str, Any] | str | os.PathLike | None = None,
                 detector: BoxDetector | None = None, batch_size: int = 32, commit_every: int = 256,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, include_hidden: bool = False,
                 progress: bool = True, workers: int | None = None,
                 within: Sequence[str | os.PathLike] | None = None, deadline: float | None = None,
                 runtime: str = "torch", videos: bool = True, video_fps: float | None = None,
                 collapse: float | bool | None = None, engine: RayEngine | None = None,
                 on_disk: bool | None = None) -> IngestReport:
    """Indexes (or incrementally re-indexes) every image and video below ``folder``.

    Args:
        folder: the collection's root folder (scanned recursively, symlinks followed without loops), or one image
            or video file.
        index_path: the index folder; default ``folder/.shusheng-index`` (for a file: next to it).
        embedder: an :class:`~shusheng.retrieval_index.embedders.Embedder`, a registered name, or ``None``
            for the embedder recorded in an existing index (``"shusheng-mini-clip"`` for a new one).
        checkpoint, device: passed to :func:`~shusheng.retrieval_index.embedders.create_embedder` for a name.
        regions: boxes to index as region entries: ``{path: [[x, y, w, h], ...]}`` or a JSON file of that
            mapping (paths relative to ``folder`` or absolute; pixels of the upright image). Files not listed
            keep the boxes stored before.
        detector: optional :class:`shusheng.detection.Detector` (such as ``DenseObjectDetector``), or any plain
            ``callable(PIL.Image) -> [[x, y, w, h], ...]``, called on the full-resolution image of new and
            changed files (and once on files indexed without it, recorded by its ``name``); its boxes become
            region entries.
        batch_size: images per embedder call.
        commit_every: commit after this many changed files (what a crash can lose at most).
        max_pixels: larger images are skipped (decompression-bomb guard of ``load_image``).
        include_hidden: also index files and folders whose names start with ``.``.
        progress: tqdm progress bar over files.
        workers: decode threads (default ``min(4, cpu_count)``).
        within: only files whose real path lies below one of these folders are indexed; symbolic links that lead
            elsewhere are skipped (default: no limit).
        deadline: a ``time.monotonic()`` value; once it is passed, no further file is started, what was done is
            committed, and the report's ``skipped`` gets ``(folder, "stopped at the time limit: ...")``. The next
            run continues (default: no limit).
        runtime: what runs the embedder's image side: ``"torch"`` (default), ``"onnxruntime"``, ``"tensorrt"``
            or ``"auto"`` (the fastest valid one here, never slower than torch; shusheng-mini-clip only, see
            :func:`~shusheng.retrieval_index.embedders.with_runtime`). Vectors match torch's to ~1e-6.
        videos: also index video files (``VIDEO_EXTENSIONS``; needs PyAV, else each video is listed as skipped).
            With ``False`` videos are not looked at (and those indexed before are dropped, as deleted files are).
        video_fps: frames sampled per second of video (default: the rate recorded in the index, else 1); stored
            in the index. Videos indexed at another rate are sampled again.
        collapse: consecutive sampled frames whose embeddings have a cosine at least this with the first frame of
            their run become one entry spanning their times (default: the index's, else 0.98); ``False``: every
            sampled frame is an entry.
        engine: ``None`` (default): everything in this process. A
            :class:`~shusheng.retrieval_index.ray_ingest.RayEngine`: new and changed images are decoded and
            embedded by Ray workers (one model each, on this machine or a cluster) and written shard by shard,
            resumable; videos and regions of unchanged files stay in this process; no ``detector`` or
            ``deadline``. Same entries as without it.
        on_disk: keep the index's IVF lists in a memory-mapped file (``True``) or in memory (``False``), recorded
            in the index (:meth:`~shusheng.retrieval_index.Index.set_on_disk`); ``None`` (default): as recorded.

    Returns:
        The :class:`IngestReport` of the run.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or not a folder.
        IndexLockedError: another process is writing the index.
        EmbedderMismatchError: the index was built with another embedder.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    root = Path(folder).expanduser().absolute()
    extensions = MEDIA_EXTENSIONS if videos else tuple(IMAGE_EXTENSIONS)
    if not root.exists():
        raise FileNotFoundError(f"folder {os.fspath(root)!r} does not exist")
    single = not root.is_dir()
    if single and not (root.is_file() and root.suffix.lower() in extensions):
        raise NotADirectoryError(f"{os.fspath(root)!r} is not a folder" + (
            ", an image or a video" if videos else " or an image"))
    base = root.parent if single else root
    index_path = Path(index_path).expanduser().absolute() if index_path else base / DEFAULT_INDEX_DIRNAME
    if engine is None:
        embedder, checkpoint = resolve_embedder(embedder, index_path, checkpoint, device, runtime)
    else:
        embedder, checkpoint = engine.resolve_embedder(embedder, index_path, checkpoint, device, runtime,
                                                       detector=detector, deadline=deadline)
    region_spec = load_regions(regions, base)
    report = IngestReport(index_path=os.fspath(index_path))
    workers = workers or min(4, os.cpu_count() or 1)
    with Index.open(index_path, create=True, embedder=embedder, checkpoint=checkpoint) as index:
        if on_disk is not None:
            index.set_on_disk(on_disk)
        sampling = resolve_sampling(index.video_sampling, video_fps, collapse)
        if single:
            files, scan_skipped, unlisted = _single_file(root, within)
        else:
            limit = {} if within is None else {"within": within}  # the old call when unused (wrappers)
            if not videos:
                limit["extensions"] = extensions
            files, scan_skipped, unlisted = scan_folder(root, skip=[index_path], include_hidden=include_hidden,
                                                        **limit)
        report.skipped.extend(scan_skipped)
        options = dict(region_spec=region_spec, detector=detector, batch_size=batch_size, commit_every=commit_every,
                       max_pixels=max_pixels, workers=workers, sampling=sampling)
        run = (_Ingest(index, embedder, report, **options) if engine is None
               else engine.ingest(index, embedder, report, progress=progress, **options))
        try:
            for n, path in enumerate(tqdm(files, desc="indexing", unit="file", disable=not progress)):
                if deadline is not None and time.monotonic() >= deadline:
                    report.skipped.append((os.fspath(root), f"stopped at the time limit: {len(files) - n} of "
                                           f"{len(files)} files not looked at yet; index again to continue"))
                    break
                run.process(path)
            run.finish()
        finally:
            run.pool.shutdown(cancel_futures=True)
        found = set(files)
        for path in sorted(set(region_spec) - found):
            report.skipped.append((path, "regions given for a file that is not an image in the folder"))
        keep_prefixes = tuple(os.path.join(d, "") for d in unlisted)
        for path in [] if single else index.paths_under(root):
            if path not in found and not path.startswith(keep_prefixes):
                index.remove(path)
                report.removed += 1
        index.set_root(root)
        if videos and index.video_sampling != sampling:
            index.set_video_sampling(sampling)
        index.commit(write_vectors=True)
    report.seconds = time.perf_counter() - t0
    logger.info("indexed %s into %s: %s", root, index_path, report.summary())
    return report
