"""The index folder on disk: file names, the embedder record (``embedder.json``), the write lock, atomic writes,
and :func:`resolve_index_path`.

Layout of an index folder::

    meta.sqlite     files, entries (with their float32 vectors) and info     (shusheng.retrieval_index.store)
    vectors.faiss   the FAISS index over every entry, a cache of meta.sqlite  (shusheng.retrieval_index.vectors)
    vectors.<generation>.<token>.ivfdata
                    on-disk indexes only: the IVF inverted lists that vectors.faiss names (memory-mapped at search
                    time); a commit writes a new one before replacing vectors.faiss, then removes the old one
    commit.json     commit marker: generation and entry count of vectors.faiss
    embedder.json   embedder name, dimension, checkpoint, format, creation time (:class:`EmbedderInfo`)
    lock            flock'ed by the one writer; holds its PID

Stdlib only, so that the command line and the UI can find an index and read its embedder without importing
numpy, torch or FAISS.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shusheng.retrieval_index.errors import IndexLockedError, IndexNotFoundError

__all__ = [
    "COMMIT_FILE", "DEFAULT_INDEX_DIRNAME", "EMBEDDER_FILE", "FORMAT_VERSION", "LOCK_FILE", "META_FILE",
    "VECTORS_FILE", "EmbedderInfo", "acquire_lock", "index_exists", "ivfdata_files", "ivfdata_name",
    "read_embedder_info", "resolve_index_path", "write_embedder_info",
]

FORMAT_VERSION = 1
DEFAULT_INDEX_DIRNAME = ".shusheng-index"
META_FILE, VECTORS_FILE, COMMIT_FILE, EMBEDDER_FILE, LOCK_FILE = (
    "meta.sqlite", "vectors.faiss", "commit.json", "embedder.json", "lock")
_IVFDATA_GLOB = "vectors.*.ivfdata"


def ivfdata_name(generation: int) -> str:
    """A new file name for the on-disk inverted lists written at ``generation``: ``vectors.<generation>.<token>
    .ivfdata``. The random token keeps it distinct from any file a reader may still have mapped (a generation can
    be written twice: after an interrupted commit, or when only the storage changed)."""
    return f"vectors.{int(generation)}.{secrets.token_hex(4)}.ivfdata"


def ivfdata_files(path: Path) -> list[Path]:
    """The on-disk inverted-list files in the index folder ``path`` (the current one and any left behind)."""
    return sorted(Path(path).glob(_IVFDATA_GLOB))


@dataclass(frozen=True)
class EmbedderInfo:
    """The embedder record of an index (``embedder.json``): which embedder built its vectors.

    Attributes:
        name: registry name of the embedder (``"shusheng-mini-clip"``, ``"open_clip:ViT-B-32"``, ...); the index
            refuses vectors and queries from any other.
        dim: length of every vector.
        checkpoint: the embedder's local weights given at creation (``None``: the embedder's default), so that
            searches can rebuild the same embedder.
        format: on-disk format version of the index.
        created: creation time, ``YYYY-MM-DDTHH:MM:SS`` local time.

    Region detectors are not part of it: each file records the detector whose boxes it holds (``files.detector``
    in ``meta.sqlite``).
    """

    name: str
    dim: int
    checkpoint: str | None = None
    format: int = FORMAT_VERSION
    created: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedderInfo:
        checkpoint = d.get("checkpoint")
        return cls(name=str(d["name"]), dim=int(d["dim"]), checkpoint=None if checkpoint is None else str(checkpoint),
                   format=int(d.get("format", FORMAT_VERSION)), created=d.get("created"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``embedder.json`` (keys ``name, dim, checkpoint, format, created``)."""
        return asdict(self)

    def accepts(self, name: str | None, dim: int | None = None) -> bool:
        """Whether vectors of embedder ``name`` (with ``dim``, if given) belong in this index; ``None`` checks
        nothing."""
        return name is None or (name == self.name and (dim is None or int(dim) == self.dim))


def index_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete index (``embedder.json`` is written last when an index is created)."""
    p = Path(path)
    return (p / META_FILE).is_file() and (p / EMBEDDER_FILE).is_file()


def read_embedder_info(path: str | os.PathLike, *, missing_ok: bool = False) -> EmbedderInfo | None:
    """The :class:`EmbedderInfo` of the index folder ``path``, read without opening the index (no SQLite, no
    FAISS, no lock).

    Args:
        path: the index folder itself (see :func:`resolve_index_path` for a collection folder).
        missing_ok: return ``None`` when there is no ``embedder.json`` instead of raising.

    Raises:
        IndexNotFoundError: no ``embedder.json`` in ``path`` (and not ``missing_ok``).
        ValueError: the file is not a valid embedder record.
    """
    file = Path(path).expanduser() / EMBEDDER_FILE
    try:
        text = file.read_text()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise IndexNotFoundError(f"no index at {os.fspath(file.parent)!r} (no {EMBEDDER_FILE})") from None
    try:
        return EmbedderInfo.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable embedder record {os.fspath(file)!r}: {e}") from e


def write_embedder_info(path: str | os.PathLike, info: EmbedderInfo) -> None:
    """Writes ``embedder.json`` into the index folder ``path`` atomically."""
    atomic_write(Path(path) / EMBEDDER_FILE, json.dumps(info.to_dict(), indent=2).encode())


def resolve_index_path(path: str | os.PathLike | None) -> Path:
    """An index folder from a user path: the index itself, or a collection folder holding ``.shusheng-index``;
    ``None`` means the current directory. The result is absolute; it need not exist."""
    p = Path(path if path is not None else ".").expanduser().absolute()
    if (p / META_FILE).is_file() or p.name == DEFAULT_INDEX_DIRNAME:
        return p
    if (p / DEFAULT_INDEX_DIRNAME).is_dir():
        return p / DEFAULT_INDEX_DIRNAME
    return p


def acquire_lock(path: Path) -> int:
    """Takes the exclusive write lock of the index folder ``path``; returns the descriptor holding it (closing
    it releases the lock, as the kernel does when the process dies).

    Raises:
        IndexLockedError: another process holds it (the message names its PID and command line).
    """
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


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file next to ``path``, fsyncs it and renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
