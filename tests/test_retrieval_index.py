"""shusheng.retrieval_index: embedders, the FAISS + SQLite store, incremental and crash-safe folder ingest, search.

Uses a deterministic colour embedder (a test double defined here) and tiny generated images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shusheng.data import ImageLoadError
from shusheng.retrieval_index import embedders as emb_mod
from shusheng.retrieval_index.index import (
    COMMIT_FILE,
    VECTORS_FILE,
    EmbedderMismatchError,
    Index,
    IndexLockedError,
    IndexNotFoundError,
    RetrievalIndexError,
    choose_index_spec,
)
from shusheng.retrieval_index.ingest import index_folder, scan_folder

faiss = pytest.importorskip("faiss")

PALETTE = {
    "red": (230, 20, 20), "green": (20, 170, 40), "blue": (20, 40, 230), "yellow": (240, 220, 30),
    "white": (250, 250, 250), "black": (10, 10, 10), "orange": (250, 140, 10), "purple": (130, 20, 170),
}


class ColorEmbedder:
    """Test double: an image's vector is its mean soft membership to 8 palette colours, plus 4 coarse
    brightness dims; a text's vector is the vector of a solid image of the palette colour it names."""

    dim = 12

    def __init__(self, name: str = "test-color", delay: float = 0.0):
        self.name = name
        self.delay = delay
        self.images_embedded = 0
        self.calls = 0
        self._centres = np.array(list(PALETTE.values()), np.float64)

    def _vec(self, rgb: np.ndarray) -> np.ndarray:  # rgb (N, 3) float
        d2 = ((rgb[:, None, :] - self._centres[None]) ** 2).sum(-1)  # (N, 8)
        member = np.exp(-d2 / (2 * 45.0 ** 2))
        member /= member.sum(1, keepdims=True) + 1e-9
        lum = rgb.mean(1) / 255.0
        bins = np.stack([(lum < 0.25), (lum >= 0.25) & (lum < 0.5), (lum >= 0.5) & (lum < 0.75), lum >= 0.75], 1)
        v = np.concatenate([member.mean(0), 0.3 * bins.mean(0)]).astype(np.float32)
        return v / np.linalg.norm(v)

    def embed_images(self, images, batch_size=32, progress=False):
        if self.delay:
            time.sleep(self.delay)
        self.calls += 1
        self.images_embedded += len(images)
        out = [self._vec(np.asarray(im.convert("RGB").resize((16, 16)), np.float64).reshape(-1, 3)) for im in images]
        return np.stack(out) if out else np.empty((0, self.dim), np.float32)

    def embed_texts(self, texts, batch_size=64):
        out = []
        for t in texts:
            colour = next((PALETTE[w] for w in t.lower().split() if w in PALETTE), (128, 128, 128))
            out.append(self._vec(np.array([colour], np.float64)))
        return np.stack(out)


def _solid(path: Path, colour, size=(32, 24), fmt=None, exif_date: str | None = None, square=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, PALETTE[colour] if isinstance(colour, str) else colour)
    if square is not None:  # (x, y, w, h, colour)
        x, y, w, h, c = square
        img.paste(PALETTE[c], (x, y, x + w, y + h))
    kwargs = {}
    if exif_date is not None:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = exif_date
        kwargs["exif"] = exif.tobytes()
    img.save(path, fmt, **kwargs)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    _solid(d / "red.png", "red")
    _solid(d / "green.png", "green")
    _solid(d / "blue.png", "blue")
    _solid(d / "sub" / "yellow.png", "yellow")
    _solid(d / "sub" / "white.png", "white")
    return d


def _index_paths(index_dir: Path) -> list[str]:
    with Index.open(index_dir) as idx:
        return sorted(idx.paths_under("/"))


# ------------------------------------------------------------------------------------------------ incremental
def test_incremental_reindex(photos):
    emb = ColorEmbedder()
    r1 = index_folder(photos, embedder=emb, progress=False)
    assert (r1.added, r1.embedded, r1.skipped) == (5, 5, [])
    assert emb.images_embedded == 5
    idx_dir = photos / ".shusheng-index"
    assert {p.name for p in idx_dir.iterdir()} >= {"meta.sqlite", "vectors.faiss", "embedder.json", "commit.json"}

    # second run: nothing embedded, nothing read beyond stat
    r2 = index_folder(photos, embedder=emb, progress=False)
    assert (r2.added, r2.updated, r2.unchanged, r2.removed, r2.embedded) == (0, 0, 5, 0, 0)
    assert emb.images_embedded == 5

    # touched but identical content: unchanged, not embedded
    os.utime(photos / "red.png", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    r3 = index_folder(photos, embedder=emb, progress=False)
    assert (r3.unchanged, r3.embedded) == (5, 0)

    # modified content: re-embedded, and search sees the new content
    _solid(photos / "green.png", "purple")
    r4 = index_folder(photos, embedder=emb, progress=False)
    assert (r4.updated, r4.embedded, r4.unchanged) == (1, 1, 4)
    with Index.open(idx_dir) as idx:
        top = idx.search(text="purple", k=1, embedder=emb)[0]
        assert top.path.endswith("green.png") and top.score > 0.9

    # deleted: gone from metadata and from the vectors
    (photos / "blue.png").unlink()
    r5 = index_folder(photos, embedder=emb, progress=False)
    assert (r5.removed, r5.embedded) == (1, 0)
    with Index.open(idx_dir) as idx:
        assert idx.ntotal == 4
        assert all(not h.path.endswith("blue.png") for h in idx.search(text="blue", k=10, embedder=emb))

    # renamed / moved: the vector is reused, nothing embedded
    before = emb.images_embedded
    (photos / "moved").mkdir()
    (photos / "red.png").rename(photos / "moved" / "crimson.png")
    r6 = index_folder(photos, embedder=emb, progress=False)
    assert (r6.added, r6.removed, r6.reused, r6.embedded) == (1, 1, 1, 0)
    assert emb.images_embedded == before
    with Index.open(idx_dir) as idx:
        top = idx.search(text="red", k=1, embedder=emb)[0]
        assert top.path == str(photos / "moved" / "crimson.png") and top.score > 0.99
        assert idx.ntotal == 4


def test_index_path_outside_folder_and_embedder_recorded(photos, tmp_path):
    emb_mod.register_embedder("test-color")(lambda checkpoint=None, device=None: ColorEmbedder())
    try:
        index_folder(photos, tmp_path / "idx", embedder="test-color", progress=False)
        # embedder=None: the recorded one is rebuilt from the registry
        report = index_folder(photos, tmp_path / "idx", progress=False)
        assert report.unchanged == 5
        with Index.open(tmp_path / "idx") as idx:
            assert idx.embedder.name == "test-color"
            assert idx.search(text="yellow", k=1)[0].path.endswith("yellow.png")
    finally:
        emb_mod._EMBEDDERS.pop("test-color", None)
    assert not (photos / ".shusheng-index").exists()


# ------------------------------------------------------------------------------------------------ search
def test_search_scores_ranking_threshold(photos):
    emb = ColorEmbedder()
    index_folder(photos, embedder=emb, progress=False)
    with Index.open(photos / ".shusheng-index", embedder=emb) as idx:
        hits = idx.search(text="red", k=5)
        assert [h.path for h in hits][0].endswith("red.png")
        assert len(hits) == 5
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        # scores are exact cosines between the query vector and the image vector
        red_vec = emb.embed_images([Image.open(photos / "red.png")])[0]
        assert hits[0].score == pytest.approx(float(red_vec @ emb.embed_texts(["red"])[0]), abs=1e-5)
        # threshold: exactly the hits at or above it
        t = (scores[1] + scores[2]) / 2
        cut = idx.search(text="red", k=5, threshold=t)
        assert [h.path for h in cut] == [h.path for h in hits[:2]]
        assert idx.search(text="red", k=5, threshold=1.01) == []
        # image -> image
        q = _solid(photos.parent / "query.png", (225, 25, 25))
        top = idx.search(image=q, k=1)[0]
        assert top.path.endswith("red.png") and top.score > 0.99
        # text + image: the normalised sum lands between them
        both = idx.search(text="yellow", image=q, k=2)
        assert {Path(h.path).name for h in both} == {"red.png", "yellow.png"}
        with pytest.raises(ValueError, match="text, an image"):
            idx.search(k=3)


def test_search_glob_and_date_filters(tmp_path):
    d = tmp_path / "p"
    _solid(d / "2019" / "a.jpg", "red", fmt="JPEG", exif_date="2019:07:01 10:00:00")
    _solid(d / "2021" / "b.jpg", "red", fmt="JPEG", exif_date="2021:03:15 12:30:00")
    p = _solid(d / "2021" / "c.png", (235, 30, 20))  # no EXIF: dated by its mtime
    ts = time.mktime((2022, 1, 2, 8, 0, 0, 0, 0, -1))
    os.utime(p, (ts, ts))
    emb = ColorEmbedder()
    index_folder(d, embedder=emb, progress=False)
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        names = lambda hits: sorted(Path(h.path).name for h in hits)  # noqa: E731
        assert names(idx.search(text="red", k=10)) == ["a.jpg", "b.jpg", "c.png"]
        assert names(idx.search(text="red", k=10, folder_glob="2021/*")) == ["b.jpg", "c.png"]
        assert names(idx.search(text="red", k=10, folder_glob="*.jpg")) == ["a.jpg", "b.jpg"]
        assert names(idx.search(text="red", k=10, folder_glob=str(d / "2019" / "*"))) == ["a.jpg"]
        assert names(idx.search(text="red", k=10, date_from="2020-01-01")) == ["b.jpg", "c.png"]
        assert names(idx.search(text="red", k=10, date_to="2021-03-15")) == ["a.jpg", "b.jpg"]  # whole day
        assert names(idx.search(text="red", k=10, date_from="2021-01-01", date_to="2021-12-31")) == ["b.jpg"]
        hit = idx.search(text="red", k=10, date_from="2022-01-02", date_to="2022-01-02")
        assert names(hit) == ["c.png"] and hit[0].date == "2022-01-02T08:00:00"
        assert idx.search(text="red", k=1, folder_glob="2019/*")[0].date == "2019-07-01T10:00:00"
        with pytest.raises(ValueError, match="invalid date"):
            idx.search(text="red", date_from="last tuesday")


def test_filters_overfetch_beyond_first_candidates(tmp_path):
    """Filtered results are found even when the top candidates are all filtered out."""
    d = tmp_path / "p"
    for i in range(60):
        _solid(d / "many" / f"{i:02d}.png", (230, 20 + i % 5, 20 + i // 5))
    _solid(d / "rare" / "x.png", "orange")
    emb = ColorEmbedder()
    index_folder(d, embedder=emb, progress=False)
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        hits = idx.search(text="red", k=1, folder_glob="rare/*")
        assert [Path(h.path).name for h in hits] == ["x.png"]


def test_region_entries_return_boxes(tmp_path):
    d = tmp_path / "p"
    _solid(d / "scene.png", "blue", size=(64, 64), square=(40, 36, 20, 24, "red"))
    _solid(d / "green.png", "green")
    _solid(d / "orange.png", "orange")
    emb = ColorEmbedder()
    r = index_folder(d, embedder=emb, regions={"scene.png": [[40, 36, 20, 24], [0, 0, 10, 10]]}, progress=False)
    assert (r.regions, r.embedded) == (2, 3)
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        top = idx.search(text="red", k=1)[0]
        assert top.path.endswith("scene.png") and top.box == (40, 36, 20, 24)
        assert (top.width, top.height) == (64, 64)
        # one hit per image by default; every (path, box) with group_by_image=False
        assert len([h for h in idx.search(text="blue", k=10) if h.path.endswith("scene.png")]) == 1
        per_box = [h for h in idx.search(text="blue", k=10, group_by_image=False) if h.path.endswith("scene.png")]
        assert sorted((h.box is None, h.box) for h in per_box)[0][1] in [(40, 36, 20, 24), (0, 0, 10, 10)]
        assert len(per_box) == 3
        # regions=False: whole images only
        assert all(h.box is None for h in idx.search(text="red", k=10, regions=False))
        assert idx.stats()["region_entries"] == 2

    # unchanged regions: nothing embedded; changed regions: only the crops re-embedded
    n = emb.images_embedded
    r2 = index_folder(d, embedder=emb, regions={"scene.png": [[40, 36, 20, 24], [0, 0, 10, 10]]}, progress=False)
    assert emb.images_embedded == n and r2.unchanged == 3
    r3 = index_folder(d, embedder=emb, regions={"scene.png": [[38, 34, 24, 28]]}, progress=False)
    assert (r3.updated, r3.regions, r3.embedded) == (1, 1, 0) and emb.images_embedded == n + 1
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        assert idx.search(text="red", k=1)[0].box == (38, 34, 24, 28)
        assert idx.stats()["region_entries"] == 1


def test_regions_from_json_file_detector_and_api(tmp_path):
    d = tmp_path / "p"
    _solid(d / "scene.png", "white", size=(80, 60), square=(5, 5, 20, 20, "green"))
    _solid(d / "other.png", "blue")
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"scene.png": [{"box": [5, 5, 20, 20], "label": "thing"}, [500, 500, 5, 5]],
                                   "missing.png": [[0, 0, 1, 1]]}))
    calls = []

    def detector(img):
        calls.append(img.size)
        return [[60, 40, 15, 15]] if img.size == (80, 60) else []

    emb = ColorEmbedder()
    r = index_folder(d, embedder=emb, regions=regions, detector=detector, progress=False)
    reasons = dict(r.skipped)
    assert "outside the 80x60 image" in reasons[str(d / "scene.png")]
    assert "not an image in the folder" in reasons[str(d / "missing.png")]
    assert sorted(calls) == [(32, 24), (80, 60)]  # the detector sees full-resolution images
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        assert idx.search(text="green", k=1)[0].box == (5, 5, 20, 20)
        assert idx.stats()["region_entries"] == 2
    # the detector runs only on new or changed files
    index_folder(d, embedder=emb, detector=detector, progress=False)
    assert len(calls) == 2
    # add_regions API on an indexed file
    with Index.open(d / ".shusheng-index", write=True, embedder=emb) as idx:
        ids = idx.add_regions(d / "other.png", [[0, 0, 8, 8]])
        assert len(ids) == 1
        with pytest.raises(KeyError, match="not in the index"):
            idx.add_regions(d / "nope.png", [[0, 0, 1, 1]])
        with pytest.raises(ValueError, match="no area"):
            idx.add_regions(d / "other.png", [[0, 0, 0, 5]])
        idx.commit()
    with Index.open(d / ".shusheng-index", embedder=emb) as idx:
        hits = idx.search(text="blue", k=5, group_by_image=False)
        assert ((0, 0, 8, 8), "other.png") in [(h.box, Path(h.path).name) for h in hits]


def test_index_api_add_remove_update(tmp_path):
    emb = ColorEmbedder()
    a = _solid(tmp_path / "a.png", "red")
    b = _solid(tmp_path / "b.png", "green")
    with Index.open(tmp_path / "idx", create=True, embedder=emb) as idx:
        idx.add(a)
        idx.add(b, boxes=[[0, 0, 10, 10]])
        assert idx.ntotal == 0  # visible at commit
        idx.commit()
        assert idx.ntotal == 3
        _solid(a, "yellow")
        idx.update(a)
        assert idx.remove(b) and not idx.remove(b)
        idx.commit()
        assert idx.ntotal == 1
        assert idx.search(text="yellow", k=1)[0].score > 0.99
        with pytest.raises(FileNotFoundError):
            idx.add(tmp_path / "missing.png")
        (tmp_path / "bad.png").write_bytes(b"not a png")
        with pytest.raises(ImageLoadError, match="not a recognised image"):
            idx.add(tmp_path / "bad.png")
    with pytest.raises(IndexNotFoundError, match="no index"):
        Index.open(tmp_path / "nowhere")
    (tmp_path / "idx" / "meta.sqlite").write_bytes(b"this is not an sqlite database, just damaged bytes" * 40)
    for name in ("meta.sqlite-wal", "meta.sqlite-shm"):
        (tmp_path / "idx" / name).unlink(missing_ok=True)
    with pytest.raises(RetrievalIndexError, match="cannot read the index metadata"):
        Index.open(tmp_path / "idx")


# ------------------------------------------------------------------------------------------------ duplicates
def test_duplicates_exact_and_near(photos):
    shutil.copy(photos / "red.png", photos / "sub" / "red_copy.png")
    _solid(photos / "red_bright.png", (236, 26, 22))  # same picture, slightly different
    emb = ColorEmbedder()
    r = index_folder(photos, embedder=emb, progress=False)
    assert r.reused == 1 and r.embedded == 6  # the byte-identical copy is not embedded
    with Index.open(photos / ".shusheng-index") as idx:
        exact = idx.duplicates()
        assert [g.kind for g in exact] == ["exact"]
        assert sorted(Path(p).name for p in exact[0].paths) == ["red.png", "red_copy.png"]
        groups = idx.duplicates(near=0.97)
        near = [g for g in groups if g.kind == "near"]
        assert len(near) == 1
        assert sorted(Path(p).name for p in near[0].paths) == ["red.png", "red_bright.png", "red_copy.png"]
        assert 0.97 <= near[0].score <= 1.0
        assert [g for g in idx.duplicates(near=0.99999) if g.kind == "near"] == []


# ------------------------------------------------------------------------------------------------ embedders
def test_embedder_mismatch_is_refused(photos):
    index_folder(photos, embedder=ColorEmbedder(), progress=False)
    with pytest.raises(EmbedderMismatchError, match="test-color"):
        index_folder(photos, embedder=ColorEmbedder(name="other-model"), progress=False)
    # a name is checked before any model is loaded
    with pytest.raises(EmbedderMismatchError, match="--embedder test-color"):
        index_folder(photos, embedder="shusheng-mini-clip", progress=False)
    with Index.open(photos / ".shusheng-index") as idx:
        with pytest.raises(EmbedderMismatchError):
            idx.search(text="red", embedder=ColorEmbedder(name="other-model"))
        with pytest.raises(EmbedderMismatchError, match="dim"):
            idx.search(vector=np.ones(5, np.float32))
        assert idx.search(vector=np.ones(ColorEmbedder.dim, np.float32), k=1)


def test_registry_and_errors():
    assert "shusheng-mini-clip" in emb_mod.list_embedders()
    with pytest.raises(ValueError, match="unknown embedder"):
        emb_mod.create_embedder("no-such-model")
    with pytest.raises(FileNotFoundError, match="--checkpoint FILE"):
        emb_mod.create_embedder("open_clip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        emb_mod.create_embedder("ViT-B-32", checkpoint="/nonexistent/weights.safetensors")
    assert isinstance(ColorEmbedder(), emb_mod.Embedder)
    with pytest.warns(UserWarning, match="registered twice"):
        emb_mod.register_embedder("shusheng-mini-clip")(lambda checkpoint=None, device=None: None)
    with pytest.warns(UserWarning):
        emb_mod.register_embedder("shusheng-mini-clip")(emb_mod._shusheng_mini_clip)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("oc")
    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "shusheng-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "shusheng-test-tiny-clip.json")
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("shusheng-test-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), d / "weights.pt")
    return model.eval(), d / "weights.pt"


def test_open_clip_embedder_offline(tiny_open_clip, photos, tmp_path):
    import open_clip
    import torch

    model, ckpt = tiny_open_clip
    emb = emb_mod.create_embedder("open_clip:shusheng-test-tiny-clip", checkpoint=ckpt, device="cpu")
    assert isinstance(emb, emb_mod.OpenClipEmbedder) and isinstance(emb, emb_mod.Embedder)
    assert (emb.name, emb.dim) == ("open_clip:shusheng-test-tiny-clip", 24)
    images = [Image.open(p).convert("RGB") for p in sorted(photos.rglob("*.png"))]
    vecs = emb.embed_images(images, batch_size=2, progress=False)
    assert vecs.shape == (5, 24) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    _, _, preprocess = open_clip.create_model_and_transforms("shusheng-test-tiny-clip", pretrained=None)
    with torch.no_grad():  # the same numbers as the model itself, with its own weights loaded from the file
        ref = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True).numpy()
        tref = model.encode_text(open_clip.get_tokenizer("shusheng-test-tiny-clip")(["a red car"]),
                                 normalize=True).numpy()
    np.testing.assert_allclose(vecs, ref, atol=1e-5)
    np.testing.assert_allclose(emb.embed_texts(["a red car"]), tref, atol=1e-5)
    # a bare architecture name works too, and it plugs into ingest + search
    emb2 = emb_mod.create_embedder("shusheng-test-tiny-clip", checkpoint=ckpt.parent / "weights.pt")
    r = index_folder(photos, tmp_path / "oc-idx", embedder=emb2, progress=False)
    assert r.added == 5
    with Index.open(tmp_path / "oc-idx", embedder=emb2) as idx:
        hit = idx.search(image=photos / "red.png", k=1)[0]
        assert hit.path.endswith("red.png") and hit.score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(FileNotFoundError, match="no open_clip weights"):
        emb_mod.create_embedder("open_clip:shusheng-test-tiny-clip", checkpoint=tmp_path)


# ------------------------------------------------------------------------------------------------ bad input
def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_bad_inputs_are_skipped_listed_and_nothing_is_lost(photos, monkeypatch):
    emb = ColorEmbedder()
    index_folder(photos, embedder=emb, progress=False)
    bad = photos / "bad"
    bad.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (64, 64), PALETTE["orange"]).save(good, "PNG", compress_level=0)
    (bad / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.gif").write_text("this is not an image")
    (bad / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    _solid(bad / "huge.png", "black", size=(1200, 1000))  # over the max_pixels given below
    os.symlink("loop.jpg", bad / "loop.jpg")  # a symlink to itself
    os.symlink("missing.png", bad / "dangling.png")
    os.symlink("..", bad / "parent")  # a folder loop: must not recurse forever
    os.mkfifo(bad / "pipe.png")  # would block a naive reader
    locked = _solid(bad / "locked.png", "purple")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as it would for a user
        from shusheng.retrieval_index import ingest

        real = ingest.read_file

        def read_file(path):
            if path.endswith("locked.png"):
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(ingest, "read_file", read_file)
    # an indexed file that turns corrupt keeps its entry
    (photos / "green.png").write_bytes(b"garbage, not a png")
    r = index_folder(photos, embedder=emb, progress=False, max_pixels=1_000_000)
    reasons = {Path(p).name: reason for p, reason in r.skipped}
    assert "truncated" in reasons["truncated.png"]
    assert "corrupt" in reasons["corrupt.jpg"] or "not a recognised image" in reasons["corrupt.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "not a recognised image" in reasons["notes.gif"]
    assert "decompression bomb" in reasons["bomb.png"] or "exceeds the limit" in reasons["bomb.png"]
    assert "exceeds the limit" in reasons["huge.png"]
    assert "symlink loop" in reasons["loop.jpg"]
    assert "broken symlink" in reasons["dangling.png"]
    assert "symlink loop" in reasons["parent"]
    assert "not a regular file" in reasons["pipe.png"]
    assert "permission denied" in reasons["locked.png"]
    assert "not a recognised image" in reasons["green.png"]
    assert len(r.skipped) == 12 and (r.added, r.embedded) == (0, 0)
    assert "12 skipped" in r.summary() and "locked.png: permission denied" in r.summary()
    names = [Path(p).name for p in _index_paths(photos / ".shusheng-index")]
    assert sorted(names) == ["blue.png", "green.png", "red.png", "white.png", "yellow.png"]
    with Index.open(photos / ".shusheng-index", embedder=emb) as idx:
        assert idx.search(text="green", k=1)[0].path.endswith("green.png")  # its old vector survives
    os.chmod(locked, 0o644)


def test_scan_folder_lists_unlistable_folders_and_keeps_their_entries(photos):
    emb = ColorEmbedder()
    index_folder(photos, embedder=emb, progress=False)
    files, skipped, unlisted = scan_folder(photos, skip=[photos / ".shusheng-index"])
    assert len(files) == 5 and skipped == [] and unlisted == []
    # a folder that can no longer be listed must not make its indexed files disappear
    import shusheng.retrieval_index.ingest as ingest

    real = ingest.scan_folder

    def scan(root, skip=(), include_hidden=False):
        files, skipped, unlisted = real(root, skip, include_hidden)
        sub = str(photos / "sub")
        return ([f for f in files if not f.startswith(sub)], skipped + [(sub, "cannot list folder")], [sub])

    ingest.scan_folder = scan
    try:
        r = index_folder(photos, embedder=emb, progress=False)
    finally:
        ingest.scan_folder = real
    assert r.removed == 0 and len(_index_paths(photos / ".shusheng-index")) == 5


# ------------------------------------------------------------------------------------------------ locking
def test_second_writer_gets_a_clear_error_readers_do_not(photos):
    emb = ColorEmbedder()
    index_folder(photos, embedder=emb, progress=False)
    path = photos / ".shusheng-index"
    with Index.open(path, write=True, embedder=emb):
        with pytest.raises(IndexLockedError, match=f"being updated by PID {os.getpid()}"):
            Index.open(path, write=True, embedder=emb)
        with pytest.raises(IndexLockedError):
            index_folder(photos, embedder=emb, progress=False)
        with Index.open(path) as reader:  # readers need no lock
            assert reader.ntotal == 5
    with Index.open(path, write=True, embedder=emb):  # released on close
        pass


# ------------------------------------------------------------------------------------------------ crash safety
_CRASH_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_retrieval_index import ColorEmbedder
from shusheng.retrieval_index.ingest import index_folder
index_folder({folder!r}, embedder=ColorEmbedder(delay=0.15), batch_size=2, commit_every=2, progress=False,
             workers=1)
print("finished")
"""


def _count_files(index_dir: Path) -> int:
    try:
        with Index.open(index_dir) as idx:
            return idx.stats()["files"]
    except IndexNotFoundError:  # not created yet (embedder.json is written last, once the schema exists)
        return 0


def test_kill_9_mid_ingest_keeps_last_commit_and_next_run_resumes(tmp_path):
    d = tmp_path / "p"
    for i in range(30):
        _solid(d / f"{i:02d}.png", (20 + 7 * i, 200 - 5 * i, (40 * i) % 255))
    script = _CRASH_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    index_dir = d / ".shusheng-index"
    deadline = time.time() + 60
    try:
        while _count_files(index_dir) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "ingest made no progress"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the last committed state is readable: metadata and vectors agree, search works
    with Index.open(index_dir) as idx:
        stats = idx.stats()
        n_files, n_entries = stats["files"], stats["entries"]
        assert 6 <= n_files < 30 and n_entries == n_files == idx.ntotal
        hits = idx.search(vector=np.ones(ColorEmbedder.dim, np.float32), k=100, embedder=ColorEmbedder())
        assert len(hits) == n_files
    # the next run embeds only what was not committed, and completes
    emb = ColorEmbedder()
    r = index_folder(d, embedder=emb, progress=False)
    assert (r.added, r.unchanged, r.embedded) == (30 - n_files, n_files, 30 - n_files)
    assert emb.images_embedded == 30 - n_files
    with Index.open(index_dir) as idx:
        assert idx.ntotal == 30 and idx.stats()["files"] == 30


def test_vector_file_behind_metadata_is_reconciled(photos):
    emb = ColorEmbedder()
    index_folder(photos, embedder=emb, progress=False)
    path = photos / ".shusheng-index"
    extra = _solid(photos / "extra.png", "orange")
    # commit metadata only (as ingest does between checkpoints), then "crash" before writing vectors.faiss
    with Index.open(path, write=True, embedder=emb) as idx:
        gen0 = idx.generation
        idx.add(extra)
        idx.remove(photos / "red.png")
        assert idx.commit(write_vectors=False) == gen0 + 1
    with Index.open(path, embedder=emb) as idx:
        assert idx.ntotal == 5
        assert idx.search(text="orange", k=1)[0].path.endswith("extra.png")
        assert all(not h.path.endswith("red.png") for h in idx.search(text="red", k=10, embedder=emb))
    # a stale marker with a newer vector file (crash between the two renames) is not double-counted
    with Index.open(path, write=True, embedder=emb) as idx:
        idx.commit()
    marker = json.loads((path / COMMIT_FILE).read_text())
    (path / COMMIT_FILE).write_text(json.dumps({**marker, "generation": marker["generation"] - 1}))
    with Index.open(path) as idx:
        assert idx.ntotal == 5
    # an unreadable vector file is rebuilt from the stored vectors
    (path / VECTORS_FILE).write_bytes(b"junk")
    with Index.open(path, embedder=emb) as idx:
        assert idx.ntotal == 5 and idx.search(text="orange", k=1)[0].score > 0.99


# ------------------------------------------------------------------------------------------------ index type
def _add_vectors(idx: Index, vecs: np.ndarray) -> None:
    """One virtual file per vector, committed."""
    for i, v in enumerate(vecs):
        fid = idx.put_file(f"/virtual/{i}.png", size=1, mtime_ns=0, digest=f"h{i}", date="2020-01-01T00:00:00",
                           date_source="mtime", width=8, height=8)
        idx.add_entries(fid, v[None], [None])
    idx.commit()


def test_choose_index_spec_rule():
    assert choose_index_spec(0).exact and choose_index_spec(49_999).factory == "IDMap2,Flat"
    s100k = choose_index_spec(100_000)
    assert s100k.factory == "IVF1024,SQ8" and s100k.nprobe == 32
    s1m = choose_index_spec(1_000_000)
    assert s1m.factory == "IVF4096,SQ8" and s1m.nprobe == 128


def test_switch_to_ivf_and_back(tmp_path, monkeypatch):
    """Crossing FLAT_MAX_ENTRIES retrains an IVF index from the stored vectors; search stays correct."""
    import shusheng.retrieval_index.vectors as vectors_mod

    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", 400)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16)).astype(np.float32)
    vecs = centres[rng.integers(0, 20, 1200)] + 0.3 * rng.normal(size=(1200, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Index.open(tmp_path / "idx", create=True, embedder_name="vec", dim=16) as idx:
        _add_vectors(idx, vecs)
        assert idx.spec.factory.startswith("IVF") and idx.spec.factory.endswith(",SQ8")
    with Index.open(tmp_path / "idx") as idx:
        assert idx.spec.factory.startswith("IVF")
        hits = idx.search(vector=vecs[7], k=5, nprobe=idx.spec.nlist)  # all lists: exact ranking
        assert hits[0].path == "/virtual/7.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        exact = np.argsort(-(vecs @ vecs[7]))[:5]
        assert [h.path for h in hits] == [f"/virtual/{i}.png" for i in exact]
    with Index.open(tmp_path / "idx", write=True, embedder_name="vec", dim=16) as idx:
        for i in range(1001):
            idx.remove(f"/virtual/{i}.png")
        idx.commit()
        assert idx.spec.exact and idx.ntotal == 199


def test_text_queries_visit_more_ivf_lists(tmp_path, monkeypatch):
    """Text queries (across the modality gap) get TEXT_NPROBE_FACTOR x the lists of image queries by default."""
    import shusheng.retrieval_index.vectors as vectors_mod

    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", 400)
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(1000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    class VecEmbedder:
        name, dim = "vec", 16

        def embed_texts(self, texts, batch_size=64):
            return np.stack([vecs[int(t)] for t in texts])

    with Index.open(tmp_path / "idx", create=True, embedder_name="vec", dim=16) as idx:
        _add_vectors(idx, vecs)
    spec = choose_index_spec(1_000_000)
    assert spec.nprobe_for("image") == 128 and spec.nprobe_for("text") == 128 * vectors_mod.TEXT_NPROBE_FACTOR
    assert vectors_mod.IndexSpec("IVF64,SQ8", nprobe=32, nlist=64).nprobe_for("text") == 64  # capped at nlist
    assert choose_index_spec(10).nprobe_for("text") is None  # exact
    with pytest.raises(ValueError, match="modality"):
        spec.nprobe_for("audio")
    seen = []
    original = vectors_mod.VectorIndex.search

    def recording(self, queries, k, nprobe=None, *a, **kw):
        seen.append(nprobe)
        return original(self, queries, k, nprobe, *a, **kw)

    monkeypatch.setattr(vectors_mod.VectorIndex, "search", recording)
    with Index.open(tmp_path / "idx") as idx:
        base = idx.spec.nprobe
        assert base is not None and idx.spec.nprobe_for("text") > base
        hits = idx.search(text="5", k=3, embedder=VecEmbedder())
        assert seen[-1] == idx.spec.nprobe_for("text") and hits[0].path == "/virtual/5.png"
        idx.search(vector=vecs[5], k=3)
        assert seen[-1] in (None, base)  # the index's own nprobe
        idx.search(vector=vecs[5], k=3, modality="text")
        assert seen[-1] == idx.spec.nprobe_for("text")
        idx.search(text="5", k=3, embedder=VecEmbedder(), nprobe=2)
        assert seen[-1] == 2  # an explicit nprobe wins
        with pytest.raises(ValueError, match="modality"):
            idx.search(vector=vecs[5], modality="sound")


def test_several_folders_share_one_index(tmp_path):
    """Re-indexing one folder never drops the files of another (not even one whose name differs in case)."""
    upper, lower = tmp_path / "Pics", tmp_path / "pics"
    _solid(upper / "a.png", "red")
    _solid(lower / "b.png", "blue")
    emb = ColorEmbedder()
    index_folder(upper, tmp_path / "idx", emb, progress=False)
    r = index_folder(lower, tmp_path / "idx", emb, progress=False)
    assert (r.added, r.removed) == (1, 0)
    (lower / "b.png").unlink()
    r = index_folder(lower, tmp_path / "idx", emb, progress=False)
    assert r.removed == 1
    assert _index_paths(tmp_path / "idx") == [str(upper / "a.png")]
    with Index.open(tmp_path / "idx") as idx:
        assert idx.stats()["roots"] == sorted([str(upper), str(lower)])


def test_mini_clip_checkpoint_through_the_registry(photos, tmp_path):
    """``create_embedder("shusheng-mini-clip", checkpoint=DIR)`` loads a save_pretrained folder (a tiny random
    model here) and it works end to end with ingest and search."""
    miniclip = pytest.importorskip("shusheng.miniclip")
    model = miniclip.MiniClip({"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 2, 4], "image_size": 32})
    model.save_pretrained(tmp_path / "mc")
    emb = emb_mod.create_embedder("shusheng-mini-clip", checkpoint=tmp_path / "mc", device="cpu")
    assert isinstance(emb, emb_mod.Embedder) and (emb.name, emb.dim) == ("shusheng-mini-clip", 384)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        emb_mod.create_embedder("shusheng-mini-clip", checkpoint=tmp_path / "mc" / "config.json")
    r = index_folder(photos, tmp_path / "idx", emb, checkpoint=tmp_path / "mc", progress=False)
    assert r.added == 5
    recorded = json.loads((tmp_path / "idx" / "embedder.json").read_text())
    assert recorded["name"] == "shusheng-mini-clip" and recorded["checkpoint"] == str(tmp_path / "mc")
    with Index.open(tmp_path / "idx", embedder=emb) as idx:
        assert idx.search(image=photos / "blue.png", k=1)[0].path.endswith("blue.png")
        hits = idx.search(text="a yellow car", k=5)
        assert len(hits) == 5 and all(-1.0 <= h.score <= 1.0 for h in hits)


def test_unchanged_reindex_keeps_vector_file_trusted(tmp_path, caplog):
    # a re-index that changes no vector must still leave commit.json naming the current generation, so the
    # next reader trusts vectors.faiss instead of rebuilding it from SQLite
    import json as _json

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (16, 16), c).save(folder / f"{i}.png")
    idx_path = tmp_path / "idx"
    emb = ColorEmbedder()
    index_folder(folder, index_path=idx_path, embedder=emb)
    index_folder(folder, index_path=idx_path, embedder=emb)
    with Index.open(idx_path) as index:
        marker = _json.loads((idx_path / "commit.json").read_text())
        assert marker["generation"] == index.generation
    with caplog.at_level("INFO"):
        with Index.open(idx_path):
            pass
    assert "behind" not in caplog.text


# ------------------------------------------------------------------------------------------------ package root API
def test_embedder_info_from_the_package_root(photos, tmp_path):
    from shusheng.retrieval_index import EmbedderInfo, read_embedder_info

    idx_dir = tmp_path / "idx"
    index_folder(photos, idx_dir, ColorEmbedder(), checkpoint=tmp_path / "weights", progress=False)
    info = read_embedder_info(idx_dir)
    assert isinstance(info, EmbedderInfo)
    assert (info.name, info.dim, info.checkpoint, info.format) == ("test-color", 12, str(tmp_path / "weights"), 1)
    assert info.created and info.created[4] == "-" and "T" in info.created
    # the on-disk record is unchanged: the same five keys, the same values
    on_disk = json.loads((idx_dir / "embedder.json").read_text())
    assert list(on_disk) == ["name", "dim", "checkpoint", "format", "created"] and info.to_dict() == on_disk
    with Index.open(idx_dir) as idx:
        assert idx.embedder_info == info and (idx.embedder_name, idx.dim) == (info.name, info.dim)
    # reading it does not open the index: it works while a writer holds the lock, and from embedder.json alone
    with Index.open(idx_dir, write=True, embedder=ColorEmbedder()):
        assert read_embedder_info(idx_dir) == info
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(idx_dir / "embedder.json", alone)
    assert read_embedder_info(alone) == info
    # the index refuses what the record does not accept
    assert info.accepts("test-color") and info.accepts("test-color", 12) and info.accepts(None)
    assert not info.accepts("test-color", 13) and not info.accepts("other")
    # missing and damaged records
    with pytest.raises(IndexNotFoundError, match="no index"):
        read_embedder_info(tmp_path / "nowhere")
    assert read_embedder_info(tmp_path / "nowhere", missing_ok=True) is None
    (alone / "embedder.json").write_text('{"dim": 12}')
    with pytest.raises(ValueError, match="unreadable embedder record"):
        read_embedder_info(alone)
    # an index created without a checkpoint records null
    index_folder(photos, tmp_path / "idx2", ColorEmbedder(), progress=False)
    assert read_embedder_info(tmp_path / "idx2").checkpoint is None


def test_resolve_index_path_from_the_package_root(photos, tmp_path, monkeypatch):
    import shusheng.retrieval_index as ri
    from shusheng.retrieval_index import DEFAULT_INDEX_DIRNAME, resolve_index_path

    assert DEFAULT_INDEX_DIRNAME == ".shusheng-index"
    own = photos / DEFAULT_INDEX_DIRNAME
    assert resolve_index_path(photos) == photos  # nothing indexed yet: the path itself
    assert resolve_index_path(own) == own  # by name, even before it exists
    index_folder(photos, embedder=ColorEmbedder(), progress=False)
    index_folder(photos, tmp_path / "elsewhere", ColorEmbedder(), progress=False)
    assert resolve_index_path(photos) == own  # a collection folder holding its index
    assert resolve_index_path(str(own)) == own
    assert resolve_index_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # an index by its meta.sqlite
    monkeypatch.chdir(photos)
    assert resolve_index_path(None) == own and resolve_index_path(".") == own
    monkeypatch.chdir(tmp_path)
    assert resolve_index_path("photos") == own  # relative paths become absolute
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_index_path("~/photos") == own
    with Index.open(resolve_index_path(photos)) as idx:
        assert idx.path == own
    from shusheng.retrieval_index import cli

    assert cli.resolve_index_path is ri.resolve_index_path  # the old import path keeps working


def test_path_and_record_helpers_import_light(photos, tmp_path):
    """The UI finds an index and reads its embedder through the package root without numpy, FAISS, torch or the
    command-line module."""
    index_folder(photos, embedder=ColorEmbedder(), progress=False)
    code = (f"import sys, shusheng.retrieval_index as ri\n"
            f"p = ri.resolve_index_path({str(photos)!r})\n"
            f"info = ri.read_embedder_info(p)\n"
            f"assert issubclass(ri.IndexNotFoundError, ri.RetrievalIndexError)\n"
            f"print(p, info.name, info.dim)\n"
            f"print(sorted(m for m in ('numpy', 'faiss', 'torch', 'shusheng.retrieval_index.cli') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-2] == f"{photos / '.shusheng-index'} test-color 12" and lines[-1] == "[]"


def test_detector_protocol_objects_and_plain_callables(tmp_path):
    """Anything with the shusheng.detection.Detector shape plugs into ingest and is recorded by its name; a new
    name re-runs detection once; plain callables keep working."""
    from shusheng.detection import Detector

    class Boxes:
        def __init__(self, name):
            self.name, self.calls = name, 0

        def detect(self, image):
            return [{"box": [2, 2, 10, 8], "label": "thing", "score": 0.9}]

        def __call__(self, image):
            self.calls += 1
            return [d["box"] for d in self.detect(image)]

    d = tmp_path / "p"
    _solid(d / "a.png", "red", square=(2, 2, 10, 8, "green"))
    emb = ColorEmbedder()
    v1 = Boxes("boxes-v1")
    assert isinstance(v1, Detector)
    r = index_folder(d, embedder=emb, detector=v1, progress=False)
    assert (r.added, r.regions, v1.calls) == (1, 1, 1)
    with Index.open(d / ".shusheng-index") as idx:
        rec = idx.file_record(d / "a.png")
        assert rec.detector == "boxes-v1" and idx.boxes_of(rec.id, "detector") == [(2, 2, 10, 8)]
    index_folder(d, embedder=emb, detector=v1, progress=False)
    assert v1.calls == 1  # same detector, unchanged file: not run again
    v2 = Boxes("boxes-v2")
    r = index_folder(d, embedder=emb, detector=v2, progress=False)
    assert (v2.calls, r.updated, r.embedded) == (1, 1, 0)  # only the regions are redone

    def plain(img):
        return [[0, 0, 4, 4]]

    r = index_folder(d, embedder=emb, detector=plain, progress=False)
    with Index.open(d / ".shusheng-index") as idx:
        rec = idx.file_record(d / "a.png")
        assert rec.detector.endswith("plain") and idx.boxes_of(rec.id, "detector") == [(0, 0, 4, 4)]
