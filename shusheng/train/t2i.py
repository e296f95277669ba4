"""Training of the text-to-image model (``shusheng train t2i``) on SynthDrive images and captions.

    shusheng train t2i --output runs/t2i                        # pixel space, 64x64, ~4.6M-parameter UNet
    shusheng train t2i --output runs/t2i --resume auto          # continue after an interruption
    shusheng train t2i --output runs/t2i-latent --latent        # a small VAE first, then the UNet on its latents
    python -m shusheng.train.t2i ...                            # same

The model is a conditional UNet (diffusers ``UNet2DConditionModel``, sized by ``--block-out-channels``,
``--layers-per-block``, ``--attention-heads``, ``--cross-attention-levels``) that cross-attends to the token-level
last hidden states of frozen all-MiniLM-L6-v2 (384-d; computed on the fly without gradients, padding masked out).
The objective is DDPM's with **v-prediction** (Salimans & Ho, 2022): the UNet predicts
``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` on a cosine noise schedule (``squaredcos_cap_v2``); v-prediction keeps the
target well scaled at both ends of the schedule, which matters for few-step DDIM sampling from a small model
(``--prediction-type epsilon`` is the classic alternative). Captions are replaced by ``""`` with probability
``--caption-dropout`` (0.1), which trains the unconditional branch of classifier-free guidance.

With ``--latent`` the same command first trains a small ``AutoencoderKL`` (``--vae-steps``; reconstruction MSE +
``--kl-weight`` KL, no perceptual or adversarial loss, so its decodings are soft), encodes every training image
once (the posterior mode, scaled to unit variance: the VAE's ``scaling_factor``) and then trains the UNet on the
latents. By default it works on pixels in ``[-1, 1]``.

AdamW with a linear warm-up and cosine decay (:mod:`shusheng.train._loop`), gradient clipping, and an exponential
moving average of the UNet's weights (decay ``--ema-decay`` at most, shortened for short runs by
``_loop.scaled_ema_decay``) that the samples, the validation loss and the saved model use. The batch of step ``t``
(images, caption choice and dropout, noise and timesteps) depends only on ``(seed, t)`` and the learning rate only
on ``t``, so a run resumed from a checkpoint (``--resume auto``: accelerate state of the UNet, the
optimiser (and the VAE), the EMA in ``ema.safetensors`` + ``progress.json``, every ``--save-every`` steps) follows the uninterrupted run exactly.
``--max-minutes`` stops (and saves) early.

Outputs: ``<output>/config.json``; ``samples/step_N.png`` every ``--sample-every`` steps and at the end (rows:
:data:`SAMPLE_PROMPTS`, columns: :data:`SAMPLE_SEEDS`, DDIM, EMA weights; ``samples/prompts.txt``);
``loss_curve.png``; ``metrics.json`` (with the loss history); and ``<output>/final``, a
:class:`~shusheng.generation.Text2ImagePipeline` folder (EMA UNet in fp16, DDIM scheduler, MiniLM by reference,
``metrics.json``, ``MODEL_CARD.md``) that ``shusheng generate --model <output>/final`` loads. The fixed SynthDrive
test split is refused as training data.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shusheng._deps import require
from shusheng.generation.config import BUNDLED_MODEL, DEFAULT_TEXT_ENCODER, UNetConfig
from shusheng.train import _loop

logger = logging.getLogger(__name__)

__all__ = ["SAMPLE_PROMPTS", "SAMPLE_SEEDS", "StepSampler", "T2ITrainConfig", "add_train_arguments", "main",
           "run_train", "train"]

#: the prompts of the sample grids (one row each): SynthDrive-style captions
SAMPLE_PROMPTS = ("A sunny city street with a red car and a blue bus.",
                  "A night roadway in heavy rain with one green bus and one yellow car; no people on foot.",
                  "A misty urban road in the evening with a stoplight showing red and a zebra crossing.",
                  "A daytime town street with two white cars; two pedestrians on the sidewalk.")
#: the seeds of the sample grids (one column each)
SAMPLE_SEEDS = (0, 1)


@dataclass
class T2ITrainConfig:
    """Every knob of a run; written to ``<output>/config.json``."""

    data_dir: str | None = None  # a folder written by `shusheng data synthdrive`; None = render n_train images
    n_train: int | None = None  # images used (default: all in data_dir; 4000 when rendering)
    image_size: int = 64
    output: str = "runs/t2i"
    model_name: str = BUNDLED_MODEL  # the name written into generated images' parameters
    # UNet (see shusheng.generation.UNetConfig)
    block_out_channels: tuple[int, ...] = UNetConfig.block_out_channels
    layers_per_block: int = UNetConfig.layers_per_block
    attention_heads: int = UNetConfig.attention_heads
    cross_attention_levels: int = UNetConfig.cross_attention_levels
    cross_attention_dim: int = UNetConfig.cross_attention_dim  # must equal the text encoder's width
    norm_num_groups: int = UNetConfig.norm_num_groups
    text_encoder: str = DEFAULT_TEXT_ENCODER  # frozen; a MiniLM alias or a local Hugging Face folder
    # diffusion
    prediction_type: str = "v_prediction"  # or "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    caption_dropout: float = 0.1  # caption -> "" (the unconditional branch of guidance)
    # latent space (a small VAE trained first in the same run)
    latent: bool = False
    vae_block_out_channels: tuple[int, ...] = (32, 64)  # one halving per extra level
    latent_channels: int = 4
    vae_steps: int = 2000
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # optimisation
    steps: int = 10000  # UNet steps (after the VAE's when --latent)
    batch_size: int = 16
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    ema_decay: float = 0.9999  # at most; shorter runs average over 5% of their steps (_loop.scaled_ema_decay)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto", a checkpoint dir, or None
    max_minutes: float | None = None  # stop (and save) after this much training time
    sample_every: int = 1000  # sample grid every N UNet steps (0 = only at the end)
    sample_steps: int = 20
    sample_guidance: float = 5.0
    n_val: int = 64  # SynthDrive validation scenes of the final validation loss (0 = none)
    log_every: int = 50
    threads: int = 0  # torch.set_num_threads (0 = torch's default)

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.vae_block_out_channels = tuple(int(c) for c in self.vae_block_out_channels)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.steps < 1 or (self.latent and self.vae_steps < 1):
            raise ValueError("steps (and vae_steps with --latent) must be >= 1")

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1) if self.latent else 1

    @property
    def first_unet_step(self) -> int:
        """Global step at which the UNet starts (after the VAE's steps)."""
        return self.vae_steps if self.latent else 0

    @property
    def total_steps(self) -> int:
        return self.first_unet_step + self.steps

    def unet_config(self) -> UNetConfig:
        """The UNet of this run (raises a ValueError for sizes that do not fit together)."""
        if self.image_size % self.vae_factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's factor {self.vae_factor}")
        return UNetConfig(sample_size=self.image_size // self.vae_factor,
                          in_channels=self.latent_channels if self.latent else 3,
                          block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                          attention_heads=self.attention_heads, cross_attention_levels=self.cross_attention_levels,
                          cross_attention_dim=self.cross_attention_dim, norm_num_groups=self.norm_num_groups)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

class StepSampler:
    """The batch of step ``t`` as a pure function of ``(seed, t)`` (exact resume without data-loader state):
    image indices (a permutation per epoch), one caption per image (or ``""`` with probability
    ``caption_dropout``) and the seed of the step's noise and timesteps."""

    def __init__(self, captions: list[list[str]], cfg: T2ITrainConfig):
        self.captions, self.cfg = captions, cfg
        self.n = len(captions)
        self.b = min(cfg.batch_size, self.n)
        self.per_epoch = max(1, self.n // self.b)

    def __call__(self, step: int) -> tuple[list[int], list[str], int]:
        """``(image indices, captions, noise seed)`` of global step ``step``."""
        epoch, k = divmod(step, self.per_epoch)
        idx = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)[k * self.b:(k + 1) * self.b]
        rng = np.random.default_rng([self.cfg.seed, 7_919, step])
        caps = []
        for i in idx:
            options = self.captions[i]
            drop = rng.random() < self.cfg.caption_dropout
            pick = options[int(rng.integers(len(options)))]
            caps.append("" if drop else pick)
        return idx.tolist(), caps, int(rng.integers(2**63 - 1))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, S, S, 3)`` → float ``(n, 3, S, S)`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------

def build_vae(cfg: T2ITrainConfig):
    """The small ``AutoencoderKL`` of ``--latent`` (random)."""
    diffusers = require("diffusers", extra="t2i")
    ch = cfg.vae_block_out_channels
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                                   up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch,
                                   layers_per_block=1, latent_channels=cfg.latent_channels,
                                   norm_num_groups=min(32, math.gcd(*ch)), sample_size=cfg.image_size)


class VAELoss(nn.Module):
    """``x`` → (reconstruction MSE, KL to N(0, I) per element): the VAE stage's forward, one module so that
    accelerate (and DDP) wrap it like any model."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        rec = self.vae.decode(z).sample
        return F.mse_loss(rec, x), posterior.kl().mean() / z[0].numel()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Every image's posterior mode ``(n, C, h, w)`` scaled to unit variance, and that scale (the VAE's
    ``scaling_factor``)."""
    device = next(vae.parameters()).device
    out = torch.cat([vae.encode(to_pixels(images[s:s + batch_size]).to(device)).latent_dist.mode().cpu()
                     for s in range(0, len(images), batch_size)])
    scale = float(1.0 / out.std().clamp(min=1e-6))
    return out * scale, scale


def make_noise_scheduler(cfg: T2ITrainConfig):
    """The training scheduler (DDPM); the saved pipeline gets a DDIM scheduler from its config."""
    diffusers = require("diffusers", extra="t2i")
    return diffusers.DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                   prediction_type=cfg.prediction_type, timestep_spacing="trailing",
                                   clip_sample=not cfg.latent)


def diffusion_loss(unet, scheduler, x0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The denoising loss of a batch: noise and timesteps drawn from ``generator`` (on the CPU), MSE to the
    scheduler's target (``eps`` or ``v``)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    pred = unet(xt, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    return F.mse_loss(pred.float(), target.float())


def lr_at(step: int, cfg: T2ITrainConfig, stage: str) -> float:
    """Learning rate of the update after ``step`` (global) updates, per stage: linear warm-up, cosine decay to
    ``min_lr_ratio``."""
    if stage == "vae":
        base, t, n = cfg.vae_lr, step, cfg.vae_steps
    else:
        base, t, n = cfg.lr, step - cfg.first_unet_step, cfg.steps
    w = min(cfg.warmup_steps, max(0, n - 1))
    return base * _loop.warmup_cosine(max(0, t), w, decay_start=w, decay_steps=n - w, floor=cfg.min_lr_ratio,
                                      start=1 / (w + 1) if w else 1.0)


# --------------------------------------------------------------------------------------------------------
# Samples and validation
# --------------------------------------------------------------------------------------------------------

def make_pipeline(cfg: T2ITrainConfig, unet, noise_scheduler, text_encoder, tokenizer, vae=None):
    """A :class:`~shusheng.generation.Text2ImagePipeline` around the given modules (DDIM, MiniLM by reference)."""
    diffusers = require("diffusers", extra="t2i")
    from shusheng.generation.pipeline import Text2ImagePipeline

    return Text2ImagePipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(noise_scheduler.config),
                              text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                              text_encoder_ref=cfg.text_encoder, model_name=cfg.model_name)


def sample_grid(pipe, cfg: T2ITrainConfig, path: Path) -> None:
    """One row per :data:`SAMPLE_PROMPTS`, one column per :data:`SAMPLE_SEEDS`, to ``path`` (PNG)."""
    from PIL import Image

    seeds = [s for _ in SAMPLE_PROMPTS for s in SAMPLE_SEEDS]
    out = pipe(list(SAMPLE_PROMPTS), num_images_per_prompt=len(SAMPLE_SEEDS), seed=seeds,
               num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance, progress=False)
    s, pad, cols = cfg.image_size, 2, len(SAMPLE_SEEDS)
    grid = Image.new("RGB", (cols * (s + pad) + pad, len(SAMPLE_PROMPTS) * (s + pad) + pad), (255, 255, 255))
    for k, im in enumerate(out.images):
        r, c = divmod(k, cols)
        grid.paste(im, (pad + c * (s + pad), pad + r * (s + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


@torch.no_grad()
def validation_loss(unet, scheduler, x0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                    batch_size: int = 32) -> float:
    """The denoising loss on fixed data with fixed noise and timesteps (generator seed 0): comparable between
    steps and runs."""
    g = torch.Generator().manual_seed(0)
    losses = []
    for s in range(0, len(x0), batch_size):
        sl = slice(s, s + batch_size)
        losses.append(float(diffusion_loss(unet, scheduler, x0[sl], context[sl], mask[sl], g)) * len(x0[sl]))
    return sum(losses) / len(x0)


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------

def train(cfg: T2ITrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (also written to ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    from tqdm.auto import tqdm

    from shusheng.generation.config import make_unet
    from shusheng.generation.pipeline import encode_text, load_text_encoder
    from shusheng.train.uniperceiver import load_synthdrive

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unet_cfg = cfg.unet_config()
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    accelerate.utils.set_seed(cfg.seed)
    if acc.num_processes > cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is split between {acc.num_processes} processes: give at least "
                         "one image per process")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    text_encoder, tokenizer = load_text_encoder(cfg.text_encoder)
    text_encoder.to(acc.device)
    if text_encoder.config.hidden_size != cfg.cross_attention_dim:
        raise ValueError(f"--cross-attention-dim {cfg.cross_attention_dim} differs from the width of the text "
                         f"encoder {cfg.text_encoder!r} ({text_encoder.config.hidden_size})")
    n = cfg.n_train if cfg.n_train is not None or cfg.data_dir else 4000
    images, records = load_synthdrive(cfg.data_dir, n, cfg.image_size)
    sampler = StepSampler([r["captions"] for r in records], cfg)
    noise_scheduler = make_noise_scheduler(cfg)

    unet = make_unet(unet_cfg)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    ema_decay = _loop.scaled_ema_decay(cfg.steps, cfg.ema_decay)
    opt = torch.optim.AdamW(_loop.param_groups(unet, cfg.weight_decay), lr=cfg.lr)
    vae = build_vae(cfg) if cfg.latent else None
    if vae is not None:
        vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        unet, opt, vae_loss, vae_opt = acc.prepare(unet, opt, VAELoss(vae), vae_opt)
    else:
        unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    n_params = sum(p.numel() for p in ema.parameters())
    logger.info("UNet %.2fM parameters (%s space, %dx%d), text encoder %s frozen, EMA decay %.5f; %d training images",
                n_params / 1e6, "latent" if vae is not None else "pixel", unet_cfg.sample_size, unet_cfg.sample_size,
                cfg.text_encoder, ema_decay, len(records))

    step, history, elapsed, first_step, val_losses = 0, [], 0.0, 0, []
    prog = _loop.load_checkpoint(acc, out, cfg.resume, {"ema": ema})
    if prog is not None:
        step, history, elapsed = prog["step"], prog["history"], prog.get("elapsed", 0.0)
        val_losses, first_step = prog.get("val_losses", []), step
    latents = None  # the UNet's training data in latent space (made once the VAE is trained)

    def data(idx: list[int]) -> torch.Tensor:
        x = latents[idx] if latents is not None else to_pixels(images[idx])
        return x.to(acc.device)

    def pipeline():
        return make_pipeline(cfg, ema, noise_scheduler, text_encoder, tokenizer,
                             None if vae is None else acc.unwrap_model(vae_loss).vae)

    def save() -> None:
        _loop.save_checkpoint(acc, out, {"step": step, "history": history, "elapsed": elapsed,
                                         "val_losses": val_losses}, cfg.keep_checkpoints, {"ema": ema})
        if acc.is_main_process:
            _loop.plot_history(history, out / "loss_curve.png", title="text-to-image training")

    t_start, t_resume = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.total_steps, initial=step, desc="train", disable=not acc.is_main_process, mininterval=5)
    stopped_early = False
    while step < cfg.total_steps:
        stage = "vae" if step < cfg.first_unet_step else "unet"
        idx, captions, noise_seed = sampler(step)
        if acc.num_processes > 1:  # the step's batch is global: each process takes its share
            idx, captions = idx[acc.process_index::acc.num_processes], captions[acc.process_index::acc.num_processes]
        g = torch.Generator().manual_seed(noise_seed + acc.process_index)
        if stage == "vae":
            x = to_pixels(images[idx]).to(acc.device)
            rec, kl = vae_loss(x, g)
            loss = rec + cfg.kl_weight * kl
            _loop.set_lr(vae_opt, lr_at(step, cfg, "vae"))
            acc.backward(loss)
            if cfg.clip_grad:
                acc.clip_grad_norm_(vae_loss.parameters(), cfg.clip_grad)
            vae_opt.step()
            vae_opt.zero_grad(set_to_none=True)
            lr = vae_opt.param_groups[0]["lr"]
            entry = {"rec": float(rec.detach()), "kl": float(kl.detach())}
        else:
            if vae is not None and latents is None:
                raw_vae = acc.unwrap_model(vae_loss).vae.eval()
                latents, scale = encode_latents(raw_vae, images)
                raw_vae.register_to_config(scaling_factor=scale)
                logger.info("latents of %d images: %s, scaling factor %.4f", len(images), tuple(latents.shape), scale)
            context, mask = encode_text(text_encoder, tokenizer, captions, acc.device)
            _loop.set_lr(opt, lr_at(step, cfg, "unet"))
            loss = diffusion_loss(unet, noise_scheduler, data(idx), context, mask, g)
            acc.backward(loss)
            if cfg.clip_grad:
                acc.clip_grad_norm_(unet.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for e, p in zip(ema.parameters(), acc.unwrap_model(unet).parameters()):
                    e.lerp_(p.detach(), 1.0 - ema_decay)
            lr = opt.param_groups[0]["lr"]
            entry = {}
        step += 1
        elapsed = time.time() - t_start
        history.append({"step": step, "stage": stage, "loss": float(loss.detach()), "lr": lr, "time": elapsed,
                        **entry})
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            logger.info("step %d (%s) loss %.4f lr %.2e (%.2f s/step)", step, stage, history[-1]["loss"], lr,
                        (time.time() - t_resume) / (step - first_step))
        unet_step = step - cfg.first_unet_step
        if stage == "unet" and cfg.sample_every and unet_step % cfg.sample_every == 0 and acc.is_main_process \
                and step < cfg.total_steps:
            sample_grid(pipeline(), cfg, out / "samples" / f"step_{step}.png")
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if _loop.out_of_time(cfg.max_minutes, elapsed, step, cfg.total_steps):
            stopped_early = True
            break
    bar.close()
    save()

    def tail(stage: str) -> float | None:
        return _loop.stage_tail(history, stage, 50)

    metrics: dict[str, Any] = {
        "steps": step, "unet_steps": max(0, step - cfg.first_unet_step), "vae_steps": min(step, cfg.first_unet_step),
        "wall_time_s": round(elapsed, 1), "stopped_early": stopped_early, "final_loss": tail("unet"),
        "final_vae_loss": tail("vae"), "unet_parameters": n_params, "ema_decay": ema_decay,
        "prediction_type": cfg.prediction_type, "space": "latent" if vae is not None else "pixel",
        "image_size": cfg.image_size}
    acc.wait_for_everyone()
    if acc.is_main_process and step > cfg.first_unet_step:
        pipe = pipeline()
        if cfg.n_val > 0:
            metrics["val_loss"] = _final_validation(pipe, cfg, noise_scheduler)
        sample_grid(pipe, cfg, out / "samples" / f"step_{step}.png")
        (out / "samples" / "prompts.txt").write_text(
            "".join(f"row {i}: {p}\n" for i, p in enumerate(SAMPLE_PROMPTS))
            + f"columns: seeds {list(SAMPLE_SEEDS)}; DDIM {cfg.sample_steps} steps, guidance {cfg.sample_guidance}, "
              "EMA weights\n")
        save_final(cfg, pipe, out / "final", metrics, len(records))
    if acc.is_main_process:
        _loop.plot_history(history, out / "loss_curve.png", title="text-to-image training")
        (out / "metrics.json").write_text(json.dumps({**metrics, "val_losses": val_losses, "history": history},
                                                     indent=2))
    return metrics


def _final_validation(pipe, cfg: T2ITrainConfig, noise_scheduler) -> float:
    """Validation loss of the EMA UNet on ``n_val`` SynthDrive validation scenes (their first caption)."""
    from shusheng.data import synthdrive as sd

    scenes = [sd.sample(sd.VAL_SEED, i, cfg.image_size) for i in range(cfg.n_val)]
    x0 = to_pixels(np.stack([np.asarray(img) for img, _ in scenes])).to(pipe.unet.device)
    if pipe.vae is not None:
        with torch.no_grad():
            x0 = pipe.vae.encode(x0).latent_dist.mode() * pipe.vae.config.scaling_factor
    context, mask = pipe.encode_prompt([ann.captions[0] for _, ann in scenes])
    return validation_loss(pipe.unet, noise_scheduler, x0, context, mask)


def command_flags(cfg: T2ITrainConfig) -> str:
    """The ``shusheng train t2i`` flags that differ from the defaults (what the model card records)."""
    default, parts = T2ITrainConfig(), []
    for k, v in asdict(cfg).items():
        if v == getattr(default, k) or k == "resume":
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, tuple):
            parts.append(f"{flag} {','.join(map(str, v))}")
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def save_final(cfg: T2ITrainConfig, pipe, final: Path, metrics: dict[str, Any], n_train: int) -> None:
    """``final``: the pipeline with the EMA UNet (and VAE) in fp16, MiniLM by reference; ``metrics.json`` and
    ``MODEL_CARD.md`` beside it."""
    half = type(pipe)(unet=copy.deepcopy(pipe.unet).half(), scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
                      tokenizer=pipe.tokenizer, vae=None if pipe.vae is None else copy.deepcopy(pipe.vae).half(),
                      text_encoder_ref=cfg.text_encoder, model_name=cfg.model_name)
    half.save_pretrained(final)
    info = {**metrics, "command": "shusheng train t2i", "train_config": asdict(cfg),
            "train_data": f"SynthDrive train ({cfg.data_dir or 'rendered, seed 0'}), {n_train} images, "
                          f"{cfg.image_size} px", "weights": "EMA of the UNet, fp16", "text_encoder": cfg.text_encoder}
    (final / "metrics.json").write_text(json.dumps(info, indent=2))
    flags = command_flags(cfg)
    val = metrics.get("val_loss")
    (final / "MODEL_CARD.md").write_text(f"""# {cfg.model_name}

Text-to-image on SynthDrive driving scenes: a conditional UNet (diffusers `UNet2DConditionModel`,
{metrics['unet_parameters'] / 1e6:.2f}M parameters, {metrics['space']} space, {cfg.image_size}x{cfg.image_size}) that
cross-attends to frozen {cfg.text_encoder} token states (referenced, not stored here).
{'A small AutoencoderKL trained in the same run maps images to latents.' if cfg.latent else ''}

- Data: {info['train_data']}; captions dropped to "" with probability {cfg.caption_dropout}.
- Objective: DDPM, {cfg.prediction_type}, {cfg.beta_schedule} betas, {cfg.num_train_timesteps} timesteps.
- Command: `shusheng train t2i {flags}` (seed {cfg.seed}).
- Steps: {metrics['steps']} ({metrics['unet_steps']} UNet{f", {metrics['vae_steps']} VAE" if cfg.latent else ''}),
  batch {cfg.batch_size}, lr {cfg.lr}; wall time {metrics['wall_time_s']} s{' (stopped early)' if metrics['stopped_early'] else ''}.
- Weights: EMA of the UNet (decay {metrics['ema_decay']:.5f}), fp16.
- Final training loss (mean of the last 50 steps): {metrics['final_loss']}; validation loss on {cfg.n_val} SynthDrive
  validation scenes: {'n/a' if val is None else f'{val:.4f}'}.
- Knows only SynthDrive-style street scenes; anything else comes out as a street scene or noise.
""")


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`T2ITrainConfig` field."""
    _loop.add_config_arguments(p, T2ITrainConfig, optional_types={"n_train": int, "max_minutes": float},
                               help={"latent": "train a small AutoencoderKL first and the UNet on its latents",
                                     "prediction_type": "v_prediction (default) or epsilon",
                                     "text_encoder": "frozen text encoder: all-MiniLM-L6-v2 or a local folder",
                                     "caption_dropout": "probability of training a caption as '' (for guidance)"})


def config_from_args(args: argparse.Namespace) -> T2ITrainConfig:
    return _loop.config_from_args(T2ITrainConfig, args)


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.t2i", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
