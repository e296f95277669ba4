"""The ``shusheng`` command line.

Each command lives in the subpackage that owns it, in a module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Those modules must import heavy libraries inside ``run`` only, so that ``shusheng --help``
stays fast. Register a new command by adding one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ops": ("shusheng.ops.cli", "DCNv3 operator: list backends and run their self-test against the reference"),
    "data": ("shusheng.data.cli", "datasets: generate SynthDrive driving scenes (images, captions, QA, boxes, masks)"),
    "train": ("shusheng.train.cli", "train a model (classify, ...)"),
    "eval": ("shusheng.train.eval_cli", "evaluate a trained model (classify, ...)"),
    "caption": ("shusheng.uniperceiver.caption_cli", "caption images with the unified decoder (--json for a list)"),
    "ask": ("shusheng.uniperceiver.ask_cli", "ask a question about images (VQA with the unified decoder)"),
    "index": ("shusheng.retrieval_index.cli", "index image folders for text/image search (incremental, crash-safe)"),
    "search": ("shusheng.retrieval_index.search_cli", "search an image index by text and/or image, with scores"),
    "demo": ("shusheng.apps.demo", "launch the Gradio app (image-text search) on a sample collection at 127.0.0.1"),
}


def build_parser() -> argparse.ArgumentParser:
    from shusheng import __version__

    parser = argparse.ArgumentParser(prog="shusheng", description="Shusheng multimodal vision suite")
    parser.add_argument("--version", action="version", version=f"shusheng {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shusheng`` console script (also ``python -m shusheng``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
