"""``shusheng ask``: see :mod:`shusheng.uniperceiver.cli`."""

from shusheng.uniperceiver.cli import add_ask_arguments as add_arguments
from shusheng.uniperceiver.cli import run_ask as run

__all__ = ["add_arguments", "run"]
