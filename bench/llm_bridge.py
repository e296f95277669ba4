"""Quality and speed of a trained LLM bridge (tower -> projector -> causal LM) on the fixed SynthDrive test set.

    python bench/llm_bridge.py --model runs/bridge/final [--lm PATH] [--n 300] [--describe 100] [--out bench/results]

Measures, with the bridge's own :class:`~shusheng.llm.ChatPipeline` (greedy decoding, batched):

* **VQA** exact match on the SynthDrive question grid (:func:`shusheng.data.synthdrive_qa.grid_eval_questions`,
  about 100 questions per image over the first ``--n`` test images, seed 2023, 128 px), answered by free
  generation (at most ``--answer-tokens`` tokens) and compared after normalisation (lower case, punctuation and
  articles dropped, number words as digits: "Yes." = "yes", "Two." = "2"): overall, per question form, per split
  (seen cells / held-out wordings / held-out cells), and the share of answers in the form the question asks for;
* the **blind baseline**: the same bridge and questions with no image (text-only rows), and for reference the
  question-only prior (:class:`~shusheng.data.synthdrive_qa.QuestionPrior`, the most frequent training answer of
  the same question);
* **hallucination**: the bridge describes ``--describe`` images ("Describe the scene."); the share of the objects
  and attributes its descriptions name that :func:`shusheng.llm.grounding.unsupported_mentions` flags against the
  scene's true attributes;
* **speed** on ``--threads`` threads (default 2): time to the first token for one image and a short question in
  a warm pipeline; decode tokens/s at batch 1 and total decode tokens/s at batch 8; the same LM's text-only
  decode tokens/s (plain ``transformers`` ``generate``, no image) in the same run; and the cold start of
  ``shusheng chat`` (process start to the first streamed character on stdout, the converted LM already cached),
  run once as a subprocess.

Targets (issue 16) are printed next to each number: VQA >= 0.85 overall and >= 0.75 on held-out wordings;
hallucination <= 5 %; the blind baseline >= 25 points below the VQA accuracy; cold start <= 10 s; time to first
token <= 1.0 s; >= 15 tokens/s at batch 1 and >= 3x that at batch 8.

Writes ``llm_bridge.json`` / ``.md`` (one row per metric: value, target, whether it is met) and
``llm_bridge_vqa_grid.json`` / ``.md`` (accuracy per grid cell and split, with both baselines). ``--model`` is
required until a trained bridge is bundled (``shusheng-mini-bridge``). The full default run answers about
2 x 30 000 questions; ``--questions-per-image K`` asks a fixed random K of each image's questions instead.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import judge_targets, machine_info, reexec_with_bench_env, write_results  # noqa: E402

BUNDLED = "shusheng-mini-bridge"
TTFT_QUESTION = "What colour is the traffic light?"
DESCRIBE = "Describe the scene."

# (target text, test) per metric key; the test gets the value and the dict of all values
TARGETS = {
    "vqa_all": (">= 0.85", lambda v, r: v >= 0.85),
    "vqa_heldout_wording": (">= 0.75", lambda v, r: v >= 0.75),
    "blind_all": ("<= VQA - 0.25", lambda v, r: v <= r["vqa_all"] - 0.25),
    "hallucination": ("<= 0.05", lambda v, r: v <= 0.05),
    "ttft": ("<= 1.0 s", lambda v, r: v <= 1.0),
    "tps_batch1": (">= 15 tok/s", lambda v, r: v >= 15),
    "tps_batch8": (">= 3x batch 1", lambda v, r: v >= 3 * r["tps_batch1"]),
    "cold_start": ("<= 10 s", lambda v, r: v <= 10),
}

COLUMNS = [("metric", "metric"), ("value", "value"), ("unit", "unit"), ("target", "target (issue 16)"),
           ("meets", "meets"), ("n", "n")]
GRID_COLUMNS = [("cell", "fact / form"), ("seen", "seen cells"), ("heldout_wording", "held-out wordings"),
                ("heldout_cell", "held-out cell"), ("blind", "no image"), ("prior", "question prior"),
                ("n", "questions")]

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}


def normalize(answer: str | None) -> str:
    """Lower case, punctuation dropped, no articles, number words as digits: ``"Two."`` -> ``"2"``."""
    words = re.sub(r"[^\w\s]", " ", (answer or "").lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def _mean(xs) -> float | str:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else ""


# ------------------------------------------------------------------------------------------------ quality
def in_form(q: dict, answer: str) -> bool:
    """Whether a (normalised) answer has the form the question asks for (yes/no, a named option, a number, a
    value of the fact): :func:`shusheng.data.synthdrive_qa.answer_matches_form` on normalised text."""
    from shusheng.data import synthdrive_qa as g

    a = normalize(answer)
    allowed = g.form_answers(q["type"], q["form"], q["params"])
    if allowed is not None:
        return a in {normalize(x) for x in allowed}
    return bool(a) and g.answer_matches_form(q["type"], q["form"], q["params"], a)


def answer_all(pipe, images, items, args, blind: bool) -> list[str]:
    """Greedy free-generation answers of ``items`` [(image index, question dict)], in order."""
    out: list[str] = []
    step = max(args.batch_size, 256)
    t0 = time.perf_counter()
    for s in range(0, len(items), step):
        chunk = items[s:s + step]
        rows = None if blind else [[images[i]] for i, _ in chunk]
        res = pipe(rows, [q["question"] for _, q in chunk], max_new_tokens=args.answer_tokens,
                   batch_size=args.batch_size)
        out += [a or "" for a in res.answers]
        if len(items) > step:
            print(f"  {'blind' if blind else 'VQA'}: {len(out)}/{len(items)} answers "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def vqa_section(pipe, images, attrs, args) -> tuple[dict, list[dict], list[dict], dict]:
    """Grid VQA by free generation, with and without the image, and the question prior."""
    import numpy as np

    from shusheng.data import synthdrive as sd
    from shusheng.data import synthdrive_qa as g

    items = []
    for i, a in enumerate(attrs):
        qs = g.grid_eval_questions(a, i)
        if args.questions_per_image and len(qs) > args.questions_per_image:
            keep = np.random.default_rng([sd.TEST_SEED, i]).choice(len(qs), args.questions_per_image, replace=False)
            qs = [qs[j] for j in sorted(keep)]
        items += [(i, q) for q in qs]
    t = time.perf_counter()
    prior = g.QuestionPrior([sd.sample(sd.TRAIN_SEED, i, sd.TEST_IMAGE_SIZE)[1].attributes for i in range(args.prior_train)])
    print(f"question prior from {args.prior_train} training scenes in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    seen = answer_all(pipe, images, items, args, blind=False)
    blind = answer_all(pipe, images, items, args, blind=True)

    hits: dict[str, list[list[bool]]] = {k: [] for k in ("bridge", "blind", "prior")}
    for (_, q), a, b in zip(items, seen, blind):
        truth = normalize(q["answer"])
        hits["bridge"].append(normalize(a) == truth)
        hits["blind"].append(normalize(b) == truth)
        hits["prior"].append(normalize(prior(q)) == truth)
    form_ok = [in_form(q, a) for (_, q), a in zip(items, seen)]

    def acc(who: str, split: str | None = None, form: str | None = None) -> float | str:
        return _mean(h for (_, q), h in zip(items, hits[who])
                     if (split is None or q["split"] == split) and (form is None or q["form"] == form))

    def count(split=None, form=None) -> int:
        return sum(1 for _, q in items if (split is None or q["split"] == split) and (form is None or q["form"] == form))

    values = {"vqa_all": acc("bridge"), "blind_all": acc("blind")}
    split_names = {"seen": "seen cells", "heldout_wording": "held-out wordings", "heldout_cell": "held-out cells"}
    rows = [_row("vqa_all", "VQA accuracy, all grid questions (free generation, exact match)", values["vqa_all"],
                 "share", count())]
    for sp, name in split_names.items():
        values[f"vqa_{sp}"] = acc("bridge", sp)
        rows.append(_row(f"vqa_{sp}", f"VQA accuracy, {name}", values[f"vqa_{sp}"], "share", count(sp)))
    for form in g.FORMS:
        rows.append(_row(f"vqa_form_{form}", f"VQA accuracy, {form} questions", acc("bridge", form=form), "share",
                         count(form=form)))
    rows.append(_row("form_consistency", "answers in the form the question asks for", _mean(form_ok), "share",
                     len(form_ok)))
    rows.append(_row("blind_all", "blind baseline: the same bridge without the image, all", values["blind_all"],
                     "share", count()))
    for sp, name in split_names.items():
        rows.append(_row(f"blind_{sp}", f"blind baseline (no image), {name}", acc("blind", sp), "share", count(sp)))
    rows.append(_row("prior_all", "question prior (reference: most frequent training answer), all", acc("prior"),
                     "share", count()))
    for sp, name in split_names.items():
        rows.append(_row(f"prior_{sp}", f"question prior, {name}", acc("prior", sp), "share", count(sp)))

    grid = []
    for c in g.CELLS:
        row = {"cell": f"{c.fact} / {c.form}" + (" (held out)" if c in g.HELDOUT_CELLS else "")}
        mine = [k for k, (_, q) in enumerate(items) if (q["type"], q["form"]) == (c.fact, c.form)]
        for sp in g.EVAL_SPLITS:
            v = _mean(hits["bridge"][k] for k in mine if items[k][1]["split"] == sp)
            if v != "":
                row[sp] = v
        row["blind"] = _mean(hits["blind"][k] for k in mine)
        row["prior"] = _mean(hits["prior"][k] for k in mine)
        row["n"] = len(mine)
        grid.append(row)
    examples = [{"question": q["question"], "answer": q["answer"], "bridge": a, "blind": b}
                for (_, q), a, b in list(zip(items, seen, blind))[:8]]
    return values, rows, grid, {"n_questions": len(items), "vqa_examples": examples}


def hallucination_section(pipe, images, attrs, args) -> tuple[dict, list[dict], dict]:
    from shusheng.llm.grounding import find_mentions, unsupported_mentions

    m = min(args.describe, len(images))
    out = pipe([[im] for im in images[:m]], DESCRIBE, max_new_tokens=args.describe_tokens,
               batch_size=args.batch_size)
    named = flagged = with_any = 0
    examples = []
    for text, a in zip(out.answers, attrs[:m]):
        text = text or ""
        bad = unsupported_mentions(text, a)
        named += len(find_mentions(text))
        flagged += len(bad)
        with_any += bool(bad)
        if len(examples) < 5:
            examples.append({"description": text, "unsupported": [str(x) for x in bad]})
    rate = flagged / named if named else 0.0  # nothing named: nothing hallucinated (see the mentions row)
    rows = [_row("hallucination", f'hallucination: unsupported mentions / mentions ("{DESCRIBE}")', rate, "share",
                 named),
            _row("hallucinating_descriptions", "descriptions with at least one unsupported mention",
                 with_any / m if m else 0.0, "share", m),
            _row("mentions_per_description", "objects and attributes named per description",
                 named / m if m else 0.0, "count", m)]
    return {"hallucination": rate}, rows, {"describe_examples": examples}


# ------------------------------------------------------------------------------------------------ speed
def _timed_stream(pipe, rows, question, max_new_tokens):
    """(seconds to the first piece, seconds to the end, time of the first piece, tokens generated)."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for d in pipe.stream(rows, question, max_new_tokens=max_new_tokens, batch_size=len(rows)):
        now = time.perf_counter()
        if first is None and (d.text or d.finish_reason):
            first = now
        if d.finish_reason:
            tokens += d.num_tokens
            last = now
    return first - t0, last - t0, first, tokens


def _decode_rate(pipe, rows, question, max_new_tokens) -> tuple[float, int]:
    """Decode tokens/s after the first piece (all rows together) and the tokens generated."""
    ttft, total, _, tokens = _timed_stream(pipe, rows, question, max_new_tokens)
    n = len(rows)
    if tokens > n and total > ttft:
        return (tokens - n) / (total - ttft), tokens
    return tokens / total, tokens  # every row ended at its first token: no decode phase to time


def lm_text_rate(model, new_tokens: int) -> float:
    """Decode tokens/s of the bridge's LM alone (``transformers`` ``generate``, greedy, a fixed length, no
    image): ``new_tokens`` more tokens, timed against a one-token run of the same prompt."""
    import torch

    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Describe a busy street at night."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    limit = model.max_positions
    if limit is not None:
        new_tokens = max(2, min(new_tokens, limit - ids.shape[1] - 1))

    def run(k: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False, pad_token_id=model.pad_token_id())
        return time.perf_counter() - t

    run(2)
    one = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new_tokens + 1) for _ in range(3))
    return new_tokens / max(full - one, 1e-9)


def speed_section(pipe, images, args) -> tuple[dict, list[dict]]:
    img = images[0]
    batch = [[images[i % len(images)]] for i in range(8)]
    _timed_stream(pipe, [[img]], TTFT_QUESTION, 4)  # warm up
    ttft = statistics.median(_timed_stream(pipe, [[img]], TTFT_QUESTION, 1)[0] for _ in range(args.repeats))
    r1 = [_decode_rate(pipe, [[img]], DESCRIBE, args.speed_tokens) for _ in range(args.repeats)]
    r8 = [_decode_rate(pipe, batch, DESCRIBE, args.speed_tokens) for _ in range(max(1, args.repeats // 2))]
    tps1 = statistics.median(r for r, _ in r1)
    tps8 = statistics.median(r for r, _ in r8)
    lm_tps = lm_text_rate(pipe.model, args.speed_tokens)
    values = {"ttft": ttft, "tps_batch1": tps1, "tps_batch8": tps8}
    rows = [_row("ttft", f'time to first token: one image + "{TTFT_QUESTION}" (warm, median of {args.repeats})',
                 ttft, "s", 1),
            _row("tps_batch1", f'decode tokens/s, batch 1 ("{DESCRIBE}", up to {args.speed_tokens} tokens)', tps1,
                 "tok/s", r1[0][1]),
            _row("tps_batch8", "total decode tokens/s, batch 8 (8 rows together)", tps8, "tok/s", r8[0][1]),
            _row("speedup_batch8", "batch 8 / batch 1 throughput", tps8 / tps1 if tps1 else 0.0, "x", 8),
            _row("tps_lm_text", "the same LM alone, text only (transformers generate, greedy)", lm_tps, "tok/s",
                 args.speed_tokens)]
    return values, rows


def cold_start(args, image) -> tuple[float | str, str]:
    """Seconds from starting ``shusheng chat IMG -q ...`` to its first character on stdout, and the command."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.png"
        image.save(path)
        cmd = [sys.executable, "-m", "shusheng", "chat", str(path), "-q", TTFT_QUESTION, "--max-tokens", "8"]
        if args.model:
            cmd += ["--model", args.model]
        if args.lm:
            cmd += ["--lm", args.lm]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with open(Path(tmp) / "stderr.txt", "w+b") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
            first = p.stdout.read(1)
            seconds = time.perf_counter() - t0
            p.stdout.read()
            rc = p.wait(timeout=600)
            err.seek(0)
            detail = err.read().decode(errors="replace").strip().splitlines()
    shown = " ".join(["shusheng", *cmd[3:]]).replace(str(path), "IMG")
    if rc != 0 or not first:
        print(f"cold start failed (exit {rc}): {' / '.join(detail[-3:])}", file=sys.stderr)
        return "", shown
    return seconds, shown


# ------------------------------------------------------------------------------------------------ rows
def _row(key: str, metric: str, value, unit: str, n: int) -> dict:
    return {"key": key, "metric": metric, "value": value, "unit": unit, "n": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"a trained bridge folder (shusheng train bridge writes <output>/final); default: the "
                             f"bundled {BUNDLED} (not bundled yet)")
    parser.add_argument("--lm", default=None, help="where the bridge's LM is, if not where its config.json says")
    parser.add_argument("--n", type=int, default=300, help="test images for VQA (the fixed set, seed 2023)")
    parser.add_argument("--describe", type=int, default=100, help="images described for the hallucination rate")
    parser.add_argument("--questions-per-image", type=int, default=0,
                        help="ask a fixed random K of each image's ~100 grid questions (0 = all)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="longest VQA answer in tokens")
    parser.add_argument("--describe-tokens", type=int, default=96, help="longest description in tokens")
    parser.add_argument("--speed-tokens", type=int, default=64, help="longest answer of the speed runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per speed number (median)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prior-train", type=int, default=3000,
                        help="SynthDrive training scenes (seed 0) the question prior counts answers on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2)")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the `shusheng chat` cold start")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.model is None:
        from shusheng.weights import BundledWeightsNotFound, bundled_path

        try:
            bundled_path(BUNDLED)
        except BundledWeightsNotFound:
            print(f"error: no trained LLM bridge is bundled ({BUNDLED}); train one with `shusheng train bridge "
                  "--output runs/bridge` and pass --model runs/bridge/final", file=sys.stderr)
            return 2
    elif not (Path(args.model) / "config.json").is_file():
        print(f"error: --model {args.model} is not a bridge folder (no config.json)", file=sys.stderr)
        return 2
    reexec_with_bench_env()

    import torch

    from shusheng.data import synthdrive as sd
    from shusheng.llm import ChatPipeline

    torch.set_num_threads(args.threads)
    t_start = time.time()
    t = time.perf_counter()
    pipe = ChatPipeline.from_pretrained(args.model, lm=args.lm)
    load_s = time.perf_counter() - t
    n = max(args.n, args.describe, 8)
    scenes = [sd.sample(sd.TEST_SEED, i, sd.TEST_IMAGE_SIZE) for i in range(n)]
    images = [img for img, _ in scenes]
    attrs = [ann.attributes for _, ann in scenes]
    meta = {**machine_info(), "model": args.model or BUNDLED, "lm": pipe.model.config.lm,
            "n_images": args.n, "n_describe": args.describe, "threads": args.threads,
            "pipeline_load_s": round(load_s, 2)}

    values, rows = {}, []
    print(f"pipeline loaded in {load_s:.1f} s; VQA on {args.n} images ...", file=sys.stderr, flush=True)
    v, r, grid, extra = vqa_section(pipe, images[:args.n], attrs[:args.n], args)
    values.update(v)
    rows += r
    meta.update(extra)
    print(f"hallucination on {args.describe} descriptions ...", file=sys.stderr, flush=True)
    v, r, extra = hallucination_section(pipe, images, attrs, args)
    values.update(v)
    rows += r
    meta.update(extra)
    print("speed ...", file=sys.stderr, flush=True)
    v, r = speed_section(pipe, images, args)
    values.update(v)
    rows += r
    if not args.no_cold_start:
        seconds, cmd = cold_start(args, images[0])
        values["cold_start"] = seconds
        rows.append(_row("cold_start", f"cold start: `{cmd}` (process start to first token)", seconds, "s", 1))
    judge_targets(rows, values, TARGETS)
    meta["seconds"] = round(time.time() - t_start, 1)

    grid_md = write_results("llm_bridge_vqa_grid", grid, GRID_COLUMNS, args.out, meta)
    md = write_results("llm_bridge", rows, COLUMNS, args.out, meta)
    print(grid_md + "\n")
    print(md)
    print(f"\n{args.n} test images, {meta['n_questions']} grid questions, {meta['seconds']} s")
    for e in meta["describe_examples"][:2]:
        print(f"  description: {e['description']!r}  unsupported: {e['unsupported']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
