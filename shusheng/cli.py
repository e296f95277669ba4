"""The ``shusheng`` command line: one table of every command (``shusheng --help`` lists them).

Each command lives in the subpackage that owns it. :data:`COMMANDS` maps a command name to

* ``Command(module, help, add="add_arguments", run="run")``: the module exposes ``add(parser)`` (declares the
  arguments) and ``run(args) -> int`` (the exit status). A module serving several commands names its functions,
  e.g. ``Command("shusheng.uniperceiver.cli", help, add="add_ask_arguments", run="run_ask")``;
* ``Group(help, {name: Command, ...})``: a command with sub-commands (``shusheng train clip``), the sub-command
  stored in ``args.task``.

The first two fields of a :class:`Command` are ``(module, help)``, the shape of design.md's table. Register a new
command by adding one entry. Command modules import heavy libraries (torch, FAISS, Gradio) inside ``run`` only;
on top of that, :func:`main` imports only the module of the command being run, so ``shusheng --help`` and
``shusheng train --help`` import no command module at all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["COMMANDS", "Command", "Group", "build_parser", "main", "resolve"]


class Command(NamedTuple):
    """A command: ``module.add(parser)`` declares its arguments, ``module.run(args) -> int`` runs it."""

    module: str
    help: str
    add: str = "add_arguments"
    run: str = "run"


class Group(NamedTuple):
    """A command made of sub-commands (``shusheng train TASK``); the chosen one is ``args.task``."""

    help: str
    commands: dict[str, Command]
    metavar: str = "TASK"


#: command name -> Command or Group, in the order ``shusheng --help`` lists them
COMMANDS: dict[str, Command | Group] = {
    "ops": Command("shusheng.ops.cli", "DCNv3 operator: list backends and run their self-test against the reference"),
    "data": Command("shusheng.data.cli",
                    "datasets: generate SynthDrive driving scenes (images, captions, QA, boxes, masks)"),
    "train": Group("train a model (classify, ...)", {
        "classify": Command("shusheng.train.classify", "image classification on an ImageFolder",
                            add="add_train_arguments", run="run_train"),
        "clip": Command("shusheng.train.clip", "shusheng-mini-clip image-text embedder on SynthDrive",
                        add="add_train_arguments", run="run_train"),
        "uniperceiver": Command("shusheng.train.uniperceiver",
                                "unified decoder (caption, VQA, retrieval, classification) on SynthDrive",
                                add="add_train_arguments", run="run_train"),
        "bridge": Command("shusheng.train.bridge",
                          "LLM bridge projector (+ LoRA on the LM with --lora-rank): SynthDrive captions, then QA",
                          add="add_train_arguments", run="run_train"),
        "t2i": Command("shusheng.train.t2i",
                       "text-to-image UNet (diffusers; + optional small VAE) on SynthDrive captions, MiniLM text",
                       add="add_train_arguments", run="run_train"),
        "detect": Command("shusheng.train.detect",
                          "box / instance-mask detector (Mask R-CNN or FCOS on InternImage) on SynthDrive scenes",
                          add="add_train_arguments", run="run_train"),
        "segment": Command("shusheng.train.segment",
                           "semantic segmenter (UperNet on InternImage) on SynthDrive scenes",
                           add="add_train_arguments", run="run_train"),
        "colors": Command("shusheng.train.colors",
                          "fit a Mask R-CNN detector's vehicle-colour head and store it with its weights",
                          add="add_train_arguments", run="run_train"),
        "answer-types": Command("shusheng.train.answer_types",
                                "fit a unified decoder's answer-type head (answers in the form asked) on the "
                                "SynthDrive question grid and store it with its weights",
                                add="add_train_arguments", run="run_train"),
        "domain-check": Command("shusheng.train.domain",
                                "fit the in-domain check of a trained model and store it with its weights",
                                add="add_train_arguments", run="run_train"),
    }),
    "eval": Group("evaluate a trained model (classify, ...)", {
        "classify": Command("shusheng.train.classify", "top-1/top-5 of a saved classifier",
                            add="add_eval_arguments", run="run_eval"),
    }),
    "caption": Command("shusheng.uniperceiver.cli", "caption images with the unified decoder (--json for a list)",
                       add="add_caption_arguments", run="run_caption"),
    "ask": Command("shusheng.uniperceiver.cli", "ask a question about images (VQA with the unified decoder)",
                   add="add_ask_arguments", run="run_ask"),
    "chat": Command("shusheng.llm.cli",
                    "chat about images with a trained LLM bridge (streamed; --json for a list, with grounding)"),
    "generate": Command("shusheng.generation.cli",
                        "generate images from a text prompt (PNG with its parameters; --from-png makes one again)"),
    "detect": Command("shusheng.detection.cli",
                      "detect objects and instance masks in images (bundled shusheng-mini-det or --model DIR)"),
    "segment": Command("shusheng.detection.cli",
                       "semantic segmentation of images: class-id and overlay PNGs (--json for class shares)",
                       add="add_segment_arguments", run="run_segment"),
    "index": Command("shusheng.retrieval_index.cli",
                     "index image folders for text/image search (incremental, crash-safe)"),
    "search": Command("shusheng.retrieval_index.cli", "search an image index by text and/or image, with scores",
                      add="add_search_arguments", run="run_search"),
    "export": Command("shusheng.deploy.cli", "export a model to checked ONNX / int8 ONNX / TensorRT for deployment"),
    "demo": Command("shusheng.apps.demo",
                    "launch the Gradio app (image-text search) on a sample collection at 127.0.0.1"),
}


def resolve(command: Command) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(add_arguments, run)`` of a table entry (imports its module)."""
    module = importlib.import_module(command.module)
    return getattr(module, command.add), getattr(module, command.run)


def _chosen(argv: Sequence[str]) -> int | None:
    """Index in ``argv`` of the first word that is not an option: the command (or sub-command) named. The
    options before it (``-v``, ``--version``, ``-h``) take no value."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            return i
    return None


def _add_commands(sub, table: dict[str, Command | Group], argv: Sequence[str] | None) -> None:
    """Adds one sub-parser per entry. With ``argv``, only the entry it names gets its arguments (and imports its
    module); the others carry just their one-line help, which is all a listing shows."""
    i = _chosen(argv) if argv is not None else None
    chosen = argv[i] if i is not None else None
    for name, entry in table.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        if argv is not None and name != chosen:
            continue
        rest = None if argv is None else argv[i + 1:]
        if isinstance(entry, Group):
            _add_commands(p.add_subparsers(dest="task", metavar=entry.metavar, required=True), entry.commands, rest)
        else:
            add_arguments, _ = resolve(entry)
            add_arguments(p)
            p.set_defaults(_command=entry)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``shusheng`` parser: every command fully built, or with ``argv`` only the command it names (the
    others are listed but not built, so that their modules are not imported)."""
    from shusheng import __version__

    parser = argparse.ArgumentParser(prog="shusheng", description="Shusheng multimodal vision suite")
    parser.add_argument("--version", action="version", version=f"shusheng {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_commands(parser.add_subparsers(dest="command", metavar="COMMAND"), COMMANDS,
                  None if argv is None else list(argv))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shusheng`` console script (also ``python -m shusheng``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    _, run = resolve(args._command)
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
