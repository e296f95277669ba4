"""The index store: FAISS vectors + SQLite metadata in one folder, safe against crashes and concurrent writers.

Layout of an index folder::

    meta.sqlite     files (path, size, mtime, content hash, date, width, height), entries (one per whole image
                    or region box, with its float32 vector), info (embedder, generation, index type, ...)
    vectors.faiss   the FAISS index over every entry (ids = entry ids); a cache rebuilt from meta.sqlite
    commit.json     commit marker: generation and entry count that vectors.faiss was written at
    embedder.json   embedder name and dimension (an index refuses vectors from another embedder)
    lock            flock'ed by the one writer; holds its PID

Consistency rules:

* SQLite (WAL mode) is the source of truth. Every change happens in a transaction; :meth:`Index.commit` commits
  it, bumps ``generation`` and only then touches the FAISS file: written to a temporary name, fsync'ed,
  ``os.replace``'d over ``vectors.faiss``, followed by ``commit.json``.
* A reader trusts ``vectors.faiss`` when ``commit.json`` names SQLite's current generation and the entry count
  matches. Otherwise (an interrupted commit, a ``kill -9`` mid-ingest, a writer still running) it reconciles the
  FAISS index in memory with SQLite: ids FAISS lacks are added from the stored vectors and ids SQLite no longer
  has are removed. So the last committed state is always what a reader sees, whatever instant a writer died.
* One writer at a time: :meth:`Index.open` with ``write=True`` takes an exclusive ``fcntl.flock`` on ``lock``
  (released by the kernel if the process dies); a second writer gets :class:`IndexLockedError` naming the PID.
  Readers take no lock.

Index type (see :func:`choose_index_spec` and ``bench/retrieval.py``): exact ``IDMap2,Flat`` (inner product
over normalised vectors = cosine) below ``FLAT_MAX_ENTRIES`` entries, ``IVF{nlist},SQ8`` above, retrained from
the stored vectors whenever the collection outgrows the trained partition by 4x. Search scores are always exact
cosines, recomputed from the stored float32 vectors of the candidates FAISS returns.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import fnmatch
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng._deps import require

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index.embedders import Embedder

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INDEX_DIRNAME", "FLAT_MAX_ENTRIES", "DuplicateGroup", "EmbedderMismatchError", "FileRecord", "Index",
    "IndexLockedError", "IndexNotFoundError", "IndexSpec", "RetrievalIndexError", "SearchHit", "choose_index_spec",
]

FORMAT_VERSION = 1
DEFAULT_INDEX_DIRNAME = ".shusheng-index"
META_FILE, VECTORS_FILE, COMMIT_FILE, EMBEDDER_FILE, LOCK_FILE = (
    "meta.sqlite", "vectors.faiss", "commit.json", "embedder.json", "lock")

#: Below this many entries search is exact (flat inner product); at or above it an IVF index is trained.
FLAT_MAX_ENTRIES = 50_000
#: IVF training sample: this many vectors per list (k-means; faiss warns below 39).
TRAIN_PER_LIST = 40
#: Retrain the IVF partition when the ideal number of lists is this many times the trained one (or 1/this).
RETRAIN_FACTOR = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    date TEXT NOT NULL,            -- ISO 8601, local time: EXIF DateTimeOriginal, else the file's mtime
    date_source TEXT NOT NULL,     -- 'exif' | 'mtime'
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    detector TEXT,                 -- name of the detector whose boxes are stored, if any
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: the FAISS id
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    source TEXT NOT NULL,                   -- 'image' (whole image) | 'user' (given box) | 'detector'
    x INTEGER, y INTEGER, w INTEGER, h INTEGER,   -- NULL for the whole image
    vector BLOB NOT NULL                    -- float32, L2-normalised
);
CREATE INDEX IF NOT EXISTS entries_file ON entries(file_id);
"""

Box = tuple[int, int, int, int]
DateLike = str | dt.date | dt.datetime


class RetrievalIndexError(RuntimeError):
    """Base class of the index's own errors."""


class IndexNotFoundError(RetrievalIndexError, FileNotFoundError):
    """No index at the given path."""


class IndexLockedError(RetrievalIndexError):
    """Another process holds the index's write lock."""


class EmbedderMismatchError(RetrievalIndexError, ValueError):
    """Vectors or queries from an embedder other than the one the index was built with."""


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        path: absolute path of the image file.
        score: exact cosine similarity between the query and the entry (``-1..1``).
        box: ``(x, y, w, h)`` in pixels of the upright image for a region hit, ``None`` for the whole image.
        entry_id: id of the matching entry (the FAISS id).
        width, height: size of the upright image.
        date: ISO date-time of the picture (EXIF DateTimeOriginal, else the file's modification time).
    """

    path: str
    score: float
    box: Box | None
    entry_id: int
    width: int
    height: int
    date: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        return d


@dataclass(frozen=True)
class DuplicateGroup:
    """Files that are the same picture: ``kind="exact"`` (identical bytes) or ``"near"`` (cosine >= threshold).

    ``score`` is the lowest similarity linking the group (1.0 for exact duplicates).
    """

    kind: str
    paths: list[str]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FileRecord:
    """A row of the ``files`` table."""

    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str
    date: str
    date_source: str
    width: int
    height: int
    detector: str | None


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build: ``factory`` string for ``faiss.index_factory`` and its search ``nprobe``."""

    factory: str
    nprobe: int | None = None
    nlist: int | None = None

    @property
    def exact(self) -> bool:
        return self.nlist is None


def choose_index_spec(n: int) -> IndexSpec:
    """The index type for a collection of ``n`` entries (the rule measured in ``bench/retrieval.py``).

    * ``n < FLAT_MAX_ENTRIES`` (50k): exact ``IDMap2,Flat`` — at most a few ms per query, recall 1.
    * otherwise ``IVF{nlist},SQ8`` with ``nlist`` = the power of two nearest ``4 * sqrt(n)`` and ``nprobe`` =
      ``nlist / 32`` (at least 16): 8-bit scalar quantisation keeps 384 B per 384-d vector and loses almost no
      recall; 1/32 of the lists probed holds recall@10 >= 0.95 on clustered embedding-like data.
    """
    if n < FLAT_MAX_ENTRIES:
        return IndexSpec("IDMap2,Flat")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return IndexSpec(f"IVF{nlist},SQ8", nprobe=max(16, nlist // 32), nlist=nlist)


def _needs_rebuild(current: IndexSpec, n: int) -> bool:
    ideal = choose_index_spec(n)
    if current.exact or ideal.exact:
        # switch flat -> IVF at FLAT_MAX_ENTRIES, back only below half of it (hysteresis)
        return (current.exact and not ideal.exact) or (not current.exact and n < FLAT_MAX_ENTRIES // 2)
    ratio = ideal.nlist / current.nlist
    return ratio >= RETRAIN_FACTOR or ratio <= 1 / RETRAIN_FACTOR


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def _parse_date(value: DateLike | None, end: bool) -> str | None:
    """ISO string bound for the date filter; a bare date covers the whole day (``end`` -> 23:59:59)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat(timespec="seconds")
    if isinstance(value, dt.date):
        return f"{value.isoformat()}T{'23:59:59' if end else '00:00:00'}"
    text = str(value).strip()
    try:
        if len(text) == 10:
            return _parse_date(dt.date.fromisoformat(text), end)
        return _parse_date(dt.datetime.fromisoformat(text), end)
    except ValueError as e:
        raise ValueError(f"invalid date {value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]") from e


def _glob_matches(path: str, pattern: str) -> bool:
    """``fnmatch`` on the whole path (``*`` also crosses ``/``); a relative pattern may match at any folder."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    return not os.path.isabs(pattern) and not pattern.startswith("*") and fnmatch.fnmatchcase(path, "*/" + pattern)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _faiss():
    return require("faiss", extra="retrieval", package="faiss-cpu")


def _faiss_ids(index) -> np.ndarray:
    """Every id stored in ``index`` (an ``IndexIDMap2`` or an IVF index)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    chunks = []
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            ptr = invlists.get_ids(lst)
            chunks.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64).copy())
            invlists.release_ids(lst, ptr)
    return np.concatenate(chunks) if chunks else np.empty(0, np.int64)


def _spec_of(index) -> IndexSpec:
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2):
        return IndexSpec("IDMap2,Flat")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    kind = "SQ8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else (
        "PQ" if isinstance(ivf, faiss.IndexIVFPQ) else "Flat")
    return IndexSpec(f"IVF{ivf.nlist},{kind}", nprobe=ivf.nprobe, nlist=ivf.nlist)


class Index:
    """An image/region vector index in a folder. Open it with :meth:`open`; use it as a context manager.

    Read-only use (no lock)::

        with Index.open("photos/.shusheng-index") as index:
            hits = index.search(text="a dog on a beach", k=10, threshold=0.25)

    Writing (one writer at a time; changes become visible at :meth:`commit`)::

        with Index.open(path, write=True, create=True, embedder=emb) as index:
            index.add("photos/a.jpg")
            index.remove("photos/b.jpg")
            index.commit()

    Folders are best indexed with :func:`shusheng.retrieval_index.index_folder`, which only embeds new or
    changed files.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, writable: bool, lock_fd: int | None,
                 embedder_info: dict[str, Any]):
        self.path = path
        self.writable = writable
        self._conn = conn
        self._lock_fd = lock_fd
        self._embedder_info = embedder_info
        self._embedder: Embedder | None = None
        self._mutex = threading.RLock()
        self._in_txn = False
        self._pending_add: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_remove: list[np.ndarray] = []
        self._faiss_index = None
        self._gpu_index = None
        self._vectors_dirty = False
        self._load_vectors()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, write: bool = False, create: bool = False,
             embedder: Embedder | None = None, embedder_name: str | None = None, dim: int | None = None,
             checkpoint: str | os.PathLike | None = None) -> Index:
        """Opens (or with ``create=True`` creates) the index folder ``path``.

        Args:
            path: the index folder.
            write: take the write lock (exclusive; fails at once if another process holds it).
            create: create the index if missing (implies ``write``); needs the embedder's name and dim.
            embedder: the embedder whose vectors will be added; its ``name``/``dim`` are recorded at creation
                and checked against an existing index. Also used for queries.
            embedder_name, dim: the same check without an embedder object.
            checkpoint: the embedder's local weights, recorded at creation so that searches can rebuild it.

        Raises:
            IndexNotFoundError: no index at ``path`` and ``create`` is false.
            IndexLockedError: ``write`` and another process is writing the index.
            EmbedderMismatchError: the index was built with another embedder or dimension.
        """
        path = Path(path).expanduser().absolute()
        write = write or create
        name = embedder.name if embedder is not None else embedder_name
        dim = int(embedder.dim) if embedder is not None else dim
        exists = (path / META_FILE).is_file() and (path / EMBEDDER_FILE).is_file()
        if not exists and not create:
            raise IndexNotFoundError(f"no index at {os.fspath(path)!r} (build one with: shusheng index FOLDER "
                                     "[--index PATH])")
        lock_fd = None
        if write:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = cls._acquire_lock(path)
        try:
            if not ((path / META_FILE).is_file() and (path / EMBEDDER_FILE).is_file()):
                # create: the schema first and embedder.json last, so readers never see a half-made index
                if name is None or dim is None:
                    raise ValueError("creating an index needs the embedder (or embedder_name and dim)")
                conn = cls._connect(path / META_FILE, write=True)
                try:
                    cls._init_schema(conn)
                finally:
                    conn.close()
                info = {"name": name, "dim": dim, "checkpoint": os.fspath(checkpoint) if checkpoint else None,
                        "format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _atomic_write(path / EMBEDDER_FILE, json.dumps(info, indent=2).encode())
            info = json.loads((path / EMBEDDER_FILE).read_text())
            if name is not None and (info["name"] != name or (dim is not None and int(info["dim"]) != dim)):
                raise EmbedderMismatchError(
                    f"index {os.fspath(path)!r} was built with embedder {info['name']!r} (dim {info['dim']}), "
                    f"not {name!r} (dim {dim}); vectors of different embedders cannot be mixed. Use "
                    f"--embedder {info['name']} for this index, or a new --index path for {name!r}."
                )
            conn = cls._connect(path / META_FILE, write)
            try:
                if write:
                    cls._init_schema(conn)
                index = cls(path, conn, write, lock_fd, info)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise RetrievalIndexError(f"cannot read the index metadata {os.fspath(path / META_FILE)!r} ({e}); "
                                          "is the index still being created, or is the file damaged?") from e
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if embedder is not None:
            index._embedder = embedder
        return index

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO info VALUES ('generation', '0')")
        conn.execute("INSERT OR IGNORE INTO info VALUES ('format', ?)", (str(FORMAT_VERSION),))

    @staticmethod
    def _connect(db: Path, write: bool) -> sqlite3.Connection:
        if write:
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process never loses a commit
        else:
            conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    @staticmethod
    def _acquire_lock(path: Path) -> int:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            pid, _, rest = holder.partition(" ")
            raise IndexLockedError(
                f"index {os.fspath(path)!r} is being updated by PID {pid}{(' (' + rest + ')') if rest else ''}; "
                "wait for it to finish (searching needs no lock)") from None
        os.ftruncate(fd, 0)
        cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        os.pwrite(fd, f"{os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {cmd}".encode(), 0)
        return fd

    def close(self) -> None:
        """Rolls back uncommitted changes, closes the database and releases the write lock."""
        with self._mutex:
            if self._conn is None:
                return
            if self._in_txn:
                logger.warning("closing %s with uncommitted changes: rolled back", self.path)
                self.rollback()
            self._conn.close()
            self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Index({os.fspath(self.path)!r}, embedder={self.embedder_name!r}, entries={self.ntotal}, "
                f"{'writable' if self.writable else 'read-only'})")

    # ------------------------------------------------------------------ properties
    @property
    def embedder_name(self) -> str:
        return self._embedder_info["name"]

    @property
    def dim(self) -> int:
        return int(self._embedder_info["dim"])

    @property
    def ntotal(self) -> int:
        """Number of committed entries (whole images + regions) in the vector index."""
        return int(self._faiss_index.ntotal)

    @property
    def generation(self) -> int:
        return int(self._info("generation", "0"))

    @property
    def spec(self) -> IndexSpec:
        return _spec_of(self._faiss_index)

    @property
    def embedder(self) -> Embedder:
        """The embedder for queries: the one given at :meth:`open`, else rebuilt from ``embedder.json``."""
        if self._embedder is None:
            from shusheng.retrieval_index.embedders import create_embedder

            self._embedder = create_embedder(self.embedder_name, checkpoint=self._embedder_info.get("checkpoint"))
            self._check_embedder(self._embedder)
        return self._embedder

    def _check_embedder(self, embedder: Embedder) -> None:
        if embedder.name != self.embedder_name or int(embedder.dim) != self.dim:
            raise EmbedderMismatchError(
                f"index {os.fspath(self.path)!r} holds {self.embedder_name!r} vectors (dim {self.dim}); "
                f"embedder {embedder.name!r} (dim {embedder.dim}) cannot query or extend it")

    def _info(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM info WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------------ vectors: load, reconcile, build, save
    def _all_vectors(self, where: str = "", params: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the entries matching ``where`` (an SQL condition on ``entries``), chunked reads."""
        n = self._conn.execute(f"SELECT count(*) FROM entries {where}", params).fetchone()[0]
        ids = np.empty(n, np.int64)
        vecs = np.empty((n, self.dim), np.float32)
        cur = self._conn.execute(f"SELECT id, vector FROM entries {where} ORDER BY id", params)
        i = 0
        while rows := cur.fetchmany(16384):
            rows = rows[: n - i]
            ids[i:i + len(rows)] = [r[0] for r in rows]
            vecs[i:i + len(rows)] = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, self.dim)
            i += len(rows)
        return ids[:i], vecs[:i]

    def _vectors_of(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):  # SQLite's variable limit
            chunk = ids[start:start + 900]
            q = f"SELECT id, vector FROM entries WHERE id IN ({','.join('?' * len(chunk))})"
            for eid, blob in self._conn.execute(q, chunk):
                out[eid] = np.frombuffer(blob, np.float32)
        return out

    def _build(self, spec: IndexSpec, ids: np.ndarray, vecs: np.ndarray):
        faiss = _faiss()
        index = faiss.index_factory(self.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            n_train = min(len(vecs), TRAIN_PER_LIST * spec.nlist)
            sample = vecs[np.sort(rng.choice(len(vecs), n_train, replace=False))] if n_train < len(vecs) else vecs
            t0 = time.perf_counter()
            index.train(sample)
            logger.info("trained %s on %d vectors in %.1f s", spec.factory, n_train, time.perf_counter() - t0)
        if spec.nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = spec.nprobe
        for start in range(0, len(ids), 65536):
            index.add_with_ids(vecs[start:start + 65536], ids[start:start + 65536])
        return index

    def _load_vectors(self) -> None:
        """Loads ``vectors.faiss`` if it matches the committed generation, else reconciles it with SQLite."""
        faiss = _faiss()
        self._conn.execute("BEGIN")  # one read snapshot for the checks below
        try:
            count = self._conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            generation = self.generation
            vec_path = self.path / VECTORS_FILE
            index = None
            if vec_path.is_file():
                try:
                    index = faiss.read_index(os.fspath(vec_path))
                except RuntimeError as e:  # faiss reports unreadable files as RuntimeError
                    logger.warning("cannot read %s (%s); rebuilding it from the stored vectors", vec_path, e)
                if index is not None and index.d != self.dim:
                    logger.warning("%s has dimension %d, not %d; rebuilding it", vec_path, index.d, self.dim)
                    index = None
            marker = self._read_marker()
            if index is None:
                ids, vecs = self._all_vectors()
                index = self._build(choose_index_spec(len(ids)), ids, vecs)
                self._vectors_dirty = len(ids) > 0
                if len(ids):
                    logger.info("built the vector index of %s from %d stored vectors", self.path, len(ids))
            elif not (marker.get("generation") == generation and index.ntotal == count):
                self._reconcile(index)
                self._vectors_dirty = True
        finally:
            self._conn.execute("COMMIT")
        self._faiss_index = index

    def _read_marker(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / COMMIT_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("unreadable commit marker in %s (%s); checking the vectors against the metadata",
                           self.path, e)
            return {}

    def _reconcile(self, index) -> None:
        have = _faiss_ids(index)
        want = np.fromiter((r[0] for r in self._conn.execute("SELECT id FROM entries")), np.int64)
        extra = np.setdiff1d(have, want, assume_unique=False)
        missing = np.setdiff1d(want, have, assume_unique=False)
        if len(extra):
            index.remove_ids(extra)
        for start in range(0, len(missing), 8192):
            chunk = missing[start:start + 8192]
            vecs = self._vectors_of(chunk)
            index.add_with_ids(np.stack([vecs[int(i)] for i in chunk]), chunk)
        logger.info("%s: vector file was behind the committed metadata (interrupted commit or a running "
                    "writer): added %d, removed %d vectors in memory", self.path, len(missing), len(extra))

    def _save_vectors(self) -> None:
        faiss = _faiss()
        vec_path = self.path / VECTORS_FILE
        tmp = self.path / f".{VECTORS_FILE}.tmp-{os.getpid()}"
        faiss.write_index(self._faiss_index, os.fspath(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, vec_path)
        self._write_marker()
        self._vectors_dirty = False

    def _write_marker(self) -> None:
        """Records that ``vectors.faiss`` holds the vectors of the current generation."""
        marker = {"generation": self.generation, "entries": int(self._faiss_index.ntotal),
                  "index": self.spec.factory, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_write(self.path / COMMIT_FILE, json.dumps(marker).encode())
        _fsync_dir(self.path)

    def _searchable(self):
        """The index to search: a GPU copy when faiss-gpu sees a GPU, else the CPU index."""
        faiss = _faiss()
        if self._gpu_index is None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._faiss_index)
                logger.info("searching %s on %d GPU(s)", self.path, faiss.get_num_gpus())
            except RuntimeError as e:  # an index type faiss-gpu cannot clone: keep searching on the CPU
                logger.warning("cannot move the index to the GPU (%s); searching on the CPU", e)
                self._gpu_index = False
        return self._gpu_index or self._faiss_index

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise RetrievalIndexError(f"index {os.fspath(self.path)!r} was opened read-only; "
                                      "use Index.open(path, write=True)")
        if not self._in_txn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def file_record(self, path: str | os.PathLike) -> FileRecord | None:
        """The stored metadata of ``path`` (absolute or relative to the current directory), or ``None``."""
        row = self._conn.execute("SELECT id, path, size, mtime_ns, hash, date, date_source, width, height, "
                                 "detector FROM files WHERE path=?", (os.path.abspath(path),)).fetchone()
        return FileRecord(*row) if row else None

    def files_with_hash(self, digest: str) -> list[FileRecord]:
        rows = self._conn.execute("SELECT id, path, size, mtime_ns, hash, date, date_source, width, height, "
                                  "detector FROM files WHERE hash=? ORDER BY id", (digest,)).fetchall()
        return [FileRecord(*r) for r in rows]

    def paths_under(self, folder: str | os.PathLike) -> list[str]:
        """Indexed paths inside ``folder`` (recursively)."""
        prefix = os.path.join(os.path.abspath(folder), "")
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._conn.execute("SELECT path FROM files WHERE path LIKE ? ESCAPE '\\'", (like,))
        return [r[0] for r in rows if r[0].startswith(prefix)]  # LIKE ignores ASCII case

    def boxes_of(self, file_id: int, source: str) -> list[Box]:
        rows = self._conn.execute("SELECT x, y, w, h FROM entries WHERE file_id=? AND source=? ORDER BY id",
                                  (file_id, source)).fetchall()
        return [tuple(r) for r in rows]

    def put_file(self, path: str | os.PathLike, *, size: int, mtime_ns: int, digest: str, date: str,
                 date_source: str, width: int, height: int, detector: str | None = None) -> int:
        """Inserts or replaces the metadata of one file; a replaced file loses all its entries. Returns its id."""
        self._require_writable()
        path = os.path.abspath(path)
        old = self.file_record(path)
        if old is not None:
            self.remove_entries(old.id)
            self._conn.execute("UPDATE files SET size=?, mtime_ns=?, hash=?, date=?, date_source=?, width=?, "
                               "height=?, detector=?, indexed_at=? WHERE id=?",
                               (size, mtime_ns, digest, date, date_source, width, height, detector, time.time(),
                                old.id))
            return old.id
        cur = self._conn.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, date, date_source, width, height, detector, indexed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path, size, mtime_ns, digest, date, date_source, width, height, detector, time.time()))
        return int(cur.lastrowid)

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        """Records a new size/mtime for a file whose content (hash) did not change."""
        self._require_writable()
        self._conn.execute("UPDATE files SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, file_id))

    def set_detector(self, file_id: int, detector: str | None) -> None:
        self._require_writable()
        self._conn.execute("UPDATE files SET detector=? WHERE id=?", (detector, file_id))

    def add_entries(self, file_id: int, vectors: np.ndarray, boxes: Sequence[Box | None],
                    source: str | Sequence[str] = "image") -> list[int]:
        """Adds one entry per row of ``vectors`` to file ``file_id``: ``box=None`` for the whole image.

        Args:
            vectors: ``(n, dim)`` float32; rows are re-normalised.
            boxes: ``n`` boxes ``(x, y, w, h)`` or ``None``.
            source: ``"image"``, ``"user"`` or ``"detector"`` (one for all, or one per row).
        """
        self._require_writable()
        vectors = _normalise(np.atleast_2d(vectors))
        if vectors.shape != (len(boxes), self.dim):
            raise ValueError(f"expected {len(boxes)} vectors of dim {self.dim}, got shape {vectors.shape}")
        sources = [source] * len(boxes) if isinstance(source, str) else list(source)
        ids = []
        for vec, box, src in zip(vectors, boxes, sources):
            xywh = tuple(int(b) for b in box) if box is not None else (None, None, None, None)
            cur = self._conn.execute("INSERT INTO entries (file_id, source, x, y, w, h, vector) "
                                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (file_id, src, *xywh, vec.tobytes()))
            ids.append(int(cur.lastrowid))
        if ids:
            self._pending_add.append((np.asarray(ids, np.int64), vectors))
        return ids

    def remove_entries(self, file_id: int, source: str | None = None) -> int:
        """Removes the entries of a file (only those of ``source`` if given). Returns how many."""
        self._require_writable()
        q, params = "SELECT id FROM entries WHERE file_id=?", [file_id]
        if source is not None:
            q, params = q + " AND source=?", params + [source]
        ids = np.fromiter((r[0] for r in self._conn.execute(q, params)), np.int64)
        if len(ids):
            self._conn.execute(q.replace("SELECT id", "DELETE"), params)
            self._pending_remove.append(ids)
        return len(ids)

    def copy_entries(self, src_file_id: int, dst_file_id: int) -> int:
        """Gives ``dst`` copies of all entries of ``src`` (an identical file): no embedding. Returns how many."""
        self._require_writable()
        rows = self._conn.execute("SELECT source, x, y, w, h, vector FROM entries WHERE file_id=? ORDER BY id",
                                  (src_file_id,)).fetchall()
        if not rows:
            return 0
        vecs = np.frombuffer(b"".join(r[5] for r in rows), np.float32).reshape(-1, self.dim)
        boxes = [None if r[1] is None else tuple(r[1:5]) for r in rows]
        self.add_entries(dst_file_id, vecs, boxes, [r[0] for r in rows])
        return len(rows)

    def remove(self, path: str | os.PathLike) -> bool:
        """Removes a file and all its entries. Returns whether it was indexed."""
        self._require_writable()
        rec = self.file_record(path)
        if rec is None:
            return False
        self.remove_entries(rec.id)
        self._conn.execute("DELETE FROM files WHERE id=?", (rec.id,))
        return True

    def add(self, path: str | os.PathLike, *, boxes: Iterable[Sequence[float]] | None = None,
            embedder: Embedder | None = None, max_pixels: int | None = None) -> list[int]:
        """Adds or updates one image file (whole image, plus region entries for ``boxes``). Returns entry ids.

        The file is loaded with :func:`shusheng.data.load_image` (which raises ``ImageLoadError`` on bad
        input); an unchanged file (same hash) keeps its entries and returns them.
        """
        from shusheng.data.images import DEFAULT_MAX_PIXELS
        from shusheng.retrieval_index.ingest import prepare_file

        self._require_writable()
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        prepared = prepare_file(os.path.abspath(path), None if boxes is None else list(boxes),
                                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        if prepared.invalid_boxes:
            raise ValueError(f"{path}: {'; '.join(prepared.invalid_boxes)}")
        old = self.file_record(prepared.path)
        if old is not None and old.hash == prepared.digest and boxes is None:
            self.touch_file(old.id, prepared.size, prepared.mtime_ns)
            return [r[0] for r in self._conn.execute("SELECT id FROM entries WHERE file_id=?", (old.id,))]
        vecs = embedder.embed_images([prepared.image, *prepared.crops])
        fid = self.put_file(prepared.path, size=prepared.size, mtime_ns=prepared.mtime_ns, digest=prepared.digest,
                            date=prepared.date, date_source=prepared.date_source, width=prepared.width,
                            height=prepared.height)
        return self.add_entries(fid, vecs, [None, *prepared.boxes], ["image"] + ["user"] * len(prepared.boxes))

    update = add

    def add_regions(self, path: str | os.PathLike, boxes: Iterable[Sequence[float]], *,
                    embedder: Embedder | None = None, replace: bool = True) -> list[int]:
        """Adds region entries for ``boxes`` (``[x, y, w, h]`` pixels of the upright image) of an indexed file.

        Each region embeds the crop with 10 % context padding. ``replace`` drops the file's previous user boxes.
        Returns the new entry ids.

        Raises:
            KeyError: the file is not in the index (add it first).
            ValueError: a box lies outside the image or is empty.
        """
        from shusheng.retrieval_index.ingest import prepare_file

        self._require_writable()
        rec = self.file_record(path)
        if rec is None:
            raise KeyError(f"{os.fspath(path)!r} is not in the index; add the image first")
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        prepared = prepare_file(rec.path, [list(b) for b in boxes])
        if prepared.invalid_boxes:
            raise ValueError(f"{rec.path}: {'; '.join(prepared.invalid_boxes)}")
        if replace:
            self.remove_entries(rec.id, "user")
        if not prepared.crops:
            return []
        vecs = embedder.embed_images(prepared.crops)
        return self.add_entries(rec.id, vecs, prepared.boxes, "user")

    def set_root(self, folder: str | os.PathLike) -> None:
        """Records ``folder`` among the folders this index covers (shown by :meth:`stats`)."""
        self._require_writable()
        roots = set(json.loads(self._info("roots", "[]")))
        roots.add(os.path.abspath(folder))
        self._conn.execute("INSERT OR REPLACE INTO info VALUES ('roots', ?)", (json.dumps(sorted(roots)),))

    def commit(self, write_vectors: bool = True) -> int:
        """Commits pending changes (one SQLite transaction) and applies them to the vector index.

        Args:
            write_vectors: also write ``vectors.faiss`` (atomically) and ``commit.json``, retraining the index
                type first if the collection outgrew it. Ingest commits every few hundred files with ``False``
                (cheap; readers reconcile from SQLite) and writes the file once at the end.

        Returns:
            The new generation number.
        """
        with self._mutex:
            if not self.writable:
                raise RetrievalIndexError("read-only index: nothing to commit")
            if self._in_txn:
                gen = self.generation + 1
                self._conn.execute("UPDATE info SET value=? WHERE key='generation'", (str(gen),))
                self._conn.execute("INSERT OR REPLACE INTO info VALUES ('last_commit', ?)",
                                   (time.strftime("%Y-%m-%dT%H:%M:%S"),))
                self._conn.execute("COMMIT")
                self._in_txn = False
                for ids, vecs in self._pending_add:
                    self._faiss_index.add_with_ids(vecs, ids)
                if self._pending_remove:
                    self._faiss_index.remove_ids(np.concatenate(self._pending_remove))
                self._vectors_dirty = self._vectors_dirty or bool(self._pending_add or self._pending_remove)
                self._pending_add, self._pending_remove = [], []
                self._gpu_index = None
            if write_vectors:
                spec = self.spec
                n = self._faiss_index.ntotal
                if _needs_rebuild(spec, n):
                    new_spec = choose_index_spec(n)
                    logger.info("%d entries: switching the vector index from %s to %s", n, spec.factory,
                                new_spec.factory)
                    ids, vecs = self._all_vectors()
                    self._faiss_index = self._build(new_spec, ids, vecs)
                    self._vectors_dirty = True
                    self._gpu_index = None
                if self._vectors_dirty or not (self.path / VECTORS_FILE).is_file():
                    self._save_vectors()
                else:  # metadata-only commit: the vector file is current, only its marker must follow
                    self._write_marker()
            return self.generation

    def rollback(self) -> None:
        """Discards uncommitted changes."""
        with self._mutex:
            if self._in_txn:
                self._conn.execute("ROLLBACK")
                self._in_txn = False
            self._pending_add, self._pending_remove = [], []

    # ------------------------------------------------------------------ querying
    def query_vector(self, text: str | None = None, image: Image.Image | str | os.PathLike | None = None,
                     embedder: Embedder | None = None) -> np.ndarray:
        """The normalised query vector: of the text, of the image, or the normalised sum of both."""
        if text is None and image is None:
            raise ValueError("give a text, an image, or both")
        embedder = embedder or self.embedder
        self._check_embedder(embedder)
        parts = []
        if text is not None:
            parts.append(embedder.embed_texts([text])[0])
        if image is not None:
            from shusheng.data.images import load_image

            parts.append(embedder.embed_images([load_image(image)])[0])
        return _normalise(np.sum(_normalise(np.stack(parts)), axis=0))

    def search(self, text: str | None = None, image: Image.Image | str | os.PathLike | None = None, k: int = 10,
               threshold: float | None = None, folder_glob: str | None = None, date_from: DateLike | None = None,
               date_to: DateLike | None = None, regions: bool = True, *, vector: np.ndarray | None = None,
               group_by_image: bool = True, nprobe: int | None = None,
               embedder: Embedder | None = None) -> list[SearchHit]:
        """Text-to-image, image-to-image or text+image search.

        Args:
            text: query text.
            image: query image (path or PIL image). With ``text`` too, the query is the normalised sum of both.
            k: number of hits.
            threshold: drop hits whose cosine score is below it.
            folder_glob: keep paths matching this ``fnmatch`` pattern (``*`` crosses folders; a relative
                pattern such as ``"2023/*"`` matches below any folder).
            date_from, date_to: keep pictures taken in this range (inclusive; ``YYYY-MM-DD`` covers the day).
            regions: also search region entries (boxes inside images).
            vector: a ready query vector instead of ``text``/``image``.
            group_by_image: one hit per image — its best entry (whole image or a region, whose box is then
                set). With ``False``, every (path, box) entry is its own hit.
            nprobe: IVF lists to visit (default the index's own); ignored by exact indexes.
            embedder: embedder for the query (default the index's).

        Returns:
            Up to ``k`` hits, best first, each with its exact cosine score.
        """
        if vector is None:
            q = self.query_vector(text, image, embedder)
        else:
            q = _normalise(np.asarray(vector, np.float32).reshape(-1))
            if q.shape[0] != self.dim:
                raise EmbedderMismatchError(f"query vector has dim {q.shape[0]}, index has {self.dim}")
        lo, hi = _parse_date(date_from, end=False), _parse_date(date_to, end=True)
        with self._mutex:
            ntotal = self.ntotal
            if ntotal == 0 or k <= 0:
                return []
            searchable = self._searchable()
            kwargs = {}
            if nprobe is not None and not self.spec.exact:  # per-call parameters: on the CPU index
                kwargs["params"] = _faiss().SearchParametersIVF(nprobe=int(nprobe))
                searchable = self._faiss_index
            fetch = min(ntotal, max(4 * k, k + 32))
            while True:
                scores, ids = searchable.search(q[None, :], fetch, **kwargs)  # (1, fetch) each
                found = ids[0][ids[0] >= 0]
                hits = self._collect(q, found, k, threshold, folder_glob, lo, hi, regions, group_by_image)
                exhausted = fetch >= ntotal or len(found) < fetch
                below = threshold is not None and len(found) and float(scores[0][len(found) - 1]) < threshold
                if len(hits) >= k or exhausted or below:
                    return hits[:k]
                fetch = min(ntotal, fetch * 4)

    def _collect(self, q: np.ndarray, ids: np.ndarray, k: int, threshold: float | None, folder_glob: str | None,
                 lo: str | None, hi: str | None, regions: bool, group_by_image: bool) -> list[SearchHit]:
        rows: dict[int, tuple] = {}
        id_list = [int(i) for i in ids]
        for start in range(0, len(id_list), 900):
            chunk = id_list[start:start + 900]
            q_sql = ("SELECT e.id, e.x, e.y, e.w, e.h, e.vector, f.path, f.width, f.height, f.date "
                     f"FROM entries e JOIN files f ON f.id = e.file_id WHERE e.id IN ({','.join('?' * len(chunk))})")
            for row in self._conn.execute(q_sql, chunk):
                rows[row[0]] = row
        scored = []
        for eid in id_list:
            row = rows.get(eid)
            if row is None:  # removed since the vector index was loaded
                continue
            score = float(np.dot(np.frombuffer(row[5], np.float32), q))  # exact cosine (FAISS may quantise)
            scored.append((score, row))
        scored.sort(key=lambda t: -t[0])
        hits: list[SearchHit] = []
        seen: set = set()
        for score, (eid, x, y, w, h, _, path, width, height, date) in scored:
            if threshold is not None and score < threshold:
                break
            box = None if x is None else (x, y, w, h)
            if box is not None and not regions:
                continue
            if folder_glob is not None and not _glob_matches(path, folder_glob):
                continue
            if (lo is not None and date < lo) or (hi is not None and date > hi):
                continue
            key = path if group_by_image else (path, box)
            if key in seen:
                continue
            seen.add(key)
            hits.append(SearchHit(path, score, box, eid, width, height, date))
            if len(hits) >= k:
                break
        return hits

    # ------------------------------------------------------------------ duplicates and stats
    def duplicates(self, near: float | None = None, neighbours: int = 10) -> list[DuplicateGroup]:
        """Groups of duplicate files.

        Args:
            near: also find near-duplicates: whole images whose cosine similarity is >= ``near`` (e.g. 0.97);
                identical files count once. ``None``: exact duplicates (same content hash) only.
            neighbours: nearest neighbours examined per image for near-duplicates.

        Returns:
            Exact groups first, then near groups; paths sorted within each group.
        """
        with self._mutex:
            groups = []
            by_hash: dict[str, list[str]] = {}
            for digest, path in self._conn.execute("SELECT hash, path FROM files ORDER BY path"):
                by_hash.setdefault(digest, []).append(path)
            for paths in by_hash.values():
                if len(paths) > 1:
                    groups.append(DuplicateGroup("exact", paths, 1.0))
            if near is None:
                return sorted(groups, key=lambda g: g.paths)
            # one whole-image entry per distinct hash
            rows = self._conn.execute("SELECT min(e.id), f.hash FROM entries e JOIN files f ON f.id = e.file_id "
                                      "WHERE e.source='image' GROUP BY f.hash").fetchall()
            rep_ids = np.asarray([r[0] for r in rows], np.int64)
            hash_of = {int(r[0]): r[1] for r in rows}
            if len(rep_ids) < 2:
                return sorted(groups, key=lambda g: g.paths)
            vec_of = self._vectors_of(rep_ids)
            vecs = np.stack([vec_of[int(i)] for i in rep_ids])
            faiss = _faiss()
            kk = min(len(rep_ids), neighbours + 1)
            if len(rep_ids) < FLAT_MAX_ENTRIES:
                flat = faiss.IndexFlatIP(self.dim)
                flat.add(vecs)
                sims, nbrs = flat.search(vecs, kk)
                nbrs = rep_ids[np.maximum(nbrs, 0)]
            else:  # the main (approximate) index; region entries and duplicates of a hash are filtered below
                sims, nbrs = self._searchable().search(vecs, kk * 2)
            parent = {int(i): int(i) for i in rep_ids}

            def find(a: int) -> int:
                while parent[a] != a:
                    parent[a] = parent[parent[a]]
                    a = parent[a]
                return a

            min_link: dict[tuple[int, int], float] = {}
            for i, eid in enumerate(rep_ids):
                for s, j in zip(sims[i], nbrs[i]):
                    j = int(j)
                    if j == eid or j not in parent or s < near:
                        continue
                    a, b = find(int(eid)), find(j)
                    if a != b:
                        parent[b] = a
                    min_link[(int(eid), j)] = float(s)
            members: dict[int, list[int]] = {}
            for eid in rep_ids:
                members.setdefault(find(int(eid)), []).append(int(eid))
            for eids in members.values():
                if len(eids) < 2:
                    continue
                eset = set(eids)
                score = min((s for (a, b), s in min_link.items() if a in eset and b in eset), default=near)
                paths = sorted(p for e in eids for p in by_hash[hash_of[e]])
                groups.append(DuplicateGroup("near", paths, score))
            return sorted([g for g in groups if g.kind == "exact"], key=lambda g: g.paths) + sorted(
                [g for g in groups if g.kind == "near"], key=lambda g: g.paths)

    def stats(self) -> dict[str, Any]:
        """Counts, embedder, index type, size on disk and last commit, as a JSON-friendly dict."""
        with self._mutex:
            c = self._conn
            files = c.execute("SELECT count(*) FROM files").fetchone()[0]
            by_source = dict(c.execute("SELECT source, count(*) FROM entries GROUP BY source").fetchall())
            spec = self.spec
            size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            return {
                "path": os.fspath(self.path),
                "files": files,
                "entries": sum(by_source.values()),
                "image_entries": by_source.get("image", 0),
                "region_entries": by_source.get("user", 0) + by_source.get("detector", 0),
                "embedder": self.embedder_name,
                "dim": self.dim,
                "index_type": spec.factory,
                "nprobe": spec.nprobe,
                "vectors_in_index": self.ntotal,
                "size_on_disk_bytes": size,
                "generation": self.generation,
                "last_commit": self._info("last_commit"),
                "roots": json.loads(self._info("roots", "[]")),
                "gpu": bool(self._gpu_index),
            }

