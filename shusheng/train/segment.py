"""``shusheng train segment``: a semantic segmenter (UperNet on an InternImage tower) on SynthDrive scenes rendered on
the fly, with their semantic masks (``shusheng.data.synthdrive.CLASSES``: road, lane marking, crosswalk, sidewalk,
sky, building, vegetation, vehicle, person, traffic light, sign, other).

    shusheng train segment --output runs/seg --steps 3000 --resume auto
    shusheng train segment --output runs/seg-balanced --class-balance --channels 64 --max-minutes 60

Every step renders its own scenes (the batch of step ``t`` is a pure function of ``(seed, t)``, the same
:func:`~shusheng.train.detect.batch_indices` as ``shusheng train detect``, so a resumed run follows the
uninterrupted one and no scene repeats within ``train_n`` images). The tower starts from the SynthDrive-pretrained
InternImage of the bundled ``shusheng-mini-uniperceiver`` (``--backbone-init``; ``none`` for random weights). The
loss is pixel cross-entropy (``--class-balance``: ENet class weights ``1 / ln(1.02 + frequency)`` from the pixel
frequencies of the first training scenes) plus ``aux_weight`` times that of the auxiliary FCN head. mIoU on
``val_n`` validation scenes is logged every ``eval_every`` steps and at the end; ``<output>/final`` is the saved
segmenter (``InternImageSegmenter.from_pretrained``, fp16 weights) with ``metrics.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shusheng._deps import require
from shusheng.train import _loop
from shusheng.train.detect import _TOWER, batch_indices, command_flags, load_backbone_init

logger = logging.getLogger(__name__)

__all__ = ["SegmentTrainConfig", "class_balance_weights", "main", "scene_batch", "train"]

_BALANCE_SCENES = 200  # training scenes whose pixel frequencies set the --class-balance weights


@dataclass
class SegmentTrainConfig:
    output: str = "runs/seg"
    model_name: str = "shusheng-mini-seg"
    backbone: str = "internimage_test"
    backbone_args: dict[str, Any] = field(default_factory=lambda: dict(_TOWER))
    backbone_init: str | None = "shusheng-mini-uniperceiver"  # bundled model / folder / safetensors; None = random
    image_size: int = 256
    channels: int = 64
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_weight: float = 0.4
    class_balance: bool = False
    train_n: int = 200_000  # distinct training scenes the steps cycle through
    steps: int = 3000
    batch_size: int = 8
    lr: float = 4e-4
    backbone_lr_scale: float = 0.5
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    seed: int = 0
    val_n: int = 200
    eval_every: int = 500
    save_every: int = 250
    keep_checkpoints: int = 2
    resume: str | None = None
    max_minutes: float | None = None
    log_every: int = 50
    threads: int = 0

    def __post_init__(self):
        self.pool_scales = tuple(int(s) for s in self.pool_scales)
        if self.steps < 1 or self.train_n < self.batch_size:
            raise ValueError("need steps >= 1 and train_n >= batch_size")
        if self.batch_size < 2:
            # the head's BatchNorm sees one value per channel after the PPM's 1 x 1 pool of a single image
            raise ValueError(f"batch_size must be at least 2 (BatchNorm in the head), got {self.batch_size}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")

    def segmenter_config(self):
        from shusheng.detection.segment import SegmenterConfig

        return SegmenterConfig(backbone=self.backbone, backbone_args=self.backbone_args, channels=self.channels,
                               pool_scales=list(self.pool_scales), image_size=self.image_size,
                               aux_weight=self.aux_weight)


def scene_batch(indices: list[int], size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """SynthDrive training scenes ``indices`` at ``size`` px: ``(pixels (B, 3, S, S) normalised, masks (B, S, S)
    int64 class ids)``."""
    from shusheng.data import synthdrive as sd

    images, masks = [], []
    for i in indices:
        img, ann = sd.sample(sd.TRAIN_SEED, i, size)
        images.append(np.asarray(img, dtype=np.uint8))
        masks.append(ann.semantic)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.from_numpy(np.stack(masks).astype(np.int64))


def class_balance_weights(num_classes: int, size: int, n: int = _BALANCE_SCENES) -> torch.Tensor:
    """ENet class weights ``1 / ln(1.02 + f_k)`` (``f_k``: pixel frequency of class ``k`` in training scenes
    ``0..n-1``), scaled to mean 1: rare classes (lights, signs, people) weigh up to ~50x a frequent one."""
    from shusheng.data import synthdrive as sd

    counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(n):
        counts += np.bincount(sd.sample(sd.TRAIN_SEED, i, size)[1].semantic.reshape(-1),
                              minlength=num_classes)[:num_classes]
    w = 1.0 / np.log(1.02 + counts / max(1, counts.sum()))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def _lr_scale(name: str, scale: float) -> float:
    return scale if name.startswith("backbone.") else 1.0


def train(cfg: SegmentTrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (also in ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    from tqdm.auto import tqdm

    from shusheng.detection.evaluate import evaluate_segmenter, synthdrive_scenes
    from shusheng.detection.segment import InternImageSegmenter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model = InternImageSegmenter(cfg.segmenter_config())
    if cfg.backbone_init:
        n = load_backbone_init(model.backbone, cfg.backbone_init)
        logger.info("tower initialised from %s (%d tensors)", cfg.backbone_init, n)
    pre = model.preprocess_config()
    n_params = sum(p.numel() for p in model.parameters())
    weights = None
    if cfg.class_balance:
        weights = class_balance_weights(model.num_classes, cfg.image_size, min(_BALANCE_SCENES, cfg.train_n))
        logger.info("class weights: %s", ", ".join(f"{k} {w:.2f}" for k, w in zip(model.labels, weights.tolist())))
        weights = weights.to(acc.device)
    groups = _loop.param_groups(model, cfg.weight_decay, lambda n: _lr_scale(n, cfg.backbone_lr_scale))
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    logger.info("UperNet segmenter: %.2fM parameters, %d classes, %d px scenes, batch %d", n_params / 1e6,
                raw.num_classes, cfg.image_size, cfg.batch_size)
    val = synthdrive_scenes("val", cfg.val_n, cfg.image_size) if cfg.val_n else []

    step, history, elapsed, first_step, evals = 0, [], 0.0, 0, []
    prog = _loop.load_checkpoint(acc, out, cfg.resume)
    if prog is not None:
        step, history, elapsed, evals = prog["step"], prog["history"], prog.get("elapsed", 0.0), prog.get("evals", [])
        first_step = step
    loss_keys: list[str] = []

    def save() -> None:
        _loop.save_checkpoint(acc, out, {"step": step, "history": history, "elapsed": elapsed, "evals": evals},
                              cfg.keep_checkpoints)
        if acc.is_main_process and history:
            _loop.plot_history(history, out / "loss_curve.png", losses=["loss", *loss_keys],
                               evals=[("val mIoU", [e["step"] for e in evals], [e["mIoU"] for e in evals])]
                               if evals else (), eval_ylabel="mIoU", title="UperNet segmenter training")

    def evaluate() -> dict[str, Any]:
        r = evaluate_segmenter(raw.predict, val, raw.labels, batch_size=cfg.batch_size)
        entry = {"step": step, "mIoU": r["mIoU"], "pixel_accuracy": r["pixel_accuracy"], "per_class": r["per_class"]}
        logger.info("val (%d scenes) at step %d: mIoU %.3f, pixel accuracy %.3f", len(val), step, entry["mIoU"],
                    entry["pixel_accuracy"])
        return entry

    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    t_start, t_resume = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not acc.is_main_process, mininterval=5)
    stopped_early = False
    model.train()
    while step < cfg.steps:
        idx = batch_indices(cfg, step)[acc.process_index::acc.num_processes]
        pixels, masks = scene_batch(idx, cfg.image_size, pre.mean, pre.std)
        _loop.set_lr(opt, cfg.lr * _loop.warmup_cosine(step, cfg.warmup_steps, cfg.warmup_steps, decay_steps,
                                                       cfg.min_lr_ratio))
        losses = model(pixels.to(acc.device), masks.to(acc.device), weights)
        loss = _loop.losses_step(acc, model, opt, losses, step, cfg.clip_grad)
        step += 1
        elapsed = time.time() - t_start
        loss_keys = sorted(losses)
        _loop.log_losses_step(history, step, loss, losses, opt.param_groups[0]["lr"], elapsed, cfg.log_every,
                              (time.time() - t_resume) / (step - first_step))
        bar.update(1)
        if cfg.eval_every and val and step % cfg.eval_every == 0 and step < cfg.steps and acc.is_main_process:
            evals.append(evaluate())
            model.train()
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if _loop.out_of_time(cfg.max_minutes, elapsed, step, cfg.steps):
            stopped_early = True
            break
    bar.close()
    metrics: dict[str, Any] = {"steps": step, "wall_time_s": round(elapsed, 1), "stopped_early": stopped_early,
                               "final_loss": _loop.stage_tail([{**h, "stage": "train"} for h in history], "train", 50),
                               "parameters": n_params, "image_size": cfg.image_size,
                               "class_weights": None if weights is None else [round(w, 4) for w in weights.tolist()]}
    acc.wait_for_everyone()
    if acc.is_main_process and val:
        if not evals or evals[-1]["step"] != step:
            evals.append(evaluate())
        metrics.update({"mIoU": evals[-1]["mIoU"], "pixel_accuracy": evals[-1]["pixel_accuracy"],
                        "per_class_iou": evals[-1]["per_class"]})
    save()
    if acc.is_main_process:
        save_final(cfg, raw, out / "final", metrics)
        (out / "metrics.json").write_text(json.dumps({**metrics, "evals": evals, "history": history}, indent=2))
    return metrics


def save_final(cfg: SegmentTrainConfig, model, final: Path, metrics: dict[str, Any]) -> None:
    """``final``: the segmenter (fp16 weights), ``metrics.json`` and ``MODEL_CARD.md``."""
    command = f"shusheng train segment {command_flags(cfg)}".strip()
    model.save_pretrained(final, dtype=torch.float16,
                          metadata={"command": command, "seed": cfg.seed, "steps": metrics["steps"],
                                    "wall_time_s": metrics["wall_time_s"], "mIoU": metrics.get("mIoU")})
    (final / "metrics.json").write_text(json.dumps({**metrics, "command": command, "train_config": asdict(cfg)},
                                                   indent=2))
    if "mIoU" in metrics:
        val = (f"mIoU {metrics['mIoU']:.3f}, pixel accuracy {metrics['pixel_accuracy']:.3f}\n\n"
               "| class | IoU |\n|---|---|\n"
               + "".join(f"| {k} | {'n/a (absent)' if v is None else f'{v:.3f}'} |\n"
                         for k, v in metrics["per_class_iou"].items()))
    else:
        val = "not evaluated\n"
    loss = "n/a" if metrics["final_loss"] is None else f"{metrics['final_loss']:.4f}"
    (final / "MODEL_CARD.md").write_text(f"""# {cfg.model_name}

UperNet semantic segmenter (PPM + FPN head of {cfg.channels} channels, auxiliary FCN head in training with weight
{cfg.aux_weight}) over an InternImage tower (`{cfg.backbone}` with {json.dumps(cfg.backbone_args)};
{metrics['parameters'] / 1e6:.2f}M parameters in all), trained on SynthDrive scenes at {cfg.image_size} px. Classes
(id = position): {", ".join(model.labels)}.

- Tower initialised from: {cfg.backbone_init or 'random weights'}.
- Data: SynthDrive train seed 0, {metrics['steps'] * cfg.batch_size} scenes rendered on the fly (indices drawn
  without repeats from the first {cfg.train_n}), their semantic masks as targets.
- Loss: pixel cross-entropy{' with ENet class-balance weights' if cfg.class_balance else ''} + {cfg.aux_weight} x
  the auxiliary head's.
- Command: `{command}` (seed {cfg.seed}).
- Steps: {metrics['steps']}, batch {cfg.batch_size}, AdamW lr {cfg.lr} (tower x{cfg.backbone_lr_scale}), warm-up
  {cfg.warmup_steps} steps then cosine; wall time {metrics['wall_time_s']} s on the machine that trained
  it{' (stopped early)' if metrics['stopped_early'] else ''}.
- Final training loss (mean of the last 50 steps): {loss}.
- Knows only SynthDrive's flat-shaded street scenes: on photographs its class maps are of little use.
- Weights stored in fp16.

## Validation ({cfg.val_n} SynthDrive val scenes at {cfg.image_size} px)

{val}""")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SegmentTrainConfig` field."""
    _loop.add_config_arguments(
        p, SegmentTrainConfig, json_fields=("backbone_args",), optional_types={"max_minutes": float},
        help={"backbone_init": "InternImage weights for the tower: a bundled model, a folder or a .safetensors "
                               "file ('none': random)",
              "channels": "width of the UperNet head",
              "pool_scales": "pyramid pooling sides on the last level (comma-separated)",
              "aux_weight": "weight of the auxiliary FCN head's loss (0: no auxiliary head)",
              "class_balance": "weight the cross-entropy by ENet class weights from the training pixel frequencies",
              "train_n": "distinct SynthDrive training scenes the run draws from"})


def config_from_args(args: argparse.Namespace) -> SegmentTrainConfig:
    return _loop.config_from_args(SegmentTrainConfig, args, none_strings_for=("backbone_init",))


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.segment", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
