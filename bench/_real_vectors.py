"""Real embeddings for the retrieval benchmark: the bundled ``shusheng-mini-clip``'s vectors of a large SynthDrive
collection, cached in chunks so the benchmark renders and embeds each image once (resumable: a finished chunk is
never redone, an interrupted one is redone whole).

* the collection: SynthDrive images of seed ``COLLECTION_SEED`` (neither the train, val nor test seed), 128 px;
* image queries: the fixed test set (seed 2023), held out from both the collection and the embedder's training;
* text queries, two sets: ``held-out`` = the 100 benchmark queries written as sentences and paraphrases
  (``PLAIN_QUERIES`` + ``PARAPHRASE_QUERIES``, wordings the embedder never trained on), and ``template`` = one
  attribute phrase per test image in the training recipe's own wording (``attribute_phrases``).

    python bench/_real_vectors.py --n 100000 --cache runs/retrieval_real   # ~13 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

COLLECTION_SEED = 9
CHUNK = 10_000
IMAGE_SIZE = 128


def _embed_chunk(model, seed: int, start: int, n: int, batch: int = 256) -> np.ndarray:
    from shusheng.data import synthdrive as sd

    out = np.empty((n, model.dim), np.float32)
    for s in range(0, n, batch):
        imgs = [sd.sample(seed, start + i, IMAGE_SIZE)[0] for i in range(s, min(n, s + batch))]
        out[s:s + len(imgs)] = model.embed_images(imgs, batch_size=64)
    return out


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def collection_vectors(n: int, cache: str | os.PathLike, model=None, log=print) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors of SynthDrive images ``0..n-1`` of ``COLLECTION_SEED``."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        path = cache / f"images_seed{COLLECTION_SEED}_{start:07d}_{CHUNK}.npy"
        if path.is_file():
            arr = np.load(path)
        else:
            if model is None:
                from shusheng.miniclip import load_bundled

                model = load_bundled()
            t0 = time.perf_counter()
            arr = _embed_chunk(model, COLLECTION_SEED, start, CHUNK)
            _save(path, arr)
            log(f"embedded images {start:,}..{start + CHUNK - 1:,} in {time.perf_counter() - t0:.0f} s")
        parts.append(arr[:size])
    return np.concatenate(parts)


def query_vectors(cache: str | os.PathLike, n_images: int = 1000, model=None) -> dict[str, tuple[list[str], np.ndarray]]:
    """Query sets by type: ``{"image": (names, vecs), "text held-out": (texts, vecs), "text template": ...}``."""
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_queries import PARAPHRASE_QUERIES, PLAIN_QUERIES, attribute_phrases

    cache = Path(cache)
    path = cache / f"queries_test{n_images}.npz"
    if not path.is_file():
        if model is None:
            from shusheng.miniclip import load_bundled

            model = load_bundled()
        samples = [sd.sample(sd.TEST_SEED, i, IMAGE_SIZE) for i in range(n_images)]
        img = model.embed_images([s[0] for s in samples], batch_size=64)
        held = [q.text for q in (*PLAIN_QUERIES, *PARAPHRASE_QUERIES)]
        rng = np.random.default_rng(0)
        tmpl = [attribute_phrases(s[1].attributes, rng, n=1)[0] for s in samples]
        np.savez(path.with_suffix(".tmp.npz"), image=img, held=model.embed_texts(held), held_texts=np.array(held),
                 tmpl=model.embed_texts(tmpl), tmpl_texts=np.array(tmpl))
        os.replace(path.with_suffix(".tmp.npz"), path)
    z = np.load(path)
    return {"image": ([f"test/{i}" for i in range(n_images)], z["image"]),
            "text held-out": (list(z["held_texts"]), z["held"]),
            "text template": (list(z["tmpl_texts"]), z["tmpl"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--cache", default="runs/retrieval_real")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    q = query_vectors(args.cache)
    print({k: v[1].shape for k, v in q.items()}, flush=True)
    v = collection_vectors(args.n, args.cache, log=lambda s: print(s, flush=True))
    print("collection", v.shape, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
