"""File preparation for the index: read a file once, hash it, decode it (through :func:`shusheng.data.load_image`),
date it (EXIF, else mtime), downscale it for the embedder and cut its region crops.

Used by folder ingest (:mod:`shusheng.retrieval_index.ingest`, in a thread pool) and by
:meth:`shusheng.retrieval_index.Index.add`; it imports neither.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shusheng.data.images import DEFAULT_MAX_PIXELS, load_image

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index.store import Box

logger = logging.getLogger(__name__)

__all__ = [
    "CONTEXT_PAD", "EMBED_MIN_SIDE", "PreparedImage", "clip_box", "crop_with_context", "downscale", "exif_date",
    "file_digest", "hash_file", "iso_from_mtime", "prepare_file", "read_file",
]

#: Images are downscaled (never upscaled) so that their shorter side is this many pixels before embedding:
#: every embedder resizes to ~224 px anyway, and it bounds the memory of queued batches.
EMBED_MIN_SIDE = 448
#: Region crops include this fraction of the box's width/height as context on each side.
CONTEXT_PAD = 0.1
_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 36867, 306


@dataclass
class PreparedImage:
    """A decoded file, ready to embed: metadata, the downscaled image and its region crops."""

    path: str
    size: int
    mtime_ns: int
    digest: str
    date: str
    date_source: str
    width: int
    height: int
    image: Image.Image
    boxes: list[Box] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)
    invalid_boxes: list[str] = field(default_factory=list)
    full: Image.Image | None = None  # full-resolution image, kept only when a detector must see it


def file_digest(data: bytes) -> str:
    """Content hash of a file's bytes (BLAKE2b, 160 bits, hex)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def iso_from_mtime(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))


def exif_date(img: Image.Image) -> str | None:
    """EXIF DateTimeOriginal (else DateTime) as ``YYYY-MM-DDTHH:MM:SS``, or ``None``."""
    try:
        exif = img.getexif()
        raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError) as e:  # malformed EXIF blocks
        logger.debug("unreadable EXIF: %s", e)
        return None
    if not isinstance(raw, str):
        return None
    try:
        parsed = time.strptime(raw.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", parsed)


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[Box | None, str]:
    """``[x, y, w, h]`` clipped to the image, as ints; ``(None, reason)`` when invalid or outside."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, f"region {box!r} is not [x, y, w, h]"
    if not (w > 0 and h > 0):
        return None, f"region {list(box)} has no area"
    x0, y0 = max(0, round(x)), max(0, round(y))
    x1, y1 = min(width, round(x + w)), min(height, round(y + h))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None, f"region {list(box)} lies outside the {width}x{height} image"
    return (x0, y0, x1 - x0, y1 - y0), ""


def crop_with_context(img: Image.Image, box: Box, pad: float = CONTEXT_PAD) -> Image.Image:
    """The crop of ``box`` grown by ``pad`` of its size on each side (clipped to the image)."""
    x, y, w, h = box
    px, py = round(w * pad), round(h * pad)
    return img.crop((max(0, x - px), max(0, y - py), min(img.width, x + w + px), min(img.height, y + h + py)))


def downscale(img: Image.Image, min_side: int = EMBED_MIN_SIDE) -> Image.Image:
    from PIL import Image as PILImage

    scale = min_side / min(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, PILImage.Resampling.BICUBIC, reducing_gap=2.0)


def read_file(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a regular file (raises ``OSError``)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read(), st


def hash_file(path: str, chunk: int = 1 << 20) -> tuple[str, os.stat_result]:
    """:func:`file_digest` and stat of a regular file, read in chunks (videos: never the whole file in memory).

    Raises:
        OSError: unreadable, or not a regular file.
    """
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest(), st


def prepare_file(path: str, boxes: Sequence[Sequence[float]] | None = None, *, data: bytes | None = None,
                 st: os.stat_result | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 keep_full: bool = False) -> PreparedImage:
    """Reads (unless ``data`` is given), hashes, decodes and crops one file. Thread-safe.

    Raises:
        ImageLoadError: not a usable image. OSError: unreadable.
    """
    if data is None:
        data, st = read_file(path)
    img = load_image(data, max_pixels=max_pixels)  # bytes: the file is read once, for hash and pixels
    mtime_ns = st.st_mtime_ns if st is not None else time.time_ns()
    date = exif_date(img)
    prepared = PreparedImage(
        path=path, size=len(data), mtime_ns=mtime_ns, digest=file_digest(data),
        date=date or iso_from_mtime(mtime_ns), date_source="exif" if date else "mtime",
        width=img.width, height=img.height, image=downscale(img), full=img if keep_full else None)
    for box in boxes or ():
        clipped, reason = clip_box(box, img.width, img.height)
        if clipped is None:
            prepared.invalid_boxes.append(reason)
            continue
        prepared.boxes.append(clipped)
        prepared.crops.append(downscale(crop_with_context(img, clipped)))
    return prepared
