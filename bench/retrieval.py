"""Benchmark the retrieval index: ingest throughput, and approximate-search recall/latency/memory vs exact.

Two parts (both print a table; results go to ``--out`` as ``retrieval_ingest.{json,md}`` and
``retrieval_ann.{json,md}``):

1. **Ingest**: images/s of ``index_folder`` on SynthDrive JPEGs with the given embedder (default the bundled
   ``shusheng-mini-clip`` when its weights exist, else that row is skipped with a message), plus a
   ``pipeline-only`` row (a 64-d random projection of the thumbnail as embedder) measuring the scan + hash +
   decode + SQLite/FAISS overhead, and the no-change re-index rate (files/s when nothing changed).
2. **ANN**: for each ``--sizes`` N, N + 1000 clustered synthetic 384-d unit vectors shaped like real embeddings
   (a few thousand anisotropic Gaussian clusters of Zipf-distributed sizes around a common direction, on the
   unit sphere; isotropic noise alone would make recall meaningless). For exact ``Flat``, ``HNSW32`` (sizes
   <= 200k: its build is too slow beyond that on a small CPU) and ``IVF{nlist},Flat|SQ8`` at several
   ``nprobe`` (``--kinds SQ8 Flat PQ48`` adds IVF-PQ): recall@10 against exact search, p50/p99 latency of
   single queries on ONE thread, memory per vector (serialised index size / N) and build (train + add) time. ``+rerank`` rows re-score the top 42
   candidates exactly from the float32 vectors, which is what ``Index.search`` does (it over-fetches
   ``max(4k, k+32)`` candidates and re-scores them from the vectors stored in SQLite). The row marked
   ``chosen`` is the configuration ``choose_index_spec(N)`` picks. ``--e2e`` also times ``Index.search``
   end to end (SQLite re-scoring included) on a real index of N entries (N <= 200k).

Run it alone on the machine (other CPU load skews latencies)::

    python bench/retrieval.py --sizes 100000 [1000000] [--e2e] [--ingest-images 200] [--out bench/results]
    python bench/retrieval.py --ingest-images 64 --embedder open_clip:ViT-B-32 --random-weights --sizes

The 1M case needs ~3 GB of memory and several minutes (k-means training of 4096 lists on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

DIM = 384
K = 10
N_QUERIES = 1000
RERANK = max(4 * K, K + 32)  # = Index.search's over-fetch


# ------------------------------------------------------------------------------------------------ data
def clustered_embeddings(n: int, d: int = DIM, n_clusters: int = 3000, rank: int = 24, seed: int = 0) -> np.ndarray:
    """``(n, d)`` float32 unit vectors: anisotropic clusters around a shared direction (CLIP's 'cone')."""
    rng = np.random.default_rng(seed)
    mean_dir = rng.normal(size=d)
    mean_dir /= np.linalg.norm(mean_dir)
    centres = rng.normal(size=(n_clusters, d)) / math.sqrt(d) + 0.5 * mean_dir
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7  # Zipf-like cluster sizes
    weights = rng.permutation(weights / weights.sum())
    labels = rng.choice(n_clusters, size=n, p=weights)
    spread = 0.22 * (np.arange(1, rank + 1, dtype=np.float64) ** -0.5)  # decaying variance per direction
    out = np.empty((n, d), np.float32)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    for c in range(n_clusters):
        idx = order[bounds[c]:bounds[c + 1]]
        if len(idx) == 0:
            continue
        basis = rng.normal(size=(rank, d))  # the cluster's own directions of spread (unit rows)
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        z = rng.normal(size=(len(idx), rank)) * spread
        noise = rng.normal(size=(len(idx), d)) * (0.12 / math.sqrt(d))
        out[idx] = centres[c] + z @ basis + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def gap_queries(queries: np.ndarray, base: np.ndarray, top1_cos: float = 0.29, seed: int = 1) -> np.ndarray:
    """Text-like queries for synthetic data: each image-like query pushed off the data along one fixed direction
    orthogonal to the collection's mean (CLIP's modality gap), until the mean cosine with its nearest
    collection vector falls to ``top1_cos`` (0.29 is what the bundled mini-clip's held-out text queries measure
    against 100k real SynthDrive embeddings; image queries measure 0.89)."""
    rng = np.random.default_rng(seed)
    mean = base[: min(len(base), 100_000)].mean(0)
    mean /= np.linalg.norm(mean)
    gap = rng.normal(size=base.shape[1])
    gap -= (gap @ mean) * mean
    gap /= np.linalg.norm(gap)
    probe = base[rng.choice(len(base), min(len(base), 20_000), replace=False)]
    lo, hi = 0.0, 20.0
    for _ in range(30):  # bisect the gap length on a sample of the collection
        s = (lo + hi) / 2
        q = queries[:200] + s * gap
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        lo, hi = (s, hi) if float((q @ probe.T).max(1).mean()) > top1_cos + 0.02 else (lo, s)
    q = queries + (lo + hi) / 2 * gap
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ ANN
def _latencies(search_one, queries: np.ndarray) -> tuple[float, float, list]:
    results, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(search_one(q[None]))
        times.append(time.perf_counter() - t0)
    t = np.asarray(times) * 1000
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), results


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth)]))


def bench_ann(n: int, hnsw_max: int, nprobes: list[int], e2e: bool, kinds: list[str]) -> list[dict]:
    """Synthetic clustered vectors: image-like queries and text-like queries across a modality gap."""
    t0 = time.perf_counter()
    data = clustered_embeddings(n + N_QUERIES)
    base, queries = data[:n], data[n:]
    del data
    sets = {"image (synthetic)": queries, "text (synthetic gap)": gap_queries(queries, base)}
    print(f"[{n:,}] generated data in {time.perf_counter() - t0:.1f} s", flush=True)
    return ann_rows(base, sets, hnsw_max, nprobes, kinds, e2e)


def bench_real(n: int, cache: str, hnsw_max: int, nprobes: list[int], e2e: bool, kinds: list[str]) -> list[dict]:
    """The bundled mini-clip's vectors of ``n`` SynthDrive images; image, held-out-text and template-text queries."""
    from _real_vectors import collection_vectors, query_vectors

    t0 = time.perf_counter()
    base = collection_vectors(n, cache, log=lambda m: print(m, flush=True))
    sets = {f"{kind} (real)": vecs for kind, (_, vecs) in query_vectors(cache).items()}
    print(f"[{n:,}] real vectors ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return ann_rows(base, sets, hnsw_max, nprobes, kinds, e2e)


def ann_rows(base: np.ndarray, sets: dict[str, np.ndarray], hnsw_max: int, nprobes: list[int], kinds: list[str],
             e2e: bool) -> list[dict]:
    """Recall@10 (against exact search), single-thread p50/p99 and bytes/vector of each index type, per query
    set; ``chosen`` marks the configuration ``Index.search`` uses for that kind of query."""
    import faiss

    from shusheng.retrieval_index.index import TRAIN_PER_LIST, choose_index_spec

    n = len(base)
    faiss.omp_set_num_threads(2)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    truths = {}
    for name, queries in sets.items():
        t0 = time.perf_counter()
        d, truths[name] = flat.search(queries, K)
        print(f"[{n:,}] {name}: {len(queries)} queries, exact ground truth in {time.perf_counter() - t0:.1f} s; "
              f"mean cosine of the 1st / 10th neighbour {d[:, 0].mean():.3f} / {d[:, K - 1].mean():.3f}", flush=True)
    del flat
    chosen = choose_index_spec(n)
    rows = []

    def measure(name: str, index, build_s: float, params_list: list[tuple[str, object, int | None]]) -> None:
        mem = faiss.serialize_index(index).nbytes / n
        faiss.omp_set_num_threads(1)
        for qname, queries in sets.items():
            kind = "text" if qname.startswith("text") else "image"
            for label, params, nprobe in params_list:
                for rerank in (False, True):
                    fetch = RERANK if rerank else K

                    def one(q, params=params, fetch=fetch, rerank=rerank):
                        _, ids = index.search(q, fetch, params=params) if params is not None else index.search(q, fetch)
                        ids = ids[0][ids[0] >= 0]
                        if rerank:
                            ids = ids[np.argsort(-(base[ids] @ q[0]))]
                        return ids[:K]

                    p50, p99, found = _latencies(one, queries)
                    factory = name if label == "" else f"{name} {label}"
                    is_chosen = (rerank and name == chosen.factory
                                 and (chosen.nprobe is None or nprobe == chosen.nprobe_for(kind)))
                    rows.append({"n": n, "queries": qname, "index": factory + (" +rerank" if rerank else ""),
                                 "recall@10": _recall(found, truths[qname]), "p50_ms": p50, "p99_ms": p99,
                                 "bytes_per_vector": mem, "build_s": build_s, "chosen": "yes" if is_chosen else ""})
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        faiss.omp_set_num_threads(2)

    # exact
    t0 = time.perf_counter()
    idmap = faiss.index_factory(DIM, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    idmap.add_with_ids(base, np.arange(n, dtype=np.int64))
    measure("IDMap2,Flat", idmap, time.perf_counter() - t0, [("", None, None)])
    del idmap
    # HNSW (no removals: not usable for the index, measured as a reference point)
    if n <= hnsw_max:
        t0 = time.perf_counter()
        hnsw = faiss.index_factory(DIM, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        hnsw.add(base)
        measure("HNSW32,Flat", hnsw, time.perf_counter() - t0,
                [(f"efSearch={ef}", faiss.SearchParametersHNSW(efSearch=ef), None) for ef in (32, 64, 128)])
        del hnsw
    # IVF family at the rule's nlist
    nlist = chosen.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    probes = sorted({p for p in nprobes if p <= nlist} | ({chosen.nprobe, chosen.nprobe_for("text")} - {None}))
    for kind in kinds:
        factory = f"IVF{nlist},{kind}"
        index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        n_train = min(n, TRAIN_PER_LIST * nlist)
        sample = base[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else base
        t0 = time.perf_counter()
        index.train(sample)
        index.add_with_ids(base, np.arange(n, dtype=np.int64))
        build = time.perf_counter() - t0
        measure(factory, index, build, [(f"nprobe={p}", faiss.SearchParametersIVF(nprobe=p), p) for p in probes])
        del index
    if e2e and n <= 200_000:
        rows.extend(bench_index_search(base, sets, truths))
    return rows


def bench_index_search(base: np.ndarray, sets: dict[str, np.ndarray], truths: dict[str, np.ndarray]) -> list[dict]:
    """``Index.search`` end to end (FAISS + SQLite metadata + exact re-scoring) on a real index, per query set
    (text sets searched as text queries: ``modality="text"``)."""
    import faiss

    from shusheng.retrieval_index.index import Index

    n = len(base)
    tmp = Path(tempfile.mkdtemp(prefix="shusheng-bench-index-"))
    rows = []
    try:
        t0 = time.perf_counter()
        with Index.open(tmp / "idx", create=True, embedder_name="synthetic", dim=DIM) as index:
            for i, v in enumerate(base):
                fid = index.put_file(f"/bench/{i:07d}.jpg", size=1, mtime_ns=0, digest=f"{i}",
                                     date="2024-01-01T00:00:00", date_source="mtime", width=1, height=1)
                index.add_entries(fid, v[None], [None])
                if (i + 1) % 50_000 == 0:
                    index.commit(write_vectors=False)
            index.commit()
        build = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / "idx").iterdir() if p.is_file())
        faiss.omp_set_num_threads(1)
        with Index.open(tmp / "idx") as index:
            for qname, queries in sets.items():
                kind = "text" if qname.startswith("text") else "image"

                def one(q, kind=kind):
                    return np.array([int(h.path[7:14]) for h in index.search(vector=q[0], k=K, modality=kind)])

                p50, p99, found = _latencies(one, queries)
                spec = index.spec.factory + (f" nprobe={index.spec.nprobe_for(kind)}" if index.spec.nprobe else "")
                rows.append({"n": n, "queries": qname, "index": f"Index.search e2e ({spec})",
                             "recall@10": _recall(found, truths[qname]), "p50_ms": p50, "p99_ms": p99,
                             "bytes_per_vector": size / n, "build_s": build, "chosen": "e2e"})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        faiss.omp_set_num_threads(2)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ ingest
def _synthdrive_jpegs(folder: Path, n: int, size: int) -> Path:
    """``folder`` filled with ``n`` SynthDrive JPEGs (seed 7, ``size`` px) named ``00000.jpg``..."""
    from shusheng.data.synthdrive import sample

    folder.mkdir()
    for i in range(n):
        sample(7, i, size)[0].save(folder / f"{i:05d}.jpg", quality=90)
    return folder


class _ProjectionEmbedder:
    """Pipeline-only embedder: a fixed random projection of a 16x16 thumbnail (no model cost)."""

    name, dim = "bench-projection", 64

    def __init__(self):
        self.proj = np.random.default_rng(0).normal(size=(16 * 16 * 3, self.dim)).astype(np.float32)

    def _embed(self, arrs):
        v = np.stack(arrs).reshape(len(arrs), -1) @ self.proj
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def embed_images(self, images, batch_size=32, progress=False):
        return self._embed([np.asarray(im.convert("RGB").resize((16, 16)), np.float32) / 255 for im in images])

    def embed_texts(self, texts, batch_size=64):
        rng = np.random.default_rng(abs(hash(tuple(texts))) % 2**32)
        return self._embed([rng.random((16, 16, 3), np.float32) for _ in texts])


def _random_open_clip_weights(arch: str, folder: Path) -> str:
    """Saves randomly initialised weights of an open_clip architecture: the compute of the real model, offline."""
    import open_clip
    import torch

    model = open_clip.create_model(arch, pretrained=None)
    path = folder / f"{arch}-random.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def bench_ingest(n_images: int, size: int, embedder_name: str | None, checkpoint: str | None,
                 random_weights: bool = False) -> list[dict]:
    from shusheng.retrieval_index.embedders import create_embedder
    from shusheng.retrieval_index.ingest import index_folder

    tmp = Path(tempfile.mkdtemp(prefix="shusheng-bench-ingest-"))
    rows = []
    try:
        folder = _synthdrive_jpegs(tmp / "images", n_images, size)
        embedders: list[tuple[str, object]] = [("pipeline-only (projection)", _ProjectionEmbedder())]
        name = embedder_name or "shusheng-mini-clip"
        if random_weights and checkpoint is None and name.startswith("open_clip:"):
            checkpoint = _random_open_clip_weights(name.split(":", 1)[1], tmp)
        try:
            embedders.append((name + (" (random weights)" if random_weights else ""),
                              create_embedder(name, checkpoint=checkpoint, device="cpu")))
        except (FileNotFoundError, ImportError, ValueError) as e:
            print(f"skipping the {name} ingest row: {e}", flush=True)
        for label, emb in embedders:
            index_dir = tmp / f"idx-{len(rows)}"
            t0 = time.perf_counter()
            report = index_folder(folder, index_dir, emb, progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = index_folder(folder, index_dir, emb, progress=False)
            second = time.perf_counter() - t0
            assert report.added == n_images and again.embedded == 0, (report, again)
            rows.append({"embedder": label, "images": n_images, "image_px": size,
                         "ingest_images_per_s": n_images / first, "ingest_s": first,
                         "reindex_unchanged_files_per_s": n_images / second})
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------------ Ray ingest
def _entry_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    import sqlite3

    con = sqlite3.connect(index_dir / "meta.sqlite")
    rows = con.execute("SELECT f.path, e.vector FROM entries e JOIN files f ON f.id = e.file_id ORDER BY e.id")
    out = {path: np.frombuffer(vec, np.float32) for path, vec in rows}
    con.close()
    return out


def bench_ray_ingest(n_images: int, size: int, embedder_name: str | None, checkpoint: str | None,
                     cpus: int = 2, repeats: int = 2) -> list[dict]:
    """images/s of ``index_folder`` in-process vs ``engine=RayEngine`` on the same ``cpus`` cores, same images.

    In-process: 2 decode threads, torch on ``cpus`` threads and on 1 thread (``torch.set_num_threads``; on 2
    cores the second is much faster: decoding overlaps the embedding and competes with torch's threads); the
    ratios are against the faster one. Ray: a local Ray with ``num_cpus=cpus`` started before the clock (as a
    running cluster would be), then ``cpus`` actors x 1 CPU and 1 actor x ``cpus`` CPUs; each time includes what a
    run costs: the driver loading the model once (a new index records its dim), every actor starting and loading
    its own copy, the shard files and commits. Each Ray index is checked against the in-process one (same paths,
    max |difference| of the vectors). Every configuration is timed ``repeats`` times into a new index (all
    configurations once, then again); its best time is kept (other load on a small machine only slows a run).
    """
    import ray
    import torch

    from shusheng.retrieval_index.ingest import index_folder
    from shusheng.retrieval_index.ray_ingest import RayEngine

    name = embedder_name or "shusheng-mini-clip"
    tmp = Path(tempfile.mkdtemp(prefix="shusheng-bench-ray-"))
    rows = []
    try:
        folder = _synthdrive_jpegs(tmp / "images", n_images, size)
        threads = torch.get_num_threads()
        # warm-up (not timed): loads the model once in this process (the bundled one stays cached) and torch
        warm = tmp / "warm"
        warm.mkdir()
        for p in sorted(folder.iterdir())[:8]:
            shutil.copy(p, warm / p.name)
        index_folder(warm, tmp / "idx-warm", name, checkpoint=checkpoint, device="cpu", progress=False)
        best: dict[str, dict] = {}
        want: dict[str, np.ndarray] = {}

        def timed(label: str, index_dir: Path, **kwargs) -> None:
            t0 = time.perf_counter()
            report = index_folder(folder, index_dir, name, checkpoint=checkpoint, device="cpu", progress=False,
                                  **kwargs)
            took = time.perf_counter() - t0
            got = _entry_vectors(index_dir)
            want.update(want or got)  # the first in-process index is the reference
            assert report.added == n_images and sorted(got) == sorted(want), report
            diff = max(float(np.abs(got[p] - want[p]).max()) for p in want)
            print(f"{label}: {took:.1f} s, {n_images / took:.1f} images/s, max |vector diff| {diff:.2g}", flush=True)
            if label not in best or took < best[label]["seconds"]:
                best[label] = {"engine": label, "images": n_images, "seconds": took, "images_per_s": n_images / took,
                               "max_abs_diff": diff}

        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(f"ray.init (local, {cpus} CPUs): {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
        try:
            for r in range(repeats):
                for torch_threads in (cpus, 1):
                    torch.set_num_threads(torch_threads)
                    timed(f"in-process: 2 decode threads, torch {torch_threads} thread" + "s" * (torch_threads > 1),
                          tmp / f"idx-local-{torch_threads}-{r}", workers=2)
                torch.set_num_threads(threads)
                for workers, per in ((cpus, 1), (1, cpus)):
                    timed(f"ray: {workers} actor{'s' * (workers > 1)} x {per} CPU{'s' * (per > 1)}",
                          tmp / f"idx-ray-{workers}-{r}", engine=RayEngine(workers=workers, cpus_per_worker=per))
        finally:
            ray.shutdown()
        rows = list(best.values())
        base = min(r["seconds"] for r in rows if r["engine"].startswith("in-process"))
        for row in rows:
            row["ratio"] = base / row["seconds"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="collection sizes for the ANN part")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="largest size HNSW is built for")
    parser.add_argument("--kinds", nargs="+", default=["SQ8", "Flat"],
                        help="IVF encodings to measure (SQ8 Flat PQ48; PQ48's training takes minutes on 2 cores)")
    parser.add_argument("--e2e", action="store_true", help="also time Index.search end to end (sizes <= 200k)")
    parser.add_argument("--real", type=int, default=0, metavar="N",
                        help="also measure on the bundled mini-clip's vectors of N SynthDrive images (>= 100000 for "
                             "the issue's figures; embedded once into --real-cache, ~15 min per 100k on 2 cores)")
    parser.add_argument("--real-cache", default="runs/retrieval_real", help="where the real vectors are cached")
    parser.add_argument("--ingest-images", type=int, default=200, help="SynthDrive images to ingest (0: skip)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--embedder", default=None, help="embedder for the ingest row (default shusheng-mini-clip)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--random-weights", action="store_true",
                        help="with --embedder open_clip:ARCH and no --checkpoint: time the architecture with random "
                             "weights (same compute as the real model; nothing is downloaded)")
    parser.add_argument("--ray-ingest", type=int, default=0, metavar="N",
                        help="also ingest N SynthDrive images in-process and with --engine ray on the same 2 cores "
                             "(needs pip install 'shusheng[scale]'; writes retrieval_ray.{json,md}; 0: skip)")
    parser.add_argument("--ray-repeats", type=int, default=2, metavar="R",
                        help="times each --ray-ingest configuration runs (its best time is kept)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    reexec_with_bench_env()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    meta = {**machine_info(), "ann_threads_per_query": 1, "k": K, "queries": N_QUERIES, "dim": DIM}
    if args.ingest_images:
        rows = bench_ingest(args.ingest_images, args.image_size, args.embedder, args.checkpoint,
                            args.random_weights)
        cols = [("embedder", "embedder"), ("images", "images"), ("image_px", "px"),
                ("ingest_images_per_s", "ingest images/s"), ("reindex_unchanged_files_per_s", "no-change re-index files/s")]
        print(write_results("retrieval_ingest", rows, cols, args.out, meta))
    if args.ray_ingest:
        rows = bench_ray_ingest(args.ray_ingest, args.image_size, args.embedder, args.checkpoint,
                                repeats=args.ray_repeats)
        cols = [("engine", "engine"), ("images", "images"), ("seconds", "s"), ("images_per_s", "images/s"),
                ("ratio", "vs in-process"), ("max_abs_diff", "max |vector diff|")]
        print(write_results("retrieval_ray", rows, cols, args.out, meta))
    cols = [("n", "N"), ("queries", "queries"), ("index", "index"), ("recall@10", "recall@10"),
            ("p50_ms", "p50 ms (1 thread)"), ("p99_ms", "p99 ms"), ("bytes_per_vector", "bytes/vector"),
            ("build_s", "build s"), ("chosen", "chosen")]
    if args.real:
        rows = bench_real(args.real, args.real_cache, args.hnsw_max, args.nprobes, args.e2e, args.kinds)
        print(write_results("retrieval_ann_real", rows, cols, args.out, meta))
    rows = []
    for n in args.sizes:
        rows.extend(bench_ann(n, args.hnsw_max, args.nprobes, args.e2e, args.kinds))
    if rows:
        print(write_results("retrieval_ann", rows, cols, args.out, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
