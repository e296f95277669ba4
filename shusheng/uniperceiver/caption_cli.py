"""``shusheng caption``: see :mod:`shusheng.uniperceiver.cli`."""

from shusheng.uniperceiver.cli import add_caption_arguments as add_arguments
from shusheng.uniperceiver.cli import run_caption as run

__all__ = ["add_arguments", "run"]
