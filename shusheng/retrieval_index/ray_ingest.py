"""Folder ingest on Ray: new and changed images decoded and embedded by a pool of Ray actors (one model each, on
this machine or across a cluster), written to the index shard by shard and resumable per shard.

``index_folder(folder, engine=RayEngine(...))`` (``shusheng index DIR --engine ray [--address ADDR]
[--workers N]``) keeps everything that decides *what* to index in the driver, exactly as the in-process ingest
does it (:class:`~shusheng.retrieval_index.ingest._Ingest`): the scan and its skip rules, unchanged files (same
size and mtime, or same hash), renamed/moved/copied files (vectors copied from the identical indexed file),
removals, videos, and region changes of unchanged files. Only what the in-process engine would decode and embed
goes to Ray:

1. the files to embed are split into shards of ``shard_size`` files, listed in ``<index>/shards/manifest.json``
   with a fingerprint of the list (paths, sizes, mtimes, hashes, the embedder);
2. Ray Data runs ``map_batches`` over the file list with an actor pool (``workers`` actors, each loading the
   embedder once); an actor reads, decodes and crops each file with the same
   :func:`~shusheng.retrieval_index.prepare.prepare_file` as the in-process ingest, embeds the batch and returns
   the vectors with each file's record (or the reason it was skipped);
3. as soon as all files of a shard are back, the driver writes ``shards/shard-NNNNN.npz`` (atomically), then
   its records and vectors into the index through the same code as the in-process ingest, in one transaction,
   commits it (FAISS gets the new vectors in memory) and marks the shard done in the manifest;
4. the last commit (in :func:`~shusheng.retrieval_index.ingest.index_folder`) writes ``vectors.faiss``,
   retraining the index type on a sample of the stored vectors if the collection outgrew it; ``shards/`` is
   then removed.

A killed run loses at most the shards not yet committed. The next run with the same file list (the folder
unchanged since) resumes: done shards are skipped, shards whose ``.npz`` was written are committed without
embedding them again, and only the others go to Ray. With a different list (files added or changed in between)
the old shards are dropped and the remaining work is planned again; committed shards are never redone, since
their files are indexed and unchanged.

The folder must be readable at the same path on every Ray node (a shared file system); the index folder only on
the driver. Every node needs shusheng and the embedder's weights (the same ``checkpoint`` path). Needs
``pip install 'shusheng[scale]'``; Ray is imported only when a run starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shusheng._deps import require
from shusheng.data.images import ImageLoadError
from shusheng.retrieval_index.ingest import _Ingest, _Job, embedder_choice, skip_reason
from shusheng.retrieval_index.layout import atomic_write
from shusheng.retrieval_index.prepare import PreparedImage, prepare_file

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.retrieval_index.embedders import Embedder
    from shusheng.retrieval_index.index import Index

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SHARD_SIZE", "SHARDS_DIRNAME", "RayEngine", "RayStats", "ray_index_folder"]

#: Files per shard: the unit of work that is written, committed and resumed.
DEFAULT_SHARD_SIZE = 1024
#: The shard folder inside the index folder (removed when every shard is committed).
SHARDS_DIRNAME = "shards"
_MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_RECORD_FIELDS = ("path", "size", "mtime_ns", "digest", "date", "date_source", "width", "height")


# ---------------------------------------------------------------------------------------------------- embedder
def _given(embedder: Embedder, checkpoint=None, device=None) -> Embedder:
    return embedder


def _build_embedder(factory: Callable[..., Embedder], checkpoint: str | None, device: str | None,
                    runtime: str) -> Embedder:
    """Runs on each Ray actor (and in the driver when it needs the model): the embedder, its image side on
    ``runtime``."""
    from shusheng.retrieval_index.embedders import with_runtime

    return with_runtime(factory(checkpoint=checkpoint, device=device), runtime)


class _DriverEmbedder:
    """The embedder as the driver sees it: its name and dim (what the index records and checks), the picklable
    ``make`` that builds it on each Ray actor, and the model itself, loaded in the driver only when something is
    embedded there (videos, new regions of unchanged files) or when a new index needs its dim."""

    def __init__(self, name: str, dim: int | None, make: Callable[[], Embedder], model: Embedder | None = None):
        self.name, self.make, self._model = name, make, model
        self._dim = dim

    @property
    def model(self) -> Embedder:
        if self._model is None:
            logger.info("loading %s in the driver", self.name)
            self._model = self.make()
        return self._model

    @property
    def dim(self) -> int:
        return int(self._dim if self._dim is not None else self.model.dim)

    def embed_images(self, images: list[Image.Image], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self.model.embed_images(images, batch_size=batch_size)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.model.embed_texts(texts, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------- actor
class _EmbedActor:
    """Ray Data callable class: one per actor. Loads the embedder once; each call reads, decodes and crops a batch
    of files (``prepare_file``, in ``threads`` threads) and embeds them.

    Input batch columns: ``shard``, ``pos`` (the file's place in its shard), ``item`` (JSON: path, boxes).
    Output: ``shard``, ``pos``, ``meta`` (JSON: the file's record, its boxes and invalid boxes, or ``reason``),
    ``vectors`` (float32 bytes: the whole image, then one row per box).
    """

    def __init__(self, make_embedder: Callable[[], Embedder], batch_size: int, max_pixels: int | None,
                 threads: int):
        self.embedder = make_embedder()
        if "torch" in sys.modules:  # the actor's share of the CPUs (Ray may not have set OMP_NUM_THREADS)
            sys.modules["torch"].set_num_threads(max(1, threads))
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="shusheng-decode")

    def _prepare(self, item: dict) -> PreparedImage | str:
        try:
            return prepare_file(item["path"], item["boxes"], max_pixels=self.max_pixels)
        except (ImageLoadError, OSError) as e:
            return skip_reason(item["path"], e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [json.loads(s) for s in batch["item"]]
        metas, images, counts = [], [], []
        for prepared in self.pool.map(self._prepare, items):
            if isinstance(prepared, str):
                metas.append({"reason": prepared})
                counts.append(0)
                continue
            meta = {k: getattr(prepared, k) for k in _RECORD_FIELDS}
            meta.update(boxes=[list(b) for b in prepared.boxes], invalid_boxes=prepared.invalid_boxes)
            metas.append(meta)
            images += [prepared.image, *prepared.crops]
            counts.append(1 + len(prepared.crops))
        vectors = (np.ascontiguousarray(self.embedder.embed_images(images, batch_size=self.batch_size), np.float32)
                   if images else np.empty((0, 0), np.float32))
        bounds = np.cumsum([0, *counts])
        return {"shard": np.asarray(batch["shard"]), "pos": np.asarray(batch["pos"]),
                "meta": np.array([json.dumps(m) for m in metas], dtype=object),
                "vectors": np.array([vectors[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])], dtype=object)}


# ---------------------------------------------------------------------------------------------------- shards
def _fingerprint(items: Iterable[dict], setup: dict) -> str:
    """Hash of a work list (order-free) and of what would make its vectors differ."""
    rows = sorted(json.dumps(it, sort_keys=True) for it in items)
    return hashlib.blake2b(json.dumps([setup, rows]).encode(), digest_size=16).hexdigest()


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


@dataclass
class _Shard:
    items: list[dict]
    done: bool = False
    failed: list[dict] = field(default_factory=list)  # done shards: {"item", "reason"} of the files skipped


@dataclass
class RayStats:
    """What the Ray part of the last run did (``RayEngine.stats``).

    Attributes:
        shards: shards of the run's work list. resumed: the run continued an earlier one's manifest.
        done_before: shards committed by an earlier run (skipped). from_files: shards committed from ``.npz``
            files an earlier run wrote (not embedded again). embedded_shards / embedded_files: sent to Ray.
        workers: actors used (0 when nothing went to Ray).
    """

    shards: int = 0
    resumed: bool = False
    done_before: int = 0
    from_files: int = 0
    embedded_shards: int = 0
    embedded_files: int = 0
    workers: int = 0


class _RayIngest(_Ingest):
    """:class:`~shusheng.retrieval_index.ingest._Ingest` whose new and changed images go to Ray actors, shard by
    shard, instead of this process's decode pool."""

    def __init__(self, index: Index, embedder: _DriverEmbedder, report, *, engine: RayEngine, progress: bool,
                 **options):
        super().__init__(index, embedder, report, **options)
        self.engine, self.progress = engine, progress
        self.work: list[dict] = []  # files to embed, in scan order
        self.dir = index.path / SHARDS_DIRNAME
        self.shards: list[_Shard] = []
        self.fingerprint = ""

    def _queue_image(self, path, data, st, digest, rec, boxes) -> None:
        # the driver has read and hashed the file (to find unchanged and identical ones); an actor reads it again
        self.work.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest,
                          "boxes": boxes})

    def finish(self) -> None:
        stats = self.engine.stats = RayStats()
        if self.work or self.dir.exists():
            self.index.commit(write_vectors=False)  # what the scan changed (touched, copied files) first
            self.changes = 0
            self._plan(stats)
            self._run(stats)
        super().finish()  # then in this process: queued region jobs, copies of files embedded by the shards

    # manifest ---------------------------------------------------------------
    def _setup(self) -> dict:
        return {"embedder": self.index.embedder_name, "checkpoint": self.index.embedder_info.checkpoint,
                "max_pixels": self.max_pixels}

    def _save_manifest(self) -> None:
        manifest = {"version": _MANIFEST_VERSION, "setup": self._setup(), "fingerprint": self.fingerprint,
                    "shards": [{"items": s.items, "done": s.done, "failed": s.failed} for s in self.shards]}
        atomic_write(self.dir / _MANIFEST, json.dumps(manifest).encode())

    def _resume(self) -> bool:
        """Takes over the manifest of an interrupted run when what is left to do is exactly its unfinished work."""
        try:
            manifest = json.loads((self.dir / _MANIFEST).read_text())
            if manifest.get("version") != _MANIFEST_VERSION or manifest["setup"] != self._setup():
                return False
            shards = [_Shard(s["items"], s["done"], s["failed"]) for s in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        # left: the files of unfinished shards, and those of finished ones that could not be indexed (no record)
        left = [it for s in shards for it in ([f["item"] for f in s.failed] if s.done else s.items)]
        if _fingerprint(left, self._setup()) != _fingerprint(self.work, self._setup()):
            logger.info("%s: the files to index differ from the interrupted run's; planning the shards again",
                        self.dir)
            return False
        self.shards, self.fingerprint = shards, manifest["fingerprint"]
        return True

    def _plan(self, stats: RayStats) -> None:
        if self.dir.exists() and self._resume():
            stats.resumed = True
            for s in self.shards:
                if s.done:
                    stats.done_before += 1
                    for f in s.failed:  # reported again, as the in-process ingest would, without decoding them
                        self._skip_job(self._job(f["item"]), f["reason"])
            logger.info("%s: resuming: %d of %d shards were committed before", self.dir, stats.done_before,
                        len(self.shards))
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            size = self.engine.shard_size
            self.shards = [_Shard(self.work[i:i + size]) for i in range(0, len(self.work), size)]
            self.fingerprint = _fingerprint(self.work, self._setup())
            self._save_manifest()
        stats.shards = len(self.shards)

    # running ------------------------------------------------------------------
    def _shard_path(self, i: int) -> Path:
        return self.dir / f"shard-{i:05d}.npz"

    def _run(self, stats: RayStats) -> None:
        to_embed = []
        for i, shard in enumerate(self.shards):
            if shard.done:
                continue
            try:
                with np.load(self._shard_path(i), allow_pickle=False) as z:
                    metas, vectors, counts = list(z["meta"]), z["vectors"], z["counts"]
            except (OSError, ValueError, KeyError):  # not written (or cut short): embed it
                to_embed.append(i)
                continue
            self._commit_shard(i, [json.loads(m) for m in metas], np.split(vectors, np.cumsum(counts)[:-1]))
            stats.from_files += 1
        if to_embed:
            stats.embedded_shards = len(to_embed)
            stats.embedded_files = sum(len(self.shards[i].items) for i in to_embed)
            self._embed_on_ray(to_embed, stats)
        if all(s.done for s in self.shards):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _embed_on_ray(self, to_embed: list[int], stats: RayStats) -> None:
        from tqdm.auto import tqdm

        ray = self.engine.connect()
        rows = [{"shard": i, "pos": j, "item": json.dumps({"path": it["path"], "boxes": it["boxes"]})}
                for i in to_embed for j, it in enumerate(self.shards[i].items)]
        workers = stats.workers = min(self.engine.actors(ray), len(rows))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        # at least one block per actor (small runs), else one per batch
        blocks = max(math.ceil(len(rows) / self.batch_size), min(len(rows), workers))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(
            _EmbedActor, batch_size=self.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=self.engine.cpus_per_worker, num_gpus=self.engine.gpus_per_worker,
            fn_constructor_kwargs={"make_embedder": self.embedder.make, "batch_size": self.batch_size,
                                   "max_pixels": self.max_pixels,
                                   "threads": max(1, int(self.engine.cpus_per_worker))})
        pending: dict[int, dict[int, tuple[dict, np.ndarray]]] = {i: {} for i in to_embed}
        bar = tqdm(total=len(rows), desc=f"embedding on {workers} Ray workers", unit="file",
                   disable=not self.progress)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        t0, first = time.perf_counter(), None
        try:
            for batch in batches:
                if first is None:  # the actors' start (process, imports, model) is most of the wait
                    first = time.perf_counter() - t0
                for shard, pos, meta, vec in zip(batch["shard"], batch["pos"], batch["meta"], batch["vectors"]):
                    got = pending[int(shard)]
                    got[int(pos)] = (json.loads(meta), np.frombuffer(vec, np.float32).reshape(-1, self.index.dim))
                    if len(got) == len(self.shards[int(shard)].items):
                        self._finish_shard(int(shard), [got[p] for p in range(len(got))])
                        del pending[int(shard)]
                bar.update(len(batch["shard"]))
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the pipeline (and frees its actors) when a shard failed to commit
        logger.info("Ray: %d files on %d workers in %.1f s (first results after %.1f s)", len(rows), workers,
                    time.perf_counter() - t0, first or 0.0)
        if pending:
            raise RuntimeError(f"Ray returned no results for {sum(len(self.shards[i].items) for i in pending)} "
                               "files; index again to retry them")

    def _finish_shard(self, i: int, results: list[tuple[dict, np.ndarray]]) -> None:
        """Writes shard ``i``'s file (so a crash before its commit does not lose the embedding), then commits it."""
        metas = [m for m, _ in results]
        vectors = [v for _, v in results]
        _write_npz(self._shard_path(i), meta=np.array([json.dumps(m) for m in metas]),
                   counts=np.array([len(v) for v in vectors], np.int64),
                   vectors=(np.concatenate(vectors) if vectors else np.empty((0, self.index.dim), np.float32)))
        self._commit_shard(i, metas, vectors)

    def _job(self, item: dict) -> _Job:
        return _Job(item["path"], "full", None, self.index.file_record(item["path"]), item["boxes"], False,
                    item["digest"])

    def _commit_shard(self, i: int, metas: list[dict], vectors: list[np.ndarray]) -> None:
        """Shard ``i``'s files into the index (one transaction, committed), then marked done in the manifest."""
        shard = self.shards[i]
        failed = []
        for item, meta, vecs in zip(shard.items, metas, vectors):
            job = self._job(item)
            if "reason" in meta:
                self._skip_job(job, meta["reason"])
                failed.append({"item": item, "reason": meta["reason"]})
                continue
            prepared = PreparedImage(**{k: meta[k] for k in _RECORD_FIELDS}, image=None,
                                     boxes=[tuple(b) for b in meta["boxes"]], invalid_boxes=meta["invalid_boxes"])
            for reason in prepared.invalid_boxes:
                self.report.skipped.append((job.path, reason))
            self._write(job, prepared, [], vecs)
        self.index.commit(write_vectors=False)
        self.changes = 0
        shard.done, shard.failed = True, failed
        self._save_manifest()
        self._shard_path(i).unlink(missing_ok=True)
        logger.info("committed shard %d/%d (%d files)", i + 1, len(self.shards), len(shard.items))


# ---------------------------------------------------------------------------------------------------- engine
class RayEngine:
    """Runs the decoding and embedding of :func:`~shusheng.retrieval_index.ingest.index_folder` on Ray.

    Args:
        address: the Ray cluster to join (``ray.init(address=...)``: ``"auto"``, ``"HOST:6379"``,
            ``"ray://HOST:10001"``); ``None``: the running one (``RAY_ADDRESS``, or ``ray.init`` already called in
            this process), else a new local one on this machine's cores.
        workers: actors, each with its own copy of the model (default: the cluster's CPUs divided by
            ``cpus_per_worker``; with ``device="cuda..."``, its GPUs: one per actor). Without a ``device``
            the actors run on the CPU.
        shard_size: files per shard (what is written, committed and resumed as a unit).
        cpus_per_worker: CPUs reserved per actor; its torch threads and decode threads.
    """

    def __init__(self, address: str | None = None, workers: int | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, cpus_per_worker: float = 1):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, not {shard_size}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.address, self.workers, self.shard_size = address, workers, shard_size
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = 0
        self.stats = RayStats()
        self._started = False

    # hooks called by index_folder ----------------------------------------------------
    def resolve_embedder(self, embedder: Embedder | str | None, index_path: Path, checkpoint, device,
                         runtime: str, *, detector=None, deadline=None) -> tuple[_DriverEmbedder, Any]:
        """The embedder for the run, without loading a model when the index already records its dim."""
        from shusheng.retrieval_index.embedders import _EMBEDDERS, create_embedder
        from shusheng.runtimes import check_runtime

        if detector is not None:
            raise ValueError("a detector (--detect) runs only in the in-process engine: index without "
                             "--engine ray, or without --detect")
        if deadline is not None:
            raise ValueError("a deadline is not supported by the Ray engine")
        check_runtime(runtime)
        # actors reserve a GPU each only when asked to run there; otherwise they run on the CPU
        self.gpus_per_worker = 1 if device is not None and str(device).startswith("cuda") else 0
        device = device or "cpu"
        if embedder is not None and not isinstance(embedder, str):
            # an object: pickled to every actor (fine for small ones; give a name for real models)
            make = partial(_build_embedder, partial(_given, embedder), None, device, runtime)
            return _DriverEmbedder(embedder.name, int(embedder.dim), make), checkpoint
        name, checkpoint, recorded = embedder_choice(embedder, index_path, checkpoint)
        # a registered factory travels to the actors (by reference, or by value when defined in a script)
        factory = _EMBEDDERS.get(name) or partial(create_embedder, name)
        ckpt = os.fspath(checkpoint) if checkpoint is not None else None
        make = partial(_build_embedder, factory, ckpt, device, runtime)
        if recorded is not None:
            return _DriverEmbedder(recorded.name, recorded.dim, make), checkpoint
        model = make()  # a new index records the embedder's dim: load it once here
        return _DriverEmbedder(model.name, int(model.dim), make, model), checkpoint

    def ingest(self, index: Index, embedder: _DriverEmbedder, report, *, progress: bool, **options) -> _RayIngest:
        return _RayIngest(index, embedder, report, engine=self, progress=progress, **options)

    # Ray --------------------------------------------------------------------------------
    def connect(self):
        """``ray``, initialised: joins ``address`` (or the running cluster), else starts a local one."""
        ray = require("ray", extra="scale", package="ray[data]")
        require("ray.data", extra="scale", package="ray[data]")
        if not ray.is_initialized():
            client = (self.address or "").startswith("ray://")  # Ray Client takes fewer options
            ray.init(address=self.address, **({} if client else {"include_dashboard": False,
                                                                  "logging_level": logging.WARNING}))
            self._started = True
        return ray

    def actors(self, ray) -> int:
        if self.workers is not None:
            return self.workers
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 1)))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))

    def shutdown(self) -> None:
        """Stops the local Ray this engine started (a joined cluster keeps running)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def ray_index_folder(folder: str | os.PathLike, index_path: str | os.PathLike | None = None,
                     embedder: Embedder | str | None = None, *, address: str | None = None,
                     workers: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, **kwargs):
    """:func:`~shusheng.retrieval_index.ingest.index_folder` with a :class:`RayEngine` (same arguments, no
    ``detector``/``deadline``); stops the local Ray it started, if any. Returns the
    :class:`~shusheng.retrieval_index.ingest.IngestReport`."""
    from shusheng.retrieval_index.ingest import index_folder

    engine = RayEngine(address=address, workers=workers, shard_size=shard_size)
    try:
        return index_folder(folder, index_path, embedder, engine=engine, **kwargs)
    finally:
        engine.shutdown()
