"""The FAISS side of an index: which index type, building and training it, loading ``vectors.faiss`` (or
reconciling it with the metadata), applying committed changes, saving it atomically, and searching it.

Index type (see :func:`choose_index_spec` and ``bench/retrieval.py``): exact ``IDMap2,Flat`` (inner product
over normalised vectors = cosine) below ``FLAT_MAX_ENTRIES`` entries, ``IVF{nlist},SQ8`` above (``SQ6`` for lists on disk), retrained from
the stored vectors whenever the collection outgrows the trained partition by 4x.

``vectors.faiss`` is a cache of the vectors in ``meta.sqlite`` (:class:`~shusheng.retrieval_index.store.MetaStore`):
a reader trusts it when ``commit.json`` names SQLite's current generation and the entry count matches, and
otherwise reconciles it in memory (ids FAISS lacks are added from the stored vectors, ids SQLite no longer has
are removed).

On-disk indexes (:meth:`Index.set_on_disk <shusheng.retrieval_index.Index.set_on_disk>`, recorded in SQLite as
``info.vectors_on_disk``) keep the inverted lists of their IVF index in ``vectors.<generation>.<token>.ivfdata``
(a ``faiss.OnDiskInvertedLists`` file that ``vectors.faiss`` names) and memory-map it read-only at search time, so
only the lists a query visits are paged in; ``vectors.faiss`` itself holds the quantizer and the list offsets
(a few MB). Below ``FLAT_MAX_ENTRIES`` they stay exact and in memory (at most 77 MB at 384-d).

* Building (the index becomes IVF, or is retrained): the quantizer and the scalar quantiser (SQ8, SQ6 on disk) are trained on the usual sample,
  read from SQLite by id; the vectors are then streamed from SQLite in id order into in-memory shards of
  ``SHARD_ENTRIES`` (written to temporary files, memory-mapped back) whose lists are copied into one ivfdata file
  with exact list sizes. The float32 vectors are never all in memory.
* A committed ivfdata file is never modified. Entries added after it was written go to a small in-memory IVF with
  the same trained quantizer (the *delta*), searched together with the on-disk lists (``HStackInvertedLists``);
  removed ones stay in the lists until the next write (``Index.search`` skips ids SQLite no longer has).
  ``commit()`` (``write_vectors=True``), or any commit once the delta exceeds ``DELTA_MAX_ENTRIES``, copies the
  on-disk lists and the delta, minus removed ids, into a new ivfdata file, replaces ``vectors.faiss`` atomically,
  writes the marker and only then removes the old ivfdata file. A crash at any point leaves ``vectors.faiss``
  naming a complete ivfdata file.
* A reader whose marker disagrees reconciles into the same delta (ids FAISS lacks) and removed-id set, without
  touching the files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng._deps import require
from shusheng.retrieval_index.layout import (
    COMMIT_FILE,
    VECTORS_FILE,
    atomic_write,
    fsync_dir,
    ivfdata_files,
    ivfdata_name,
)

if TYPE_CHECKING:
    from shusheng.retrieval_index.store import MetaStore

logger = logging.getLogger(__name__)

__all__ = ["DELTA_MAX_ENTRIES", "FLAT_MAX_ENTRIES", "ON_DISK_KEY", "RETRAIN_FACTOR", "SHARD_ENTRIES", "TRAIN_PER_LIST",
           "IndexSpec", "VectorIndex", "choose_index_spec", "on_disk_requested"]

#: Below this many entries search is exact (flat inner product); at or above it an IVF index is trained.
FLAT_MAX_ENTRIES = 50_000
#: IVF training sample: this many vectors per list (k-means; faiss warns below 39).
TRAIN_PER_LIST = 40
#: Query modalities :meth:`IndexSpec.nprobe_for` knows.
MODALITIES = ("image", "text")
#: Text queries visit this many times the image queries' ``nprobe`` (measured on real embeddings, see
#: :func:`choose_index_spec`).
TEXT_NPROBE_FACTOR = 4
#: Retrain the IVF partition when the ideal number of lists is this many times the trained one (or 1/this).
RETRAIN_FACTOR = 4
#: On-disk indexes: entries added since the ivfdata file was written are kept in memory (SQ6: ~300 B each at
#: 384-d, ~19 MB here) and searched alongside it; past this many, the next commit writes a new ivfdata file.
DELTA_MAX_ENTRIES = 65_536
#: On-disk builds: entries per in-memory shard (its SQ6 codes, ~75 MB at 384-d) before it goes to a temporary file.
SHARD_ENTRIES = 262_144
#: On-disk searches: threads that faiss starts per search call to read the probed lists ahead of the scan
#: (``OnDiskInvertedLists.prefetch_nthread``). 0: the search thread pages them in itself (see docs/scaling.md).
ONDISK_PREFETCH_THREADS = 0
#: ``info`` key of ``meta.sqlite`` recording that the index keeps its IVF lists on disk (``"1"``).
ON_DISK_KEY = "vectors_on_disk"
_READ_CHUNK = 32_768  # rows per SQLite fetch when streaming the stored vectors (48 MB of float32 at 384-d)


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build: ``factory`` string for ``faiss.index_factory`` and its search ``nprobe``."""

    factory: str
    nprobe: int | None = None
    nlist: int | None = None

    @property
    def exact(self) -> bool:
        return self.nlist is None

    def nprobe_for(self, modality: str = "image") -> int | None:
        """IVF lists to visit for a query of this ``modality``: ``nprobe`` for image queries, ``TEXT_NPROBE_FACTOR``
        times it (at most ``nlist``) for text queries, which sit across the modality gap from every image cluster
        and need more lists for the same recall (``bench/retrieval.py --real``); ``None`` for exact indexes."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if self.nprobe is None:
            return None
        return min(self.nlist or self.nprobe, self.nprobe * TEXT_NPROBE_FACTOR) if modality == "text" else self.nprobe


def choose_index_spec(n: int, on_disk: bool = False) -> IndexSpec:
    """The index type for a collection of ``n`` entries (the rule measured in ``bench/retrieval.py``).

    * ``n < FLAT_MAX_ENTRIES`` (50k): exact ``IDMap2,Flat`` — at most a few ms per query, recall 1.
    * otherwise ``IVF{nlist},SQ8`` with ``nlist`` = the power of two nearest ``4 * sqrt(n)`` and ``nprobe`` =
      ``nlist / 32`` (at least 16): 8-bit scalar quantisation keeps 384 B per 384-d vector and loses almost no
      recall; 1/32 of the lists probed holds recall@10 >= 0.95 on clustered embedding-like data, and 0.999 for
      image queries on the bundled mini-clip's vectors of 100k SynthDrive images.
    * text queries visit ``TEXT_NPROBE_FACTOR`` (4) times as many lists (:meth:`IndexSpec.nprobe_for`): a text
      vector sits across the modality gap from every image cluster (cosine 0.30 with its nearest image, against
      0.91 for an image query), so its neighbours spread over more lists. On those 100k real vectors nprobe 32
      gave text queries recall@10 0.855 (held-out wordings), 128 gives 0.990, at 0.9 ms p50 end to end.
    * ``on_disk`` (lists in a memory-mapped file): ``SQ6`` instead of ``SQ8``, 288 B per 384-d vector, so that
      the lists a long-running search process ends up holding in memory stay below a quarter of the float32
      vectors (with SQ8 they are exactly a quarter, plus the ids). Recall after re-scoring was the same as SQ8's
      on 100k real and 1M synthetic vectors (0.999 / 0.984 image / text at 100k; SQ4 fell to 0.95 for text at
      1M).
    """
    if n < FLAT_MAX_ENTRIES:
        return IndexSpec("IDMap2,Flat")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return IndexSpec(f"IVF{nlist},{'SQ6' if on_disk else 'SQ8'}", nprobe=max(16, nlist // 32), nlist=nlist)


def needs_rebuild(current: IndexSpec, n: int, on_disk: bool = False) -> bool:
    """Whether an index of type ``current`` holding ``n`` entries should be rebuilt as
    ``choose_index_spec(n, on_disk)``: another kind (flat / IVF), a partition 4x too small or too large, or
    another encoding (an index moved to or from disk)."""
    ideal = choose_index_spec(n, on_disk)
    if current.exact or ideal.exact:
        # switch flat -> IVF at FLAT_MAX_ENTRIES, back only below half of it (hysteresis)
        return (current.exact and not ideal.exact) or (not current.exact and n < FLAT_MAX_ENTRIES // 2)
    if current.factory.split(",")[-1] != ideal.factory.split(",")[-1]:
        return True
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
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        kind = {faiss.ScalarQuantizer.QT_8bit: "SQ8", faiss.ScalarQuantizer.QT_6bit: "SQ6",
                faiss.ScalarQuantizer.QT_4bit: "SQ4"}.get(ivf.sq.qtype, "SQ")
    else:
        kind = "PQ" if isinstance(ivf, faiss.IndexIVFPQ) else "Flat"
    return IndexSpec(f"IVF{ivf.nlist},{kind}", nprobe=ivf.nprobe, nlist=ivf.nlist)


def build_faiss_index(dim: int, spec: IndexSpec, ids: np.ndarray, vecs: np.ndarray):
    """A FAISS index of type ``spec`` over ``vecs`` with ids ``ids`` (trained on a sample of them if needed)."""
    faiss = faiss_module()
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        n_train = min(len(vecs), TRAIN_PER_LIST * spec.nlist)
        sample = vecs[_train_positions(len(vecs), n_train)] if n_train < len(vecs) else vecs
        t0 = time.perf_counter()
        index.train(sample)
        logger.info("trained %s on %d vectors in %.1f s", spec.factory, n_train, time.perf_counter() - t0)
    if spec.nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    for start in range(0, len(ids), 65536):
        index.add_with_ids(vecs[start:start + 65536], ids[start:start + 65536])
    return index


def _batches(added: list[tuple[np.ndarray, np.ndarray]], rows: int = 65536):
    """The ``(ids, vectors)`` batches of a transaction (one per file, mostly) joined into calls of up to ``rows``
    rows: one FAISS call assigns many vectors to their lists at once."""
    group: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0
    for ids, vecs in added:
        group.append((ids, vecs))
        size += len(ids)
        if size >= rows:
            yield np.concatenate([g[0] for g in group]), np.concatenate([g[1] for g in group])
            group, size = [], 0
    if group:
        yield np.concatenate([g[0] for g in group]), np.concatenate([g[1] for g in group])


def _train_positions(n: int, n_train: int) -> np.ndarray:
    """Which of ``n`` vectors (in id order) train an IVF index: ``n_train`` of them, sorted, always the same."""
    return np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))


def on_disk_requested(store: MetaStore) -> bool:
    """Whether the index of ``store`` keeps its IVF lists on disk (:data:`ON_DISK_KEY`)."""
    return store.info(ON_DISK_KEY) == "1"


# ---------------------------------------------------------------------------------------------- on-disk lists
def _empty_copy(index):
    """An empty copy of the trained IVF ``index`` (quantizer, encoder, nprobe), whatever its lists are: on disk,
    stacked or in memory (``faiss.clone_index`` copies only in-memory lists, so they are swapped out meanwhile)."""
    faiss = faiss_module()
    ivf = faiss.extract_index_ivf(index)
    lists, own, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # replace_invlists must not free `lists`
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
        index.ntotal = ivf.ntotal = ntotal


def _train_from_store(dim: int, spec: IndexSpec, store: MetaStore):
    """An empty ``spec`` index trained on the sample :func:`build_faiss_index` would take, read from SQLite by id
    (the same vectors, so the same partition)."""
    faiss = faiss_module()
    ids = np.sort(store.entry_ids())
    n_train = min(len(ids), TRAIN_PER_LIST * spec.nlist)
    sample_ids = ids[_train_positions(len(ids), n_train)] if n_train < len(ids) else ids
    vec_of = store.vectors_of(sample_ids)
    sample = np.stack([vec_of[int(i)] for i in sample_ids])
    del vec_of
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(sample)
    logger.info("trained %s on %d stored vectors in %.1f s", spec.factory, n_train, time.perf_counter() - t0)
    faiss.extract_index_ivf(index).nprobe = spec.nprobe
    return index


def _list_entries(invlists, list_no: int, code_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids, codes)`` of one list of in-memory or on-disk ``invlists``: views, valid while they live."""
    faiss = faiss_module()
    n = invlists.list_size(list_no)
    if not n:
        return None
    return (faiss.rev_swig_ptr(invlists.get_ids(list_no), n),
            faiss.rev_swig_ptr(invlists.get_codes(list_no), n * code_size))


def _merged_lists(sources: list, nlist: int, code_size: int, dead: np.ndarray | None = None):
    """``(list number, ids, codes)`` of each non-empty list: the entries of all ``sources`` in order, minus the ids
    ``dead``; contiguous arrays."""
    dead = dead if dead is not None and len(dead) else None
    for lst in range(nlist):
        parts = [got for il in sources if (got := _list_entries(il, lst, code_size)) is not None]
        if not parts:
            continue
        ids = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        codes = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if dead is not None:
            keep = ~np.isin(ids, dead)
            ids, codes = ids[keep], codes.reshape(-1, code_size)[keep].reshape(-1)
        if len(ids):
            yield lst, np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(codes, np.uint8)


def _has_on_disk_lists(index) -> bool:
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIDMap2):
        return False
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return isinstance(lists, faiss.OnDiskInvertedLists)


def _write_lists(sources: list, nlist: int, code_size: int, file: Path, dead: np.ndarray | None = None):
    """Copies the inverted lists ``sources`` (in-memory or on-disk, not stacked), list by list and minus the ids
    ``dead``, into a new ``faiss.OnDiskInvertedLists`` file ``file`` with exact list sizes, fsynced.

    Returns:
        ``(lists, n)``: the writable ``OnDiskInvertedLists`` (mapped) and its number of entries.
    """
    faiss = faiss_module()
    dead = dead if dead is not None and len(dead) else None
    sizes = np.zeros(nlist, np.uint64)
    for lst in range(nlist):
        for il in sources:
            got = _list_entries(il, lst, code_size)
            if got is not None:
                sizes[lst] += len(got[0]) - (int(np.isin(got[0], dead).sum()) if dead is not None else 0)
    total = int(sizes.sum())
    od = faiss.OnDiskInvertedLists(nlist, code_size, os.fspath(file))
    od.set_all_lists_sizes(faiss.swig_ptr(sizes))  # contiguous lists, capacity = size: no free space
    nbytes = total * (code_size + 8)
    with open(file, "wb") as f:
        f.truncate(nbytes)
    if total:
        od.totsize = nbytes
        od.do_mmap()  # (not update_totsize: it prints to stdout)
    for lst, ids, codes in _merged_lists(sources, nlist, code_size, dead):
        od.update_entries(lst, 0, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)  # the pages written through the mapping
    finally:
        os.close(fd)
    return od, total


def _read_vector_file(path: Path):
    """Reads ``path/vectors.faiss``; on-disk inverted lists are mapped read-only from the ivfdata file of the same
    folder that the file names (``faiss.read_index`` would take the absolute path it was written with)."""
    faiss = faiss_module()
    vec_path = os.fspath(path / VECTORS_FILE)
    for attempt in range(3):
        try:
            index = faiss.read_index(vec_path, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # in-memory inverted lists cannot be skipped: an ordinary index file
            return faiss.read_index(vec_path)
        if isinstance(index, faiss.IndexIDMap2):
            return index
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            return faiss.read_index(vec_path)
        lists.filename = os.fspath(path / os.path.basename(lists.filename))
        lists.prefetch_nthread = ONDISK_PREFETCH_THREADS
        if lists.totsize == 0:
            return index
        try:
            lists.do_mmap()
            return index
        except RuntimeError:  # its ivfdata was just replaced by a writer's commit: read the new vectors.faiss
            if attempt == 2:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


class VectorIndex:
    """The FAISS index of one index folder, kept in memory, with its on-disk file ``vectors.faiss``.

    Attributes:
        index: the CPU FAISS index (ids = entry ids). For an on-disk index, its IVF lists are the memory-mapped
            ivfdata file, stacked with the in-memory delta when there is one.
        dirty: it differs from ``vectors.faiss`` on disk.
    """

    def __init__(self, path: Path, dim: int, index, dirty: bool = False):
        self.path = path
        self.dim = dim
        self.index = index
        self.dirty = dirty
        self._gpu_index = None  # None: not tried yet; False: cannot be cloned to the GPU
        # on-disk lists: the index read from vectors.faiss (lists mapped read-only), the in-memory IVF of entries
        # added since (same quantizer) and the ids removed since (still in one of the two); None/None/empty else
        self._base = index if _has_on_disk_lists(index) else None
        self._delta = None
        self._dead = np.empty(0, np.int64)
        self._rebuild_spec: IndexSpec | None = None  # on-disk retrain left to persist()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Path, store: MetaStore) -> VectorIndex:
        """Loads ``path/vectors.faiss`` if it matches the committed generation of ``store``, else reconciles it
        with the stored vectors (or rebuilds it from them when it is missing or unreadable)."""
        faiss_module()  # a clear ImportError without FAISS
        dim = store.dim
        with store.snapshot():  # one read snapshot for the checks below
            count = store.entry_count()
            generation = store.generation
            vec_path = path / VECTORS_FILE
            index = None
            if vec_path.is_file():
                try:
                    index = _read_vector_file(path)
                except RuntimeError as e:  # faiss reports unreadable files as RuntimeError
                    logger.warning("cannot read %s (%s); rebuilding it from the stored vectors", vec_path, e)
                if index is not None and index.d != dim:
                    logger.warning("%s has dimension %d, not %d; rebuilding it", vec_path, index.d, dim)
                    index = None
            marker = cls._read_marker(path)
            if index is None:
                spec = choose_index_spec(count, on_disk_requested(store))
                if on_disk_requested(store) and not spec.exact:  # streamed: never all float32 vectors at once
                    index = _train_from_store(dim, spec, store)
                    for ids, vecs in store.iter_vectors(_READ_CHUNK):
                        index.add_with_ids(vecs, ids)
                else:
                    ids, vecs = store.all_vectors()
                    index = build_faiss_index(dim, spec, ids, vecs)
                if count:
                    logger.info("built the vector index of %s from %d stored vectors", path, count)
                return cls(path, dim, index, dirty=count > 0)
            loaded = cls(path, dim, index)
            if not (marker.get("generation") == generation and index.ntotal == count):
                loaded._reconcile(store)
        return loaded

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

    def _reconcile(self, store: MetaStore) -> None:
        """Brings the index in memory to the committed state of ``store`` (every id is read: slow on big indexes,
        and only needed after an interrupted commit or while a writer runs). On-disk lists are not modified: the
        missing entries go to the in-memory delta."""
        have = _faiss_ids(self.index)
        want = store.entry_ids()
        extra = np.setdiff1d(have, want, assume_unique=False)
        missing = np.setdiff1d(want, have, assume_unique=False)
        added = []
        for start in range(0, len(missing), 8192):
            chunk = missing[start:start + 8192]
            vecs = store.vectors_of(chunk)
            added.append((chunk, np.stack([vecs[int(i)] for i in chunk])))
        self.apply(added, [extra] if len(extra) else [])
        self.dirty = True
        logger.info("%s: vector file was behind the committed metadata (interrupted commit or a running "
                    "writer): added %d, removed %d vectors in memory", self.path, len(missing), len(extra))

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self._dead)

    @property
    def lists_on_disk(self) -> bool:
        """Whether the IVF lists are memory-mapped from an ivfdata file (else the whole index is in memory)."""
        return self._base is not None

    @property
    def in_memory_entries(self) -> int:
        """Entries held in memory: all of them, or for on-disk lists those of the delta."""
        if self._base is None:
            return self.ntotal
        return int(self._delta.ntotal) if self._delta is not None else 0

    @property
    def spec(self) -> IndexSpec:
        return _spec_of(self.index)

    @property
    def on_gpu(self) -> bool:
        return bool(self._gpu_index)

    # ------------------------------------------------------------------ changing
    def apply(self, added: list[tuple[np.ndarray, np.ndarray]], removed: list[np.ndarray],
              store: MetaStore | None = None) -> None:
        """Applies a committed transaction: ``(ids, vectors)`` batches added, id arrays removed.

        On-disk lists are never modified here: additions go to the in-memory delta, removals to the removed-id
        set. With ``store`` (the writer's, after its commit), an index recorded as on-disk is written out at
        once when its in-memory part exceeds ``DELTA_MAX_ENTRIES`` or its type no longer suits its size, so a
        long ingest of ``commit(write_vectors=False)`` calls never holds more than that in memory.
        """
        if self._base is not None:
            if added:
                if self._delta is None:
                    self._delta = _empty_copy(self._base)
                for ids, vecs in _batches(added):
                    self._delta.add_with_ids(vecs, ids)
            if removed:
                self._dead = np.union1d(self._dead, np.concatenate(removed).astype(np.int64))
            self._stack()
        else:
            for ids, vecs in _batches(added):
                self.index.add_with_ids(vecs, ids)
            if removed:
                self.index.remove_ids(np.concatenate(removed))
        self.dirty = self.dirty or bool(added or removed)
        self._gpu_index = None
        if (store is not None and store.writable and (added or removed) and on_disk_requested(store)
                and (self.in_memory_entries > DELTA_MAX_ENTRIES or needs_rebuild(self.spec, self.ntotal, True))):
            self.rebuild_if_outgrown(store)
            self.persist(store.generation, store)

    def _stack(self) -> None:
        """Points ``index`` at the on-disk lists, stacked with the delta's (``HStackInvertedLists``) if any."""
        faiss = faiss_module()
        if self._delta is None:
            self.index = self._base
            return
        if self.index is self._base:  # the stacked view reads the delta's lists as they grow
            stacked_index = _empty_copy(self._base)
            ils = faiss.InvertedListsPtrVector()
            ils.push_back(faiss.extract_index_ivf(self._base).invlists)
            ils.push_back(faiss.extract_index_ivf(self._delta).invlists)
            stacked = faiss.HStackInvertedLists(ils.size(), ils.data())
            faiss.extract_index_ivf(stacked_index).replace_invlists(stacked, True)
            stacked.this.disown()
            self.index = stacked_index
        ivf = faiss.extract_index_ivf(self.index)
        self.index.ntotal = ivf.ntotal = self._base.ntotal + self._delta.ntotal

    def _set_index(self, index) -> None:
        self.index = index
        self._base = index if _has_on_disk_lists(index) else None
        self._delta = None
        self._dead = np.empty(0, np.int64)
        self._gpu_index = None

    def _sources(self) -> list:
        """The inverted lists holding the entries: the on-disk ones and the delta's, or the in-memory ones."""
        faiss = faiss_module()
        indexes = [self._base, self._delta] if self._base is not None else [self.index]
        return [faiss.extract_index_ivf(i).invlists for i in indexes if i is not None]

    def rebuild_if_outgrown(self, store: MetaStore) -> bool:
        """Rebuilds (retrains) the index from the stored vectors when its type no longer suits its size.

        An index recorded as on-disk gets its new IVF lists streamed from SQLite straight into a new ivfdata file,
        written at once (the committed generation of ``store``)."""
        spec, n = self.spec, self.ntotal
        on_disk = store.writable and on_disk_requested(store)
        if not needs_rebuild(spec, n, on_disk):
            return False
        new_spec = choose_index_spec(n, on_disk)
        logger.info("%d entries: switching the vector index from %s to %s", n, spec.factory, new_spec.factory)
        if not new_spec.exact and store.writable and on_disk_requested(store):
            self._build_on_disk(store, new_spec)
            return True
        ids, vecs = store.all_vectors()
        self._set_index(build_faiss_index(self.dim, new_spec, ids, vecs))
        self.dirty = True
        return True

    def save(self, generation: int) -> None:
        """Writes ``vectors.faiss`` atomically (temporary file, fsync, rename), then the commit marker. On-disk
        lists are first copied, with the delta and without removed ids, into a new ivfdata file."""
        if self._base is not None:
            self._save_on_disk(generation, self._sources(), self._base, self._dead)
            return
        self._write_vector_file(self.index)
        self.write_marker(generation)
        self._remove_stale()
        self.dirty = False

    def _write_vector_file(self, index) -> None:
        faiss = faiss_module()
        tmp = self.path / f".{VECTORS_FILE}.tmp-{os.getpid()}"
        faiss.write_index(index, os.fspath(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / VECTORS_FILE)

    def _save_on_disk(self, generation: int, sources: list, template, dead: np.ndarray | None = None) -> None:
        """Writes the entries of ``sources`` (minus ``dead``) as a new ivfdata file, then a ``vectors.faiss`` of
        the trained ``template`` naming it (atomically replaced), then the marker, then removes the old files.
        Until the replace, ``vectors.faiss`` and the ivfdata file it names are untouched."""
        faiss = faiss_module()
        t0 = time.perf_counter()
        ivf = faiss.extract_index_ivf(template)
        name = ivfdata_name(generation)
        lists, n = _write_lists(sources, ivf.nlist, ivf.code_size, self.path / name, dead)
        out = _empty_copy(template)
        out_ivf = faiss.extract_index_ivf(out)
        out_ivf.replace_invlists(lists, True)
        lists.this.disown()
        out.ntotal = out_ivf.ntotal = n
        lists.filename = name  # named relative to the index folder, which may move
        self._write_vector_file(out)
        del out, out_ivf, lists  # unmaps the writable mapping
        self._set_index(_read_vector_file(self.path))
        self.write_marker(generation)
        self._remove_stale(keep=name)
        self.dirty = False
        logger.info("wrote the on-disk lists of %s: %d entries, %s in %.1f s", self.path, n, name,
                    time.perf_counter() - t0)

    def _build_on_disk(self, store: MetaStore, spec: IndexSpec) -> None:
        """Trains a ``spec`` index on a sample of the stored vectors, streams them all from SQLite into shards
        (temporary files, memory-mapped back) and writes their lists as the on-disk index of the committed
        generation."""
        faiss = faiss_module()
        t0 = time.perf_counter()
        template = _train_from_store(self.dim, spec, store)
        build_dir = self.path / f".build-{os.getpid()}"
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir()
        shards = []
        try:
            shard = faiss.clone_index(template)
            for ids, vecs in store.iter_vectors(_READ_CHUNK):
                shard.add_with_ids(vecs, ids)
                if shard.ntotal >= SHARD_ENTRIES:
                    file = os.fspath(build_dir / f"shard-{len(shards)}.faiss")
                    faiss.write_index(shard, file)
                    shards.append(faiss.read_index(file, faiss.IO_FLAG_MMAP))
                    shard = faiss.clone_index(template)
            sources = [faiss.extract_index_ivf(s).invlists for s in [*shards, shard] if s.ntotal]
            logger.info("%s: %s trained and %d shards added in %.1f s", self.path, spec.factory, len(sources),
                        time.perf_counter() - t0)
            self._save_on_disk(store.generation, sources, template)
        finally:
            del shards
            shutil.rmtree(build_dir, ignore_errors=True)

    def _to_memory(self) -> None:
        """Reads on-disk lists (with the delta, without removed ids) into an in-memory index."""
        faiss = faiss_module()
        out = _empty_copy(self._base)
        out_ivf = faiss.extract_index_ivf(out)
        n = 0
        for lst, ids, codes in _merged_lists(self._sources(), out_ivf.nlist, out_ivf.code_size, self._dead):
            out_ivf.invlists.add_entries(lst, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            n += len(ids)
        out.ntotal = out_ivf.ntotal = n
        self._set_index(out)
        self.dirty = True

    def _remove_stale(self, keep: str | None = None) -> None:
        """Removes the ivfdata files other than ``keep`` (readers that mapped one keep reading it) and leftovers
        of interrupted builds."""
        for file in ivfdata_files(self.path):
            if file.name != keep:
                file.unlink(missing_ok=True)
        for leftover in self.path.glob(".build-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def write_marker(self, generation: int) -> None:
        """Records that ``vectors.faiss`` holds the vectors of ``generation``."""
        marker = {"generation": generation, "entries": self.ntotal, "index": self.spec.factory,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(self.path / COMMIT_FILE, json.dumps(marker).encode())
        fsync_dir(self.path)

    def persist(self, generation: int, store: MetaStore | None = None) -> None:
        """After a commit: the vector file if it changed (or is missing), else just a marker naming
        ``generation`` (the vector file is current, only its marker must follow). With ``store``, the storage it
        records (:data:`ON_DISK_KEY`) is applied first: IVF lists moved to an ivfdata file, or back to memory."""
        if store is not None:
            want_disk = on_disk_requested(store)
            if want_disk and self._base is None and not self.spec.exact and self.ntotal > 0:
                self._save_on_disk(generation, self._sources(), self.index)
                return
            if not want_disk and self._base is not None:
                self._to_memory()
        if self._base is not None:
            if self._delta is not None or len(self._dead) or not (self.path / VECTORS_FILE).is_file():
                self.save(generation)
            else:
                self.write_marker(generation)
            return
        if self.dirty or not (self.path / VECTORS_FILE).is_file():
            self.save(generation)
        else:
            self.write_marker(generation)

    # ------------------------------------------------------------------ searching
    def searchable(self):
        """The index to search: a GPU copy when faiss-gpu sees a GPU, else the CPU index (always for on-disk
        lists: copying them to the GPU would read them all)."""
        faiss = faiss_module()
        if self._base is not None:
            return self.index
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
