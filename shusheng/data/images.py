"""The one image loader of shusheng: every entry point (CLI, apps, ingest, training) opens images through
:func:`load_image`.

It validates before it decodes and normalises after: the declared size is checked against a pixel limit before
any pixel data is read (so decompression bombs and absurd dimensions cost nothing), EXIF orientation is applied,
and every mode (palette, greyscale, 16-bit, CMYK, with or without transparency) becomes the requested mode, with
transparency composited on a background colour. Every failure raises :class:`ImageLoadError`, a ``ValueError``
whose message names the file and the reason.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "ImageSource", "load_image"]

#: File name extensions treated as images when scanning folders (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
)

#: Default limit on width * height (64 megapixels). Larger images are refused before decoding.
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

# Errors Pillow's decoders are known to raise on malformed data. UnidentifiedImageError is an OSError.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error, zlib.error,
    Image.DecompressionBombError,
)
# Modes that carry transparency and are composited on the background.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image could not be loaded: missing, empty, truncated, corrupt, not an image, or too large.

    Attributes:
        source: a printable name of what was being loaded (a path, or ``<bytes: N B>``).
        reason: the reason, without the name.
    """

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes: {len(source)} B>"
    if isinstance(source, Image.Image):
        return f"<PIL.Image {source.mode} {source.size[0]}x{source.size[1]}>"
    name = getattr(source, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(source).__name__}>"


def _read_bytes(source: ImageSource, name: str) -> bytes:
    """Reads a path, buffer or binary file object fully into memory."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(name, "file not found")
        if not path.is_file():
            raise ImageLoadError(name, "not a regular file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(name, f"unreadable ({e.strerror or e})") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        try:
            data = source.read()
        except OSError as e:
            raise ImageLoadError(name, f"unreadable stream ({e})") from e
        if not isinstance(data, bytes):
            raise ImageLoadError(name, "stream is not opened in binary mode")
    else:
        raise ImageLoadError(name, f"unsupported source type {type(source).__name__}")
    if len(data) == 0:
        raise ImageLoadError(name, "file is empty (0 bytes)")
    return data


def _check_size(img: Image.Image, name: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(name, f"invalid dimensions {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(
            name,
            f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels to allow it)",
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """Maps 16/32-bit integer and float greyscale to 8-bit ``L`` by its bit depth (not by clipping)."""
    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr, 0.0, 1.0) * 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else np.clip(arr, 0, 255)
        scaled = np.nan_to_num(scaled)
    else:  # "I", "I;16", "I;16B", ...: 16-bit content (what PNG/TIFF decode to these modes)
        scaled = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _normalise_mode(img: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode == "RGBA":
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        img = canvas.convert("RGB")
    if img.mode != mode:
        img = img.convert(mode)
    return img


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    mode: str = "RGB",
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Loads, validates and normalises one image.

    Args:
        source: a path, the encoded bytes, a binary file object, or an already opened ``PIL.Image``.
        max_pixels: refuse images with more than this many pixels (width * height), checked from the header
            before any pixel is decoded. ``None`` disables the limit (Pillow's own hard bomb limit of
            ``2 * Image.MAX_IMAGE_PIXELS`` still applies when opening files and is reported the same way).
        mode: the mode of the returned image: ``"RGB"`` (default), ``"L"``, ``"RGBA"`` or any mode Pillow can
            convert RGB to.
        background: colour that transparency is composited on when ``mode`` has no alpha channel.

    Returns:
        A fully loaded ``PIL.Image`` in ``mode``, upright according to its EXIF orientation, detached from any
        file.

    Raises:
        ImageLoadError: the file is missing or empty, not an image (whatever its extension), truncated or
            corrupt, larger than ``max_pixels``, or in a mode that cannot be converted.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
        _check_size(img, name, max_pixels)
    else:
        data = _read_bytes(source, name)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise ImageLoadError(name, "not a recognised image format (corrupt or not an image)") from e
        except Image.DecompressionBombError as e:
            raise ImageLoadError(name, f"decompression bomb refused by Pillow ({e})") from e
        except _DECODE_ERRORS as e:
            raise ImageLoadError(name, f"corrupt image header ({type(e).__name__}: {e})") from e
        _check_size(img, name, max_pixels)  # header only: nothing decoded yet
        try:
            img.load()
        except _DECODE_ERRORS as e:
            reason = "truncated" if "truncated" in str(e) or isinstance(e, EOFError) else "corrupt"
            raise ImageLoadError(name, f"{reason} image data ({type(e).__name__}: {e})") from e
    try:
        img = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as e:  # a broken EXIF block must not make a good picture unreadable
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, e)
    try:
        out = _normalise_mode(img, mode, background)
    except _DECODE_ERRORS as e:
        raise ImageLoadError(name, f"cannot convert mode {img.mode!r} to {mode!r} ({e})") from e
    if out is source:  # never hand the caller's object back to be mutated
        out = out.copy()
    return out
