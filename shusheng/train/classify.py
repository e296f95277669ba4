"""Image classification training and evaluation (InternImage recipe) on any ImageFolder dataset.

    shusheng train classify --data-dir DATA/train --val-dir DATA/val --model internimage_t --output runs/t
    shusheng eval classify --data-dir DATA/val --checkpoint runs/t/final
    python -m shusheng.train.classify ...            # same as `shusheng train classify`
    accelerate launch -m shusheng.train.classify ... # several GPUs / nodes

Defaults follow the official InternImage ImageNet-1k recipe (spec §13): AdamW (betas 0.9/0.999), base lr 5e-4
per 512 images scaled linearly with the global batch, weight decay 0.05 except 1-D parameters and biases,
cosine schedule stepped per iteration with warm-up, label smoothing 0.1 folded into Mixup 0.8 / CutMix 1.0,
RandAugment + random erasing, EMA of the weights, gradient clipping 5.0, fp16 autocast on GPU. Optional layer-wise
lr decay and the DCN lr multiplier of the fine-tuning recipes.

Warm-up and EMA follow the length of the run (``--recipe scaled``, the default): the warm-up is the official 20
epochs but at most 1/15 of the run, and the EMA decay averages over 5 % of the run's steps, at most the official
0.9999. For the official 300 epochs both equal the official values; a run of a few epochs warms up for a fraction
of an epoch and averages recent weights, instead of spending the whole run in the warm-up and evaluating an
average of the initial weights. ``--recipe official`` uses the official 20 epochs and 0.9999 whatever the run's
length; ``--warmup-epochs`` and ``--ema-decay`` override either (``--no-ema`` turns EMA off).

Checkpoints (accelerate state + progress, and the EMA weights as ``ema.safetensors``) are written every
``--save-every`` steps and at the end of each epoch; ``--resume auto`` continues from the newest. Nothing in a
checkpoint is unpickled as an arbitrary object when it is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shusheng._deps import require
from shusheng.modeling import Preprocess
from shusheng.train import _loop

logger = logging.getLogger(__name__)

DCN_LR_KEYWORDS = ("offset", "attention_weights", "center_feature_scale_proj", "alpha_beta")
#: the official ImageNet-1k recipe's warm-up and EMA decay (``--recipe official``)
OFFICIAL_WARMUP_EPOCHS = 20
OFFICIAL_EMA_DECAY = 0.9999
RECIPES = ("scaled", "official")


@dataclass
class ClassifyConfig:
    """Every knob of a classification run; written to ``<output>/config.json``."""

    data_dir: str = ""
    output: str = "runs/classify"
    val_dir: str | None = None
    model: str = "internimage_t"
    pretrained: str | None = None  # local checkpoint to start from (official .pth, safetensors, ...)
    img_size: int = 224
    crop_pct: float = 1.0
    epochs: int = 300
    recipe: str = "scaled"  # warm-up and EMA decay: "scaled" to the run's length or "official" (see module doc)
    warmup_epochs: float | None = None  # None: from the recipe
    batch_size: int = 128  # per process
    grad_accum: int = 1
    lr: float = 5e-4  # per 512 images; scaled by the global batch
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    layer_decay: float | None = None
    dcn_lr_mul: float | None = None
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    color_jitter: float = 0.4
    ema_decay: float | None = None  # None: from the recipe; 0: no EMA
    amp: str = "auto"  # auto: fp16 on GPU, none on CPU
    workers: int = 4
    seed: int = 0
    save_every: int = 0  # steps; 0 = only at epoch ends
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto", a checkpoint dir, or None
    max_steps: int | None = None  # stop early (for smoke tests and time-boxed runs)
    log_every: int = 20
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")


# --------------------------------------------------------------------------------------------------------
# Parameter groups and schedule
# --------------------------------------------------------------------------------------------------------

def layer_id_for_internimage(name: str, depths: list[int]) -> int:
    """Layer index for layer-wise lr decay, numbered like the official recipe (0 = stem, last = heads).

    Blocks are numbered in order from 1; ``patch_embed`` shares the id of the first block; a level's downsample
    and norm share the id of the first block of the next level; everything else (heads, last level norm,
    level-2 post norms) gets the top id (lr scale 1).
    """
    total = sum(depths)
    starts = [sum(depths[:i]) for i in range(len(depths))]
    if name.startswith("patch_embed"):
        return 1
    m = re.match(r"levels\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        return starts[int(m.group(1))] + int(m.group(2)) + 1
    m = re.match(r"levels\.(\d+)\.(downsample|norm)\.", name)
    if m and int(m.group(1)) < len(depths) - 1:
        return starts[int(m.group(1)) + 1] + 1
    return total + 1


def build_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                       dcn_lr_mul: float | None = None) -> list[dict]:
    """AdamW parameter groups: no decay for 1-D params and biases; optional layer decay and DCN lr multiplier.

    Each group carries ``lr_scale``; the training loop multiplies the scheduled lr by it.
    """
    depths = getattr(model, "depths", None)

    def lr_scale(name: str) -> float:
        scale = 1.0
        if layer_decay is not None and depths is not None:
            num_layers = sum(depths) + 1
            scale *= layer_decay ** (num_layers - layer_id_for_internimage(name, list(depths)))
        if dcn_lr_mul is not None and any(k in name for k in DCN_LR_KEYWORDS):
            scale *= dcn_lr_mul
        return scale

    return _loop.param_groups(model, weight_decay, lr_scale)


def resolve_schedule(cfg: ClassifyConfig, steps_per_epoch: int) -> tuple[int, float]:
    """``(warm-up steps, EMA decay)`` of a run: explicit values of ``cfg`` win, else its recipe decides
    (``official``: 20 epochs and 0.9999; ``scaled``: the same, at most 1/15 of the run and a horizon of 5 % of
    its steps). An EMA decay of 0 means no EMA."""
    total = steps_per_epoch * cfg.epochs
    official_warmup = int(OFFICIAL_WARMUP_EPOCHS * steps_per_epoch)
    if cfg.warmup_epochs is not None:
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
    elif cfg.recipe == "official":
        warmup = official_warmup
    else:
        warmup = _loop.scaled_warmup(official_warmup, total)
    if cfg.ema_decay is not None:
        ema = cfg.ema_decay
    elif cfg.recipe == "official":
        ema = OFFICIAL_EMA_DECAY
    else:
        ema = _loop.scaled_ema_decay(total, OFFICIAL_EMA_DECAY)
    return warmup, ema


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

def _image_folder(root: str, transform):
    from torchvision.datasets import ImageFolder

    from shusheng.data import load_image

    if not Path(root).is_dir():
        raise FileNotFoundError(f"data directory {root!r} does not exist (expected ImageFolder: root/<class>/<image>)")
    return ImageFolder(root, transform=transform, loader=load_image)


class SeededAugmentation(torch.utils.data.Dataset):
    """Wraps a dataset so that the random augmentation of item ``i`` in epoch ``e`` depends only on
    ``(seed, e, i)``, never on the global RNG (which it leaves untouched).

    Augmentations are then identical whatever the number of workers, and a run resumed from a checkpoint sees
    exactly the images an uninterrupted run would have seen (data loaders fetch ahead of the training step, so
    restoring the global RNG alone cannot achieve that). Set ``epoch`` before each epoch; workers must not be
    persistent so that they see the new value.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        import random

        import numpy as np

        item_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + int(i)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed % 2**32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _transforms(cfg: ClassifyConfig, model: nn.Module, training: bool):
    timm_data = require("timm.data", extra="backbone", package="timm")
    pre = Preprocess.from_timm(getattr(model, "pretrained_cfg", None) or {})  # the weights' own mean/std
    mean, std = pre.mean, pre.std
    if training:
        return timm_data.create_transform(
            cfg.img_size, is_training=True, color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa if cfg.aa and cfg.aa != "none" else None, re_prob=cfg.reprob,
            re_mode="pixel", re_count=1, interpolation="bicubic", mean=mean, std=std)
    return timm_data.create_transform(cfg.img_size, is_training=False, crop_pct=cfg.crop_pct,
                                      interpolation="bicubic", mean=mean, std=std)


def build_model(name: str, num_classes: int, drop_path: float = 0.0, checkpoint: str | None = None) -> nn.Module:
    """A classifier by registry name (shusheng first, then timm), optionally initialised from a local file."""
    from shusheng.backbone import create_model, list_models

    if name in list_models():
        model = create_model(name, num_classes=num_classes, drop_path_rate=drop_path)
    else:
        timm = require("timm", extra="backbone")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    if checkpoint:
        from shusheng.backbone.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, strict=False, num_classes=num_classes)
    return model


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------

def _save(model: nn.Module, path: Path) -> None:
    """``save_pretrained`` when the model has it (shusheng models), else a plain safetensors state dict."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


EMA_FILE = "ema.safetensors"


def save_ema(ema: nn.Module, checkpoint_dir: Path) -> None:
    """Writes the EMA weights into a checkpoint folder (safetensors: tensors only)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()},
              str(checkpoint_dir / EMA_FILE))


def load_ema(ema: nn.Module, checkpoint_dir: Path) -> None:
    """Restores the EMA weights of a checkpoint folder: ``ema.safetensors``, or the ``custom_checkpoint_0.pkl``
    that earlier versions had accelerate write (a state dict, read with ``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: the checkpoint has no EMA weights.
    """
    from safetensors.torch import load_file

    d = Path(checkpoint_dir)
    if (d / EMA_FILE).is_file():
        ema.load_state_dict(load_file(str(d / EMA_FILE)))
    elif (d / "custom_checkpoint_0.pkl").is_file():
        ema.load_state_dict(torch.load(d / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=True))
    else:
        raise FileNotFoundError(f"checkpoint {d} has no EMA weights ({EMA_FILE}); resume with the EMA off (--no-ema) "
                                "or from another checkpoint")


def train(cfg: ClassifyConfig) -> dict:
    """Run (or resume) a training run; returns the final metrics dict (also written to ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    timm_data = require("timm.data", extra="backbone", package="timm")
    timm_loss = require("timm.loss", extra="backbone", package="timm")
    timm_utils = require("timm.utils", extra="backbone", package="timm")
    from tqdm.auto import tqdm

    out = Path(cfg.output)
    mp = cfg.amp if cfg.amp != "auto" else ("fp16" if torch.cuda.is_available() else "no")
    acc = accelerate.Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(),
        dataloader_config=accelerate.DataLoaderConfiguration(use_seedable_sampler=True))
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    probe = _image_folder(cfg.data_dir, None)
    num_classes = len(probe.classes)
    model = build_model(cfg.model, num_classes, cfg.drop_path, cfg.pretrained)
    train_ds = SeededAugmentation(_image_folder(cfg.data_dir, _transforms(cfg, model, training=True)), cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
        drop_last=len(train_ds) >= cfg.batch_size, pin_memory=torch.cuda.is_available(),
        # its own generator: shuffling never draws from the global RNG (restored by checkpoints)
        generator=torch.Generator().manual_seed(cfg.seed))

    global_batch = cfg.batch_size * cfg.grad_accum * acc.num_processes
    scale = global_batch / 512
    groups = build_param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.dcn_lr_mul)
    opt = torch.optim.AdamW(groups, lr=cfg.lr * scale, betas=(0.9, 0.999), eps=1e-8)
    model, opt, loader = acc.prepare(model, opt, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps, ema_decay = resolve_schedule(cfg, steps_per_epoch)
    logger.info("%d steps per epoch; warm-up %d steps, EMA decay %s", steps_per_epoch, warmup_steps,
                ema_decay or "off")

    def lr_at(step: int) -> float:  # the official recipe: the warm-up overlays the first steps of the cosine
        return cfg.lr * scale * _loop.warmup_cosine(
            step, warmup_steps, decay_start=0, decay_steps=steps_per_epoch * cfg.epochs,
            floor=cfg.min_lr / cfg.lr, start=cfg.warmup_lr / cfg.lr)

    # the EMA is checkpointed as safetensors by `save` below, not registered with accelerate (which unpickles
    # registered objects with torch.load(weights_only=False) on resume)
    ema = timm_utils.ModelEmaV3(acc.unwrap_model(model), decay=ema_decay) if ema_decay else None

    mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
    mixup_fn = timm_data.Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=num_classes) if mixup_on else None
    if mixup_on:
        criterion = timm_loss.SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = timm_loss.LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    step, start_epoch, skip_batches, history = 0, 0, 0, []
    prog = _loop.load_checkpoint(acc, out, cfg.resume)
    if prog is not None:
        step, start_epoch, history = prog["step"], prog["epoch"], prog["history"]
        skip_batches = prog["batch_in_epoch"]
        if ema is not None:
            load_ema(ema, _loop.resume_dir(out, cfg.resume))
    _loop.set_lr(opt, lr_at(step))

    def save(epoch: int, batch_in_epoch: int) -> None:
        if ema is not None and acc.is_main_process:  # before progress.json, which marks the checkpoint complete
            d = out / "checkpoints" / f"step_{step}"
            if not (d / "progress.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                save_ema(ema, d)
        _loop.save_checkpoint(acc, out, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                         "history": history}, cfg.keep_checkpoints)

    model.train()
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not acc.is_main_process)
    done = step >= total_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        loader.set_epoch(epoch)
        train_ds.epoch = epoch
        it = acc.skip_first_batches(loader, skip_batches * cfg.grad_accum) if skip_batches else loader
        batch_in_epoch = skip_batches
        skip_batches = 0
        running = []
        for images, targets in it:
            if mixup_fn is not None:
                if images.shape[0] % 2:  # timm's batch mixup needs an even batch
                    images, targets = images[:-1], targets[:-1]
                images, targets = mixup_fn(images, targets)
            with acc.accumulate(model):
                with acc.autocast():
                    loss = criterion(model(images.contiguous(memory_format=torch.channels_last)), targets)
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad:
                    acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
            running.append(loss.item())
            if not acc.sync_gradients:
                continue
            step += 1
            batch_in_epoch += 1
            _loop.set_lr(opt, lr_at(step))  # times each group's lr_scale
            if ema is not None:
                ema.update(acc.unwrap_model(model), step=step)
            history.append({"step": step, "loss": sum(running) / len(running), "lr": opt.param_groups[0]["lr"]})
            running = []
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", epoch=epoch)
            if step % cfg.log_every == 0:
                logger.info("step %d epoch %d loss %.4f lr %.2e", step, epoch, history[-1]["loss"], history[-1]["lr"])
            if cfg.save_every and step % cfg.save_every == 0:
                save(epoch, batch_in_epoch)
            if step >= total_steps:
                done = True
                break
        if not done or batch_in_epoch >= len(loader) // cfg.grad_accum:
            save(epoch + 1, 0)
        else:
            save(epoch, batch_in_epoch)
    bar.close()

    metrics = {"steps": step, "wall_time_s": time.time() - t0, "final_loss": history[-1]["loss"] if history else None,
               "warmup_steps": warmup_steps, "ema_decay": ema_decay}
    acc.wait_for_everyone()
    if acc.is_main_process:
        _save(acc.unwrap_model(model), out / "final")
        if ema is not None:
            _save(ema.module, out / "final_ema")
        if cfg.val_dir:
            metrics["val"] = evaluate_model(acc.unwrap_model(model), cfg.val_dir, cfg, batch_size=cfg.batch_size)
            if ema is not None:
                metrics["val_ema"] = evaluate_model(ema.module, cfg.val_dir, cfg, batch_size=cfg.batch_size)
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate_model(model: nn.Module, data_dir: str, cfg: ClassifyConfig, batch_size: int = 64,
                   workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (percent) and mean loss of ``model`` on an ImageFolder."""
    from tqdm.auto import tqdm

    ds = _image_folder(data_dir, _transforms(cfg, model, training=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    for images, targets in tqdm(loader, desc="eval", leave=False):
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(1).sum().item()
        n += targets.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError(f"no images found under {data_dir}")
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "loss": loss_sum / n, "images": n}


def evaluate_checkpoint(checkpoint: str, data_dir: str, img_size: int | None = None, crop_pct: float = 1.0,
                        batch_size: int = 64, workers: int = 0) -> dict:
    """Load a ``save_pretrained`` folder and evaluate it on an ImageFolder."""
    from shusheng.backbone import InternImage

    model = InternImage.from_pretrained(checkpoint)
    size = img_size or (model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-1]
    cfg = ClassifyConfig(img_size=size, crop_pct=crop_pct)
    return evaluate_model(model, data_dir, cfg, batch_size=batch_size, workers=workers)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = ClassifyConfig()
    p.add_argument("--data-dir", required=True, help="ImageFolder root of the training images")
    p.add_argument("--val-dir", default=None, help="ImageFolder root evaluated at the end")
    p.add_argument("--output", default=d.output)
    p.add_argument("--recipe", choices=RECIPES, default=d.recipe,
                   help="warm-up and EMA decay scaled to the run's length (default) or the official 20 epochs and "
                        "0.9999 whatever the length")
    _loop.add_config_arguments(
        p, ClassifyConfig, skip=("data_dir", "val_dir", "output", "recipe", "extra"),
        optional_types={"layer_decay": float, "dcn_lr_mul": float, "ema_decay": float, "warmup_epochs": float,
                        "max_steps": int},
        help={"warmup_epochs": "warm-up epochs (default: from --recipe)",
              "ema_decay": "EMA decay (default: from --recipe; 0 = no EMA)"})
    p.add_argument("--no-ema", dest="ema_decay", action="store_const", const=0.0, help="disable EMA")


def config_from_args(args: argparse.Namespace) -> ClassifyConfig:
    return _loop.config_from_args(ClassifyConfig, args)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="ImageFolder root to evaluate on")
    p.add_argument("--checkpoint", required=True, help="a folder written by save_pretrained (e.g. runs/x/final)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true")


def run_eval(args: argparse.Namespace) -> int:
    m = evaluate_checkpoint(args.checkpoint, args.data_dir, args.img_size, args.crop_pct, args.batch_size, args.workers)
    print(json.dumps(m) if args.json else
          f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['images']} images)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.classify", __doc__, add_train_arguments, run_train, argv,
                          log_format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    raise SystemExit(main())
