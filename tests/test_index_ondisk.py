"""On-disk IVF indexes (``Index.set_on_disk``, ``shusheng index --on-disk``): the inverted lists in a memory-mapped
``vectors.<generation>.<token>.ivfdata`` file, built in shards from SQLite, kept crash-safe across commits.

Small clustered random vectors; ``FLAT_MAX_ENTRIES`` and the IVF size are monkeypatched down so that a few thousand
entries make an IVF index.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from shusheng.cli import main
from shusheng.retrieval_index import embedders as emb_mod
from shusheng.retrieval_index import vectors as vectors_mod
from shusheng.retrieval_index.index import VECTORS_FILE, Index
from shusheng.retrieval_index.layout import ivfdata_files
from shusheng.retrieval_index.store import MetaStore

sys.path.insert(0, str(Path(__file__).parent))
from test_retrieval_index import ColorEmbedder, _solid  # noqa: E402

faiss = pytest.importorskip("faiss")

DIM = 12  # = ColorEmbedder.dim, so that `shusheng search TEXT` can query these indexes
N = 3000


_REAL_SPEC, _REAL_FLAT_MAX = vectors_mod.choose_index_spec, vectors_mod.FLAT_MAX_ENTRIES


@pytest.fixture(autouse=True)
def small_ivf(monkeypatch):
    """IVF32,SQ8 (nprobe 8) from 500 entries on; vectors streamed 256 at a time into shards of 1000."""
    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", 500)
    monkeypatch.setattr(vectors_mod, "SHARD_ENTRIES", 1000)
    monkeypatch.setattr(vectors_mod, "_READ_CHUNK", 256)

    def spec(n: int, on_disk: bool = False) -> vectors_mod.IndexSpec:
        # one encoding on disk and in memory here (the real rule uses SQ6 on disk), so that the lists of both
        # can be compared code for code
        if n < vectors_mod.FLAT_MAX_ENTRIES:
            return vectors_mod.IndexSpec("IDMap2,Flat")
        return vectors_mod.IndexSpec("IVF32,SQ8", nprobe=8, nlist=32)

    monkeypatch.setattr(vectors_mod, "choose_index_spec", spec)


@pytest.fixture
def color_registered():
    emb_mod.register_embedder("test-color")(lambda checkpoint=None, device=None: ColorEmbedder())
    yield "test-color"
    emb_mod._EMBEDDERS.pop("test-color", None)


def _clustered(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` centres (the same centres for every ``seed``: one distribution, which
    the SQ8 encoder trained on the first vectors also covers)."""
    centres = np.random.default_rng(0).normal(size=(clusters, DIM))
    rng = np.random.default_rng(seed)
    vecs = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def _add(idx: Index, vecs: np.ndarray, start: int = 0) -> None:
    for i, v in enumerate(vecs, start):
        fid = idx.put_file(f"/virtual/{i}.png", size=1, mtime_ns=0, digest=f"h{i}", date="2020-01-01T00:00:00",
                           date_source="mtime", width=8, height=8)
        idx.add_entries(fid, v[None], [None])


def _build(path: Path, vecs: np.ndarray, on_disk: bool) -> None:
    with Index.open(path, create=True, embedder_name="test-color", dim=DIM) as idx:
        if on_disk:
            idx.set_on_disk(True)
        _add(idx, vecs)
        idx.commit()


def _ids(idx: Index, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    return [[h.entry_id for h in idx.search(vector=q, k=k)] for q in queries]


def _ivfdata(path: Path) -> list[str]:
    return [f.name for f in ivfdata_files(path)]


@pytest.fixture(scope="module")
def vecs() -> np.ndarray:
    return _clustered(N)


@pytest.fixture
def queries(vecs) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = vecs[rng.choice(N, 40, replace=False)] + 0.2 * rng.normal(size=(40, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_on_disk_index_matches_the_in_memory_one(tmp_path, vecs, queries, monkeypatch):
    _build(tmp_path / "ram", vecs, on_disk=False)
    _build(tmp_path / "disk", vecs, on_disk=True)
    assert _ivfdata(tmp_path / "ram") == [] and len(_ivfdata(tmp_path / "disk")) == 1
    assert not list((tmp_path / "disk").glob(".build-*"))  # the shard files are gone

    def forbidden(*a, **k):
        raise AssertionError("opening a current on-disk index must not read every vector or id")

    with Index.open(tmp_path / "ram") as ram:
        want = _ids(ram, queries)
        want_raw = ram._vectors.search(queries, 20)
        assert ram.stats()["storage"] == "in-RAM"
    for name in ("all_vectors", "iter_vectors", "entry_ids"):
        monkeypatch.setattr(MetaStore, name, forbidden)
    with Index.open(tmp_path / "disk") as disk:  # a fresh reader: the committed files are trusted as they are
        stats = disk.stats()
        assert (stats["storage"], stats["on_disk"], stats["in_memory_entries"]) == ("on-disk", True, 0)
        assert stats["index_type"] == "IVF32,SQ8" and stats["vectors_in_index"] == N
        got_raw = disk._vectors.search(queries, 20)
        assert np.array_equal(got_raw[1], want_raw[1])  # same trained partition, same codes, same lists
        assert np.allclose(got_raw[0], want_raw[0])
        assert _ids(disk, queries) == want
        assert disk.search(vector=vecs[7], k=1)[0].path == "/virtual/7.png"
    size = sum(f.stat().st_size for f in ivfdata_files(tmp_path / "disk"))
    assert size == N * (DIM + 8)  # SQ8 codes + ids, exact list sizes


def test_reopening_and_committing_nothing_keeps_the_files(tmp_path, vecs, queries):
    _build(tmp_path / "idx", vecs, on_disk=True)
    before = _ivfdata(tmp_path / "idx")
    with Index.open(tmp_path / "idx") as idx:
        want = _ids(idx, queries)
    with Index.open(tmp_path / "idx", write=True, embedder_name="test-color", dim=DIM) as idx:
        assert idx.on_disk
        idx.commit()
        assert _ids(idx, queries) == want
    assert _ivfdata(tmp_path / "idx") == before
    with Index.open(tmp_path / "idx") as idx:
        assert idx.stats()["storage"] == "on-disk" and _ids(idx, queries) == want


def test_adds_and_removes_after_the_build_are_searched(tmp_path, vecs, monkeypatch):
    path = tmp_path / "idx"
    _build(path, vecs, on_disk=True)
    first = _ivfdata(path)
    new = _clustered(200, seed=5)
    removed = list(range(0, 100))
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        _add(idx, new, start=N)
        for i in removed:
            idx.remove(f"/virtual/{i}.png")
        idx.commit(write_vectors=False)  # the on-disk lists stay as they are; the changes are held in memory
        assert _ivfdata(path) == first
        assert idx.ntotal == N + 200 - 100 and idx.stats()["in_memory_entries"] == 200
        for j in (0, 77, 199):
            assert idx.search(vector=new[j], k=1)[0].path == f"/virtual/{N + j}.png"
        for i in (0, 42, 99):
            assert all(h.path != f"/virtual/{i}.png" for h in idx.search(vector=vecs[i], k=10))
        with Index.open(path) as reader:  # the marker is behind: a reader reconciles without writing
            assert reader.ntotal == N + 100 and reader.stats()["in_memory_entries"] == 200
            assert reader.search(vector=new[3], k=1)[0].path == f"/virtual/{N + 3}.png"
            assert all(h.path != "/virtual/5.png" for h in reader.search(vector=vecs[5], k=10))
        idx.commit()  # writes the next generation of the lists: delta merged, removed ids dropped
        after = _ivfdata(path)
        assert len(after) == 1 and after != first
        assert idx.stats()["in_memory_entries"] == 0
    with Index.open(path) as idx:
        assert idx.ntotal == N + 100 and idx.stats()["storage"] == "on-disk"
        assert idx.search(vector=new[3], k=1)[0].path == f"/virtual/{N + 3}.png"
        assert all(h.path != "/virtual/5.png" for h in idx.search(vector=vecs[5], k=10))
        hits = idx.search(vector=vecs[2000], k=3, nprobe=32)  # all lists: the exact ranking of what is left
        kept = np.concatenate([vecs[100:], new])
        exact = np.argsort(-(kept @ vecs[2000]))[:3] + 100
        assert [h.path for h in hits] == [f"/virtual/{i}.png" for i in exact]
    assert (path / ivfdata_files(path)[0].name).stat().st_size == (N + 100) * (DIM + 8)

    # a long ingest of commit(write_vectors=False) writes the lists once the delta outgrows DELTA_MAX_ENTRIES
    monkeypatch.setattr(vectors_mod, "DELTA_MAX_ENTRIES", 50)
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        _add(idx, _clustered(30, seed=6), start=N + 200)
        idx.commit(write_vectors=False)
        assert idx.stats()["in_memory_entries"] == 30 and _ivfdata(path) == after
        _add(idx, _clustered(30, seed=7), start=N + 230)
        idx.commit(write_vectors=False)
        assert idx.stats()["in_memory_entries"] == 0 and _ivfdata(path) != after
        generation = idx.generation
    assert json.loads((path / "commit.json").read_text())["generation"] == generation


def test_crash_before_replacing_the_vector_file_keeps_the_previous_generation(tmp_path, vecs, monkeypatch):
    path = tmp_path / "idx"
    _build(path, vecs, on_disk=True)
    old_ivfdata, old_header = _ivfdata(path), (path / VECTORS_FILE).read_bytes()
    new = _clustered(20, seed=9)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        _add(idx, new, start=N)
        idx.remove("/virtual/1.png")
        with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
            m.setattr(faiss, "write_index", crash)  # the new ivfdata file is written, vectors.faiss is not
            idx.commit()
    names = _ivfdata(path)
    assert len(names) == 2 and old_ivfdata[0] in names  # the orphan is left for the next commit to remove
    assert (path / VECTORS_FILE).read_bytes() == old_header
    with Index.open(path) as idx:  # the previous generation's lists + the committed changes from SQLite
        assert idx.stats()["storage"] == "on-disk" and idx.ntotal == N + 20 - 1
        assert idx.search(vector=new[4], k=1)[0].path == f"/virtual/{N + 4}.png"
        assert all(h.path != "/virtual/1.png" for h in idx.search(vector=vecs[1], k=10))
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        idx.commit()
    names = _ivfdata(path)
    assert len(names) == 1 and names[0] not in old_ivfdata
    with Index.open(path) as idx:
        assert idx.stats()["in_memory_entries"] == 0 and idx.ntotal == N + 19
        assert idx.search(vector=new[4], k=1)[0].path == f"/virtual/{N + 4}.png"


def test_switching_back_to_memory_and_shrinking_to_flat(tmp_path, vecs, queries):
    path = tmp_path / "idx"
    _build(path, vecs, on_disk=True)
    with Index.open(path) as idx:
        want = _ids(idx, queries)
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        idx.set_on_disk(False)
        idx.commit()
        assert idx.stats()["storage"] == "in-RAM" and _ids(idx, queries) == want
    assert _ivfdata(path) == []
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        idx.set_on_disk(True)
        idx.commit()
        assert idx.stats()["storage"] == "on-disk" and _ids(idx, queries) == want
        for i in range(2800):  # below FLAT_MAX_ENTRIES / 2: exact and in memory again
            idx.remove(f"/virtual/{i}.png")
        idx.commit()
        assert idx.spec.exact and idx.stats()["storage"] == "in-RAM" and idx.ntotal == 200
    assert _ivfdata(path) == []


def test_unreadable_lists_are_rebuilt_from_sqlite(tmp_path, vecs, queries):
    path = tmp_path / "idx"
    _build(path, vecs, on_disk=True)
    with Index.open(path) as idx:
        want = _ids(idx, queries)
    ivfdata_files(path)[0].unlink()
    with Index.open(path) as idx:  # a reader rebuilds in memory (streamed from SQLite), writes nothing
        assert idx.ntotal == N and _ids(idx, queries) == want
    assert _ivfdata(path) == []
    with Index.open(path, write=True, embedder_name="test-color", dim=DIM) as idx:
        idx.commit()
    assert len(_ivfdata(path)) == 1


def test_cli_index_on_disk_then_search_and_stats(tmp_path, vecs, color_registered, capfd, monkeypatch):
    # `shusheng search` on an on-disk index: nothing but the JSON on stdout (faiss prints nothing there)
    _build(tmp_path / "idx", vecs, on_disk=True)
    capfd.readouterr()
    assert main(["search", "red", "--index", str(tmp_path / "idx"), "-k", "5", "--json"]) == 0
    hits = json.loads(capfd.readouterr().out)
    assert len(hits) == 5 and all(h["path"].startswith("/virtual/") for h in hits)
    assert main(["index", "--stats", str(tmp_path / "idx"), "--json"]) == 0
    stats = json.loads(capfd.readouterr().out)
    assert stats["storage"] == "on-disk" and stats["on_disk"] is True

    # `shusheng index FOLDER --on-disk` on real images (IVF from 10 entries here), kept by the next runs
    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", 10)
    monkeypatch.setattr(vectors_mod, "choose_index_spec", lambda n, on_disk=False: vectors_mod.IndexSpec(
        "IDMap2,Flat") if n < 10 else vectors_mod.IndexSpec("IVF2,SQ8", nprobe=2, nlist=2))
    folder = tmp_path / "pics"
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black", "orange", "purple"] * 2):
        _solid(folder / f"{colour}{i}.png", colour, size=(16 + i, 12))
    assert main(["index", str(folder), "--embedder", color_registered, "--on-disk", "--quiet"]) == 0
    assert main(["index", str(folder), "--quiet"]) == 0  # recorded: the next run keeps it
    capfd.readouterr()
    assert main(["index", "--stats", str(folder), "--json"]) == 0
    stats = json.loads(capfd.readouterr().out)
    assert (stats["storage"], stats["on_disk"], stats["entries"]) == ("on-disk", True, 16)
    assert main(["search", "blue", "--index", str(folder), "-k", "2", "--json"]) == 0
    hits = json.loads(capfd.readouterr().out)
    assert {Path(h["path"]).name for h in hits} == {"blue2.png", "blue10.png"}


def test_on_disk_lists_are_sq6_and_moving_retrains(tmp_path, vecs, monkeypatch):
    """The real rule: SQ6 on disk (below a quarter of the float32 size), SQ8 in memory; moving an index either
    way retrains it with the other encoding."""
    monkeypatch.setattr(vectors_mod, "choose_index_spec", _REAL_SPEC)  # undo the module's small-IVF rule
    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", _REAL_FLAT_MAX)
    big = vectors_mod.choose_index_spec(100_000)
    assert big.factory == "IVF1024,SQ8"
    assert vectors_mod.choose_index_spec(100_000, on_disk=True).factory == "IVF1024,SQ6"
    assert vectors_mod.needs_rebuild(big, 100_000, on_disk=True)
    assert not vectors_mod.needs_rebuild(vectors_mod.choose_index_spec(100_000, True), 100_000, on_disk=True)
    assert vectors_mod.choose_index_spec(10, on_disk=True).exact

    monkeypatch.setattr(vectors_mod, "FLAT_MAX_ENTRIES", 500)
    monkeypatch.setattr(vectors_mod, "choose_index_spec", lambda n, on_disk=False: _REAL_SPEC(n * 100, on_disk)
                        if n >= 500 else vectors_mod.IndexSpec("IDMap2,Flat"))  # IVF from 500 entries here
    _build(tmp_path / "idx", vecs, on_disk=False)
    with Index.open(tmp_path / "idx", write=True, embedder_name="test-color", dim=DIM) as idx:
        assert idx.stats()["index_type"].endswith(",SQ8") and _ivfdata(tmp_path / "idx") == []
        idx.set_on_disk(True)
        idx.commit()
    with Index.open(tmp_path / "idx") as idx:
        stats = idx.stats()
        assert stats["storage"] == "on-disk" and stats["index_type"].endswith(",SQ6")
        hits = idx.search(vector=vecs[7], k=3, nprobe=idx.spec.nlist)
        assert hits[0].path == "/virtual/7.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    size = sum(f.stat().st_size for f in ivfdata_files(tmp_path / "idx"))
    assert size == N * (DIM * 6 // 8 + 8)  # 6-bit codes + ids
    with Index.open(tmp_path / "idx", write=True, embedder_name="test-color", dim=DIM) as idx:
        idx.set_on_disk(False)
        idx.commit()
        assert idx.stats()["index_type"].endswith(",SQ8") and idx.stats()["storage"] == "in-RAM"
    assert _ivfdata(tmp_path / "idx") == []
