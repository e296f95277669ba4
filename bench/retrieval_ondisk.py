"""Benchmark an on-disk index (``Index.set_on_disk``): build N clustered 384-d vectors into a real index folder
(SQLite + FAISS, IVF lists in a memory-mapped ivfdata file), then search it from a FRESH process and measure
recall@10 against exact search, single-thread latency and the searching process's resident memory against the
float32 size of the vectors (N x 384 x 4 B; the target is a peak RSS below a quarter of it).

Build (this process), each phase timed:

1. ``clustered_embeddings(N + queries)`` from ``bench/retrieval.py`` (one distribution; the last rows are queries).
2. Exact top-10 of every query by brute force (``faiss.knn`` over the float32 vectors), saved to ``truth.npy``.
3. Ingest through the public ``Index`` API: ``set_on_disk(True)``, then ``put_file`` + ``add_entries`` per vector
   and ``commit(write_vectors=False)`` every ``--batch`` entries (one SQLite transaction each), as
   ``index_folder`` does. Inside those commits the index becomes IVF on disk at 50k entries, is retrained
   (``IVF4096,SQ6``, the on-disk encoding) once it outgrows its lists, and writes a new ivfdata generation whenever more than
   ``DELTA_MAX_ENTRIES`` entries wait in memory. Then one final ``commit()``.

Search (``--search-only`` subprocesses started fresh, one thread, ``Index.search(vector=q, k=10)`` for every
query), three times: *cold* (the index's files evicted from the page cache first, ``posix_fadvise(DONTNEED)``),
*warm* (right after), and *evicted before each query* (the first ``--evicted-queries`` queries; the process's
mapped index pages dropped with ``madvise(MADV_DONTNEED)`` and the files evicted again before every query,
untimed: every query reads its lists and candidate rows from disk, the worst case of a machine whose RAM holds
none of the index). Peak RSS is
``VmHWM`` (= ``ru_maxrss``); at the end, ``RssAnon`` is the process's own memory, ``RssFile`` its file-backed
pages (shared libraries and the mapped lists, which the kernel can reclaim), and "lists resident" the part of
``RssFile`` that belongs to the mapped ivfdata file (``/proc/self/smaps``).

Then the baseline: the same lists moved into memory (``set_on_disk(False)`` + ``commit()``) and searched warm
by a fresh process; they are moved back to disk after. Last, the cost of a small update: 1000 entries added and
``commit()`` (a new ivfdata generation written).

    python bench/retrieval_ondisk.py                     # N = 2,000,000 (~3 GB of vectors; 20 min on 2 cores)
    python bench/retrieval_ondisk.py --n 200000 --dir /tmp/ondisk --keep

The index goes to ``--dir`` (default a new folder under /tmp; several GB at 2M) and is deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

DIM = 384
K = 10
EMBEDDER = "bench-vectors-384"


def _status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _evict(folder: Path) -> None:
    """Drops the clean page-cache pages of the index's files (the next reads come from disk). Pages that a
    process has mapped stay: see :func:`_unmap_pages`."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _mapped_rss(folder: Path) -> int:
    """Resident bytes of this process's mappings of files in ``folder`` (``/proc/self/smaps``)."""
    prefix, total, inside = os.fspath(folder.resolve()) + "/", 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = len(fields) == 6 and fields[5].startswith(prefix)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def _unmap_pages(folder: Path) -> None:
    """``madvise(MADV_DONTNEED)`` on every mapping of a file of ``folder`` in this process (found in
    ``/proc/self/maps``): its pages leave this process's resident set (read again on the next access)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prefix = os.fspath(folder.resolve()) + "/"
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(prefix):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if libc.madvise(lo, hi - lo, 4) != 0:  # MADV_DONTNEED
                    raise OSError(ctypes.get_errno(), "madvise failed")


# ------------------------------------------------------------------------------------------------ search (child)
def search_only(folder: Path, work: Path, evict_each: bool = False, prefetch_threads: int | None = None,
                max_queries: int | None = None) -> dict:
    """Opens the index in this (fresh) process and runs every query once; returns the measurements.

    ``evict_each``: before every query, the index's file pages are dropped from this process and from the page
    cache (not timed), so that each query reads its lists and candidate rows from disk: the worst case of a
    machine whose RAM holds nothing of the index but the quantizer."""
    import faiss

    from shusheng.retrieval_index import vectors
    from shusheng.retrieval_index.index import Index

    faiss.omp_set_num_threads(1)
    if prefetch_threads is not None:
        vectors.ONDISK_PREFETCH_THREADS = prefetch_threads
    queries = np.load(work / "queries.npy")[:max_queries]
    truth = np.load(work / "truth.npy")[:max_queries]
    before_open = _status()
    t0 = time.perf_counter()
    index = Index.open(folder)
    open_s = time.perf_counter() - t0
    after_open = _status()
    stats = index.stats()
    times, recalls = [], []
    for q, want in zip(queries, truth):
        if evict_each:
            _unmap_pages(folder)
            _evict(folder)
        t0 = time.perf_counter()
        hits = index.search(vector=q, k=K)
        times.append(time.perf_counter() - t0)
        recalls.append(len({h.entry_id for h in hits} & set(want.tolist())) / K)
    end = _status()
    lists_resident = _mapped_rss(folder)
    index.close()
    t = np.asarray(times) * 1000
    return {
        "open_s": open_s, "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()), "recall@10": float(np.mean(recalls)), "queries": len(queries),
        "prefetch_threads": vectors.ONDISK_PREFETCH_THREADS,
        "storage": stats["storage"], "index_type": stats["index_type"], "nprobe": stats["nprobe"],
        "rss_before_open": before_open["VmRSS"], "rss_after_open": after_open["VmRSS"],
        "rss_end": end["VmRSS"], "rss_anon_end": end["RssAnon"], "rss_file_end": end["RssFile"],
        "lists_resident_end": lists_resident,
        "peak_rss": end["VmHWM"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _run_search(folder: Path, work: Path, evict_each: bool = False, max_queries: int | None = None) -> dict:
    """Runs :func:`search_only` in a fresh process. It is started by a small ``sh`` (which forks it, then exits with
    its status), not forked from this big process: a child forked from here would inherit this process's resident
    set in its ``ru_maxrss``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, os.path.abspath(__file__), "--search-only",
           "--dir", os.fspath(folder), "--work", os.fspath(work)] + (["--evict-each"] if evict_each else []) + (
               ["--max-queries", str(max_queries)] if max_queries else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ build (parent)
class _Log(logging.Handler):
    """Keeps the vector index's log lines (trainings, ivfdata writes) with their times since the start."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.t0 = time.perf_counter()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{time.perf_counter() - self.t0:8.1f} s  {record.getMessage()}")


def build(n: int, n_queries: int, batch: int, folder: Path, work: Path, phases: dict) -> dict:
    import faiss
    from retrieval import clustered_embeddings

    from shusheng.retrieval_index.index import Index

    t0 = time.perf_counter()
    data = clustered_embeddings(n + n_queries)
    base, queries = data[:n], data[n:]
    phases["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, truth_pos = faiss.knn(queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    phases["exact_truth_s"] = time.perf_counter() - t0

    log = _Log()
    logging.getLogger("shusheng.retrieval_index").addHandler(log)
    logging.getLogger("shusheng.retrieval_index").setLevel(logging.INFO)
    insert_s, commit_s, commits = 0.0, 0.0, []
    ids = np.empty(n, np.int64)
    with Index.open(folder, create=True, embedder_name=EMBEDDER, dim=DIM) as index:
        index.set_on_disk(True)
        for start in range(0, n, batch):
            t0 = time.perf_counter()
            for i in range(start, min(n, start + batch)):
                fid = index.put_file(f"/bench/{i:08d}.jpg", size=1, mtime_ns=0, digest=f"{i:x}",
                                     date="2024-01-01T00:00:00", date_source="mtime", width=640, height=480)
                ids[i] = index.add_entries(fid, base[i:i + 1], [None])[0]
            t1 = time.perf_counter()
            index.commit(write_vectors=False)
            t2 = time.perf_counter()
            insert_s += t1 - t0
            commit_s += t2 - t1
            commits.append({"entries": min(n, start + batch), "commit_s": round(t2 - t1, 2),
                            "in_memory": index.stats()["in_memory_entries"], "index": index.spec.factory})
            print(f"  {commits[-1]}", flush=True)
        t0 = time.perf_counter()
        index.commit()
        phases["final_commit_s"] = time.perf_counter() - t0
        stats = index.stats()
    logging.getLogger("shusheng.retrieval_index").removeHandler(log)
    phases["sqlite_insert_s"] = insert_s
    phases["commits_s"] = commit_s
    del data, base
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", ids[truth_pos])
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return {"stats": stats, "commits": commits, "log": log.lines, "files": files}


def set_storage(folder: Path, on_disk: bool) -> float:
    """Moves the index's IVF lists to disk or into memory (``set_on_disk`` + ``commit``); returns the seconds."""
    from shusheng.retrieval_index.index import Index

    t0 = time.perf_counter()
    with Index.open(folder, write=True, embedder_name=EMBEDDER, dim=DIM) as index:
        index.set_on_disk(on_disk)
        index.commit()
        assert index.stats()["storage"] == ("on-disk" if on_disk else "in-RAM")
    return time.perf_counter() - t0


def small_update(folder: Path, n: int, extra: int = 1000) -> dict:
    """Adds ``extra`` entries to the built index and commits: the cost of an incremental ingest."""
    from retrieval import clustered_embeddings

    from shusheng.retrieval_index.index import Index

    vecs = clustered_embeddings(extra, seed=1)
    with Index.open(folder, write=True, embedder_name=EMBEDDER, dim=DIM) as index:
        t0 = time.perf_counter()
        for i, v in enumerate(vecs):
            fid = index.put_file(f"/bench/new-{i:06d}.jpg", size=1, mtime_ns=0, digest=f"new{i:x}",
                                 date="2024-01-02T00:00:00", date_source="mtime", width=640, height=480)
            index.add_entries(fid, v[None], [None])
        t1 = time.perf_counter()
        index.commit(write_vectors=False)
        t2 = time.perf_counter()
        index.commit()
        t3 = time.perf_counter()
        assert index.ntotal == n + extra
    return {"entries_added": extra, "insert_s": t1 - t0, "commit_no_vectors_s": t2 - t1,
            "commit_write_lists_s": t3 - t2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000, help="vectors in the index (2,000,000)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50_000, help="entries per SQLite transaction (50,000)")
    parser.add_argument("--evicted-queries", type=int, default=200,
                        help="queries of the evicted-before-each-query run (200)")
    parser.add_argument("--dir", default=None, help="index folder (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the index folder")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--search-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evict-each", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-queries", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.search_only:
        print(json.dumps(search_only(Path(args.dir), Path(args.work), args.evict_each, args.prefetch_threads,
                                     args.max_queries)))
        return 0
    reexec_with_bench_env()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="shusheng-ondisk-"))
    folder = Path(args.dir) if args.dir else work / "index"
    if folder.exists() and any(folder.iterdir()):
        parser.error(f"{folder} is not empty")
    float32_bytes = args.n * DIM * 4
    phases: dict = {}
    meta = {**machine_info(), "n": args.n, "dim": DIM, "k": K, "queries": args.queries, "batch": args.batch,
            "float32_bytes": float32_bytes, "rss_target_bytes": float32_bytes // 4, "phases": phases}
    try:
        built = build(args.n, args.queries, args.batch, folder, work, phases)
        meta.update(built)
        rows = []
        for label in ("cold", "warm", "evicted before each query", "in-RAM lists (baseline)"):
            if label == "cold":
                _evict(folder)
            if label.startswith("in-RAM"):
                phases["to_memory_s"] = set_storage(folder, on_disk=False)
            t0 = time.perf_counter()
            evict_each = label.startswith("evicted")  # slow (reads from disk): the first --evicted-queries
            r = _run_search(folder, work, evict_each, args.evicted_queries if evict_each else None)
            r["page_cache"] = label
            r["process_s"] = time.perf_counter() - t0
            r["peak_rss_mb"] = r["peak_rss"] / 2**20
            r["rss_file_mb"] = r["rss_file_end"] / 2**20
            r["rss_anon_mb"] = r["rss_anon_end"] / 2**20
            r["lists_resident_mb"] = r["lists_resident_end"] / 2**20
            r["peak_rss_vs_float32"] = r["peak_rss"] / float32_bytes
            r["n"] = args.n
            rows.append(r)
            print(json.dumps(r), flush=True)
        phases["back_to_disk_s"] = set_storage(folder, on_disk=True)
        meta["small_update"] = small_update(folder, args.n)
    finally:
        if args.keep:
            print(f"kept the index in {folder} and the queries and exact top-{K} in {work}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    cols = [("n", "N"), ("page_cache", "run"), ("storage", "lists"), ("index_type", "index"), ("nprobe", "nprobe"),
            ("recall@10", "recall@10"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("open_s", "open s"),
            ("peak_rss_mb", "peak RSS MiB"), ("rss_anon_mb", "RssAnon MiB"), ("rss_file_mb", "RssFile MiB"),
            ("lists_resident_mb", "lists resident MiB"),
            ("peak_rss_vs_float32", "peak RSS / float32")]
    print(write_results("retrieval_ondisk", rows, cols, args.out, meta))
    print(json.dumps({"phases": phases, "small_update": meta.get("small_update"), "files": meta.get("files")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
