"""``shusheng eval TASK`` (registered separately from ``train`` so each command has its own help)."""

from shusheng.train.cli import add_eval_arguments as add_arguments
from shusheng.train.cli import run

__all__ = ["add_arguments", "run"]
