"""Generate images from a text prompt with the bundled shusheng-mini-t2i, saved as PNGs that carry their parameters.

    python demos/generate_image.py "a foggy street at night" --n 2 --seed 1 --out /tmp/gen

It prints one JSON line per image (wrapped here): the file, the prompt, the seed and the settings that made it,
guidance and sampler being the model's own defaults:

    {"file": "/tmp/gen/a-foggy-street-at-night-1.png", "prompt": "a foggy street at night", "seed": 1,
     "steps": 20, "sampler": "ddim", "guidance": 2.0, "size": [64, 64], "model": "shusheng-mini-t2i"}
    {"file": "/tmp/gen/a-foggy-street-at-night-2.png", "prompt": "a foggy street at night", "seed": 2, ...}

Image k gets seed S+k (without --seed, S is random); an existing file is never overwritten (name-1.png, ...).
Each PNG holds AUTOMATIC1111-style "parameters" (shusheng.generation.read_parameters reads them back), so
`shusheng generate --from-png FILE` makes it again. The bundled model draws 64x64 SynthDrive-like street scenes
and gets the time of day and the weather of a prompt right more often than its vehicles. --model DIR takes a
pipeline folder written by `shusheng train t2i` (runs/t2i/final) instead.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help='what to draw, e.g. "a red car on a wet street at night"')
    parser.add_argument("--n", type=int, default=1, help="number of images (1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image; the next get S+1, ... "
                                                              "(default: random)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (20)")
    parser.add_argument("--out", type=Path, default=Path("generated"), help="folder for the PNGs (generated)")
    parser.add_argument("--model", type=Path, default=None,
                        help="pipeline folder (default: the bundled shusheng-mini-t2i)")
    args = parser.parse_args()

    if not args.prompt.strip():
        parser.error("the prompt is empty; describe the picture to draw")
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if not 1 <= args.steps <= 1000:
        parser.error(f"--steps must be in [1, 1000], got {args.steps}")
    if args.model is not None and not args.model.is_dir():
        parser.error(f"model folder {str(args.model)!r} does not exist or is not a folder")

    try:
        from shusheng.generation import GenerationParameters, Text2ImagePipeline
        from shusheng.generation.png import prompt_slug, save_png
    except ImportError as e:  # diffusers missing: the message names the extra to install
        print(f"error: {e}", file=sys.stderr)
        return 1
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars of small components are noise here
    transformers.utils.logging.disable_progress_bar()
    seed = secrets.randbits(32) if args.seed is None else args.seed  # short enough to type in again
    try:
        pipe = Text2ImagePipeline.from_pretrained(args.model)  # None: the bundled model
        out = pipe(args.prompt, num_images_per_prompt=args.n, num_inference_steps=args.steps, seed=seed,
                   progress=False)  # one generator per image: seeds S, S+1, ...
    except (FileNotFoundError, ValueError) as e:  # not a pipeline folder, an over-long prompt, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    for image, seed, text in zip(out.images, out.seeds, out.parameters):
        file = save_png(image, args.out, f"{prompt_slug(args.prompt)}-{seed}", text)  # never overwrites
        p = GenerationParameters.from_text(text)
        print(json.dumps({"file": str(file), "prompt": p.prompt, "seed": seed, "steps": p.steps,
                          "sampler": p.sampler, "guidance": p.cfg_scale, "size": [p.width, p.height],
                          "model": p.model}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
