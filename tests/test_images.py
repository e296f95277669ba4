"""shusheng.data.load_image: every bad input raises ImageLoadError naming the file; every mode becomes RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shusheng.data import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, load_image


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 5
    arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 7
    return Image.fromarray(arr, "RGB")


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h pixels, with a tiny (invalid) IDAT: only the header is plausible."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _raises(source, match: str, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image(source, **kw)
    return info.value


# ---------------------------------------------------------------- bad inputs
def test_error_type_is_a_value_error_naming_the_file(tmp_path):
    assert issubclass(ImageLoadError, ValueError)
    path = tmp_path / "missing.png"
    err = _raises(path, "file not found")
    assert str(path) in str(err) and err.source == repr(str(path)) and err.reason == "file not found"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _raises(path, "empty")
    assert "empty.jpg" in str(err)
    _raises(b"", "empty")


def test_directory_is_refused(tmp_path):
    _raises(tmp_path, "not a regular file")


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path, fmt, ext):
    data = _encode(_rgb(64, 64), fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    err = _raises(path, "truncated|corrupt")
    assert f"cut.{ext}" in str(err)


def test_corrupt_image_data(tmp_path):
    data = bytearray(_encode(_rgb(64, 64), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(range(40))  # garbage inside the compressed stream
    path = tmp_path / "garbled.png"
    path.write_bytes(bytes(data))
    _raises(path, "corrupt|truncated")


def test_random_bytes_and_text_with_image_extensions(tmp_path):
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    _raises(junk, "not a recognised image")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    err = _raises(text, "not a recognised image")
    assert "notes.png" in str(err)


def test_huge_dimensions_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(_png_header_only(9000, 8000))  # 72 MP declared; the pixel data is bogus and never read
    err = _raises(path, "exceeds the limit")
    assert "9000x8000" in str(err) and "wide.png" in str(err)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_decompression_bomb_refused(tmp_path):
    bomb = Image.new("1", (9000, 8000))  # 72 MP that compresses to a few kB
    data = _encode(bomb, "PNG")
    assert len(data) < 200_000
    _raises(data, "exceeds the limit")
    # beyond Pillow's own hard limit the open itself fails; still reported as ImageLoadError
    _raises(_png_header_only(100_000, 100_000), "decompression bomb|exceeds the limit", max_pixels=None)


def test_pixel_limit_is_configurable():
    data = _encode(_rgb(20, 20))
    _raises(data, "400 pixels exceeds the limit of 100", max_pixels=100)
    assert load_image(data, max_pixels=400).size == (20, 20)
    assert load_image(data, max_pixels=None).size == (20, 20)
    _raises(_rgb(20, 20), "exceeds", max_pixels=10)  # also for PIL images passed in


def test_unsupported_source_type():
    _raises(12345, "unsupported source type")


# ---------------------------------------------------------------- normalisation
def test_sources_path_bytes_stream_and_pil(tmp_path):
    img = _rgb()
    path = tmp_path / "ok.png"
    img.save(path)
    ref = np.asarray(img)
    for src in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes()), img):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), ref)
    assert load_image(img) is not img


def test_exif_orientation_is_applied():
    img = _rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)
    out = load_image(data)
    assert out.size == (20, 40)
    assert out.getexif().get(0x0112, 1) == 1  # orientation consumed, not applied twice downstream
    # 90 degrees clockwise: the red top-right corner (x=39, y=0) ends at the bottom-right (x=19, y=39)
    assert np.asarray(img)[0, 39, 0] > 150 and np.asarray(out)[39, 19, 0] > 150 and np.asarray(out)[0, 19, 0] < 60


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(_encode(rgba))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    assert load_image(_encode(rgba), background=(0, 0, 0)).getpixel((1, 1)) == (0, 0, 0)
    kept = load_image(_encode(rgba), mode="RGBA")
    assert kept.mode == "RGBA" and kept.getpixel((1, 1))[3] == 0
    la = Image.new("LA", (2, 2), (10, 0))
    assert load_image(_encode(la)).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (3, 3), 0)
    p.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    data = _encode(p, transparency=0)
    out = load_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    gif = load_image(_encode(p, "GIF"))
    assert gif.mode == "RGB" and gif.getpixel((1, 1)) == (255, 0, 0)


def test_grey_bilevel_cmyk_and_16_bit():
    assert load_image(_encode(Image.new("L", (3, 2), 77))).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(_encode(Image.new("1", (3, 2), 1))).getpixel((0, 0)) == (255, 255, 255)
    cmyk = load_image(_encode(Image.new("CMYK", (3, 2), (0, 0, 0, 0)), "JPEG", quality=100))
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((0, 0))) > 240
    arr16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode == "I;16"
    out = load_image(_encode(img16))
    assert out.mode == "RGB" and [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [load_image(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_target_modes():
    img = _encode(_rgb())
    assert load_image(img, mode="L").mode == "L"
    assert load_image(img, mode="RGBA").mode == "RGBA"


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_import_is_light():
    """``import shusheng.data`` pulls in neither torch nor pycocotools (SynthDrive loads on first use)."""
    import subprocess
    import sys

    code = ("import sys, shusheng.data as d; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'pycocotools' not in sys.modules; assert callable(d.load_image); "
            "assert d.TEST_SEED == 2023 and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
