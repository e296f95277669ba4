"""``shusheng caption IMG...`` and ``shusheng ask IMG... -q QUESTION``: the unified decoder on the command line.

With ``--json`` each prints a JSON list of ``{"image", "caption" | "answer", "score", "in_domain",
"domain_score"}`` objects; an image that cannot be loaded gets an ``"error"`` entry instead, the others are still
answered, and the exit status is 1. Images unlike the model's training data get a one-line warning on stderr.
Without a ``--model`` folder the bundled ``shusheng-mini-uniperceiver`` is used. Heavy imports happen in ``run``
only.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_ask_arguments", "add_caption_arguments", "run_ask", "run_caption"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--model", default=None, help="model folder (default: the bundled shusheng-mini-uniperceiver)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runtime", choices=("torch", "onnxruntime", "tensorrt", "auto"), default="torch",
                   help="what runs the image side (backbone + image tokenizer): torch (default), onnxruntime, "
                        "tensorrt, or auto (the fastest here, measured once and cached)")


def add_caption_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--beams", type=int, default=1, help="beam width (1 = greedy, the default: it scores best)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="longest caption in tokens (at most the model's max_text_len)")


def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("-q", "--question", required=True, help="the question (asked about every image)")
    p.add_argument("--mode", choices=("match", "generate"), default="match",
                   help="pick from the model's answer list (default) or generate a free answer")
    p.add_argument("--top-k", type=int, default=3, help="alternatives shown (matching mode)")


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace, cls):
    return cls.from_pretrained(args.model, runtime=args.runtime)


def _report(args: argparse.Namespace, rows: list[dict], out, line) -> int:
    """Print ``rows`` (``--json``) or one line each; warn about failed and out-of-domain images on stderr.

    Returns 1 when some image failed, else 0."""
    for r, ok, score, err in zip(rows, out.in_domain, out.domain_score, out.errors):
        r["in_domain"] = ok
        r["domain_score"] = None if score != score else round(score, 4)  # NaN (no check) -> null
        if err is not None:
            r["error"] = err
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['image']}: error: {r['error']}" if "error" in r else line(r))
    for r in rows:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
        elif r["in_domain"] is False:
            print(f"warning: {r['image']} does not look like the scenes this model was trained on "
                  f"(domain score {r['domain_score']:.4f}); treat the answer as unreliable", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def run_caption(args: argparse.Namespace) -> int:
    from shusheng.data import ImageLoadError
    from shusheng.runtimes import RuntimeCheckError
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    try:
        pipe = _load(args, CaptionPipeline)
        out = pipe(args.images, max_new_tokens=args.max_tokens, num_beams=args.beams, batch_size=args.batch_size)
    except (ImageLoadError, ValueError, FileNotFoundError, ImportError, RuntimeCheckError) as e:
        return _fail(e)
    rows = [{"image": im, "caption": c, "score": None if s is None else round(s, 4)}
            for im, c, s in zip(args.images, out.captions, out.scores)]
    return _report(args, rows, out, lambda r: f"{r['image']}: {r['caption']}  (score {r['score']:.3f})")


def run_ask(args: argparse.Namespace) -> int:
    from shusheng.data import ImageLoadError
    from shusheng.runtimes import RuntimeCheckError
    from shusheng.uniperceiver.pipelines import VQAPipeline

    if not args.question.strip():
        return _fail(ValueError("the question is empty; ask something about the image"))
    try:
        pipe = _load(args, VQAPipeline)
        out = pipe(args.images, args.question, mode=args.mode, top_k=args.top_k, batch_size=args.batch_size)
    except (ImageLoadError, ValueError, FileNotFoundError, ImportError, RuntimeCheckError) as e:
        return _fail(e)
    rows = [{"image": im, "question": args.question, "answer": a, "score": None if s is None else round(s, 4),
             "alternatives": [[t, round(p, 4)] for t, p in (k or [])]}
            for im, a, s, k in zip(args.images, out.answers, out.scores, out.top_k)]

    def line(r: dict) -> str:
        alts = ", ".join(f"{t} {p:.2f}" for t, p in r["alternatives"][1:])
        return f"{r['image']}: {r['answer']}  (score {r['score']:.3f}{'; also ' + alts if alts else ''})"

    return _report(args, rows, out, line)
