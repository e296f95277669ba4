"""Registry of the bundled pretrained models: one folder per model under ``shusheng/weights/<name>/`` holding
its index file, the safetensors weights and ``MODEL_CARD.md`` (data seed and size, command, steps, wall time,
metrics). The index file is ``config.json`` (constructor arguments and preprocessing, :mod:`shusheng.modeling`)
for the project's own models, ``model_index.json`` (its components, one sub-folder each) for a diffusers pipeline
folder such as ``shusheng-mini-t2i``. Every folder is reproducible with ``shusheng train ...``.

    >>> from shusheng.weights import bundled_path, list_bundled
    >>> list_bundled()
    ['shusheng-mini-clip', 'shusheng-mini-uniperceiver']
    >>> bundled_path("shusheng-mini-clip")       # Path to the folder; raises if it is missing
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["INDEX_FILES", "TRAIN_COMMANDS", "BundledWeightsNotFound", "bundled_path", "list_bundled"]

_ROOT = Path(__file__).resolve().parent
#: the files that make a folder a bundled model: a ``config.json`` of :mod:`shusheng.modeling`, or the
#: ``model_index.json`` of a diffusers pipeline folder
INDEX_FILES = ("config.json", "model_index.json")

#: bundled model name -> the command that trains it and writes its folder
TRAIN_COMMANDS: dict[str, str] = {
    "shusheng-mini-clip": "shusheng train clip --export-dir shusheng/weights/shusheng-mini-clip",
    "shusheng-mini-uniperceiver": "shusheng train uniperceiver (the stages and exact flags are in "
                                  "shusheng/weights/shusheng-mini-uniperceiver/MODEL_CARD.md)",
    "shusheng-mini-bridge": "shusheng train bridge --output runs/bridge (see docs/llm.md); then copy "
                            "runs/bridge/final to shusheng/weights/shusheng-mini-bridge",
    "shusheng-mini-t2i": "shusheng train t2i --output runs/t2i (see docs/generation.md); then copy runs/t2i/final "
                         "to shusheng/weights/shusheng-mini-t2i",
    "shusheng-mini-det": "shusheng train detect --output runs/det/maskrcnn (see docs/detection.md); then copy "
                         "runs/det/maskrcnn/final to shusheng/weights/shusheng-mini-det",
    "shusheng-mini-det-fcos": "shusheng train detect --output runs/det/fcos_lite --head fcos --anchor-scale 1 "
                              "--backbone-indices 1,2,3 --head-convs 1 --topk-candidates 100 (see "
                              "shusheng/weights/shusheng-mini-det-fcos/MODEL_CARD.md for the exact schedule); then "
                              "copy runs/det/fcos_lite/final to shusheng/weights/shusheng-mini-det-fcos",
    "shusheng-mini-seg": "shusheng train segment --output runs/seg (see docs/detection.md); then copy runs/seg/final "
                         "to shusheng/weights/shusheng-mini-seg",
}


class BundledWeightsNotFound(FileNotFoundError):
    """A bundled model's folder is missing or incomplete; the message names the command that trains it."""


def _is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in INDEX_FILES)


def list_bundled() -> list[str]:
    """Names of the bundled models present in this installation (folders with a ``config.json`` or a
    ``model_index.json``)."""
    return sorted(p.name for p in _ROOT.iterdir() if _is_model_folder(p))


def bundled_path(name: str) -> Path:
    """The folder of bundled model ``name``.

    Raises:
        BundledWeightsNotFound: the folder does not exist or has neither a ``config.json`` nor a
            ``model_index.json``. The message says how to train the model, or lists the models that are bundled
            when ``name`` is unknown.
    """
    folder = _ROOT / name
    if _is_model_folder(folder):
        return folder
    if name in TRAIN_COMMANDS:
        raise BundledWeightsNotFound(
            f"the bundled weights of {name!r} are missing ({folder} has neither config.json nor "
            f"model_index.json); train them with: {TRAIN_COMMANDS[name]}")
    raise BundledWeightsNotFound(
        f"no bundled model named {name!r}; bundled here: {list_bundled() or 'none'}; known: {sorted(TRAIN_COMMANDS)}")
