"""The records of an index: ``meta.sqlite`` (files, entries with their float32 vectors, info).

A video file is one row of ``files`` (``sampling`` records how its frames were sampled); each kept frame is an
entry with ``frame``, ``time`` and ``time_end`` (the span of near-identical frames it stands for), and the region
entries of a frame carry the same three values. Whole images and their regions leave them NULL. Indexes made
before videos were supported lack those columns: a writer adds them, a reader reads them as NULL.

SQLite (WAL mode) is the source of truth of an index: the FAISS file (:mod:`shusheng.retrieval_index.vectors`)
is a cache that can always be rebuilt from the vectors stored here. Every change runs inside one write
transaction; :class:`MetaStore` keeps the entry ids added and removed in it, so that at :meth:`MetaStore.commit`
the caller can apply exactly that delta to the vector index (and drop it on :meth:`MetaStore.rollback`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shusheng.retrieval_index.layout import FORMAT_VERSION

__all__ = ["Box", "EntryRow", "FileRecord", "FrameSpan", "MetaStore", "normalise"]

SCHEMA = """
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
    indexed_at REAL NOT NULL,
    sampling TEXT                  -- videos: how frames were sampled (JSON of VideoSampling); NULL for images
);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: the FAISS id
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    source TEXT NOT NULL,                   -- 'image' (whole image) | 'user' (given box) | 'detector'
    x INTEGER, y INTEGER, w INTEGER, h INTEGER,   -- NULL for the whole image
    vector BLOB NOT NULL,                   -- float32, L2-normalised
    frame INTEGER,                          -- videos: index of the frame in the stream; NULL for images
    time REAL,                              -- videos: the frame's time in seconds from the first frame
    time_end REAL                           -- videos: time of the last near-identical frame it stands for
);
CREATE INDEX IF NOT EXISTS entries_file ON entries(file_id);
"""

#: Columns added after the first format: (table, column, type). Writers add the missing ones to older indexes.
_ADDED_COLUMNS = (("files", "sampling", "TEXT"), ("entries", "frame", "INTEGER"), ("entries", "time", "REAL"),
                  ("entries", "time_end", "REAL"))
_SQL_VARS = 900  # ids per "IN (...)" query: below SQLite's variable limit

Box = tuple[int, int, int, int]
#: Where a video entry sits in its video: ``(frame index, time s, time_end s)``.
FrameSpan = tuple[int, float, float]
#: An entry joined with its file:
#: ``(id, x, y, w, h, vector blob, path, width, height, date, frame, time, time_end)`` (the last three NULL for
#: images).
EntryRow = tuple[int, int | None, int | None, int | None, int | None, bytes, str, int, int, str, int | None,
                 float | None, float | None]


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
    sampling: str | None = None  # videos: JSON of the VideoSampling their entries were made with

    @property
    def is_video(self) -> bool:
        return self.sampling is not None


def normalise(v: np.ndarray) -> np.ndarray:
    """``v`` as float32 with every row (last axis) L2-normalised."""
    v = np.asarray(v, np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


class MetaStore:
    """``meta.sqlite`` of one index: the connection, one write transaction at a time, and every query on it.

    Not thread-safe by itself: :class:`~shusheng.retrieval_index.Index` serialises the calls.
    """

    def __init__(self, conn: sqlite3.Connection, dim: int, writable: bool):
        self.conn = conn
        self.dim = dim
        self.writable = writable
        self.in_txn = False
        self._added: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, vectors) inserted in the open transaction
        self._removed: list[np.ndarray] = []  # entry ids deleted in the open transaction
        columns = {(t, c) for t in ("files", "entries") for c in self._columns(conn, t)}
        self.has_video_columns = all((t, c) in columns for t, c, _ in _ADDED_COLUMNS)
        self._file_columns = ("id, path, size, mtime_ns, hash, date, date_source, width, height, detector, "
                              + ("sampling" if self.has_video_columns else "NULL"))
        self._span_columns = "e.frame, e.time, e.time_end" if self.has_video_columns else "NULL, NULL, NULL"

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}

    # ------------------------------------------------------------------ connection
    @classmethod
    def open(cls, db: Path, dim: int, write: bool) -> MetaStore:
        """Connects to ``db`` (read-only unless ``write``); a writer also creates missing tables."""
        conn = cls._connect(db, write)
        try:
            if write:
                cls._init_schema(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn, dim, write)

    @classmethod
    def create(cls, db: Path) -> None:
        """Creates the schema of a new index in ``db``."""
        conn = cls._connect(db, write=True)
        try:
            cls._init_schema(conn)
        finally:
            conn.close()

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        for table, column, kind in _ADDED_COLUMNS:  # an index made before these columns existed
            if column not in MetaStore._columns(conn, table):
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
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

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One consistent read snapshot for several queries."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def begin_write(self) -> None:
        """Opens the write transaction unless one is open (``BEGIN IMMEDIATE``: waits for other writers)."""
        if not self.in_txn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.in_txn = True

    def commit(self) -> tuple[int, list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
        """Commits the open transaction as a new generation.

        Returns:
            ``(generation, added, removed)``: the new generation, the ``(ids, vectors)`` batches inserted and the
            id arrays deleted in the transaction, for the vector index to follow.
        """
        gen = self.generation + 1
        self.conn.execute("UPDATE info SET value=? WHERE key='generation'", (str(gen),))
        self.conn.execute("INSERT OR REPLACE INTO info VALUES ('last_commit', ?)",
                          (time.strftime("%Y-%m-%dT%H:%M:%S"),))
        self.conn.execute("COMMIT")
        self.in_txn = False
        added, removed = self._added, self._removed
        self._added, self._removed = [], []
        return gen, added, removed

    def rollback(self) -> None:
        """Discards the open transaction, if any."""
        if self.in_txn:
            self.conn.execute("ROLLBACK")
            self.in_txn = False
        self._added, self._removed = [], []

    # ------------------------------------------------------------------ info
    def info(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM info WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def generation(self) -> int:
        return int(self.info("generation", "0"))

    def roots(self) -> list[str]:
        return json.loads(self.info("roots", "[]"))

    def set_info(self, key: str, value: str) -> None:
        self.begin_write()
        self.conn.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, value))

    def add_root(self, folder: str | os.PathLike) -> None:
        roots = set(self.roots())
        roots.add(os.path.abspath(folder))
        self.conn.execute("INSERT OR REPLACE INTO info VALUES ('roots', ?)", (json.dumps(sorted(roots)),))

    # ------------------------------------------------------------------ files
    def file_record(self, path: str | os.PathLike) -> FileRecord | None:
        row = self.conn.execute(f"SELECT {self._file_columns} FROM files WHERE path=?",
                                (os.path.abspath(path),)).fetchone()
        return FileRecord(*row) if row else None

    def files_with_hash(self, digest: str) -> list[FileRecord]:
        rows = self.conn.execute(f"SELECT {self._file_columns} FROM files WHERE hash=? ORDER BY id",
                                 (digest,)).fetchall()
        return [FileRecord(*r) for r in rows]

    def paths_under(self, folder: str | os.PathLike) -> list[str]:
        prefix = os.path.join(os.path.abspath(folder), "")
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.conn.execute("SELECT path FROM files WHERE path LIKE ? ESCAPE '\\'", (like,))
        return [r[0] for r in rows if r[0].startswith(prefix)]  # LIKE ignores ASCII case

    def put_file(self, path: str | os.PathLike, *, size: int, mtime_ns: int, digest: str, date: str,
                 date_source: str, width: int, height: int, detector: str | None = None,
                 sampling: str | None = None) -> int:
        self.begin_write()
        path = os.path.abspath(path)
        old = self.file_record(path)
        if old is not None:
            self.remove_entries(old.id)
            self.conn.execute("UPDATE files SET size=?, mtime_ns=?, hash=?, date=?, date_source=?, width=?, "
                              "height=?, detector=?, indexed_at=?, sampling=? WHERE id=?",
                              (size, mtime_ns, digest, date, date_source, width, height, detector, time.time(),
                               sampling, old.id))
            return old.id
        cur = self.conn.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, date, date_source, width, height, detector, indexed_at,"
            " sampling) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path, size, mtime_ns, digest, date, date_source, width, height, detector, time.time(), sampling))
        return int(cur.lastrowid)

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.begin_write()
        self.conn.execute("UPDATE files SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, file_id))

    def set_detector(self, file_id: int, detector: str | None) -> None:
        self.begin_write()
        self.conn.execute("UPDATE files SET detector=? WHERE id=?", (detector, file_id))

    def remove_file(self, path: str | os.PathLike) -> bool:
        self.begin_write()
        rec = self.file_record(path)
        if rec is None:
            return False
        self.remove_entries(rec.id)
        self.conn.execute("DELETE FROM files WHERE id=?", (rec.id,))
        return True

    def file_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM files").fetchone()[0]

    def paths_by_hash(self) -> dict[str, list[str]]:
        """``{content hash: [paths, sorted]}`` over every file."""
        by_hash: dict[str, list[str]] = {}
        for digest, path in self.conn.execute("SELECT hash, path FROM files ORDER BY path"):
            by_hash.setdefault(digest, []).append(path)
        return by_hash

    # ------------------------------------------------------------------ entries
    def add_entries(self, file_id: int, vectors: np.ndarray, boxes: Sequence[Box | None],
                    source: str | Sequence[str] = "image", spans: Sequence[FrameSpan | None] | None = None
                    ) -> list[int]:
        """Inserts one entry per row of ``vectors`` (re-normalised) with its box (``None``: the whole image or
        frame) and, for video entries, its :data:`FrameSpan` (``spans``: one per row, or ``None`` for images)."""
        self.begin_write()
        vectors = normalise(np.atleast_2d(vectors))
        if vectors.shape != (len(boxes), self.dim):
            raise ValueError(f"expected {len(boxes)} vectors of dim {self.dim}, got shape {vectors.shape}")
        sources = [source] * len(boxes) if isinstance(source, str) else list(source)
        spans = [None] * len(boxes) if spans is None else list(spans)
        if len(spans) != len(boxes):
            raise ValueError(f"expected {len(boxes)} frame spans, got {len(spans)}")
        ids = []
        for vec, box, src, span in zip(vectors, boxes, sources, spans):
            xywh = tuple(int(b) for b in box) if box is not None else (None, None, None, None)
            fte = (int(span[0]), float(span[1]), float(span[2])) if span is not None else (None, None, None)
            cur = self.conn.execute("INSERT INTO entries (file_id, source, x, y, w, h, vector, frame, time, time_end)"
                                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    (file_id, src, *xywh, vec.tobytes(), *fte))
            ids.append(int(cur.lastrowid))
        if ids:
            self._added.append((np.asarray(ids, np.int64), vectors))
        return ids

    def remove_entries(self, file_id: int, source: str | None = None) -> int:
        self.begin_write()
        q, params = "SELECT id FROM entries WHERE file_id=?", [file_id]
        if source is not None:
            q, params = q + " AND source=?", params + [source]
        ids = np.fromiter((r[0] for r in self.conn.execute(q, params)), np.int64)
        if len(ids):
            self.conn.execute(q.replace("SELECT id", "DELETE"), params)
            self._removed.append(ids)
        return len(ids)

    def copy_entries(self, src_file_id: int, dst_file_id: int) -> int:
        self.begin_write()
        rows = self.conn.execute("SELECT source, x, y, w, h, vector, frame, time, time_end FROM entries "
                                 "WHERE file_id=? ORDER BY id", (src_file_id,)).fetchall()
        if not rows:
            return 0
        vecs = np.frombuffer(b"".join(r[5] for r in rows), np.float32).reshape(-1, self.dim)
        boxes = [None if r[1] is None else tuple(r[1:5]) for r in rows]
        spans = [None if r[7] is None else (r[6], r[7], r[8]) for r in rows]
        self.add_entries(dst_file_id, vecs, boxes, [r[0] for r in rows], spans)
        return len(rows)

    def boxes_of(self, file_id: int, source: str) -> list[Box]:
        rows = self.conn.execute("SELECT x, y, w, h FROM entries WHERE file_id=? AND source=? ORDER BY id",
                                 (file_id, source)).fetchall()
        return [tuple(r) for r in rows]

    def frame_spans(self, file_id: int) -> list[FrameSpan]:
        """The :data:`FrameSpan` of each kept frame of a video (its whole-frame entries), in time order."""
        if not self.has_video_columns:
            return []
        rows = self.conn.execute("SELECT frame, time, time_end FROM entries WHERE file_id=? AND source='image' "
                                 "AND time IS NOT NULL ORDER BY time", (file_id,)).fetchall()
        return [tuple(r) for r in rows]

    def entry_ids_of(self, file_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM entries WHERE file_id=?", (file_id,))]

    def entry_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    def entry_counts_by_source(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT source, count(*) FROM entries GROUP BY source").fetchall())

    def video_counts(self) -> tuple[int, int]:
        """``(video files, whole-frame entries of videos)``."""
        if not self.has_video_columns:
            return 0, 0
        videos = self.conn.execute("SELECT count(*) FROM files WHERE sampling IS NOT NULL").fetchone()[0]
        frames = self.conn.execute("SELECT count(*) FROM entries WHERE source='image' AND time IS NOT NULL"
                                   ).fetchone()[0]
        return videos, frames

    def entry_ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM entries")), np.int64)

    def image_entry_per_hash(self) -> list[tuple[int, str]]:
        """``(entry id, hash)``: one whole-image entry (the oldest) per distinct image content (videos: none)."""
        frames = " AND e.time IS NULL" if self.has_video_columns else ""
        return self.conn.execute("SELECT min(e.id), f.hash FROM entries e JOIN files f ON f.id = e.file_id "
                                 f"WHERE e.source='image'{frames} GROUP BY f.hash").fetchall()

    def all_vectors(self, where: str = "", params: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the entries matching ``where`` (an SQL condition on ``entries``), chunked reads."""
        n = self.conn.execute(f"SELECT count(*) FROM entries {where}", params).fetchone()[0]
        ids = np.empty(n, np.int64)
        vecs = np.empty((n, self.dim), np.float32)
        cur = self.conn.execute(f"SELECT id, vector FROM entries {where} ORDER BY id", params)
        i = 0
        while rows := cur.fetchmany(16384):
            rows = rows[: n - i]
            ids[i:i + len(rows)] = [r[0] for r in rows]
            vecs[i:i + len(rows)] = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, self.dim)
            i += len(rows)
        return ids[:i], vecs[:i]

    def iter_vectors(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of every entry in id order, ``chunk`` rows at a time (one cursor: never all of them
        in memory, unlike :meth:`all_vectors`)."""
        cur = self.conn.execute("SELECT id, vector FROM entries ORDER BY id")
        while rows := cur.fetchmany(chunk):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, self.dim)
            yield ids, vecs

    def vectors_of(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _SQL_VARS):
            chunk = ids[start:start + _SQL_VARS]
            q = f"SELECT id, vector FROM entries WHERE id IN ({','.join('?' * len(chunk))})"
            for eid, blob in self.conn.execute(q, chunk):
                out[eid] = np.frombuffer(blob, np.float32)
        return out

    def entry_rows(self, ids: Sequence[int]) -> dict[int, EntryRow]:
        """Each entry of ``ids`` still present, joined with its file (see :data:`EntryRow`)."""
        rows: dict[int, EntryRow] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _SQL_VARS):
            chunk = ids[start:start + _SQL_VARS]
            q = (f"SELECT e.id, e.x, e.y, e.w, e.h, e.vector, f.path, f.width, f.height, f.date, {self._span_columns} "
                 f"FROM entries e JOIN files f ON f.id = e.file_id WHERE e.id IN ({','.join('?' * len(chunk))})")
            for row in self.conn.execute(q, chunk):
                rows[row[0]] = row
        return rows
