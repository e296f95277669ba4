"""Outputs of the bundled models on the fixed SynthDrive test set, written to JSON: a regression check for
changes that must not change behaviour.

    python bench/bundled_outputs.py before.json 1000      # captions, answers and search hits of 1000 test images
    (change the code)
    python bench/bundled_outputs.py after.json 1000
    python bench/bundled_outputs.py --compare before.json after.json

Records, for the first N images of the fixed test set (seed 2023, 128 px): greedy captions and their scores,
matched answers to five questions, generated answers, an md5 of the mini-clip image embeddings (rounded to 4
decimals), exact text->image hits, and the hits of `shusheng index --detect` + `shusheng search --json` over the
images written as PNG files. Only public entry points are used, so two versions of the package can be compared
(``PYTHONPATH=/path/to/other/checkout python bench/bundled_outputs.py ...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUESTIONS = ("What color is the traffic light?", "How many vehicles are there?", "Is it raining?",
             "What time of day is it?", "Where are the pedestrians?")
TEXT_QUERIES = ("a red car at night", "people crossing in the rain", "a stop sign", "a green traffic light",
                "a bus on a sunny day")
SEARCH_QUERIES = ("a red car at night", "a stop sign", "pedestrians on a crosswalk")


def compare(before: str, after: str) -> int:
    a, b = (json.load(open(f)) for f in (before, after))
    for key in a:
        print(f"{key}: {'same' if a[key] == b.get(key) else 'DIFFERENT'}")
    return 0 if a == b else 1


def record(out_file: str, n: int) -> int:
    import numpy as np
    import torch

    from shusheng.data import synthdrive as sd
    from shusheng.uniperceiver import CaptionPipeline, VQAPipeline

    try:
        from shusheng.miniclip import load_bundled
    except ImportError:  # a checkout from before the model-layer change
        from shusheng.retrieval_index.miniclip import load_bundled

    torch.set_num_threads(2)
    imgs = [sd.sample(2023, i, 128)[0] for i in range(n)]
    out: dict = {}
    cap = CaptionPipeline.from_pretrained()
    c = cap(imgs)
    out["captions"], out["caption_scores"] = c.captions, [round(s, 5) for s in c.scores]
    vqa = VQAPipeline(cap.model)
    out["answers"] = {}
    for q in QUESTIONS:
        o = vqa(imgs, q)
        out["answers"][q] = [o.answers, [round(s, 5) for s in o.scores]]
    out["gen_answers"] = vqa(imgs[:10], "what color is the car?", mode="generate").answers
    model = load_bundled()
    emb = model.embed_images(imgs)
    out["emb_md5_6dp"] = hashlib.md5(np.round(emb, 4).tobytes()).hexdigest()
    sims = model.embed_texts(list(TEXT_QUERIES)) @ emb.T
    out["exact_hits"] = [list(map(int, np.argsort(-r, kind="stable")[:10])) for r in sims]
    with tempfile.TemporaryDirectory() as d:
        for i, im in enumerate(imgs):
            im.save(f"{d}/{i:04d}.png")
        subprocess.run([sys.executable, "-m", "shusheng", "index", d, "--detect"], check=True, capture_output=True)
        out["index_hits"] = {}
        for q in SEARCH_QUERIES:
            r = subprocess.run([sys.executable, "-m", "shusheng", "search", q, "--index", f"{d}/.shusheng-index",
                                "--json", "-k", "8"], check=True, capture_output=True, text=True)
            out["index_hits"][q] = [(os.path.basename(h.get("path", "")), h.get("box"), round(h.get("score", 0), 4))
                                    for h in json.loads(r.stdout)]
    with open(out_file, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", out_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--compare" and len(argv) == 3:
        return compare(argv[1], argv[2])
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        print(__doc__)
        return 2
    return record(argv[0], int(argv[1]) if len(argv) > 1 else 60)


if __name__ == "__main__":
    sys.exit(main())
