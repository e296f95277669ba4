"""``shusheng train answer-types``: fit a unified decoder's answer typer on the SynthDrive question grid.

The typer (:class:`shusheng.uniperceiver.answer_types.AnswerTyper`) reads which form of answer a question asks
for (open, yes/no, one of named options, a number) from its words; matching then weighs each answer by the
probability that the question asks for its form. It is fitted on the training wordings of the grid's cells
(``--qa-cells train``, the default: without the six held-out cells, so that those measure whether it learned
forms or facts) over SynthDrive train scenes, and measured on the test wordings of every cell over val scenes.
The folder is written back with the typer in ``answer_types.json`` and the fit's numbers in ``config.json``'s
metadata (``--out``: a copy elsewhere); the weights' tensors are unchanged.

    shusheng train answer-types --model runs/uniperceiver/mini_v10/final
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_train_arguments", "fit_answer_types", "grid_type_questions", "run_train"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a unified decoder folder (model_type uniperceiver)")
    p.add_argument("--out", default=None, help="folder to write (default: --model itself)")
    p.add_argument("--n-scenes", type=int, default=2000, help="SynthDrive train scenes whose questions it is fit on")
    p.add_argument("--val-n", type=int, default=500, help="SynthDrive val scenes it is measured on (test wordings)")
    p.add_argument("--qa-cells", choices=("train", "all"), default="train",
                   help="grid cells to fit on: without the held-out cells (default) or all")
    p.add_argument("--min-facts", type=int, default=3,
                   help="read only words used in questions about at least this many facts")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="question sampling seed")


def grid_type_questions(split_seed: int, n: int, pool: str, cells: Any, seed: int) -> list[tuple[str, str, str]]:
    """``(question, answer type, "fact / form")`` for every applicable cell of ``cells`` about scenes ``0..n-1``
    of a SynthDrive split, worded from ``pool``; distinct questions only."""
    from shusheng.data import synthdrive as sd
    from shusheng.data import synthdrive_qa as g
    from shusheng.uniperceiver.answer_types import FORM_TYPES

    out, seen = [], set()
    for i in range(n):
        attrs = sd.sample(split_seed, i, 128)[1].attributes
        rng = np.random.default_rng([seed, split_seed, i])
        for q in g.grid_questions(attrs, rng, pool, cells):
            if q["question"] not in seen:
                seen.add(q["question"])
                out.append((q["question"], FORM_TYPES[q["form"]], f'{q["type"]} / {q["form"]}'))
    return out


def fit_answer_types(n_scenes: int = 2000, val_n: int = 500, cells: str = "train", min_facts: int = 3,
                     steps: int = 300, lr: float = 0.05, seed: int = 0):
    """An :class:`~shusheng.uniperceiver.answer_types.AnswerTyper` fitted on the grid's training wordings, and its
    metrics: accuracy on the fit questions and on val scenes' test wordings, overall, per cell and on the
    held-out cells."""
    from shusheng.data import synthdrive as sd
    from shusheng.data import synthdrive_qa as g
    from shusheng.uniperceiver.answer_types import AnswerTyper

    fit_cells = g.TRAIN_CELLS if cells == "train" else g.CELLS
    train = grid_type_questions(sd.TRAIN_SEED, n_scenes, "train", fit_cells, seed)
    test = grid_type_questions(sd.VAL_SEED, val_n, "test", g.CELLS, seed + 1)
    typer = AnswerTyper.fit([q for q, _, _ in train], [t for _, t, _ in train],
                            [c.split(" / ")[0] for _, _, c in train], min_facts=min_facts, steps=steps, lr=lr)
    fit_acc = float(np.mean([p == t for p, (_, t, _) in zip(typer.predict([q for q, _, _ in train]), train)]))
    hit = [p == t for p, (_, t, _) in zip(typer.predict([q for q, _, _ in test]), test)]
    per_cell: dict[str, list[bool]] = defaultdict(list)
    for (_, _, cell), h in zip(test, hit):
        per_cell[cell].append(h)
    held = {f"{c.fact} / {c.form}" for c in g.HELDOUT_CELLS}
    metrics = {"fit_questions": len(train), "fit_cells": cells, "features": len(typer.vocab),
               "fit_accuracy": round(fit_acc, 4), "test_questions": len(test),
               "test_accuracy": round(float(np.mean(hit)), 4),
               "test_accuracy_seen_cells": round(float(np.mean([h for c, v in per_cell.items() if c not in held
                                                                for h in v])), 4),
               "test_accuracy_heldout_cells": round(float(np.mean([h for c in held for h in per_cell[c]])), 4),
               "test_accuracy_per_cell": {c: round(float(np.mean(v)), 4) for c, v in sorted(per_cell.items())}}
    return typer, metrics


def run_train(args: argparse.Namespace) -> int:
    import torch

    from shusheng.uniperceiver.model import UniPerceiver

    folder = Path(args.model)
    model = UniPerceiver.from_pretrained(folder)  # a clear error for anything but a decoder folder
    meta = UniPerceiver.load_config(folder)
    if min(args.n_scenes, args.val_n, args.steps, args.min_facts) < 1:
        raise SystemExit("error: --n-scenes, --val-n, --steps and --min-facts must be >= 1")
    t = time.time()
    model.answer_typer, metrics = fit_answer_types(args.n_scenes, args.val_n, args.qa_cells, args.min_facts,
                                                   args.steps, args.lr, args.seed)
    metrics["seconds"] = round(time.time() - t, 1)
    metrics["command"] = (f"shusheng train answer-types --model {folder} --n-scenes {args.n_scenes} --val-n "
                          f"{args.val_n} --qa-cells {args.qa_cells} --min-facts {args.min_facts} --steps "
                          f"{args.steps} --lr {args.lr} --seed {args.seed}")
    out = Path(args.out) if args.out else folder
    provenance = dict(meta.get("metadata") or {})
    provenance["answer_types"] = {k: v for k, v in metrics.items() if k != "test_accuracy_per_cell"}
    model.save_pretrained(out, dtype=getattr(torch, meta.get("weights_dtype", "float32")), metadata=provenance)
    print(json.dumps({"folder": str(out), **metrics}, indent=2))
    return 0
