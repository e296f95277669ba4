"""Caption every image in a folder with the bundled shusheng-mini-uniperceiver, one JSON line per image.

    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/caption_folder.py /tmp/scenes --out /tmp/captions.jsonl

Images are captioned --batch-size at a time and each line is written as soon as its batch is done, so memory
stays flat on large folders. It prints one line per image and a summary:

    images/000000.png: A night street scene in the rain with a green truck, ... no pedestrians.
    images/000001.png: A daytime street scene in the rain with a white bus; a pedestrian on the sidewalk.
    ...
    8 images: 8 captioned, 0 failed -> /tmp/captions.jsonl

Each JSONL line is {"file", "caption", "score", "in_domain", "domain_score"}; a file that cannot be read (corrupt,
truncated, not an image) gets {"file", "error"} instead and the run goes on (exit status 1 when any failed).
"in_domain" is false for pictures unlike the driving scenes the model was trained on: its captions are guesses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shusheng.data import IMAGE_EXTENSIONS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("captions.jsonl"), help="JSONL output (captions.jsonl)")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned at a time (16)")
    args = parser.parse_args()

    if not args.folder.is_dir():
        parser.error(f"folder {str(args.folder)!r} does not exist or is not a folder")
    files = sorted(p for p in args.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(args.folder).parts))
    if not files:
        parser.error(f"no images found in {str(args.folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")

    from shusheng.uniperceiver import CaptionPipeline

    try:
        pipe = CaptionPipeline.from_pretrained()  # the bundled model
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = 0
    with args.out.open("w", encoding="utf-8") as f:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            out = pipe([str(p) for p in chunk], batch_size=args.batch_size)  # per-item errors, never raises
            for i, path in enumerate(chunk):
                name = path.relative_to(args.folder).as_posix()
                if out.errors[i] is not None:
                    failed += 1
                    row = {"file": name, "error": out.errors[i]}
                    print(f"{name}: error: {out.errors[i]}", file=sys.stderr)
                else:
                    score = out.domain_score[i]
                    row = {"file": name, "caption": out.captions[i], "score": round(out.scores[i], 4),
                           "in_domain": out.in_domain[i], "domain_score": None if score != score else round(score, 4)}
                    print(f"{name}: {out.captions[i]}" + ("" if out.in_domain[i] else "  [not a driving scene?]"))
                f.write(json.dumps(row) + "\n")
            f.flush()
    print(f"{len(files)} images: {len(files) - failed} captioned, {failed} failed -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
