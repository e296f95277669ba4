"""Registry of the bundled pretrained models: one folder per model under ``shusheng/weights/<name>/`` holding
``config.json`` (constructor arguments and preprocessing), the safetensors weights and ``MODEL_CARD.md`` (data
seed and size, command, steps, wall time, metrics). Every folder is reproducible with ``shusheng train ...``.

    >>> from shusheng.weights import bundled_path, list_bundled
    >>> list_bundled()
    ['shusheng-mini-clip', 'shusheng-mini-uniperceiver']
    >>> bundled_path("shusheng-mini-clip")       # Path to the folder; raises if it is missing
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TRAIN_COMMANDS", "BundledWeightsNotFound", "bundled_path", "list_bundled"]

_ROOT = Path(__file__).resolve().parent

#: bundled model name -> the command that trains it and writes its folder
TRAIN_COMMANDS: dict[str, str] = {
    "shusheng-mini-clip": "shusheng train clip --export-dir shusheng/weights/shusheng-mini-clip",
    "shusheng-mini-uniperceiver": "shusheng train uniperceiver (the stages and exact flags are in "
                                  "shusheng/weights/shusheng-mini-uniperceiver/MODEL_CARD.md)",
    "shusheng-mini-bridge": "shusheng train bridge --output runs/bridge (see docs/llm.md); then copy "
                            "runs/bridge/final to shusheng/weights/shusheng-mini-bridge",
}


class BundledWeightsNotFound(FileNotFoundError):
    """A bundled model's folder is missing or incomplete; the message names the command that trains it."""


def list_bundled() -> list[str]:
    """Names of the bundled models present in this installation (folders with a ``config.json``)."""
    return sorted(p.name for p in _ROOT.iterdir() if p.is_dir() and (p / "config.json").is_file())


def bundled_path(name: str) -> Path:
    """The folder of bundled model ``name``.

    Raises:
        BundledWeightsNotFound: the folder (or its ``config.json``) does not exist. The message says how to
            train the model, or lists the models that are bundled when ``name`` is unknown.
    """
    folder = _ROOT / name
    if (folder / "config.json").is_file():
        return folder
    if name in TRAIN_COMMANDS:
        raise BundledWeightsNotFound(
            f"the bundled weights of {name!r} are missing ({folder} has no config.json); train them with: "
            f"{TRAIN_COMMANDS[name]}")
    raise BundledWeightsNotFound(
        f"no bundled model named {name!r}; bundled here: {list_bundled() or 'none'}; known: {sorted(TRAIN_COMMANDS)}")
