"""``index_folder(engine=RayEngine(...))`` / ``shusheng index DIR --engine ray``: the same entries as the in-process
ingest, bad files skipped with the same reasons, resumable per shard. One local Ray (2 CPUs) for the module."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from shusheng.cli import main  # noqa: E402
from shusheng.retrieval_index import embedders as emb_mod  # noqa: E402
from shusheng.retrieval_index import ray_ingest  # noqa: E402
from shusheng.retrieval_index.ingest import index_folder  # noqa: E402
from shusheng.retrieval_index.ray_ingest import SHARDS_DIRNAME, RayEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_retrieval_index  # noqa: E402
from test_retrieval_index import PALETTE, ColorEmbedder, _solid  # noqa: E402

COLOURS = list(PALETTE)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own settings


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # the test double lives in a test module that Ray workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(test_retrieval_index)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(test_retrieval_index)


@pytest.fixture
def drive(tmp_path) -> Path:
    """12 images in 3 folders (a coloured box on a coloured background), a copy of one, a corrupt file."""
    d = tmp_path / "drive"
    for i in range(12):
        _solid(d / f"seq{i % 3}" / f"{i:03d}.jpg" if i % 2 else d / f"seq{i % 3}" / f"{i:03d}.png",
               COLOURS[i % 8], size=(48 + 4 * i, 32), fmt="JPEG" if i % 2 else None,
               square=(8 + i, 16, 12, 10, COLOURS[(i + 3) % 8]))
    shutil.copy(d / "seq0" / "000.png", d / "seq2" / "copy.png")  # identical content: vectors copied
    (d / "seq1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


def _entries(index_dir: Path) -> dict[str, list[tuple]]:
    """``{path: [(source, box and video frame span, vector), ...]}`` straight from the index's SQLite."""
    con = sqlite3.connect(index_dir / "meta.sqlite")
    out: dict[str, list[tuple]] = {}
    for path, src, x, y, w, h, frame, t, t_end, vec in con.execute(
            "SELECT f.path, e.source, e.x, e.y, e.w, e.h, e.frame, e.time, e.time_end, e.vector FROM entries e "
            "JOIN files f ON f.id = e.file_id ORDER BY f.path, e.id"):
        out.setdefault(path, []).append((src, (x, y, w, h, frame, t, t_end), np.frombuffer(vec, np.float32)))
    con.close()
    return out


def _assert_same_entries(a: Path, b: Path) -> None:
    ea, eb = _entries(a), _entries(b)
    assert sorted(ea) == sorted(eb)
    for path in ea:
        assert [(s, box) for s, box, _ in ea[path]] == [(s, box) for s, box, _ in eb[path]], path
        np.testing.assert_allclose(np.stack([v for *_, v in ea[path]]), np.stack([v for *_, v in eb[path]]),
                                   atol=1e-5)


def _counts(report) -> dict:
    d = report.to_dict()
    return {k: d[k] for k in ("added", "updated", "unchanged", "removed", "reused", "embedded", "regions")}


def test_ray_ingest_matches_in_process(drive, tmp_path):
    regions = {"seq0/000.png": [[8, 16, 12, 10], [500, 500, 5, 5]]}  # one crop, one box outside the image
    local = index_folder(drive, tmp_path / "local", ColorEmbedder(), regions=regions, batch_size=4, progress=False)
    engine = RayEngine(workers=2, shard_size=4)
    rayed = index_folder(drive, tmp_path / "ray", ColorEmbedder(), regions=regions, batch_size=4, progress=False,
                         engine=engine)
    _assert_same_entries(tmp_path / "local", tmp_path / "ray")
    assert _counts(rayed) == _counts(local) == {"added": 13, "updated": 0, "unchanged": 0, "removed": 0,
                                                 "reused": 1, "embedded": 12, "regions": 1}
    assert sorted(rayed.skipped) == sorted(local.skipped) and len(rayed.skipped) == 2
    reasons = dict(rayed.skipped)
    assert reasons[str(drive / "seq1" / "broken.jpg")]
    assert "outside" in reasons[str(drive / "seq0" / "000.png")]
    # 13 files to embed (the copy is not: its vectors are copied), in shards of 4
    assert (engine.stats.shards, engine.stats.embedded_files, engine.stats.workers) == (4, 13, 2)
    assert not (tmp_path / "ray" / SHARDS_DIRNAME).exists()  # every shard committed: shard files removed

    # again: unchanged files are not sent to Ray, the corrupt one is tried again (as in-process), and a changed
    # file is re-embedded there with its stored region
    _solid(drive / "seq0" / "000.png", "black", size=(60, 40))
    index_folder(drive, tmp_path / "local", ColorEmbedder(), progress=False)
    engine = RayEngine(workers=1)  # 2 files: one actor starts faster on 2 cores
    again = index_folder(drive, tmp_path / "ray", ColorEmbedder(), progress=False, engine=engine)
    assert (again.unchanged, again.updated, again.embedded, again.regions) == (12, 1, 1, 1)
    assert engine.stats.embedded_files == 2
    _assert_same_entries(tmp_path / "local", tmp_path / "ray")


def test_ray_ingest_cli(drive, tmp_path, capsys):
    """The CLI; and a video, which the Ray engine indexes in the driver's process like the in-process engine."""
    has_video = False
    try:
        from shusheng.data.video import write_video

        write_video([Image.new("RGB", (64, 48), PALETTE[c]) for c in ("red", "red", "blue", "blue")],
                    drive / "seq0" / "clip.mp4", 2)
        has_video = True
    except ImportError:  # no PyAV: images only
        pass
    emb_mod.register_embedder("test-color")(lambda checkpoint=None, device=None: ColorEmbedder())
    try:
        assert main(["index", str(drive), "--index", str(tmp_path / "local"), "--embedder", "test-color",
                     "--json"]) == 0
        local = json.loads(capsys.readouterr().out)
        assert main(["index", str(drive), "--index", str(tmp_path / "ray"), "--embedder", "test-color", "--engine",
                     "ray", "--workers", "1", "--shard-size", "5", "--json"]) == 0
        rayed = json.loads(capsys.readouterr().out)
    finally:
        emb_mod._EMBEDDERS.pop("test-color", None)
    for key in ("added", "reused", "embedded", "frames", "frame_entries", "skipped"):
        assert rayed[key] == local[key], key
    assert rayed["frame_entries"] == (2 if has_video else 0)
    _assert_same_entries(tmp_path / "local", tmp_path / "ray")
    # the options that only the Ray engine takes, and what it cannot do
    assert main(["index", str(drive), "--workers", "2"]) == 2
    assert main(["index", str(drive), "--engine", "ray", "--detect"]) == 2


def test_ray_ingest_resumes_per_shard(drive, tmp_path, monkeypatch):
    """A crash while committing the second shard: the first stays committed, the second's vectors are on disk;
    the next run embeds neither again, only what was not done, and ends with the in-process entries."""
    index_folder(drive, tmp_path / "local", ColorEmbedder(), progress=False)
    commit = ray_ingest._RayIngest._commit_shard
    calls = []

    class Crash(Exception):
        pass

    def crash_on_second(self, i, metas, vectors):
        calls.append(i)
        if len(calls) == 2:
            raise Crash(f"simulated crash while committing shard {i}")
        commit(self, i, metas, vectors)

    monkeypatch.setattr(ray_ingest._RayIngest, "_commit_shard", crash_on_second)
    engine = RayEngine(workers=2, shard_size=4)
    with pytest.raises(Crash):
        index_folder(drive, tmp_path / "ray", ColorEmbedder(), progress=False, engine=engine)
    monkeypatch.setattr(ray_ingest._RayIngest, "_commit_shard", commit)
    shards = tmp_path / "ray" / SHARDS_DIRNAME
    manifest = json.loads((shards / "manifest.json").read_text())
    done, crashed = calls
    assert [i for i, s in enumerate(manifest["shards"]) if s["done"]] == [done]
    assert sorted(p.name for p in shards.glob("shard-*.npz")) == [f"shard-{crashed:05d}.npz"]  # embedded only
    first = manifest["shards"][done]
    committed = len(first["items"]) - len(first["failed"])  # files the first shard indexed

    report = index_folder(drive, tmp_path / "ray", ColorEmbedder(), progress=False, engine=engine)
    stats = engine.stats
    assert (stats.resumed, stats.shards, stats.done_before, stats.from_files, stats.embedded_shards) == (
        True, 4, 1, 1, 2)
    assert stats.embedded_files == sum(len(s["items"]) for i, s in enumerate(manifest["shards"])
                                       if i not in (done, crashed))
    assert report.added == 13 - committed and report.unchanged == committed
    assert str(drive / "seq1" / "broken.jpg") in dict(report.skipped)
    _assert_same_entries(tmp_path / "local", tmp_path / "ray")
    assert not shards.exists()

    # a different file list than the interrupted run's: the old shards are dropped, the rest is planned again
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    _solid(drive / "new.png", "orange")
    index_folder(drive, tmp_path / "local", ColorEmbedder(), progress=False)
    engine = RayEngine(workers=1)
    report = index_folder(drive, tmp_path / "ray", ColorEmbedder(), progress=False, engine=engine)
    assert not engine.stats.resumed and engine.stats.embedded_files == 2  # new.png + broken.jpg (still broken)
    assert report.added == 1
    _assert_same_entries(tmp_path / "local", tmp_path / "ray")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"shusheng\[scale\]"):
        RayEngine().connect()


def test_ray_is_imported_only_by_a_run():
    import subprocess

    code = ("import sys, shusheng.retrieval_index.ray_ingest, shusheng.retrieval_index.cli; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False"]
