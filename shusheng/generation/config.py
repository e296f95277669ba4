"""The data of text-to-image generation: scheduler names, the default UNet, the bundled model's name.

Nothing here imports diffusers at module level: :mod:`shusheng.generation` stays light to import, and the PNG
parameters (:mod:`shusheng.generation.png`) read sampler names from this table without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BUNDLED_MODEL", "DEFAULT_GUIDANCE", "DEFAULT_TEXT_ENCODER", "SAMPLER_LABELS", "SCHEDULERS", "TRAIN_COMMAND", "UNetConfig",
           "make_scheduler", "make_unet", "scheduler_name"]

#: the bundled pipeline (``shusheng/weights/shusheng-mini-t2i``), trained by ``shusheng train t2i``
BUNDLED_MODEL = "shusheng-mini-t2i"
TRAIN_COMMAND = "shusheng train t2i --output runs/t2i"

#: the text encoder a pipeline references by default: frozen all-MiniLM-L6-v2 through :mod:`shusheng.text_encoders`
#: (its token-level last hidden states, 384-d, are the UNet's cross-attention context)
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"

#: the guidance scale of a pipeline folder that names none (``default_guidance`` in its ``model_index.json``)
DEFAULT_GUIDANCE = 5.0

#: scheduler name -> diffusers class name (every one is built from the pipeline's saved scheduler config)
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), deterministic
    "euler": "EulerDiscreteScheduler",
    "ddpm": "DDPMScheduler",  # ancestral: draws noise at every step (from each image's own generator)
}

#: scheduler name -> the ``Sampler:`` label of AUTOMATIC1111's parameters text (read back case-insensitively)
SAMPLER_LABELS: dict[str, str] = {"ddim": "DDIM", "dpm": "DPM++ 2M", "euler": "Euler", "ddpm": "DDPM"}


def make_scheduler(name: str, config: Any):
    """Scheduler ``name`` (one of :data:`SCHEDULERS`) built from another scheduler's ``config`` (its betas,
    prediction type, timestep spacing, ...).

    Raises:
        ValueError: ``name`` is not one of :data:`SCHEDULERS` (the message lists them).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    from shusheng._deps import require

    diffusers = require("diffusers", extra="t2i")

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def scheduler_name(scheduler: Any) -> str:
    """The :data:`SCHEDULERS` name of a scheduler object, or its class name when it is none of them."""
    cls = type(scheduler).__name__
    return next((k for k, v in SCHEDULERS.items() if v == cls), cls)


@dataclass
class UNetConfig:
    """A conditional UNet (diffusers ``UNet2DConditionModel``) as a few knobs.

    The defaults (4.6M parameters, 0.43 GFLOP per 64x64 image and step) keep the full-resolution levels narrow
    and put attention at 16x16 and below, so that 20 DDIM steps with classifier-free guidance stay cheap on a
    CPU (docs/generation.md has the figures).

    Args:
        sample_size: side of the UNet's input (pixels in pixel space, latents otherwise).
        in_channels: 3 in pixel space, the VAE's latent channels otherwise (the output has as many).
        block_out_channels: channels per resolution level (each level after the first halves the side).
        layers_per_block: ResNet blocks per level on the way down (one more on the way up).
        attention_heads: heads of every attention layer (diffusers' ``attention_head_dim`` of this UNet, a
            historical misnomer for the number of heads).
        cross_attention_levels: how many of the lowest-resolution levels have self- and cross-attention to the
            text (the middle block always has); the others are plain ResNet levels.
        cross_attention_dim: width of the text context (384 = MiniLM's hidden size).
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
    """

    sample_size: int = 64
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    cross_attention_levels: int = 3
    cross_attention_dim: int = 384
    norm_num_groups: int = 4

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        if n < 1 or not 0 <= self.cross_attention_levels <= n:
            raise ValueError(f"cross_attention_levels must be in [0, {n}], got {self.cross_attention_levels}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                             f"entry {self.block_out_channels}")
        if self.sample_size % 2 ** (n - 1):
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of the UNet's downsampling "
                             f"factor {2 ** (n - 1)}")

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The ``UNet2DConditionModel(**kwargs)`` of this config."""
        n = len(self.block_out_channels)
        attn = [i >= n - self.cross_attention_levels for i in range(n)]
        return dict(sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.in_channels,
                    block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                    up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                    attention_head_dim=self.attention_heads, cross_attention_dim=self.cross_attention_dim,
                    norm_num_groups=self.norm_num_groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_unet(config: UNetConfig | dict[str, Any] | None = None):
    """A randomly initialised ``UNet2DConditionModel`` of ``config`` (a :class:`UNetConfig` or its dict; None =
    the defaults)."""
    from shusheng._deps import require

    diffusers = require("diffusers", extra="t2i")
    if config is None:
        config = UNetConfig()
    elif isinstance(config, dict):
        config = UNetConfig(**config)
    return diffusers.UNet2DConditionModel(**config.diffusers_kwargs())
