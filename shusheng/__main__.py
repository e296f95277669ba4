"""``python -m shusheng`` runs the command-line interface."""

from shusheng.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
