"""Ask questions about one image with the bundled shusheng-mini-uniperceiver (visual question answering).

    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/ask_image.py /tmp/scenes/images/000003.png -q "Are there any pedestrians?" \\
        -q "How many vehicles are there?" -q "What is the weather?"

It prints each question with the answer, its score (the answer's probability over the model's answer list),
the runner-up answers and whether the image looks like the driving scenes the model was trained on:

    Q: Are there any pedestrians?
    A: yes  (score 1.00; also no 0.00, both 0.00)  in_domain=True
    Q: How many vehicles are there?
    A: 2  (score 0.96; also 3 0.03, 1 0.00)  in_domain=True
    Q: What is the weather?
    A: clear  (score 1.00; also blue, white 0.00, silver, white 0.00)  in_domain=True

The model knows only SynthDrive's driving scenes (lights, signs, vehicles and their colours, pedestrians, weather,
time of day); with in_domain=False its answers are guesses. --mode generate writes a free answer instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("-q", "--question", action="append", required=True,
                        help="a question (repeat -q to ask several)")
    parser.add_argument("--mode", choices=("match", "generate"), default="match",
                        help="pick from the model's answer list (default) or generate a free answer")
    parser.add_argument("--top-k", type=int, default=3, help="answers shown per question in match mode (3)")
    args = parser.parse_args()

    if not args.image.is_file():
        parser.error(f"image {str(args.image)!r} does not exist or is not a file")
    if any(not q.strip() for q in args.question):
        parser.error("a question is empty; ask something about the image")
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")

    from shusheng.uniperceiver import VQAPipeline

    try:
        pipe = VQAPipeline.from_pretrained()  # the bundled model
        # one call: the image once per question (it is decoded once per question, which is cheap)
        out = pipe([str(args.image)] * len(args.question), args.question, mode=args.mode, top_k=args.top_k)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out.errors[0] is not None:
        print(f"error: {out.errors[0]}", file=sys.stderr)
        return 1
    for question, answer, score, top in zip(args.question, out.answers, out.scores, out.top_k):
        also = ", ".join(f"{a} {p:.2f}" for a, p in top[1:])
        print(f"Q: {question}")
        print(f"A: {answer}  (score {score:.2f}{'; also ' + also if also else ''})  in_domain={out.in_domain[0]}")
    if not out.in_domain[0]:
        print("warning: this image does not look like a SynthDrive driving scene; treat the answers as guesses",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
