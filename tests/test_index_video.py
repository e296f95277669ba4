"""Video collections in the index: frames sampled at a set rate, near-identical frames collapsed, times on hits,
incremental re-index, corrupt videos, regions on frames, the CLI and the app's Search tab."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_retrieval_index import PALETTE, ColorEmbedder, _solid  # noqa: E402

pytest.importorskip("faiss")
pytest.importorskip("av")

from shusheng.cli import main  # noqa: E402
from shusheng.data.synthdrive_drive import generate_drives  # noqa: E402
from shusheng.data.video import iter_video_frames, write_video  # noqa: E402
from shusheng.retrieval_index import Index, index_folder  # noqa: E402
from shusheng.retrieval_index import embedders as emb_mod  # noqa: E402
from shusheng.retrieval_index.video import VideoSampling, read_frame  # noqa: E402


@pytest.fixture(scope="module")
def drives(tmp_path_factory) -> Path:
    """Two SynthDrive drives: 16 frames at 4 fps (4 s), 128 px."""
    out = tmp_path_factory.mktemp("drives")
    generate_drives(out, 2, seed=11, frames=16, fps=4, size=128, progress=False)
    return out


@pytest.fixture
def folder(drives, tmp_path) -> Path:
    """The two drives and two images."""
    d = tmp_path / "clips"
    d.mkdir()
    for name in ("drive_000000.mp4", "drive_000001.mp4"):
        shutil.copy(drives / name, d / name)
    _solid(d / "red.png", "red")
    _solid(d / "blue.png", "blue")
    return d


def _static(path: Path, colour: str = "green", n: int = 12, fps: float = 4) -> Path:
    """A video of ``n`` identical frames."""
    write_video([Image.new("RGB", (64, 48), PALETTE[colour])] * n, path, fps)
    return path


def _frames(index_dir: Path, name: str) -> list[tuple[int, float, float]]:
    with Index.open(index_dir) as idx:
        rec = idx.file_record(next(p for p in idx.paths_under("/") if p.endswith(name)))
        return idx.frame_spans(rec.id)


def test_frames_sampled_at_the_rate_with_times_in_steps_of_1_over_fps(folder):
    emb = ColorEmbedder()
    r = index_folder(folder, embedder=emb, collapse=False, progress=False)
    assert (r.added, r.embedded, r.frames, r.frame_entries, r.skipped) == (4, 2, 8, 8, [])
    assert emb.images_embedded == 10
    assert _frames(folder / ".shusheng-index", "drive_000000.mp4") == [(0, 0.0, 0.0), (4, 1.0, 1.0),
                                                                       (8, 2.0, 2.0), (12, 3.0, 3.0)]
    with Index.open(folder / ".shusheng-index") as idx:
        stats = idx.stats()
        assert (stats["files"], stats["videos"], stats["image_entries"], stats["frame_entries"]) == (4, 2, 2, 8)
        assert stats["video_sampling"] == {"fps": 1.0, "collapse": None}  # stored in the index
        assert idx.video_sampling == VideoSampling(1.0, None)

    # another rate: the videos are sampled again (the recorded no-collapse stays), the images are not touched
    r = index_folder(folder, embedder=emb, video_fps=2, progress=False)
    assert (r.updated, r.unchanged, r.embedded, r.frames) == (2, 2, 0, 16)
    spans = _frames(folder / ".shusheng-index", "drive_000001.mp4")
    assert [t for _, t, _ in spans] == [k / 2 for k in range(8)] and [f for f, _, _ in spans] == list(range(0, 16, 2))
    # faster than the video itself: every frame
    r = index_folder(folder, embedder=emb, video_fps=8, progress=False)
    assert r.frames == 32
    assert [t for _, t, _ in _frames(folder / ".shusheng-index", "drive_000000.mp4")] == [k / 4 for k in range(16)]


def test_static_video_collapses_into_one_entry_spanning_its_frames(folder):
    _static(folder / "static.mp4", n=12, fps=4)  # 3 s of one picture
    emb = ColorEmbedder()
    r = index_folder(folder, embedder=emb, collapse=False, progress=False)
    uncollapsed = r.frame_entries
    assert len(_frames(folder / ".shusheng-index", "static.mp4")) == 3 and uncollapsed == 11

    r = index_folder(folder, embedder=emb, collapse=0.98, progress=False)
    assert r.frames == 11 and r.frame_entries < uncollapsed
    assert _frames(folder / ".shusheng-index", "static.mp4") == [(0, 0.0, 2.0)]
    for name in ("drive_000000.mp4", "drive_000001.mp4"):  # a run starts where a frame differs from its first
        spans = _frames(folder / ".shusheng-index", name)
        assert spans[0][1] == 0.0 and all(a[2] < b[1] for a, b in zip(spans, spans[1:]))
        assert spans[-1][2] == 3.0
    with Index.open(folder / ".shusheng-index", embedder=emb) as idx:
        top = idx.search(text="green", k=1)[0]
        assert top.video == top.path == str(folder / "static.mp4")
        assert (top.time, top.time_end, top.frame, top.when) == (0.0, 2.0, 0, "0.0-2.0 s")
        assert top.to_dict()["video"] == top.path
        image = idx.search(text="red", k=1)[0]
        assert image.path.endswith("red.png") and (image.video, image.time, image.when) == (None, None, "")


def test_reindex_embeds_nothing_and_a_changed_video_is_replaced(folder):
    emb = ColorEmbedder()
    index_folder(folder, embedder=emb, collapse=False, progress=False)
    n = emb.images_embedded
    r = index_folder(folder, embedder=emb, progress=False)
    assert (r.unchanged, r.added, r.updated, r.frames) == (4, 0, 0, 0) and emb.images_embedded == n

    _static(folder / "drive_000000.mp4", "yellow", n=8, fps=4)  # new content under the same name
    shutil.copy(folder / "drive_000001.mp4", folder / "copy.mp4")  # a copy: its vectors are reused
    r = index_folder(folder, embedder=emb, progress=False)
    assert (r.updated, r.added, r.reused, r.unchanged, r.frames) == (1, 1, 1, 3, 2)
    assert emb.images_embedded == n + 2
    assert _frames(folder / ".shusheng-index", "drive_000000.mp4") == [(0, 0.0, 0.0), (4, 1.0, 1.0)]
    assert _frames(folder / ".shusheng-index", "copy.mp4") == _frames(folder / ".shusheng-index", "drive_000001.mp4")
    with Index.open(folder / ".shusheng-index", embedder=emb) as idx:
        assert idx.stats()["frame_entries"] == 2 + 4 + 4
        top = idx.search(text="yellow", k=1)[0]
        assert top.path.endswith("drive_000000.mp4") and top.time in (0.0, 1.0)
    (folder / "copy.mp4").unlink()
    r = index_folder(folder, embedder=emb, progress=False)
    assert r.removed == 1 and emb.images_embedded == n + 2
    r = index_folder(folder, embedder=emb, videos=False, progress=False)  # images only: the videos are dropped
    assert (r.removed, r.unchanged) == (2, 2)


def test_corrupt_videos_are_reported_and_skipped_nothing_lost(folder):
    emb = ColorEmbedder()
    (folder / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    (folder / "empty.mov").write_bytes(b"")
    data = (folder / "drive_000001.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    r = index_folder(folder, embedder=emb, collapse=False, progress=False)
    reasons = {Path(p).name: reason for p, reason in r.skipped}
    assert set(reasons) == {"garbage.mp4", "empty.mov", "truncated.mp4"}
    assert "not a readable video" in reasons["garbage.mp4"] and "empty" in reasons["empty.mov"]
    assert r.added == 4  # the images and the good videos are indexed
    before = _frames(folder / ".shusheng-index", "drive_000000.mp4")

    # an indexed video that becomes corrupt keeps its entries
    (folder / "drive_000000.mp4").write_bytes(b"not a video any more")
    r = index_folder(folder, embedder=emb, progress=False)
    assert str(folder / "drive_000000.mp4") in dict(r.skipped)
    assert _frames(folder / ".shusheng-index", "drive_000000.mp4") == before

    # frames over max_pixels are refused like too-large images
    _static(folder / "big.mp4", n=4)
    r = index_folder(folder, embedder=emb, max_pixels=1000, progress=False)
    assert "64x48 pixels exceed the limit of 1000" in dict(r.skipped)[str(folder / "big.mp4")]


def test_detector_regions_on_kept_frames(folder):
    emb = ColorEmbedder()
    seen = []

    def corner(img):  # a box in the top-left corner of every picture
        seen.append(img.size)
        return [[0, 0, img.width // 2, img.height // 2]]

    r = index_folder(folder, embedder=emb, collapse=False, detector=corner, progress=False)
    assert r.regions == 2 + 8 and sorted(set(seen)) == [(32, 24), (128, 128)]  # full-resolution frames
    with Index.open(folder / ".shusheng-index", embedder=emb) as idx:
        hits = idx.search(text="blue", k=50, group_by_image=False)
        regions = [h for h in hits if h.is_video and h.box is not None]
        assert len(regions) == 8 and all(h.box == (0, 0, 64, 64) for h in regions)
        assert sorted(h.time for h in regions if h.path.endswith("drive_000000.mp4")) == [0.0, 1.0, 2.0, 3.0]
        # grouped: one hit per frame (its best entry), never a frame twice
        grouped = [(h.path, h.frame) for h in idx.search(text="blue", k=50)]
        assert len(grouped) == len(set(grouped)) == 2 + 8

    # a detector with another name runs on the kept frames only: no frame is embedded again
    def other(img):
        return [[img.width // 2, img.height // 2, img.width // 2, img.height // 2]]

    n = emb.images_embedded
    r = index_folder(folder, embedder=emb, detector=other, progress=False)
    assert (r.updated, r.frames, r.embedded, r.regions) == (4, 0, 0, 10) and emb.images_embedded == n + 10
    with Index.open(folder / ".shusheng-index", embedder=emb) as idx:
        boxes = {h.box for h in idx.search(text="blue", k=50, group_by_image=False) if h.is_video and h.box}
        assert boxes == {(64, 64, 64, 64)}


def test_real_embedder_text_query_finds_video_frames(folder, drives):
    pytest.importorskip("shusheng.miniclip")
    from shusheng.miniclip import load_bundled

    try:
        load_bundled()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"bundled shusheng-mini-clip unavailable: {e}")
    r = index_folder(folder, progress=False)
    assert r.frames == 8 and 1 <= r.frame_entries <= 8 and r.embedded == 2
    caption = json.loads((drives / "drive_000000.jsonl").read_text().splitlines()[0])["captions"][1]
    with Index.open(folder / ".shusheng-index") as idx:
        hits = idx.search(text=caption, k=5)  # "A road at dusk with two trucks and one bus."
        videos = [h for h in hits if h.is_video]
        assert hits[0].path == str(folder / "drive_000000.mp4")  # the drive it describes, before solid colours
        for h in videos:
            assert h.time * 1.0 == int(h.time) and h.time_end >= h.time and h.frame == round(h.time * 4)
            frame = read_frame(h.path, h.time)
            decoded = next(img for i, _, img in iter_video_frames(h.path) if i == h.frame)
            assert np.array_equal(np.asarray(frame), np.asarray(decoded))


def test_cli_index_and_search_with_video_fields(folder, capsys):
    emb_mod.register_embedder("test-color-video")(lambda checkpoint=None, device=None: ColorEmbedder("test-color-video"))
    try:
        capsys.readouterr()
        assert main(["index", str(folder), "--embedder", "test-color-video", "--video-fps", "2", "--no-collapse",
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["added"], report["frames"], report["frame_entries"]) == (4, 16, 16)
        assert main(["search", "blue", "--index", str(folder), "-k", "20", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        for h in hits:
            assert {"path", "score", "box", "entry_id", "width", "height", "date", "video", "time", "time_end",
                    "frame"} <= set(h)
        video = [h for h in hits if h["video"]]
        assert video and all(h["video"] == h["path"] and h["time"] * 2 == int(h["time"] * 2) for h in video)
        assert all(h["time"] is None and h["frame"] is None for h in hits if not h["video"])
        # plain text: "path @ 1.5 s"
        assert main(["search", "blue", "--index", str(folder), "-k", "20"]) == 0
        lines = capsys.readouterr().out.splitlines()
        h = video[0]
        assert any(f"{h['path']} @ {h['time']:.1f} s" in line for line in lines)
        assert main(["index", "--stats", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "4 (2 videos)" in out and "16 video frames" in out and "2 frames/s, no collapsing" in out
        assert main(["index", str(folder), "--collapse", "1.5"]) == 1  # not a cosine
    finally:
        emb_mod._EMBEDDERS.pop("test-color-video", None)


def test_app_shows_frames_only_of_videos_in_the_collection(folder, tmp_path):
    from shusheng.apps.tabs.search import SearchApp

    emb = ColorEmbedder()
    index_folder(folder, embedder=emb, collapse=False, progress=False)
    # an entry for a video outside the folders the index was built from (a tampered or foreign index)
    (tmp_path / "elsewhere").mkdir()
    elsewhere = _static(tmp_path / "elsewhere" / "secret.mp4", "blue")
    with Index.open(folder / ".shusheng-index", write=True, embedder=emb) as idx:
        fid = idx.put_file(elsewhere, size=1, mtime_ns=1, digest="x", date="2020-01-01T00:00:00",
                           date_source="mtime", width=64, height=48, sampling=VideoSampling().key())
        idx.add_entries(fid, emb.embed_texts(["blue"]), [None], spans=[(0, 0.0, 0.0)])
        idx.commit()
    app = SearchApp(folder / ".shusheng-index", embedder=emb, allow_dirs=[folder, tmp_path / "elsewhere"])
    try:
        result = app.search("blue", k=12, threshold=None)
        shown = [h.path for h in result.hits]
        assert str(elsewhere) not in shown
        assert any("outside the folders this index was built from" in w for w in result.warnings)
        videos = [(h, item) for h, item in zip(result.hits, result.items) if h.is_video]
        assert len(videos) == 8
        for hit, (picture, caption) in videos:
            assert caption.endswith(f"{Path(hit.path).name} @ {hit.time:.1f} s")
            frame = next(img for i, _, img in iter_video_frames(hit.path) if i == hit.frame)
            assert picture.size == (256, 256)  # scaled for display like an image
            assert np.abs(np.asarray(picture.resize(frame.size), np.float32)
                          - np.asarray(frame, np.float32)).mean() < 8
        assert "2 images + 3 videos (9 frames)" in app.describe()
    finally:
        app.close()


OLD_SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL, date TEXT NOT NULL, date_source TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, detector TEXT, indexed_at REAL NOT NULL);
CREATE INDEX files_hash ON files(hash);
CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE, source TEXT NOT NULL,
    x INTEGER, y INTEGER, w INTEGER, h INTEGER, vector BLOB NOT NULL);
CREATE INDEX entries_file ON entries(file_id);
"""


def test_video_given_directly_and_old_indexes_gain_the_video_columns(folder, tmp_path):
    emb = ColorEmbedder()
    images = tmp_path / "images"
    images.mkdir()
    shutil.move(folder / "red.png", images / "red.png")
    index_folder(images, embedder=emb, progress=False)
    # an index made before videos were supported: its tables lack sampling / frame / time / time_end
    meta = images / ".shusheng-index" / "meta.sqlite"
    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.executescript(OLD_SCHEMA)
    old.execute("ATTACH ? AS new", (str(meta),))
    old.execute("INSERT INTO info SELECT * FROM new.info")
    old.execute("INSERT INTO files SELECT id, path, size, mtime_ns, hash, date, date_source, width, height, detector, "
                "indexed_at FROM new.files")
    old.execute("INSERT INTO entries SELECT id, file_id, source, x, y, w, h, vector FROM new.entries")
    old.commit()
    old.execute("DETACH new")
    old.close()
    (tmp_path / "old.sqlite").replace(meta)
    with Index.open(images / ".shusheng-index", embedder=emb) as idx:  # a reader reads them as NULL
        hit = idx.search(text="red", k=1)[0]
        assert hit.path.endswith("red.png") and hit.time is None and idx.stats()["videos"] == 0

    # one video given directly, into that index: the columns are added, the image stays
    video = folder / "drive_000000.mp4"
    r = index_folder(video, images / ".shusheng-index", embedder=emb, collapse=False, progress=False)
    assert (r.added, r.removed, r.frames) == (1, 0, 4)
    with Index.open(images / ".shusheng-index", embedder=emb) as idx:
        assert idx.stats()["files"] == 2 and str(video) in idx.roots
        assert {h.path for h in idx.search(text="red", k=10)} == {str(images / "red.png"), str(video)}
    # default index of a file: next to it
    r = index_folder(folder / "drive_000001.mp4", embedder=emb, progress=False)
    assert r.index_path == str(folder / ".shusheng-index") and r.added == 1
    (folder / "notes.txt").write_text("not a picture")
    with pytest.raises(NotADirectoryError, match="an image or a video"):
        index_folder(folder / "notes.txt", embedder=emb)


def test_videos_without_pyav_are_skipped_and_images_indexed(folder, monkeypatch):
    import shusheng._deps as deps

    real = deps.require

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("PyAV is needed for videos: pip install 'shusheng[video]'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(deps, "require", no_av)
    r = index_folder(folder, embedder=ColorEmbedder(), progress=False)
    assert r.added == 2 and r.embedded == 2
    assert {Path(p).name: reason for p, reason in r.skipped} == {
        "drive_000000.mp4": "PyAV is needed for videos: pip install 'shusheng[video]'",
        "drive_000001.mp4": "PyAV is needed for videos: pip install 'shusheng[video]'"}
