"""``shusheng chat IMG... -q QUESTION``: chat about images with a trained LLM bridge.

One image and one question: the answer is streamed to the terminal as it is generated (Ctrl-C stops it). Several
images: each is answered (in batches) and printed as ``image: answer``. ``--json`` prints a list of
``{"image", "question", "answer", "unsupported", "in_domain"}`` objects (+ ``"domain_score"``,
``"finish_reason"``; an image that cannot be loaded gets ``"error"`` and the exit status is 1). ``"unsupported"``
lists what the answer names that the bundled dense detector does not see in the image
(:func:`shusheng.llm.grounding.unsupported_mentions`; null when the detector is not available).

There is no bundled trained bridge yet: without ``--model`` the command says so and names ``shusheng train
bridge`` instead of chatting through a random projector. Heavy imports happen in ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("-q", "--question", required=True, help="the question (asked about every image)")
    p.add_argument("--model", default=None,
                   help="a trained bridge folder (shusheng train bridge writes <output>/final); default: the bundled "
                        "shusheng-mini-bridge")
    p.add_argument("--lm", default=None,
                   help="where the bridge's LM is on this machine (a Hugging Face folder or .gguf file), if not "
                        "where its config.json says")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--choices", nargs="+", default=None, metavar="ANSWER",
                   help="restrict the answer to one of these (the most likely one)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a string that ends the answer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-grounding", action="store_true",
                   help="skip the check of the answer against the bundled dense detector")


def _fail(e: BaseException) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _detector():
    """The bundled dense detector, or None (with the reason logged) when it cannot be loaded."""
    import logging

    from shusheng.detection import DenseObjectDetector
    from shusheng.miniclip import load_bundled
    from shusheng.weights import BundledWeightsNotFound

    try:
        return DenseObjectDetector(load_bundled())
    except (BundledWeightsNotFound, ValueError) as e:
        logging.getLogger(__name__).warning("no grounding check: %s", e)
        return None


def _unsupported(detector, image, answer: str | None) -> list[str] | None:
    from shusheng.data import ImageLoadError
    from shusheng.llm.grounding import unsupported_mentions

    if detector is None or answer is None:
        return None
    try:
        return [str(m) for m in unsupported_mentions(answer, detector.detect(image))]
    except ImageLoadError:
        return None


def run(args: argparse.Namespace) -> int:
    from shusheng.data import ImageLoadError
    from shusheng.llm.pipelines import ChatPipeline

    if not args.question.strip():
        return _fail(ValueError("the question is empty; ask something about the image"))
    try:
        pipe = ChatPipeline.from_pretrained(args.model, lm=args.lm)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(e)
    kw = dict(choices=args.choices, max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed, stop=args.stop)
    detector = None if args.no_grounding else _detector()
    if len(args.images) == 1 and not args.json:
        return _stream(pipe, args, kw, detector)
    try:
        out = pipe([[im] for im in args.images], args.question, batch_size=args.batch_size, **kw)
    except (ImageLoadError, ValueError) as e:
        return _fail(e)
    rows = []
    for i, im in enumerate(args.images):
        score = out.domain_score[i]
        row = {"image": im, "question": args.question, "answer": out.answers[i],
               "unsupported": _unsupported(detector, im, out.answers[i]), "in_domain": out.in_domain[i],
               "domain_score": None if score != score else round(score, 4), "finish_reason": out.finish_reasons[i]}
        if out.errors[i] is not None:
            row["error"] = out.errors[i]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for r in rows:
            print(f"{r['image']}: error: {r['error']}" if "error" in r else f"{r['image']}: {r['answer']}")
    for r in rows:
        _warn(r)
    return 1 if any("error" in r for r in rows) else 0


def _stream(pipe, args: argparse.Namespace, kw: dict, detector) -> int:
    image = args.images[0]
    parts, last = [], None
    try:
        for d in pipe.stream([[image]], args.question, **kw):
            if d.text:
                parts.append(d.text)
                print(d.text, end="", flush=True)
            if d.finish_reason:
                last = d
    except ValueError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    print()
    if last is None or last.finish_reason == "error":
        return _fail(RuntimeError(last.error if last else "no answer"))
    answer = "".join(parts)
    score = last.domain_score
    _warn({"image": image, "answer": answer, "unsupported": _unsupported(detector, image, answer),
           "in_domain": last.in_domain, "domain_score": None if score != score else round(score, 4)})
    return 0


def _warn(r: dict) -> None:
    if "error" in r:
        print(f"error: {r['image']}: {r['error']}", file=sys.stderr)
        return
    if r.get("in_domain") is False:
        print(f"warning: {r['image']} does not look like the scenes this model was trained on (domain score "
              f"{r['domain_score']:.4f}); treat the answer as unreliable", file=sys.stderr)
    if r.get("unsupported"):
        print(f"warning: {r['image']}: the answer mentions {', '.join(map(repr, r['unsupported']))}, which the "
              "detector does not see", file=sys.stderr)
