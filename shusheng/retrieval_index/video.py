"""Video files in an index: frames sampled at a set rate, near-identical consecutive frames collapsed, and one
frame read back at its time for display.

A video becomes one entry per *kept* frame (plus region entries on kept frames when a detector is given):

1. **Sampling** (:func:`sample_frames`): every frame is decoded (:func:`shusheng.data.video.iter_video_frames`)
   and the first frame at or after each multiple of ``1 / fps`` seconds is taken (``fps`` = 1: the frames at
   0 s, 1 s, 2 s, ...; a video slower than ``fps`` gives all its frames).
2. **Collapsing** (:func:`embed_video`): a sampled frame whose embedding has a cosine of at least ``collapse``
   with the *first* frame of the current run is folded into that run instead of becoming an entry; the run's
   entry records the span (``time`` .. ``time_end``). Comparing with the run's first frame, not with the previous
   one, keeps a slow pan from folding into a single entry.
3. **Regions**: a detector sees each kept frame at full resolution, as it sees images; its boxes become region
   entries with the frame's span.

The index records the :class:`VideoSampling` in its metadata and on every video file; a video sampled with other
settings than the current ones is sampled again. PyAV (``pip install 'shusheng[video]'``) is imported only when
a video is read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng.data.images import DEFAULT_MAX_PIXELS
from shusheng.data.video import VIDEO_EXTENSIONS, VideoLoadError, iter_video_frames
from shusheng.retrieval_index.prepare import clip_box, crop_with_context, downscale
from shusheng.retrieval_index.store import Box, FrameSpan, normalise

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index.embedders import Embedder

__all__ = [
    "DEFAULT_COLLAPSE", "DEFAULT_VIDEO_FPS", "VIDEO_EXTENSIONS", "VideoEntries", "VideoLoadError", "VideoSampling",
    "embed_video", "is_video", "read_frame", "sample_frames",
]

#: Frames per second sampled from videos unless the index or the caller says otherwise.
DEFAULT_VIDEO_FPS = 1.0
#: Consecutive sampled frames whose embeddings have at least this cosine are collapsed into one entry.
DEFAULT_COLLAPSE = 0.98
#: A frame this many seconds before a sampling instant still counts as at it (timestamps are rounded).
_TIME_TOLERANCE = 1e-3


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a video file extension (:data:`shusheng.data.video.VIDEO_EXTENSIONS`)."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoSampling:
    """How the frames of videos become entries.

    Attributes:
        fps: frames sampled per second of video (> 0).
        collapse: consecutive sampled frames whose embeddings have a cosine ``>= collapse`` with the first frame
            of their run are collapsed into it; ``None``: every sampled frame is an entry.
    """

    fps: float = DEFAULT_VIDEO_FPS
    collapse: float | None = DEFAULT_COLLAPSE

    def __post_init__(self):
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"the video sampling rate must be a positive number of frames per second, "
                             f"not {self.fps!r}")
        if self.collapse is not None and not -1.0 <= float(self.collapse) <= 1.0:
            raise ValueError(f"the collapse threshold is a cosine between -1 and 1 (or None: off), "
                             f"not {self.collapse!r}")
        object.__setattr__(self, "fps", float(self.fps))
        if self.collapse is not None:
            object.__setattr__(self, "collapse", float(self.collapse))

    def to_dict(self) -> dict[str, Any]:
        return {"fps": self.fps, "collapse": self.collapse}

    def key(self) -> str:
        """The JSON stored with the index and with each video file (compared to decide on re-sampling)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_key(cls, text: str | None) -> VideoSampling | None:
        if not text:
            return None
        d = json.loads(text)
        return cls(fps=d["fps"], collapse=d.get("collapse"))


def sample_frames(path: str | os.PathLike, fps: float) -> Iterator[tuple[int, float, Image.Image]]:
    """The frames of a video at ``fps`` per second: the first frame at or after ``0, 1/fps, 2/fps, ...`` s.

    Returns:
        An iterator of ``(frame index, time s, RGB image)`` (times from the first frame, as
        :func:`~shusheng.data.video.iter_video_frames` gives them).

    Raises:
        VideoLoadError: unreadable, not a video or corrupt (when called, or while iterating).
        ImportError: PyAV is missing (names the ``video`` extra).
    """
    frames = iter_video_frames(path)  # opens and checks the file now
    return _every(frames, float(fps))


def _every(frames: Iterator[tuple[int, float, Image.Image]], fps: float
           ) -> Iterator[tuple[int, float, Image.Image]]:
    next_t = 0.0
    for index, t, img in frames:
        if t + _TIME_TOLERANCE >= next_t:
            yield index, t, img
            next_t = (math.floor((t + _TIME_TOLERANCE) * fps) + 1) / fps


@dataclass
class VideoEntries:
    """What :func:`embed_video` made of one video: its entries (whole frames and regions) with their spans.

    Attributes:
        width, height: frame size.
        vectors: ``(n, dim)`` float32, one row per entry.
        boxes: ``None`` for a whole frame, else the region's ``(x, y, w, h)`` in frame pixels.
        sources: ``"image"`` (whole frame) or ``"detector"``, per entry.
        spans: ``(frame index, time, time_end)`` per entry (a region shares its frame's).
        sampled: frames run through the embedder. kept: whole-frame entries after collapsing.
        regions: region crops run through the embedder.
    """

    width: int = 0
    height: int = 0
    vectors: np.ndarray | None = None
    boxes: list[Box | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    spans: list[FrameSpan] = field(default_factory=list)
    sampled: int = 0
    kept: int = 0
    regions: int = 0


def _chunks(frames: Iterator, n: int) -> Iterator[list]:
    """Lists of ``n`` frames; the first holds one, so that the frame size is checked before more are decoded."""
    for size in itertools.chain([1], itertools.repeat(n)):
        chunk = list(itertools.islice(frames, size))
        if not chunk:
            return
        yield chunk


def _prefetched(chunks: Iterator[list], pool: Executor | None) -> Iterator[list]:
    """``chunks``, the next one decoded in ``pool`` while the caller works on the current one."""
    if pool is None:
        yield from chunks
        return
    pending: Future = pool.submit(next, chunks, None)
    try:
        while (chunk := pending.result()) is not None:
            pending = pool.submit(next, chunks, None)
            yield chunk
    finally:
        if not pending.done():  # stopped early: let the decode finish before the generator is closed
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - the error that stopped the caller is the one to report
                pass
        chunks.close()


def embed_video(path: str | os.PathLike, embedder: Embedder, sampling: VideoSampling, *, batch_size: int = 32,
                detector: Callable[[Image.Image, float], Sequence[Sequence[float]]] | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, pool: Executor | None = None,
                only_frames: Mapping[int, FrameSpan] | None = None) -> VideoEntries:
    """Samples, embeds and collapses the frames of one video (see the module docstring). Memory stays bounded:
    frames are decoded, embedded and dropped ``batch_size`` at a time.

    Args:
        path: the video file.
        embedder: embeds the (downscaled) frames and region crops.
        sampling: the rate and the collapse threshold.
        batch_size: frames per embedder call.
        detector: ``detector(full-resolution frame, time) -> [[x, y, w, h], ...]`` run on each kept frame.
        max_pixels: videos whose frames are larger are refused (``VideoLoadError``).
        pool: decodes the next batch of frames while the current one is embedded.
        only_frames: regions only: ``{frame index: span}`` of frames kept before; the detector runs on those
            frames and no whole-frame entry is made.

    Raises:
        VideoLoadError: unreadable, not a video, corrupt, or frames over ``max_pixels``.
        ImportError: PyAV is missing.
    """
    if only_frames is not None:
        last = max(only_frames, default=-1)
        frames = ((i, t, img) for i, t, img in itertools.takewhile(lambda f: f[0] <= last, iter_video_frames(path))
                  if i in only_frames)
    else:
        frames = sample_frames(path, sampling.fps)
    out = VideoEntries()
    dim = int(embedder.dim)
    vectors: list[np.ndarray] = []  # (n_i, dim) per batch, in entry order
    threshold = sampling.collapse
    rep = None  # vector of the first frame of the current run
    run_span: list | None = None  # [frame, time, time_end], shared by the run's entries; grows with the run
    spans: list[list] = []
    with contextlib.closing(_prefetched(_chunks(frames, batch_size), pool)) as chunks:
        for chunk in chunks:
            if not out.width:
                out.width, out.height = chunk[0][2].size
                if max_pixels is not None and out.width * out.height > max_pixels:
                    raise VideoLoadError(repr(os.fspath(path)), f"frames of {out.width}x{out.height} pixels "
                                         f"exceed the limit of {max_pixels}")
            if only_frames is None:
                vecs = normalise(embedder.embed_images([downscale(img) for *_, img in chunk],
                                                       batch_size=batch_size))
                out.sampled += len(chunk)
            rows: list[np.ndarray | None] = []  # this batch's entries: a frame's vector, or None for a crop
            crops: list[Image.Image] = []
            for k, (index, t, img) in enumerate(chunk):
                if only_frames is not None:
                    run_span = list(only_frames[index])
                else:
                    if rep is not None and threshold is not None and float(vecs[k] @ rep) >= threshold:
                        run_span[2] = t  # the run now lasts until this frame
                        continue
                    rep, run_span = vecs[k], [index, t, t]
                    rows.append(vecs[k])
                    out.boxes.append(None)
                    out.sources.append("image")
                    spans.append(run_span)
                    out.kept += 1
                for box in detector(img, t) if detector is not None else ():
                    clipped, _ = clip_box(box, img.width, img.height)
                    if clipped is not None:
                        rows.append(None)
                        out.boxes.append(clipped)
                        out.sources.append("detector")
                        spans.append(run_span)
                        crops.append(downscale(crop_with_context(img, clipped)))
            if crops:  # embedded batch by batch too: memory stays bounded on long videos
                crop_vecs = iter(normalise(embedder.embed_images(crops, batch_size=batch_size)))
                rows = [v if v is not None else next(crop_vecs) for v in rows]
                out.regions += len(crops)
            if rows:
                vectors.append(np.stack(rows).astype(np.float32))
    out.vectors = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
    out.spans = [(int(s[0]), float(s[1]), float(s[2])) for s in spans]
    return out


def read_frame(path: str | os.PathLike, time_s: float, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> Image.Image:
    """The frame of a video at ``time_s`` seconds from its first frame (the time an index entry records), seeking
    to the keyframe before it rather than decoding the video from the start.

    Raises:
        VideoLoadError: unreadable, not a video, corrupt, no frame at that time, or frames over ``max_pixels``.
        ImportError: PyAV is missing.
    """
    from shusheng._deps import require

    av = require("av", extra="video")
    name = repr(os.fspath(path))
    frames = iter_video_frames(path)  # the checks and messages of the reader; its first frame gives t0
    try:
        _, _, first = next(frames)
    except StopIteration:  # pragma: no cover - iter_video_frames raises VideoLoadError instead
        raise VideoLoadError(name, "no decodable frame") from None
    finally:
        frames.close()
    if max_pixels is not None and first.width * first.height > max_pixels:
        raise VideoLoadError(name, f"frames of {first.width}x{first.height} pixels exceed the limit of {max_pixels}")
    if time_s <= _TIME_TOLERANCE:
        return first
    try:
        container = av.open(os.fspath(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoLoadError(name, f"not a readable video ({type(e).__name__}: {e})") from e
    try:
        stream = container.streams.video[0]
        t0 = None
        for frame in container.decode(stream):  # the first frame's time: what index times are relative to
            if frame.pts is not None and frame.time_base is not None:
                t0 = float(frame.pts * frame.time_base)
            break
        if t0 is not None and stream.time_base is not None:
            container.seek(int((t0 + time_s - _TIME_TOLERANCE) / stream.time_base), stream=stream, backward=True)
            last = None
            for frame in container.decode(stream):
                if frame.pts is None:
                    break
                if float(frame.pts * frame.time_base) - t0 >= time_s - _TIME_TOLERANCE:
                    return frame.to_image()
                last = frame
            if last is not None:
                raise VideoLoadError(name, f"no frame at {time_s:.3f} s (the video is shorter)")
    except av.error.FFmpegError:
        pass  # seeking is not possible in every file: decode from the start below
    finally:
        container.close()
    for _, t, img in iter_video_frames(path):
        if t >= time_s - _TIME_TOLERANCE:
            return img
    raise VideoLoadError(name, f"no frame at {time_s:.3f} s (the video is shorter)")
