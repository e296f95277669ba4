"""``shusheng train TASK`` and ``shusheng eval TASK``: each task module supplies its arguments and runner."""

from __future__ import annotations

import argparse
import importlib

# task -> (module, add-arguments function, run function, help)
TRAIN_TASKS = {
    "classify": ("shusheng.train.classify", "add_train_arguments", "_run_train", "image classification on an ImageFolder"),
    "clip": ("shusheng.train.clip", "add_train_arguments", "_run_train", "shusheng-mini-clip image-text embedder on SynthDrive"),
    "uniperceiver": ("shusheng.train.uniperceiver", "add_train_arguments", "_run_train", "unified decoder (caption, VQA, retrieval, classification) on SynthDrive"),
}
EVAL_TASKS = {
    "classify": ("shusheng.train.classify", "add_eval_arguments", "run_eval", "top-1/top-5 of a saved classifier"),
}


def _add(parser: argparse.ArgumentParser, tasks: dict) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (module, add_fn, run_fn, help_text) in tasks.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add_fn)(p)
        p.set_defaults(_task=(module, run_fn))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, TRAIN_TASKS)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, EVAL_TASKS)


def run(args: argparse.Namespace) -> int:
    module, run_fn = args._task
    return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
