"""Chat about one image with a trained LLM bridge (image tower -> projector -> a small chat LM), answers streamed.

    shusheng train bridge --output runs/bridge --lora-rank 8 --qa-turns 8       # no bridge is bundled yet
    shusheng data synthdrive --split val --n 8 --out /tmp/scenes --no-masks --quiet   # 8 scenes to try it on
    python demos/chat_image.py /tmp/scenes/images/000003.png --model runs/bridge/final \\
        -q "Describe the scene." -q "What is the weather?" -q "And the time of day?"

The questions are one conversation: each is asked with the earlier questions and answers before it, so a
follow-up may refer back. Every answer is printed as the LM writes it (the format; the answers depend on the
bridge):

    Q: Describe the scene.
    A: A night street scene in the rain with a red car and a white bus.
    Q: What is the weather?
    A: rain
    Q: And the time of day?
    A: night

Without -q it reads the questions from the terminal, one per line, until an empty line or end of input. No
bridge is bundled with this version (the first one trained answers worse than a question-only prior, see
docs/llm.md), so --model is required: the folder `shusheng train bridge` writes (<output>/final). --lm says where
the bridge's LM is when it has moved. `shusheng chat` also checks answers against the bundled object detector.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NO_BRIDGE = ("--model is required: no LLM bridge is bundled with this version. Train one with `shusheng train "
             "bridge --output runs/bridge` (see docs/llm.md) and pass --model runs/bridge/final")


def questions_from_terminal():
    """Questions typed one per line, until an empty line or end of input."""
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("--model", type=Path, default=None, help="trained bridge folder (required: none is bundled)")
    parser.add_argument("-q", "--question", action="append", default=None,
                        help="a question (repeat -q for a conversation; default: read them from the terminal)")
    parser.add_argument("--lm", default=None, help="where the bridge's LM is, if not where its config.json says")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest answer in tokens (96)")
    args = parser.parse_args()

    if args.model is None:
        from shusheng.weights import BundledWeightsNotFound, bundled_path

        try:
            args.model = bundled_path("shusheng-mini-bridge")  # used once a later version bundles one
        except BundledWeightsNotFound:
            parser.error(NO_BRIDGE)
    if not args.model.is_dir():
        parser.error(f"model folder {str(args.model)!r} does not exist or is not a folder")
    if not args.image.is_file():
        parser.error(f"image {str(args.image)!r} does not exist or is not a file")
    if args.question is not None and any(not q.strip() for q in args.question):
        parser.error("a question is empty; ask something about the image")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")

    from shusheng.data import ImageLoadError, load_image

    try:
        image = load_image(args.image)  # RGB, EXIF orientation applied; decoded before the model loads
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        import transformers

        from shusheng.llm import ChatPipeline

        transformers.utils.logging.disable_progress_bar()  # the LM's loading bar is noise here
        chat = ChatPipeline.from_pretrained(args.model, lm=args.lm)  # the LM is loaded from the bridge's reference
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    conversation: list[dict[str, str]] = []  # the whole chat so far: the image goes into its first message
    in_domain = True
    for question in args.question or questions_from_terminal():
        conversation.append({"role": "user", "content": question})
        print(f"Q: {question}\nA: ", end="", flush=True)
        parts = []
        try:
            for piece in chat.stream([[image]], [conversation], max_new_tokens=args.max_tokens):
                print(piece.text, end="", flush=True)
                parts.append(piece.text)
                if piece.finish_reason is not None:
                    in_domain = in_domain and piece.in_domain is not False
        except ValueError as e:  # the conversation outgrew the LM's positions
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C ends the chat
            print("\n[interrupted]", file=sys.stderr)
            return 130
        print()
        conversation.append({"role": "assistant", "content": "".join(parts)})
    if not in_domain:
        print("warning: this image does not look like the scenes the bridge was trained on; treat the answers as "
              "guesses", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
