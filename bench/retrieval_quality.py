"""Retrieval quality of shusheng-mini-clip on the fixed SynthDrive test set (seed 2023, 1,000 images, 128 px).

    python bench/retrieval_quality.py                         # the bundled weights
    python bench/retrieval_quality.py --checkpoint runs/miniclip/final --out bench/results

100 text queries, each with its ground truth written as a predicate over a scene's ``attributes``
(``shusheng.data.PLAIN_QUERIES`` / ``PARAPHRASE_QUERIES``): 50 attribute queries written as sentences
("a red car at night", "people crossing in the rain", ...) and 50 paraphrases asking for the same scenes in other
words ("a crimson automobile after dark", ...). Images go through the public ``embed_images`` (PIL →
preprocessing from the weights' config) and queries through ``embed_texts``; exact search over the 1,000
embeddings (numpy). A result is relevant when its scene satisfies the query. Reported: mean precision@10 per set
(targets: >= 0.8 plain, >= 0.6 paraphrases) against the chance level measured on the same images (the fraction of
relevant images, i.e. the expected P@10 of a random ranking), per-query P@10 and relevant counts, and for each
paraphrase the words that never occur in the training texts of the same recipe (``--vocab-images`` train images:
captions + attribute phrases), which the image tower never saw. Writes ``retrieval_quality.{json,md}`` (summary)
and ``retrieval_quality_per_query.{json,md}``.

The query sets were written before the model was trained and were not changed after looking at its results;
the only constraint used when writing them was that each has at least 10 relevant test images.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: image size of the ``shusheng train clip`` recipe (``--image-size``); a scene's visible objects depend on it
TRAIN_IMAGE_SIZE = 128


def training_vocabulary(n_images: int) -> set[str]:
    """Words of the training texts (captions + attribute phrases, ``shusheng train clip``'s default recipe:
    :func:`shusheng.data.training_texts`) of the first ``n_images`` train images."""
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_queries import training_texts

    attrs, caps = [], []
    for i in range(n_images):
        _, ann = sd.sample(sd.TRAIN_SEED, i, TRAIN_IMAGE_SIZE)
        attrs.append(ann.attributes)
        caps.append(ann.captions)
    texts, _, _ = training_texts(attrs, caps)
    return {w for t in texts for w in re.findall(r"[a-z0-9/-]+", t.lower())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a MiniClip save_pretrained folder (default: bundled)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and markdown results")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--vocab-images", type=int, default=1000,
                   help="train images whose texts define the training vocabulary (novel-word column)")
    args = p.parse_args(argv)
    reexec_with_bench_env()

    import numpy as np
    import torch

    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_queries import PARAPHRASE_QUERIES, PLAIN_QUERIES, relevance_matrix
    from shusheng.miniclip import MiniClip, load_bundled
    from shusheng.miniclip.evaluation import evaluate_queries

    torch.set_num_threads(2)
    model = load_bundled() if args.checkpoint is None else MiniClip.from_pretrained(args.checkpoint)
    source = "bundled shusheng/weights/shusheng-mini-clip" if args.checkpoint is None else args.checkpoint

    t0 = time.perf_counter()
    images, attributes = [], []
    for i in range(sd.TEST_SIZE):
        img, ann = sd.sample(sd.TEST_SEED, i, sd.TEST_IMAGE_SIZE)
        images.append(img)
        attributes.append(ann.attributes)
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    img_emb = model.embed_images(images, batch_size=64)
    t_img = time.perf_counter() - t0

    train_vocab = training_vocabulary(args.vocab_images)
    summary, per_query = [], []
    for name, queries in (("plain", PLAIN_QUERIES), ("paraphrase", PARAPHRASE_QUERIES)):
        t0 = time.perf_counter()
        q_emb = model.embed_texts([q.text for q in queries])
        t_txt = time.perf_counter() - t0
        res = evaluate_queries(img_emb, q_emb, queries, attributes, k=args.k)
        rel = relevance_matrix(queries, attributes)
        chance = float(rel.mean(axis=1).mean())
        p = np.array([r["p_at_k"] for r in res["per_query"]])
        summary.append({"set": name, "queries": len(queries), "p_at_k": res["p_at_k"], "chance": chance,
                        "ratio_vs_chance": res["p_at_k"] / chance, "perfect": int((p == 1).sum()),
                        "below_half": int((p < 0.5).sum()), "min": float(p.min()),
                        "target": 0.8 if name == "plain" else 0.6,
                        "meets_target": bool(res["p_at_k"] >= (0.8 if name == "plain" else 0.6)),
                        "text_ms_per_query": 1000 * t_txt / len(queries)})
        for r in res["per_query"]:
            novel = [w for w in re.findall(r"[a-z0-9/-]+", r["query"].lower()) if w not in train_vocab]
            per_query.append({"set": name, "query": r["query"], "p_at_k": r["p_at_k"], "n_relevant": r["n_relevant"],
                              "novel_words": " ".join(novel) if name == "paraphrase" else ""})

    meta = {**machine_info(), "model": source, "k": args.k, "test_set": f"SynthDrive seed {sd.TEST_SEED}, "
            f"{sd.TEST_SIZE} images, {sd.TEST_IMAGE_SIZE} px", "render_seconds": round(t_render, 1),
            "image_embed_per_second": round(len(images) / t_img, 1), "vocab_images": args.vocab_images}
    cols = [("set", "query set"), ("queries", "queries"), ("p_at_k", f"mean P@{args.k}"), ("chance", "chance"),
            ("ratio_vs_chance", "x chance"), ("target", "target"), ("meets_target", "met"),
            ("perfect", f"P@{args.k}=1"), ("below_half", f"P@{args.k}<0.5"), ("min", "min")]
    md = write_results("retrieval_quality", summary, cols, args.out, meta)
    md_q = write_results("retrieval_quality_per_query", per_query,
                         [("set", "set"), ("query", "query"), ("p_at_k", f"P@{args.k}"),
                          ("n_relevant", "relevant"), ("novel_words", "words unseen in training")], args.out, meta)
    print(f"model: {source}; {len(images)} test images embedded at {meta['image_embed_per_second']} images/s\n")
    print(md)
    print()
    print(md_q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
