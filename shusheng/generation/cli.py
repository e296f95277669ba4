"""``shusheng generate "PROMPT"``: text to PNG images, each carrying the parameters that make it again.

    shusheng generate "a red car on a wet street at night" -n 4 --seed 123 --model runs/t2i/final
    shusheng generate "a bus at dusk" --negative "fog" --scheduler dpm --steps 10 --size 64x64 --out shots/
    shusheng generate --from-png shots/a-bus-at-dusk-77.png --model runs/t2i/final     # the same image again

``--seed S`` gives the images seeds ``S, S+1, ...``; without it the seeds are random, printed and stored in the
PNGs. Every image is generated on its own (one prompt, one seed per call), so ``--from-png`` reproduces it
exactly on the same machine. Files are written atomically (a temporary file, then a new name: an existing file is
never overwritten; ``name-1.png`` etc. when taken).

``--check`` reads the scene facts the prompt states (:func:`~shusheng.generation.pipelines.faithfulness.prompt_facts`) and
asks the bundled decoder (``shusheng-mini-uniperceiver``, through
:class:`~shusheng.generation.pipelines.faithfulness.FaithfulnessChecker`) whether each image shows them; the checker is
loaded only with ``--check``. ``--json`` prints a list of ``{"prompt", "seed", "file", "checks", "share",
"in_domain"}``: ``checks`` is a list of ``{"kind", "expected", "observed", "holds", "score", "question"}``, one per
fact, ``share`` the share of the facts that hold (null when the prompt states none the judge knows), ``in_domain``
the decoder's in-domain check of the image; all three are null without ``--check``.

    shusheng generate "two red cars at night" -n 2 --model runs/t2i/final --check

There is no bundled trained model yet: without ``--model`` the command says so and names ``shusheng train t2i``
instead of drawing noise with a random UNet. Heavy imports happen in ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from shusheng.generation.config import SCHEDULERS

__all__ = ["add_arguments", "check_lines", "check_rows", "parse_size", "run"]

#: arguments that ``--from-png`` takes from the file (giving them as well is an error)
_FROM_FILE = ("prompt", "num_images", "seed", "steps", "guidance", "negative", "scheduler", "size")


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or ``"S"`` for a square) → ``(height, width)``."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"size must be HxW or S (pixels), got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (omit with --from-png)")
    p.add_argument("-n", "--num-images", type=int, default=None, help="images to generate (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (the next get S+1, ...); "
                                                          "default: random seeds, printed")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own default_guidance)")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (default: none)")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler (default: the model's own, DDIM for shusheng train t2i)")
    p.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                   help="image size in pixels (default: the size the model was trained at)")
    p.add_argument("--out", default="generated", metavar="DIR", help="where the PNGs go (default: ./generated)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {prompt, seed, file, checks, share, in_domain}")
    p.add_argument("--check", action="store_true",
                   help="check that each image shows the scene facts of its prompt (time of day, weather, "
                        "vehicles, counts, lights, signs, pedestrians, crosswalk), judged by the bundled decoder")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a pipeline folder (shusheng train t2i writes <output>/final); default: the bundled "
                        "shusheng-mini-t2i")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="generate the image of FILE again, from its stored parameters")


def _fail(e: BaseException | str) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _jobs(args: argparse.Namespace) -> tuple[dict, list[int], object | None]:
    """``(settings, seeds, parameters read from --from-png or None)``; raises ValueError on bad arguments."""
    from shusheng.generation.png import read_parameters

    if args.from_png is not None:
        given = [f"--{k.replace('_', '-')}" if k != "prompt" else "PROMPT" for k in _FROM_FILE
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--from-png takes the settings from the file; drop {', '.join(given)}")
        params = read_parameters(args.from_png)
        if params.seed is None:
            raise ValueError(f"{args.from_png} stores no seed: its image cannot be made again")
        settings = dict(prompt=params.prompt, negative=params.negative_prompt, steps=params.steps,
                        guidance=params.cfg_scale, scheduler=params.sampler, size=(params.height, params.width))
        return settings, [params.seed], params
    if args.prompt is None or not args.prompt.strip():
        raise ValueError("give a prompt (what to draw) or --from-png FILE")
    n = 1 if args.num_images is None else args.num_images
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    seeds = [args.seed + k for k in range(n)] if args.seed is not None else [secrets.randbits(32) for _ in range(n)]
    settings = dict(prompt=args.prompt, negative=args.negative or "", steps=20 if args.steps is None else args.steps,
                    guidance=args.guidance, scheduler=args.scheduler,
                    size=args.size)
    return settings, seeds, None


def check_rows(result) -> list[dict]:
    """The JSON ``checks`` of one :class:`~shusheng.generation.pipelines.faithfulness.FaithfulnessResult`: one dict per
    fact."""
    return [{"kind": c.kind, "expected": c.expected, "observed": c.observed, "holds": c.holds,
             "score": round(c.score, 4), "question": c.question} for c in result.checks]


def check_lines(result) -> list[str]:
    """The human-readable lines of one :class:`~shusheng.generation.pipelines.faithfulness.FaithfulnessResult`."""
    if not result.checks:
        return ["  check: the prompt states no scene fact the judge knows (time of day, weather, vehicles, counts, "
                "traffic lights, signs, pedestrians, crosswalks)"]
    n_hold = sum(c.holds for c in result.checks)
    lines = [f"  check: {n_hold} of {len(result.checks)} facts hold"]
    width = max(len(f"{c.kind}: {c.expected}") for c in result.checks)
    for c in result.checks:
        verdict = "holds        " if c.holds else "does not hold"
        lines.append(f"    {verdict}  {f'{c.kind}: {c.expected}':<{width}}  (decoder: {c.observed}, {c.score:.2f})")
    if result.in_domain is not None and not result.in_domain:
        lines.append(f"  note: the image does not look like the driving scenes the judge was trained on (domain "
                     f"score {result.domain_score:.2g}): its verdicts mean little")
    return lines


def _model_path(args: argparse.Namespace, params) -> str | None:
    from shusheng.generation.config import BUNDLED_MODEL

    if args.model is not None:
        return args.model
    if params is not None and params.model not in (None, BUNDLED_MODEL):
        raise ValueError(f"{args.from_png} was made with the model {params.model!r}: pass its folder with --model "
                         "DIR")
    return None  # the bundled model


def run(args: argparse.Namespace) -> int:
    try:
        settings, seeds, params = _jobs(args)
        path = _model_path(args, params)
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    from shusheng.generation.config import scheduler_name
    from shusheng.generation.png import prompt_slug, save_png

    try:
        from shusheng.generation.pipeline import Text2ImagePipeline, diffusers

        diffusers.utils.logging.disable_progress_bar()  # loading bars of a few small components are noise here
        pipe = Text2ImagePipeline.from_pretrained(path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(e)
    checker = None
    if args.check:  # loaded only when asked for, before any image is made
        try:
            from shusheng.generation.pipelines.faithfulness import FaithfulnessChecker

            checker = FaithfulnessChecker.from_pretrained()
        except (FileNotFoundError, ValueError, ImportError) as e:
            return _fail(f"--check needs the bundled decoder (shusheng-mini-uniperceiver): {e}")
    if params is not None and params.model_hash and params.model_hash != pipe.model_hash:
        print(f"warning: {args.from_png} was made by weights with hash {params.model_hash}, this model's is "
              f"{pipe.model_hash}: the image will differ", file=sys.stderr)
    scheduler = settings["scheduler"]
    if scheduler is not None and scheduler == scheduler_name(pipe.scheduler):
        scheduler = None  # the pipeline's own (same config): also for a sampler outside the table
    height, width = settings["size"] or (None, None)
    show = sys.stderr.isatty() and not args.json
    rows = []
    for seed in seeds:  # one image per call: --from-png makes exactly this computation again
        try:
            out = pipe(settings["prompt"], negative_prompt=settings["negative"],
                       num_inference_steps=settings["steps"], guidance_scale=settings["guidance"], seed=[seed],
                       height=height, width=width, scheduler=scheduler, progress=show)
        except ValueError as e:
            return _fail(e)
        except KeyboardInterrupt:
            print("[interrupted]", file=sys.stderr)
            return 130
        file = save_png(out.images[0], args.out, f"{prompt_slug(settings['prompt'])}-{seed}", out.parameters[0])
        row = {"prompt": settings["prompt"], "seed": seed, "file": str(file), "checks": None, "share": None,
               "in_domain": None}
        result = None
        if checker is not None:
            result = checker(out.images, out.prompts)[0]
            row.update(checks=check_rows(result), share=result.share,
                       in_domain=None if result.in_domain is None else bool(result.in_domain))
        rows.append(row)
        if not args.json:
            print(f"{file}  (seed {seed})", flush=True)
            if result is not None:
                print("\n".join(check_lines(result)), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0
