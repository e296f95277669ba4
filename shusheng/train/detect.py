"""``shusheng train detect``: a box / instance-mask detector (torchvision's Mask R-CNN or FCOS on a feature
pyramid over an InternImage tower) on SynthDrive scenes rendered on the fly.

    shusheng train detect --output runs/det/maskrcnn --head maskrcnn --steps 4000 --resume auto
    shusheng train detect --output runs/det/fcos --head fcos --anchor-scale 1 --steps 3000

Every step renders its own scenes (the batch of step ``t`` is a pure function of ``(seed, t)``, so a resumed run
follows the uninterrupted one and no scene repeats within ``train_n`` images). The tower starts from the
SynthDrive-pretrained InternImage of the bundled ``shusheng-mini-uniperceiver`` (``--backbone-init``; ``none``
for random weights). COCO box (and mask) AP on ``val_n`` validation scenes is logged every ``eval_every`` steps
and at the end; ``<output>/final`` is the saved detector (``InternImageDetector.from_pretrained``) with
``metrics.json`` and ``MODEL_CARD.md``.
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

logger = logging.getLogger(__name__)

__all__ = ["DetectTrainConfig", "train", "load_backbone_init", "load_detector_init", "scene_targets", "main"]

_TOWER = {"channels": 32, "depths": [1, 1, 3, 1], "groups": [2, 4, 8, 16], "mlp_ratio": 4.0}  # the bundled models' InternImage


@dataclass
class DetectTrainConfig:
    output: str = "runs/det"
    model_name: str = "shusheng-mini-det"
    head: str = "maskrcnn"
    backbone: str = "internimage_test"
    backbone_args: dict[str, Any] = field(default_factory=lambda: dict(_TOWER))
    backbone_init: str | None = "shusheng-mini-uniperceiver"  # bundled model / folder / safetensors; None = random
    backbone_indices: str | None = None  # tower levels the pyramid reads, e.g. "1,2,3" (None = all)
    init: str | None = None  # a detector folder to start from (fine-tuning); its head and pyramid must fit
    image_size: int = 256
    render_sizes: str | None = None  # e.g. "128,256": scene i is rendered at size i mod n (default: image_size)
    fpn_channels: int = 64
    anchor_scale: int = 4
    box_head_dim: int = 256
    mask_head_dim: int = 64
    rpn_proposals: int = 500
    roi_batch: int = 128
    head_convs: int = 4
    topk_candidates: int = 1000
    train_n: int = 200_000  # distinct training scenes the steps cycle through
    steps: int = 4000
    batch_size: int = 8
    lr: float = 4e-4
    backbone_lr_scale: float = 0.5
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    seed: int = 0
    val_n: int = 200
    eval_every: int = 1000
    save_every: int = 250
    keep_checkpoints: int = 2
    resume: str | None = None
    max_minutes: float | None = None
    log_every: int = 50
    threads: int = 0

    def __post_init__(self):
        from shusheng.detection.model import HEADS

        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.steps < 1 or self.batch_size < 1 or self.train_n < self.batch_size:
            raise ValueError("need steps >= 1, batch_size >= 1 and train_n >= batch_size")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if any(size < 32 for size in self.scene_sizes()):
            raise ValueError(f"render_sizes must be at least 32 px each, got {self.render_sizes!r}")

    def scene_sizes(self) -> list[int]:
        """Sizes the training scenes are rendered at (the detector resizes them to ``image_size``)."""
        if not self.render_sizes:
            return [self.image_size]
        return [int(v) for v in str(self.render_sizes).split(",") if v.strip()]

    def detector_config(self):
        from shusheng.detection.model import DetectorConfig

        indices = None if not self.backbone_indices else [int(i) for i in str(self.backbone_indices).split(",")]
        return DetectorConfig(backbone=self.backbone, backbone_args=self.backbone_args, head=self.head,
                              backbone_indices=indices, head_convs=self.head_convs,
                              topk_candidates=self.topk_candidates,
                              fpn_channels=self.fpn_channels, min_size=self.image_size, max_size=self.image_size,
                              anchor_scale=self.anchor_scale, box_head_dim=self.box_head_dim,
                              mask_head_dim=self.mask_head_dim, rpn_proposals=self.rpn_proposals,
                              roi_batch=self.roi_batch)


def load_backbone_init(tower: torch.nn.Module, source: str) -> int:
    """Copy InternImage weights into ``tower`` from ``source``: a bundled model name (its ``backbone/`` folder if it
    has one), a folder with ``model.safetensors`` or a ``.safetensors`` file. Keys may carry a ``tower.backbone.``
    or ``backbone.`` prefix. Returns the number of tensors copied.

    Raises:
        FileNotFoundError: nothing to load at ``source``.
        ValueError: no key matches the tower, or a matching key has another shape.
    """
    from safetensors.torch import load_file

    path = Path(source)
    if not path.exists():
        from shusheng.weights import bundled_path

        path = bundled_path(source)
        if (path / "backbone").is_dir():
            path = path / "backbone"
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    state = load_file(str(path))
    own = tower.state_dict()
    picked = {}
    for k, v in state.items():
        for prefix in ("tower.backbone.", "backbone.", ""):
            if k.startswith(prefix) and k[len(prefix):] in own:
                name = k[len(prefix):]
                if own[name].shape != v.shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} in {path}, {tuple(own[name].shape)} in the tower")
                picked[name] = v.to(own[name].dtype)
                break
    if not picked:
        raise ValueError(f"no tensor of {path} matches the tower's parameters")
    tower.load_state_dict(picked, strict=False)
    return len(picked)


def load_detector_init(model: torch.nn.Module, source: str) -> None:
    """Copy a whole saved detector (a folder or a bundled name) into ``model`` to fine-tune it.

    Raises:
        ValueError: the saved detector's architecture differs from ``model``'s (a tensor missing or of another
            shape), named in the message.
    """
    from shusheng.detection.model import InternImageDetector

    path = Path(source)
    if not path.exists():
        from shusheng.weights import bundled_path

        path = bundled_path(source)
    state = InternImageDetector.from_pretrained(path).float().state_dict()
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{source} does not fit this detector's architecture ({len(bad)} tensors differ, e.g. "
                         f"{bad[:3]}): train with the same head and pyramid options as the saved one")
    model.load_state_dict(state)


def scene_targets(ann, masks: bool) -> dict[str, torch.Tensor]:
    """torchvision targets of a SynthDrive annotation: ``boxes`` (N, 4) xyxy, ``labels`` (COCO ids = labels 1..6)
    and, with ``masks``, ``masks`` (N, H, W) uint8."""
    objs = ann.objects
    boxes = torch.tensor([o["bbox"] for o in objs], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    t = {"boxes": boxes, "labels": torch.tensor([int(o["category_id"]) for o in objs], dtype=torch.int64)}
    if masks:
        from pycocotools import mask as mask_util

        h, w = ann.semantic.shape
        t["masks"] = (torch.from_numpy(np.stack([mask_util.decode(o["segmentation"]) for o in objs]))
                      if objs else torch.zeros(0, h, w, dtype=torch.uint8))
    return t


def batch_indices(cfg: DetectTrainConfig, step: int) -> list[int]:
    """Training-scene indices of global step ``step`` (a permutation of ``train_n`` per epoch)."""
    per_epoch = cfg.train_n // cfg.batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(cfg.train_n)
    return perm[k * cfg.batch_size:(k + 1) * cfg.batch_size].tolist()


def _lr_scale(name: str, scale: float) -> float:
    return scale if ".backbone.backbone." in f".{name}" else 1.0


def train(cfg: DetectTrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (also in ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    from tqdm.auto import tqdm

    from shusheng.data import synthdrive as sd
    from shusheng.detection.evaluate import evaluate_detector, synthdrive_scenes
    from shusheng.detection.model import InternImageDetector

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model = InternImageDetector(cfg.detector_config())
    if cfg.init:
        load_detector_init(model, cfg.init)
        logger.info("detector initialised from %s", cfg.init)
    elif cfg.backbone_init:
        n = load_backbone_init(model.fpn.backbone, cfg.backbone_init)
        logger.info("tower initialised from %s (%d tensors)", cfg.backbone_init, n)
    n_params = sum(p.numel() for p in model.parameters())
    groups = _loop.param_groups(model, cfg.weight_decay, lambda n: _lr_scale(n, cfg.backbone_lr_scale))
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    logger.info("%s detector: %.2fM parameters, %d px scenes, batch %d", cfg.head, n_params / 1e6, cfg.image_size,
                cfg.batch_size)
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
                               title=f"{cfg.head} detector training")

    def evaluate() -> dict[str, Any]:
        r = evaluate_detector(raw, val)
        entry = {"step": step, "box_AP": r["bbox"]["AP"], "box_AP50": r["bbox"]["AP50"],
                 "mask_AP": None if r["segm"] is None else r["segm"]["AP"]}
        logger.info("val (%d scenes) at step %d: box AP %.3f AP50 %.3f mask AP %s", len(val), step, entry["box_AP"],
                    entry["box_AP50"], "n/a" if entry["mask_AP"] is None else f"{entry['mask_AP']:.3f}")
        return entry

    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    t_start, t_resume = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not acc.is_main_process, mininterval=5)
    stopped_early = False
    model.train()
    while step < cfg.steps:
        idx = batch_indices(cfg, step)[acc.process_index::acc.num_processes]
        images, targets = [], []
        sizes = cfg.scene_sizes()
        for i in idx:
            img, ann = sd.sample(sd.TRAIN_SEED, i, sizes[i % len(sizes)])
            images.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
                          .to(acc.device))
            targets.append({k: v.to(acc.device) for k, v in scene_targets(ann, cfg.head == "maskrcnn").items()})
        _loop.set_lr(opt, cfg.lr * _loop.warmup_cosine(step, cfg.warmup_steps, cfg.warmup_steps, decay_steps,
                                                       cfg.min_lr_ratio))
        losses = model(images, targets)
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
    save()
    metrics: dict[str, Any] = {"steps": step, "wall_time_s": round(elapsed, 1), "stopped_early": stopped_early,
                               "final_loss": _loop.stage_tail([{**h, "stage": "train"} for h in history], "train", 50),
                               "parameters": n_params, "head": cfg.head, "image_size": cfg.image_size}
    acc.wait_for_everyone()
    if acc.is_main_process:
        if val:
            evals.append(evaluate())
            metrics.update({k: v for k, v in evals[-1].items() if k != "step"})
        save_final(cfg, raw, out / "final", metrics)
        (out / "metrics.json").write_text(json.dumps({**metrics, "evals": evals, "history": history}, indent=2))
    return metrics


def command_flags(cfg: DetectTrainConfig) -> str:
    """The ``shusheng train detect`` flags that differ from the defaults (recorded in the model card); any
    trainer config dataclass works (its own defaults are the reference)."""
    default, parts = type(cfg)(), []
    for k, v in asdict(cfg).items():
        if v == getattr(default, k) or k in ("resume", "output"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, dict):
            parts.append(f"{flag} '{json.dumps(v)}'")
        elif isinstance(v, (tuple, list)):
            parts.append(f"{flag} {','.join(str(x) for x in v)}")
        else:
            parts.append(f"{flag} {'none' if v is None else v}")
    return " ".join(parts)


def save_final(cfg: DetectTrainConfig, model, final: Path, metrics: dict[str, Any]) -> None:
    """``final``: the detector (fp16 weights), ``metrics.json`` and ``MODEL_CARD.md``."""
    model.save_pretrained(final, dtype=torch.float16)
    (final / "metrics.json").write_text(json.dumps({**metrics, "command": "shusheng train detect",
                                                    "train_config": asdict(cfg)}, indent=2))
    kind = "Mask R-CNN (boxes + instance masks)" if cfg.head == "maskrcnn" else "FCOS (boxes, one stage)"
    val = (f"box AP {metrics['box_AP']:.3f}, AP50 {metrics['box_AP50']:.3f}"
           + (f", mask AP {metrics['mask_AP']:.3f}" if metrics.get("mask_AP") is not None else "")
           if "box_AP" in metrics else "not evaluated")
    (final / "MODEL_CARD.md").write_text(f"""# {cfg.model_name}

{kind} from torchvision on a {cfg.fpn_channels}-channel feature pyramid over an InternImage tower
(`{cfg.backbone}` with {json.dumps(cfg.backbone_args)}; {metrics['parameters'] / 1e6:.2f}M parameters in all),
trained on SynthDrive scenes rendered at {'/'.join(map(str, cfg.scene_sizes()))} px (input {cfg.image_size} px). Labels: car, truck, bus, person, traffic light, sign.

- Initialised from: {f'the detector {cfg.init} (fine-tuned)' if cfg.init else
                       f'the tower of {cfg.backbone_init}' if cfg.backbone_init else 'random weights'}.
- Data: SynthDrive train seed {0}, {metrics['steps'] * cfg.batch_size} scenes rendered on the fly (indices drawn
  without repeats from the first {cfg.train_n}).
- Command: `shusheng train detect {command_flags(cfg)}` (seed {cfg.seed}).
- Steps: {metrics['steps']}, batch {cfg.batch_size}, AdamW lr {cfg.lr} (tower x{cfg.backbone_lr_scale}); wall
  time {metrics['wall_time_s']} s on the machine that trained it{' (stopped early)' if metrics['stopped_early'] else ''}.
- Final training loss (mean of the last 50 steps): {metrics['final_loss']}.
- Validation ({cfg.val_n} SynthDrive val scenes, COCO AP): {val}. Test-set numbers: `python bench/detection.py`.
- Knows only SynthDrive's flat-shaded street scenes: on photographs it finds little or nothing of use.
- Weights stored in fp16.
""")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`DetectTrainConfig` field."""
    _loop.add_config_arguments(
        p, DetectTrainConfig, json_fields=("backbone_args",), optional_types={"max_minutes": float},
        help={"head": "maskrcnn (boxes + masks) or fcos (boxes, one stage)",
              "backbone_init": "InternImage weights for the tower: a bundled model, a folder or a .safetensors "
                               "file ('none': random)",
              "anchor_scale": "anchor / FCOS object size per level = anchor_scale x stride (FCOS: use 1)",
              "backbone_indices": "tower levels the pyramid reads, comma-separated (default: all; '1,2,3' starts "
                                  "the pyramid at stride 8)",
              "head_convs": "convolutions per FCOS head branch (torchvision: 4)",
              "topk_candidates": "FCOS: best cells kept per pyramid level before NMS (torchvision: 1000)",
              "train_n": "distinct SynthDrive training scenes the run draws from",
              "init": "a saved detector (folder or bundled name) to fine-tune; replaces --backbone-init",
              "render_sizes": "comma-separated sizes the training scenes are rendered at, scene i at size i mod n "
                              "(e.g. 128,256; the detector resizes them to --image-size)"})


def config_from_args(args: argparse.Namespace) -> DetectTrainConfig:
    return _loop.config_from_args(DetectTrainConfig, args, none_strings_for=("backbone_init", "init"))


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.detect", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
