"""Generation parameters in PNG files, in AUTOMATIC1111's ``parameters`` format, and safe PNG writing.

Every PNG that shusheng generates carries a ``parameters`` text chunk (tEXt; iTXt when the text is not Latin-1)
that other tools (AUTOMATIC1111's "PNG Info", ComfyUI, image viewers) read::

    a red car on a wet street at night
    Negative prompt: fog
    Steps: 20, Sampler: DDIM, CFG scale: 5.0, Seed: 123, Size: 64x64, Model hash: 3f2a9c01de, Model: shusheng-mini-t2i

The prompt is every line before the ``Negative prompt:`` line (or before the settings line when there is no
negative prompt), so commas, colons and line breaks inside the prompt are kept; the settings line is the last line
that starts with ``Steps:``. A setting whose value holds a comma, colon or quote is written JSON-quoted, as
AUTOMATIC1111 does. ``Size`` is ``WIDTHxHEIGHT`` (AUTOMATIC1111's order). Limits of the format: a prompt line
that starts with ``Negative prompt:`` cannot be told from the negative prompt, and a negative prompt's last line
must not start with ``Steps:``.

    >>> from shusheng.generation.png import GenerationParameters, read_parameters
    >>> p = GenerationParameters("a bus, at dusk", seed=7, width=64, height=64)
    >>> GenerationParameters.from_text(p.to_text()) == p
    True
    >>> read_parameters("generated/a-bus-at-dusk-7.png").seed
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shusheng.generation.config import SAMPLER_LABELS

__all__ = ["PARAMETERS_KEY", "GenerationParameters", "prompt_slug", "read_parameters", "save_png", "unique_path"]

#: the PNG text key (AUTOMATIC1111's)
PARAMETERS_KEY = "parameters"

_NEGATIVE = "Negative prompt:"
_SETTINGS = "Steps:"
# "Key: value," pairs of the settings line; a value is JSON-quoted or runs to the next comma
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_LABEL_TO_NAME = {v.lower(): k for k, v in SAMPLER_LABELS.items()}


def _quote(value: Any) -> str:
    s = str(value)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ',:"\n') else s


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


@dataclass
class GenerationParameters:
    """What made one image: enough to make it again with the same model.

    Attributes:
        prompt: the prompt.
        negative_prompt: the negative prompt ("" = unconditional, written as no ``Negative prompt:`` line).
        steps: denoising steps requested.
        sampler: the scheduler's name (``"ddim"``, ``"dpm"``, ``"euler"``, ``"ddpm"``; written as its
            AUTOMATIC1111 label, e.g. ``DPM++ 2M``); another label read from a file is kept as written.
        cfg_scale: the classifier-free guidance scale.
        seed: the seed of the image's initial noise (None when the caller's own generator made it).
        width, height: the image size in pixels.
        model: the model's name; model_hash: the first 10 hex digits of a SHA-256 of its UNet weights.
        extra: any other settings (``Stopped at`` for an interrupted image; unknown keys read from a file).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "ddim"
    cfg_scale: float = 5.0
    seed: int | None = None
    width: int = 64
    height: int = 64
    model: str | None = None
    model_hash: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """The AUTOMATIC1111 ``parameters`` text (see the module docstring)."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{_NEGATIVE} {self.negative_prompt}")
        settings: list[tuple[str, Any]] = [("Steps", self.steps), ("Sampler", SAMPLER_LABELS.get(self.sampler,
                                                                                                 self.sampler)),
                                           ("CFG scale", float(self.cfg_scale))]
        if self.seed is not None:
            settings.append(("Seed", int(self.seed)))
        settings.append(("Size", f"{self.width}x{self.height}"))
        if self.model_hash:
            settings.append(("Model hash", self.model_hash))
        if self.model:
            settings.append(("Model", self.model))
        settings += list(self.extra.items())
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in settings))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse a ``parameters`` text (ours or AUTOMATIC1111's).

        Raises:
            ValueError: there is no settings line (a line starting with ``Steps:``), or ``Steps``, ``CFG scale``,
                ``Seed`` or ``Size`` cannot be read.
        """
        lines = text.replace("\r\n", "\n").strip("\n").split("\n")
        at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(_SETTINGS)), None)
        if at is None:
            raise ValueError("not a generation parameters text: no line starts with 'Steps:'")
        head = lines[:at]
        neg_at = next((i for i, line in enumerate(head) if line.startswith(_NEGATIVE)), len(head))
        prompt = "\n".join(head[:neg_at])
        negative = "\n".join(head[neg_at:])[len(_NEGATIVE):].strip() if neg_at < len(head) else ""
        settings = {k.strip(): _unquote(v) for k, v in _PAIR.findall(lines[at])}
        try:
            steps = int(settings.pop("Steps"))
            cfg_scale = float(settings.pop("CFG scale", 5.0))
            seed = settings.pop("Seed", None)
            seed = None if seed is None else int(seed)
            width, height = 64, 64
            if "Size" in settings:
                width, height = (int(v) for v in settings.pop("Size").lower().split("x"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"unreadable generation settings {lines[at]!r}: {e}") from e
        label = settings.pop("Sampler", SAMPLER_LABELS["ddim"])
        return cls(prompt=prompt, negative_prompt=negative, steps=steps,
                   sampler=_LABEL_TO_NAME.get(label.lower(), label), cfg_scale=cfg_scale, seed=seed,
                   width=width, height=height, model=settings.pop("Model", None),
                   model_hash=settings.pop("Model hash", None), extra=settings)


def read_parameters(path: str | os.PathLike) -> GenerationParameters:
    """The generation parameters stored in a PNG file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PNG with a ``parameters`` text, or the text cannot be parsed.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(PARAMETERS_KEY)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from e
    if text is None:
        raise ValueError(f"{path} holds no '{PARAMETERS_KEY}' text: it was not written by shusheng generate (or "
                         "the metadata was stripped)")
    return GenerationParameters.from_text(text)


def unique_path(directory: str | os.PathLike, stem: str, suffix: str = ".png") -> Path:
    """``directory/stem.suffix``, or ``stem-1``, ``stem-2``, ... when taken (a name free at the time of the
    call; :func:`save_png` claims it without overwriting)."""
    directory = Path(directory)
    for i in range(1_000_000):
        p = directory / (f"{stem}{suffix}" if i == 0 else f"{stem}-{i}{suffix}")
        if not os.path.lexists(p):
            return p
    raise FileExistsError(f"no free name for {stem}{suffix} in {directory}")


def save_png(image, directory: str | os.PathLike, stem: str, parameters: GenerationParameters | str | None = None
             ) -> Path:
    """Write ``image`` (a PIL image) as ``directory/stem.png`` with the ``parameters`` text, atomically and never
    over an existing file: it is written to a temporary file in ``directory`` first, then linked to the first
    free name (``stem-1.png``, ... when taken), so a crash leaves no half-written PNG and concurrent writers
    never replace each other's files.

    Returns:
        the path written.
    """
    from PIL.PngImagePlugin import PngInfo

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters if isinstance(parameters, str) else parameters.to_text())
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        while True:
            target = unique_path(directory, stem)
            try:
                os.link(tmp, target)  # fails if the name was taken meanwhile: never overwrites
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: rename (the name was free a moment ago)
                if os.path.lexists(target):
                    continue
                os.replace(tmp, target)
            return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prompt_slug(prompt: str) -> str:
    """The file-name stem of a prompt's images: lower-case ASCII letters, digits and ``-``, at most 40
    characters (``"image"`` when nothing is left)."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "image"
