"""``shusheng index`` / ``shusheng search`` in-process: JSON schema, stats, duplicates, errors."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from shusheng.cli import main
from shusheng.retrieval_index import embedders as emb_mod

sys.path.insert(0, str(Path(__file__).parent))
from test_retrieval_index import ColorEmbedder, _solid  # noqa: E402

pytest.importorskip("faiss")


@pytest.fixture
def color_registered():
    emb_mod.register_embedder("test-color")(lambda checkpoint=None, device=None: ColorEmbedder())
    yield "test-color"
    emb_mod._EMBEDDERS.pop("test-color", None)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "pics"
    _solid(d / "red.png", "red")
    _solid(d / "blue.png", "blue")
    _solid(d / "scene.png", "white", size=(64, 48), square=(30, 10, 20, 20, "green"))
    _solid(d / "2020" / "yellow.jpg", "yellow", fmt="JPEG", exif_date="2020:06:01 09:00:00")
    return d


def _json_out(capsys, argv) -> object:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_index_then_search_json_schema(folder, tmp_path, capsys, color_registered, monkeypatch):
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"scene.png": [[30, 10, 20, 20]]}))
    report = _json_out(capsys, ["index", str(folder), "--embedder", color_registered, "--regions", str(regions),
                                "--batch-size", "2", "--json"])
    assert report["added"] == 4 and report["regions"] == 1 and report["skipped"] == []
    assert report["index_path"] == str(folder / ".shusheng-index")

    hits = _json_out(capsys, ["search", "green", "--index", str(folder), "-k", "3", "--json"])
    assert isinstance(hits, list) and len(hits) == 3
    for h in hits:
        assert {"path", "score", "box", "entry_id", "width", "height", "date"} <= set(h)
        assert isinstance(h["score"], float) and (h["box"] is None or len(h["box"]) == 4)
    assert hits[0]["path"] == str(folder / "scene.png") and hits[0]["box"] == [30, 10, 20, 20]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["box"] is None for h in hits[1:])

    # filters and threshold through the CLI; default index = the current directory's .shusheng-index
    monkeypatch.chdir(folder)
    hits = _json_out(capsys, ["search", "yellow", "--json", "--from", "2020-01-01", "--to", "2020-12-31"])
    assert [Path(h["path"]).name for h in hits] == ["yellow.jpg"] and hits[0]["date"] == "2020-06-01T09:00:00"
    hits = _json_out(capsys, ["search", "red", "--json", "--threshold", "0.9"])
    assert [Path(h["path"]).name for h in hits] == ["red.png"]
    hits = _json_out(capsys, ["search", "red", "--json", "--glob", "2020/*"])
    assert [Path(h["path"]).name for h in hits] == ["yellow.jpg"]
    hits = _json_out(capsys, ["search", "--image", str(folder / "blue.png"), "--json", "-k", "1", "--no-regions"])
    assert Path(hits[0]["path"]).name == "blue.png" and hits[0]["score"] > 0.99

    # plain-text output names the box of a region hit
    capsys.readouterr()
    assert main(["search", "green", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "scene.png" in out and "box=[30, 10, 20, 20]" in out


def test_index_stats_and_duplicates(folder, capsys, color_registered):
    shutil.copy(folder / "red.png", folder / "red_copy.png")
    _solid(folder / "red_again.png", (233, 24, 21))
    assert main(["index", str(folder), "--embedder", color_registered, "--quiet"]) == 0
    assert "6 added" in capsys.readouterr().out

    stats = _json_out(capsys, ["index", "--stats", str(folder), "--json"])
    assert (stats["files"], stats["entries"], stats["image_entries"]) == (6, 6, 6)
    assert (stats["embedder"], stats["dim"], stats["index_type"]) == ("test-color", ColorEmbedder.dim, "IDMap2,Flat")
    assert stats["size_on_disk_bytes"] > 0 and stats["generation"] >= 1 and stats["last_commit"]
    assert stats["roots"] == [str(folder)]
    capsys.readouterr()
    assert main(["index", "--stats", str(folder / ".shusheng-index")]) == 0
    text = capsys.readouterr().out
    for key in ("files", "entries", "embedder", "index type", "size on disk", "last commit"):
        assert key in text
    assert "test-color (dim 12)" in text and "(exact)" in text

    groups = _json_out(capsys, ["index", "--duplicates", str(folder), "--json"])
    assert [(g["kind"], sorted(Path(p).name for p in g["paths"])) for g in groups] == [
        ("exact", ["red.png", "red_copy.png"])]
    groups = _json_out(capsys, ["index", "--duplicates", str(folder), "--near", "0.97", "--json"])
    near = [g for g in groups if g["kind"] == "near"]
    assert len(near) == 1 and sorted(Path(p).name for p in near[0]["paths"]) == [
        "red.png", "red_again.png", "red_copy.png"]

    # second run: nothing to do
    report = _json_out(capsys, ["index", str(folder), "--json"])
    assert (report["unchanged"], report["added"], report["embedded"]) == (6, 0, 0)


def test_cli_errors_are_clear(folder, tmp_path, capsys, color_registered, caplog):
    caplog.set_level(logging.ERROR)
    assert main(["search", "red", "--index", str(tmp_path / "none")]) == 1
    assert "no index at" in caplog.text
    assert main(["search", "--index", str(folder)]) == 2
    assert main(["index"]) == 2
    assert main(["index", str(folder), "--embedder", color_registered, "--quiet"]) == 0
    caplog.clear()
    assert main(["index", str(folder), "--embedder", "open_clip:ViT-B-32", "--quiet"]) == 1
    assert "built with embedder 'test-color'" in caplog.text
    caplog.clear()
    assert main(["index", str(folder), "--index", str(tmp_path / "oc"), "--embedder", "open_clip:ViT-B-32"]) == 1
    assert "--checkpoint FILE" in caplog.text
    caplog.clear()
    assert main(["index", str(tmp_path / "missing-folder")]) == 1
    assert "does not exist" in caplog.text
