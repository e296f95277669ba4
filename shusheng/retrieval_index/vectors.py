"""The FAISS side of an index: which index type, building and training it, loading ``vectors.faiss`` (or
reconciling it with the metadata), applying committed changes, saving it atomically, and searching it.

Index type (see :func:`choose_index_spec` and ``bench/retrieval.py``): exact ``IDMap2,Flat`` (inner product
over normalised vectors = cosine) below ``FLAT_MAX_ENTRIES`` entries, ``IVF{nlist},SQ8`` above, retrained from
the stored vectors whenever the collection outgrows the trained partition by 4x.

``vectors.faiss`` is a cache of the vectors in ``meta.sqlite`` (:class:`~shusheng.retrieval_index.store.MetaStore`):
a reader trusts it when ``commit.json`` names SQLite's current generation and the entry count matches, and
otherwise reconciles it in memory (ids FAISS lacks are added from the stored vectors, ids SQLite no longer has
are removed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng._deps import require
from shusheng.retrieval_index.layout import COMMIT_FILE, VECTORS_FILE, atomic_write, fsync_dir

if TYPE_CHECKING:
    from shusheng.retrieval_index.store import MetaStore

logger = logging.getLogger(__name__)

__all__ = ["FLAT_MAX_ENTRIES", "RETRAIN_FACTOR", "TRAIN_PER_LIST", "IndexSpec", "VectorIndex", "choose_index_spec"]

#: Below this many entries search is exact (flat inner product); at or above it an IVF index is trained.
FLAT_MAX_ENTRIES = 50_000
#: IVF training sample: this many vectors per list (k-means; faiss warns below 39).
TRAIN_PER_LIST = 40
#: Retrain the IVF partition when the ideal number of lists is this many times the trained one (or 1/this).
RETRAIN_FACTOR = 4


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


def needs_rebuild(current: IndexSpec, n: int) -> bool:
    """Whether an index of type ``current`` holding ``n`` entries should be rebuilt as ``choose_index_spec(n)``."""
    ideal = choose_index_spec(n)
    if current.exact or ideal.exact:
        # switch flat -> IVF at FLAT_MAX_ENTRIES, back only below half of it (hysteresis)
        return (current.exact and not ideal.exact) or (not current.exact and n < FLAT_MAX_ENTRIES // 2)
    ratio = ideal.nlist / current.nlist
    return ratio >= RETRAIN_FACTOR or ratio <= 1 / RETRAIN_FACTOR


def faiss_module():
    return require("faiss", extra="retrieval", package="faiss-cpu")


def _faiss_ids(index) -> np.ndarray:
    """Every id stored in ``index`` (an ``IndexIDMap2`` or an IVF index)."""
    faiss = faiss_module()
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
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIDMap2):
        return IndexSpec("IDMap2,Flat")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    kind = "SQ8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else (
        "PQ" if isinstance(ivf, faiss.IndexIVFPQ) else "Flat")
    return IndexSpec(f"IVF{ivf.nlist},{kind}", nprobe=ivf.nprobe, nlist=ivf.nlist)


def build_faiss_index(dim: int, spec: IndexSpec, ids: np.ndarray, vecs: np.ndarray):
    """A FAISS index of type ``spec`` over ``vecs`` with ids ``ids`` (trained on a sample of them if needed)."""
    faiss = faiss_module()
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
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


class VectorIndex:
    """The FAISS index of one index folder, kept in memory, with its on-disk file ``vectors.faiss``.

    Attributes:
        index: the CPU FAISS index (ids = entry ids).
        dirty: it differs from ``vectors.faiss`` on disk.
    """

    def __init__(self, path: Path, dim: int, index, dirty: bool = False):
        self.path = path
        self.dim = dim
        self.index = index
        self.dirty = dirty
        self._gpu_index = None  # None: not tried yet; False: cannot be cloned to the GPU

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Path, store: MetaStore) -> VectorIndex:
        """Loads ``path/vectors.faiss`` if it matches the committed generation of ``store``, else reconciles it
        with the stored vectors (or rebuilds it from them when it is missing or unreadable)."""
        faiss = faiss_module()
        dim = store.dim
        with store.snapshot():  # one read snapshot for the checks below
            count = store.entry_count()
            generation = store.generation
            vec_path = path / VECTORS_FILE
            index = None
            if vec_path.is_file():
                try:
                    index = faiss.read_index(os.fspath(vec_path))
                except RuntimeError as e:  # faiss reports unreadable files as RuntimeError
                    logger.warning("cannot read %s (%s); rebuilding it from the stored vectors", vec_path, e)
                if index is not None and index.d != dim:
                    logger.warning("%s has dimension %d, not %d; rebuilding it", vec_path, index.d, dim)
                    index = None
            marker = cls._read_marker(path)
            dirty = False
            if index is None:
                ids, vecs = store.all_vectors()
                index = build_faiss_index(dim, choose_index_spec(len(ids)), ids, vecs)
                dirty = len(ids) > 0
                if len(ids):
                    logger.info("built the vector index of %s from %d stored vectors", path, len(ids))
            elif not (marker.get("generation") == generation and index.ntotal == count):
                cls._reconcile(path, index, store)
                dirty = True
        return cls(path, dim, index, dirty)

    @staticmethod
    def _read_marker(path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / COMMIT_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("unreadable commit marker in %s (%s); checking the vectors against the metadata",
                           path, e)
            return {}

    @staticmethod
    def _reconcile(path: Path, index, store: MetaStore) -> None:
        have = _faiss_ids(index)
        want = store.entry_ids()
        extra = np.setdiff1d(have, want, assume_unique=False)
        missing = np.setdiff1d(want, have, assume_unique=False)
        if len(extra):
            index.remove_ids(extra)
        for start in range(0, len(missing), 8192):
            chunk = missing[start:start + 8192]
            vecs = store.vectors_of(chunk)
            index.add_with_ids(np.stack([vecs[int(i)] for i in chunk]), chunk)
        logger.info("%s: vector file was behind the committed metadata (interrupted commit or a running "
                    "writer): added %d, removed %d vectors in memory", path, len(missing), len(extra))

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def spec(self) -> IndexSpec:
        return _spec_of(self.index)

    @property
    def on_gpu(self) -> bool:
        return bool(self._gpu_index)

    # ------------------------------------------------------------------ changing
    def apply(self, added: list[tuple[np.ndarray, np.ndarray]], removed: list[np.ndarray]) -> None:
        """Applies a committed transaction: ``(ids, vectors)`` batches added, id arrays removed."""
        for ids, vecs in added:
            self.index.add_with_ids(vecs, ids)
        if removed:
            self.index.remove_ids(np.concatenate(removed))
        self.dirty = self.dirty or bool(added or removed)
        self._gpu_index = None

    def rebuild_if_outgrown(self, store: MetaStore) -> bool:
        """Rebuilds (retrains) the index from the stored vectors when its type no longer suits its size."""
        spec, n = self.spec, self.ntotal
        if not needs_rebuild(spec, n):
            return False
        new_spec = choose_index_spec(n)
        logger.info("%d entries: switching the vector index from %s to %s", n, spec.factory, new_spec.factory)
        ids, vecs = store.all_vectors()
        self.index = build_faiss_index(self.dim, new_spec, ids, vecs)
        self.dirty = True
        self._gpu_index = None
        return True

    def save(self, generation: int) -> None:
        """Writes ``vectors.faiss`` atomically (temporary file, fsync, rename), then the commit marker."""
        faiss = faiss_module()
        vec_path = self.path / VECTORS_FILE
        tmp = self.path / f".{VECTORS_FILE}.tmp-{os.getpid()}"
        faiss.write_index(self.index, os.fspath(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, vec_path)
        self.write_marker(generation)
        self.dirty = False

    def write_marker(self, generation: int) -> None:
        """Records that ``vectors.faiss`` holds the vectors of ``generation``."""
        marker = {"generation": generation, "entries": self.ntotal, "index": self.spec.factory,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(self.path / COMMIT_FILE, json.dumps(marker).encode())
        fsync_dir(self.path)

    def persist(self, generation: int) -> None:
        """After a commit: the vector file if it changed (or is missing), else just a marker naming
        ``generation`` (the vector file is current, only its marker must follow)."""
        if self.dirty or not (self.path / VECTORS_FILE).is_file():
            self.save(generation)
        else:
            self.write_marker(generation)

    # ------------------------------------------------------------------ searching
    def searchable(self):
        """The index to search: a GPU copy when faiss-gpu sees a GPU, else the CPU index."""
        faiss = faiss_module()
        if self._gpu_index is None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
                logger.info("searching %s on %d GPU(s)", self.path, faiss.get_num_gpus())
            except RuntimeError as e:  # an index type faiss-gpu cannot clone: keep searching on the CPU
                logger.warning("cannot move the index to the GPU (%s); searching on the CPU", e)
                self._gpu_index = False
        return self._gpu_index or self.index

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(len(queries), k)``; ids ``-1`` past the end. ``nprobe`` (IVF only) is a
        per-call parameter, so the search runs on the CPU index."""
        if nprobe is not None and not self.spec.exact:
            params = faiss_module().SearchParametersIVF(nprobe=int(nprobe))
            return self.index.search(queries, k, params=params)
        return self.searchable().search(queries, k)
