"""Text-to-image: faithfulness to the prompt, Fréchet distance and speed of a pipeline, beside real-scene baselines.

    python bench/generation.py [--model DIR] [--seeds 4] [--n 200] [--threads 2] [--out bench/results]
    python bench/generation.py --ceiling-only [--n 100]          # before any text-to-image model exists

Measures, for a pipeline folder (``--model``; default the bundled ``shusheng-mini-t2i``):

* **faithfulness**: every prompt of ``bench/generation_prompts.json`` (62 prompts written for this benchmark, not
  SynthDrive captions, each listing the facts it states) is generated with ``--seeds`` seeds (0 .. seeds-1) and
  ``--steps`` steps; :class:`shusheng.generation.pipelines.faithfulness.FaithfulnessChecker` (the bundled decoder,
  closed questions) decides for each image whether each fact of its prompt holds. Reported: the share that holds
  per kind (time of day, weather, vehicle colour and type, counts, traffic light, signs, pedestrians, crosswalk),
  beside the **ceiling**: the same judge on ``--n`` real held-out scenes (the fixed test set, seed 2023,
  downsampled to the generated size) with their own captions (:func:`~shusheng.generation.pipelines.faithfulness.ceiling`),
  the most a generator can score by this judge. Also the share of generated images the decoder's in-domain check
  accepts.
* **Fréchet distance** on the bundled mini-clip's image embeddings: ``--n`` images generated from the captions of
  the first ``--n`` test scenes against those scenes, beside the **floor**: ``--n`` SynthDrive train scenes
  against the same test scenes (two real sets of the same size; the estimate is biased by the set size, so only
  same-size figures compare).
* **speed** on ``--threads`` threads: 20 steps for one image at the pipeline's own size, and the time per image
  at batch 8 against batch 1, both measured in this run (medians of ``--repeats``).

Targets (issue 17): faithfulness >= 0.9 for time of day and weather, >= 0.7 for vehicle colour and type, >= 0.5
for counts; one image in <= 1 s; per image at batch 8 <= half of batch 1. Writes ``generation.json`` / ``.md``
(``generation_ceiling.*`` with ``--ceiling-only``); the JSON's meta holds the per-prompt shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import judge_targets, machine_info, median_time, reexec_with_bench_env, write_results  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "generation_prompts.json"
SPEED_PROMPT = "a red car at a green light on a rainy street at night"
SPEED_STEPS = 20
# (target text, test) per metric key; the test gets the value and the dict of all values
TARGETS = {
    "faith_time": (">= 0.9", lambda v, r: v >= 0.9),
    "faith_weather": (">= 0.9", lambda v, r: v >= 0.9),
    "faith_vehicle": (">= 0.7", lambda v, r: v >= 0.7),
    "faith_count": (">= 0.5", lambda v, r: v >= 0.5),
    "speed_one": ("<= 1 s", lambda v, r: v <= 1.0),
    "speed_batch_ratio": ("<= 0.5", lambda v, r: v <= 0.5),
}
COLUMNS = [("metric", "metric"), ("value", "value"), ("real", "real scenes (ceiling / floor)"), ("unit", "unit"),
           ("target", "target (issue 17)"), ("meets", "meets"), ("n", "n")]


def _row(key: str, metric: str, value, unit: str, n: int, real="") -> dict:
    return {"key": key, "metric": metric, "value": value, "real": real, "unit": unit, "n": n}


def load_prompts(path: Path, limit: int = 0) -> list[dict]:
    """The benchmark prompts; warns when :func:`prompt_facts` reads a prompt differently from its listed facts
    (the judge scores what ``prompt_facts`` reads)."""
    from shusheng.generation.pipelines.faithfulness import Fact, prompt_facts

    items = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    items = items[:limit] if limit else items
    for it in items:
        listed = sorted(str(Fact.from_dict(f)) for f in it["facts"])
        read = sorted(str(f) for f in prompt_facts(it["prompt"]))
        if listed != read:
            print(f"warning: prompt_facts reads {read} from {it['prompt']!r}, the file lists {listed}",
                  file=sys.stderr)
    return items


# ------------------------------------------------------------------------------------------------ sections
def real_baselines(args, size: int, checker, embedder) -> tuple[dict, float, dict]:
    """The judge's ceiling per kind, and the Fréchet floor (train vs held-out scenes), at ``size``."""
    from shusheng.data import synthdrive as sd
    from shusheng.generation.pipelines import faithfulness as ff

    t = time.perf_counter()
    ceil = ff.ceiling(args.n, sd.TEST_SEED, size, checker=checker, batch_size=args.check_batch)
    print(f"ceiling on {args.n} test scenes at {size} px in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    t = time.perf_counter()
    held_out, _ = ff.synthdrive_images(args.n, sd.TEST_SEED, size)
    train, _ = ff.synthdrive_images(args.n, sd.TRAIN_SEED, size)
    feats = {"test": ff.embed_images(held_out, embedder), "train": ff.embed_images(train, embedder)}
    floor = ff.frechet_distance(feats["train"], feats["test"])
    print(f"Fréchet floor on 2 x {args.n} scenes in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return ceil, floor, feats


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, batch_size: int, guidance):
    """PIL images of ``prompts[k]`` with ``seeds[k]``, ``batch_size`` at a time (each image from its own seeded
    generator, so batching does not change them)."""
    import torch

    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    out = []
    for s in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in seeds[s:s + batch_size]]
        res = pipe(prompts[s:s + batch_size], num_inference_steps=steps, generator=gens, output_type="pil", **kwargs)
        out += list(res.images)
    return out


def faithfulness_section(pipe, items, checker, ceil, args) -> tuple[dict, list[dict], dict]:
    """Share of facts that hold per kind over ``--seeds`` images of every prompt, beside the ceiling."""
    from shusheng.generation.pipelines import faithfulness as ff

    prompts = [it["prompt"] for it in items for _ in range(args.seeds)]
    seeds = [k for _ in items for k in range(args.seeds)]
    t = time.perf_counter()
    images = generate(pipe, prompts, seeds, args.steps, args.batch_size, args.guidance)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    results = checker(images, prompts, batch_size=args.check_batch)
    print(f"generated {len(images)} images in {gen_s:.1f} s, judged in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    shares = ff.shares_by_kind(results)
    values, rows = {}, []
    for kind in (*ff.FACT_KINDS, "all"):
        if kind not in shares:
            continue
        name = "all facts" if kind == "all" else ff.KIND_NAMES[kind]
        real = ceil["per_kind"].get(kind, {}).get("share", "")
        values[f"faith_{kind}"] = shares[kind]["share"]
        rows.append(_row(f"faith_{kind}", f"faithfulness: {name} (share of facts that hold)", shares[kind]["share"],
                         "share", shares[kind]["n"], real))
    strict = ff.shares_by_kind(results, strict=True)["all"]
    values["faith_all_strict"] = strict["share"]
    rows.append(_row("faith_all_strict", "faithfulness: all facts, a fact of an out-of-domain image failing",
                     strict["share"], "share", strict["n"], ""))
    in_domain = sum(bool(r.in_domain) for r in results) / len(results)
    rows.append(_row("in_domain", "generated images the decoder's in-domain check accepts", in_domain, "share",
                     len(results), ceil["in_domain"]))
    per_prompt = []
    for i, it in enumerate(items):
        mine = results[i * args.seeds:(i + 1) * args.seeds]
        fails: dict[str, int] = {}
        for r in mine:
            for c in r.checks:
                if not c.holds:
                    fails[str(c.fact)] = fails.get(str(c.fact), 0) + 1
        per_prompt.append({"prompt": it["prompt"], "share": sum(r.share or 0 for r in mine) / len(mine),
                           "failed": fails})
    return values, rows, {"per_prompt": per_prompt, "images": len(images), "generate_s": round(gen_s, 1),
                          "generated_size": list(images[0].size)}


def fd_section(pipe, args, size: int, feats: dict, floor: float, embedder) -> tuple[list[dict], dict]:
    from shusheng.data import synthdrive as sd
    from shusheng.generation.pipelines import faithfulness as ff

    _, anns = ff.synthdrive_images(args.n, sd.TEST_SEED, size)
    captions = [a.captions[0] for a in anns]
    t = time.perf_counter()
    images = generate(pipe, captions, list(range(len(captions))), args.steps, args.batch_size, args.guidance)
    if images[0].size != (size, size):
        print(f"note: generated {images[0].size} images, real scenes downsampled to {size} px", file=sys.stderr)
    fd = ff.frechet_distance(ff.embed_images(images, embedder), feats["test"])
    print(f"Fréchet distance of {len(images)} generated images in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return [_row("fd", "Fréchet distance (mini-clip embeddings): generated from test captions vs the test scenes",
                 fd, "distance", len(images), floor)], {"fd_captions": captions[:3]}


def speed_section(pipe, args) -> tuple[dict, list[dict]]:
    import torch

    def one():
        pipe(SPEED_PROMPT, num_inference_steps=SPEED_STEPS, generator=[torch.Generator("cpu").manual_seed(0)])

    def eight():
        pipe([SPEED_PROMPT] * 8, num_inference_steps=SPEED_STEPS,
             generator=[torch.Generator("cpu").manual_seed(k) for k in range(8)])

    t1 = median_time(one, warmup=1, min_runs=args.repeats, budget_s=0.0)
    t8 = median_time(eight, warmup=1, min_runs=max(1, args.repeats // 2 + 1), budget_s=0.0)
    values = {"speed_one": t1, "speed_batch_ratio": (t8 / 8) / t1}
    rows = [_row("speed_one", f"one image, {SPEED_STEPS} steps, own size ({args.threads} threads, median)", t1, "s", 1),
            _row("speed_batch8", f"per image at batch 8 ({SPEED_STEPS} steps)", t8 / 8, "s", 8),
            _row("speed_batch_ratio", "per image at batch 8 / per image at batch 1", values["speed_batch_ratio"], "x",
                 8)]
    return values, rows


def load_generator(model: str | None):
    """The pipeline of ``model`` (None: the bundled one); exits with a message when there is none."""
    from shusheng.generation import Text2ImagePipeline, UntrainedGeneratorError, load_pipeline

    try:
        pipe = Text2ImagePipeline.from_pretrained() if model is None else load_pipeline(model)
    except (UntrainedGeneratorError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a text-to-image pipeline folder (shusheng train t2i writes <output>/final); default: "
                             "the bundled shusheng-mini-t2i")
    parser.add_argument("--prompts", default=str(PROMPTS), help="the benchmark prompts (JSON)")
    parser.add_argument("--max-prompts", type=int, default=0, help="use the first K prompts only (0 = all)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0 .. seeds-1)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the faithfulness and FD images")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--n", type=int, default=200,
                        help="real scenes for the ceiling, and images per set for the Fréchet distance")
    parser.add_argument("--batch-size", type=int, default=8, help="images generated at a time")
    parser.add_argument("--check-batch", type=int, default=32, help="images per pass of the judge")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per speed number (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the speed targets are for 2)")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the real-scene baselines: the judge's ceiling and the Fréchet floor")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "n", "batch_size", "check_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads == 2:
        reexec_with_bench_env()
    else:  # read by torch and the BLAS when they load, below
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from shusheng.generation.pipelines import faithfulness as ff
    from shusheng.miniclip import load_bundled

    torch.set_num_threads(args.threads)
    t_start = time.time()
    items = load_prompts(Path(args.prompts), args.max_prompts)
    pipe = None
    if not args.ceiling_only:
        pipe = load_generator(args.model)
        if pipe is None:
            return 2
    checker = ff.FaithfulnessChecker.from_pretrained()
    embedder = load_bundled()
    size = ff.GENERATED_SIZE
    if pipe is not None:  # the pipeline's own size, read from one image
        size = generate(pipe, [SPEED_PROMPT], [0], 1, 1, args.guidance)[0].size[0]
    meta = {**machine_info(), "model": args.model or "shusheng-mini-t2i", "threads": args.threads, "n_real": args.n,
            "size": size, "prompts": len(items), "seeds": args.seeds, "steps": args.steps}

    ceil, floor, feats = real_baselines(args, size, checker, embedder)
    meta["ceiling"] = ceil
    values, rows = {}, []
    if args.ceiling_only:
        for kind in (*ff.FACT_KINDS, "all"):
            if kind in ceil["per_kind"]:
                s = ceil["per_kind"][kind]
                name = "all facts" if kind == "all" else ff.KIND_NAMES[kind]
                rows.append(_row(f"faith_{kind}", f"ceiling: {name} on real scenes with their own captions",
                                 s["share"], "share", s["n"]))
                values[f"faith_{kind}"] = s["share"]
        rows.append(_row("in_domain", "real scenes the decoder's in-domain check accepts", ceil["in_domain"],
                         "share", args.n))
        rows.append(_row("fd_floor", "Fréchet floor: train scenes vs held-out test scenes (mini-clip)", floor,
                         "distance", args.n))
        name = "generation_ceiling"
    else:
        print(f"faithfulness: {len(items)} prompts x {args.seeds} seeds ...", file=sys.stderr, flush=True)
        v, r, extra = faithfulness_section(pipe, items, checker, ceil, args)
        values.update(v)
        rows += r
        meta.update(extra)
        print("Fréchet distance ...", file=sys.stderr, flush=True)
        r, extra = fd_section(pipe, args, size, feats, floor, embedder)
        rows += r
        meta.update(extra)
        print("speed ...", file=sys.stderr, flush=True)
        v, r = speed_section(pipe, args)
        values.update(v)
        rows += r
        name = "generation"
    judge_targets(rows, values, TARGETS)
    meta["seconds"] = round(time.time() - t_start, 1)
    md = write_results(name, rows, COLUMNS, args.out, meta)
    print(md)
    print(f"\n{meta['seconds']} s; judge: {ff.__name__} (decoder questions), real scenes at {size} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
