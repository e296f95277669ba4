"""Multi-task training of the unified decoder (captioning, VQA, retrieval, attribute classification) on SynthDrive.

    shusheng data synthdrive --split train --n 10000 --out runs/uniperceiver/data/train --no-masks
    shusheng train uniperceiver --data-dir runs/uniperceiver/data/train --output runs/uniperceiver/mini
    python -m shusheng.train.uniperceiver ...            # same
    accelerate launch -m shusheng.train.uniperceiver ... # several processes

Every step draws one batch of images and applies every task to it, so the image tower's forward and backward
(trained jointly from scratch) serve all four losses: captioning (two-stream layout, one of the five captions),
VQA (``--vqa-per-image`` questions per image; matching at the question's ``<SPE>`` against the answer set plus
open generation of the answer), image-text contrastive retrieval with in-batch negatives, and classification of
the time / weather / light / sign attributes by matching class-name texts. The batch of step ``t`` (images,
flips, chosen captions and questions, masked question words) depends only on ``(seed, t)`` and the learning
rate (linear warm-up, then cosine decay to ``min_lr_ratio``) only on ``t``, so a run resumed from a checkpoint
follows the uninterrupted run exactly. The attribute classes, answers and tags come from
:mod:`shusheng.data.synthdrive_queries`. Checkpoints (accelerate state + progress) are written
every ``--save-every`` steps; ``--resume auto`` continues from the newest; ``loss_curve.png`` is redrawn next to
them. The fixed SynthDrive test split is refused as training data.
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
from shusheng.data.synthdrive_qa import CELLS, TRAIN_CELLS, grid_questions
from shusheng.data.synthdrive_queries import (
    ATTRIBUTE_CLASSES,
    TAG_GROUPS,
    attribute_labels,
    attribute_tags,
    synthdrive_answers,
)
from shusheng.modeling import Preprocess
from shusheng.train import _loop

logger = logging.getLogger(__name__)

# ATTRIBUTE_CLASSES, attribute_labels and synthdrive_answers live in shusheng.data; they stay importable from here
# for existing callers
__all__ = ["UniPerceiverTrainConfig", "load_synthdrive", "main", "train"]


@dataclass
class UniPerceiverTrainConfig:
    """Every knob of a run; written to ``<output>/config.json``."""

    data_dir: str | None = None  # a folder written by `shusheng data synthdrive`; None = render n_train images
    n_train: int | None = None  # images used (default: all in data_dir; 10000 when rendering)
    image_size: int = 128
    output: str = "runs/uniperceiver"
    domain_fit: int = 4000  # SynthDrive train scenes for the in-domain check written with the weights (0 = none)
    # "joint": everything trained together; "tower": pre-train the image tower alone on attribute tags;
    # "decoder": freeze the tower of a "tower" run (--tower), cache its pooled features, train the rest
    stage: str = "joint"
    tower: str | None = None  # output folder of a "tower" run (stage "decoder")
    # warm start: a UniPerceiver folder (save_pretrained) whose weights, all but the image backbone's, start the
    # run (stages "joint" and "decoder"; the vocabulary, answers and shapes must match)
    init: str | None = None
    amp: str = "no"  # "bf16": bfloat16 autocast (CPU and GPU)
    # model
    backbone: str = "internimage_test"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {
        "channels": 32, "depths": [2, 2, 4, 2], "groups": [2, 4, 8, 16], "mlp_ratio": 4.0, "drop_path_rate": 0.0})
    image_grid: int = 4
    text_init: str | None = "minilm"
    n_layers: int = 2
    d_model: int = 384
    n_heads: int = 12
    vocab_targets: str = "full"
    max_text_len: int = 64
    # optimisation
    steps: int = 600
    batch_size: int = 32
    vqa_per_image: int = 2
    # where questions come from: "annotations" (each image's stored SynthDrive questions, one form per fact) or
    # "grid" (drawn per step from the question grid of shusheng.data.synthdrive_qa: every fact in every form that
    # fits it, training wordings and training cells only; the held-out cells and wordings are never drawn)
    qa: str = "annotations"
    # grid cells drawn: "train" (every cell but the held-out ones, which measure generalisation to unseen
    # fact x form combinations) or "all" (a final model for users, after the held-out cells have been measured)
    qa_cells: str = "train"
    lr: float = 1e-3  # image tower and new parameters
    text_lr: float = 2e-4  # parameters initialised from MiniLM
    min_lr_ratio: float = 0.05
    warmup_steps: int = 40
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    w_caption: float = 1.0
    w_vqa: float = 1.0
    w_vqa_gen: float = 0.5
    w_retrieval: float = 0.5
    w_cls: float = 0.5
    answer_pool: int = 96  # answers matched per step (the batch's + random others); 0 = all of them
    question_drop: float = 0.1  # probability of replacing a question word by [MASK]
    # probability that the caption target is the first, complete caption (every fact of the scene) instead of
    # one of the five drawn uniformly: the generated caption's style follows the mode of its targets, and a
    # caption that states everything it sees is what users (and CIDEr-D against five paraphrases) reward
    caption_full_p: float = 0.0
    hflip: bool = True
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto", a checkpoint dir, or None
    max_minutes: float | None = None  # stop (and save) after this much training time
    # fit the run into this many minutes: after `calibration_steps` steps the total number of steps (and so the
    # lr schedule) is fixed from the measured speed; the choice is stored in the checkpoints, resumes keep it
    time_budget_min: float | None = None
    calibration_steps: int = 15
    log_every: int = 10


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

def load_synthdrive(data_dir: str | None, n: int | None, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Training images ``(N, S, S, 3)`` uint8 and their annotation records, from a folder or rendered."""
    from tqdm.auto import tqdm

    from shusheng.data import load_image
    from shusheng.data import synthdrive as sd

    if data_dir is None:
        n = 10_000 if n is None else n
        images, records = np.zeros((n, size, size, 3), np.uint8), []
        for i in tqdm(range(n), desc="render", leave=False):
            img, ann = sd.sample(sd.TRAIN_SEED, i, size)
            images[i] = np.asarray(img)
            records.append({"attributes": ann.attributes, "captions": ann.captions, "qa": ann.qa})
        return images, records
    root = Path(data_dir)
    ann_file = root / "annotations.jsonl"
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file} not found: write the data with `shusheng data synthdrive --out {root}`")
    coco = root / "coco.json"
    if coco.is_file():
        with open(coco, encoding="utf-8") as f:
            info = json.load(f).get("info", {})
        if info.get("seed") == sd.TEST_SEED:
            raise ValueError(f"{root} is the fixed SynthDrive test split (seed {sd.TEST_SEED}); never train on it")
    records = [json.loads(line) for line in ann_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is not None:
        records = records[:n]
    images = np.zeros((len(records), size, size, 3), np.uint8)
    for i, r in enumerate(tqdm(records, desc="load images", leave=False)):
        img = load_image(root / r["file"])
        if img.size != (size, size):
            img = img.resize((size, size), resample=3)
        images[i] = np.asarray(img)
    return images, records


class StepSampler:
    """The batch of step ``t`` as a pure function of ``(seed, t)`` (exact resume without data-loader state)."""

    def __init__(self, images: np.ndarray, records: list[dict[str, Any]], cfg: UniPerceiverTrainConfig,
                 answers: list[str], preprocess: Preprocess | None = None):
        self.images, self.records, self.cfg, self.answers = images, records, cfg, answers
        self.per_epoch = max(1, len(records) // cfg.batch_size)
        self.with_images = True
        pre = preprocess or Preprocess(size=cfg.image_size, resize="squash")  # the model's normalisation
        self.mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std).view(1, 3, 1, 1)

    def __call__(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        epoch, k = divmod(step, self.per_epoch)
        n = len(self.records)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        b = min(cfg.batch_size, n)
        idx = perm[k * b:(k + 1) * b]
        rng = np.random.default_rng([cfg.seed, 1_000_003, step])
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5) if cfg.hflip else torch.zeros(len(idx), dtype=torch.bool)
        x = None
        if self.with_images:
            x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 255.0
            x = (torch.where(flip[:, None, None, None], x.flip(-1), x) - self.mean) / self.std
        recs = [self.records[i] for i in idx]
        captions = [r["captions"][int(rng.integers(len(r["captions"])))] for r in recs]
        if cfg.caption_full_p > 0:  # own stream: the draws above (and resumes of older runs) are unchanged
            full = np.random.default_rng([cfg.seed, 2_000_003, step]).random(len(recs)) < cfg.caption_full_p
            captions = [r["captions"][0] if f else c for r, c, f in zip(recs, captions, full)]
        retrieval = [r["captions"][int(rng.integers(len(r["captions"])))] for r in recs]
        questions, answers, cells = [], [], []
        qrng = np.random.default_rng([cfg.seed, 3_000_003, step])  # own stream: "annotations" runs are unchanged
        for r in recs:
            if cfg.qa == "grid":
                drawn_from = TRAIN_CELLS if cfg.qa_cells == "train" else CELLS
                qs = grid_questions(r["attributes"], qrng, "train", drawn_from, k=cfg.vqa_per_image)
            else:
                pick = rng.choice(len(r["qa"]), size=min(cfg.vqa_per_image, len(r["qa"])), replace=False)
                qs = [r["qa"][int(j)] for j in pick]
            questions.append([self._drop(q["question"], rng) for q in qs])
            answers.append([q["answer"] for q in qs])
            cells.append([f'{q["type"]}/{q.get("form", "open")}' for q in qs])
        labels: dict[str, list[int]] = {g: [] for g in ATTRIBUTE_CLASSES}
        for r in recs:
            for g, y in attribute_labels(r["attributes"]).items():
                labels[g].append(y)
        pool = self.answers
        if cfg.answer_pool and cfg.answer_pool < len(self.answers):
            need = list(dict.fromkeys(a for a_s in answers for a in a_s))
            rest = [a for a in self.answers if a not in set(need)]
            extra = rng.choice(len(rest), size=max(0, cfg.answer_pool - len(need)), replace=False)
            pool = need + [rest[int(j)] for j in sorted(extra)]
        return {"index": torch.from_numpy(idx), "flip": flip, "records": recs, "images": x, "captions": captions, "retrieval_texts": retrieval, "questions": questions,
                "answers": answers, "question_cells": cells, "labels": labels, "answer_candidates": pool}

    def _drop(self, question: str, rng: np.random.Generator) -> str:
        if self.cfg.question_drop <= 0:
            return question
        words = question.split()
        return " ".join("[MASK]" if rng.random() < self.cfg.question_drop else w for w in words)


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------

def build_model(cfg: UniPerceiverTrainConfig, records: list[dict[str, Any]]):
    """The model for a run: the generation vocabulary is every token of the training captions and answers."""
    from shusheng.uniperceiver.model import UniPerceiver
    from shusheng.uniperceiver.tokenizers import TextTokenizer

    tok = TextTokenizer()
    answers = synthdrive_answers()
    seen = {q["answer"] for r in records for q in r.get("qa", ())}
    answers += sorted(seen - set(answers))
    texts = [c for r in records for c in r["captions"]] + answers
    vocab = sorted({i for ids in tok.encode(texts) for i in ids} | {tok.eos_id})
    class_names = {g: list(m.values()) for g, m in ATTRIBUTE_CLASSES.items()}
    return UniPerceiver(
        dict(backbone=cfg.backbone, backbone_args=cfg.backbone_args, image_size=cfg.image_size,
             image_grid=cfg.image_grid, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
             text_init=cfg.text_init, freeze_word_embeddings=cfg.text_init is not None,
             vocab_targets=cfg.vocab_targets, max_text_len=cfg.max_text_len, target_vocab=vocab, answers=answers,
             class_names=class_names, vocab_size=tok.vocab_size, norm_first=cfg.text_init is None),
        tokenizer=tok)


def param_groups(model, cfg: UniPerceiverTrainConfig) -> list[dict]:
    """AdamW groups: MiniLM-initialised parameters at ``text_lr`` (``lr_scale = text_lr / lr``), the rest at
    ``lr``; no decay on 1-D parameters, biases and the logit scale."""
    pretrained = ("text.position", "text.token_type", "text.norm", "encoder.layers") if cfg.text_init else ()
    return _loop.param_groups(
        model, cfg.weight_decay,
        lr_scale=lambda name: cfg.text_lr / cfg.lr if pretrained and name.startswith(pretrained) else 1.0,
        no_decay=lambda name, p: _loop.no_weight_decay(name, p) or name.startswith("logit_scale"))


def lr_factor(step: int, cfg: UniPerceiverTrainConfig) -> float:
    """Factor on each group's lr for the update after ``step`` updates: ``(step + 1) / warmup_steps`` during the
    warm-up, then cosine from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``cfg.steps`` (read at each step: a
    time budget may fix ``steps`` during the run)."""
    w = cfg.warmup_steps
    return _loop.warmup_cosine(step, max(0, w - 1), decay_start=w, decay_steps=cfg.steps - w,
                               floor=cfg.min_lr_ratio, start=1 / w if w else 1.0)


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Loss curves (total and per task, smoothed; log scale) and training accuracies to a PNG."""
    _loop.plot_history(history, path, losses=("loss", "caption", "vqa", "vqa_gen", "retrieval", "cls", "tags"),
                       accuracies=("caption_acc", "vqa_acc", "tag_acc", "acc_light", "acc_sign", "acc_n_car",
                                   "acc_n_red"), title="training losses", log_scale=True)


# --------------------------------------------------------------------------------------------------------
# Stage "tower": the image tower alone, on attribute tags
# --------------------------------------------------------------------------------------------------------

class TowerTagger(torch.nn.Module):
    """Image tower + a linear tag head on the flattened ``g x g`` pooled grid (the decoder's image tokens).

    The head exists only for pre-training the tower and is dropped afterwards.
    """

    def __init__(self, backbone: str, backbone_args: dict[str, Any], grid: int):
        super().__init__()
        from shusheng.backbone import create_backbone

        self.backbone = create_backbone(backbone, **backbone_args)
        self.grid = grid
        self.groups = TAG_GROUPS
        c = self.backbone.num_features
        self.norm = torch.nn.LayerNorm(grid * grid * c)
        self.head = torch.nn.Linear(grid * grid * c, sum(n for _, n in self.groups))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone.forward_features(images)  # (B, C, h, w)
        f = torch.nn.functional.adaptive_avg_pool2d(f.float(), self.grid).flatten(1)  # (B, C*g*g)
        logits = self.head(torch.nn.functional.dropout(self.norm(f), 0.1, self.training))
        return dict(zip([g for g, _ in self.groups], logits.split([n for _, n in self.groups], 1)))


def _tower_losses(model: TowerTagger, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    logits = model(batch["images"])
    tags = [attribute_tags(r["attributes"]) for r in batch["records"]]
    losses, correct = [], {}
    for g, lg in logits.items():
        y = torch.tensor([t[g] for t in tags], device=lg.device)
        losses.append(torch.nn.functional.cross_entropy(lg, y))
        correct[g] = (lg.argmax(-1) == y).float().mean()
    out = {"tags": torch.stack(losses).mean()}
    with torch.no_grad():
        for key in ("light", "sign", "n_car", "n_red", "time"):
            out[f"acc_{key}"] = correct[key]
        out["tag_acc"] = torch.stack(list(correct.values())).mean()
    return out


def load_tower(model, tower_dir: str | Path) -> None:
    """Copy a frozen image tower into ``model.image.backbone`` (exact shapes required): the backbone of a finished
    "tower" run (``<dir>/final/backbone.safetensors``) or of a saved UniPerceiver folder (its ``backbone/``
    component, e.g. the bundled model's)."""
    from safetensors.torch import load_file

    d = Path(tower_dir)
    f = d / "final" / "backbone.safetensors"
    component = d / "backbone" / "model.safetensors"
    if f.is_file():
        sd = load_file(str(f))
    elif component.is_file():
        sd = load_file(str(component))
    else:
        raise FileNotFoundError(f"{f} not found (nor a model folder's {component}): run the 'tower' stage first "
                                f"(--stage tower --output {tower_dir}) or pass a saved UniPerceiver folder")
    own = model.image.backbone.state_dict()
    model.image.backbone.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()})


def init_from(model, directory: str | Path) -> None:
    """Copy every tensor of a ``save_pretrained`` folder except the image backbone's into ``model`` (a warm
    start on a new tower). The run's generation vocabulary, answers and class names must be the folder's."""
    from safetensors.torch import load_file

    d = Path(directory)
    f, cfg_file = d / "model.safetensors", d / "config.json"
    if not (f.is_file() and cfg_file.is_file()):
        raise FileNotFoundError(f"init: {d} is not a UniPerceiver folder (model.safetensors + config.json)")
    theirs = json.loads(cfg_file.read_text()).get("config", {})
    for key in ("target_vocab", "answers", "class_names", "d_model", "n_layers", "image_grid"):
        ours = json.loads(json.dumps(getattr(model.config, key)))
        if key in ("target_vocab", "answers") and key in theirs:
            # no parameter depends on these lists (answers are encoded texts; "shallow" vocabulary targets are
            # the frozen word embeddings): a run may grow them, never drop what the folder had
            if not set(theirs[key]) <= set(ours):
                raise ValueError(f"init: {d} has {key} that this run lacks: {sorted(set(theirs[key]) - set(ours))[:6]}")
            if key == "target_vocab" and model.config.vocab_targets != "shallow" and theirs[key] != ours:
                raise ValueError(f"init: {d} has a different {key} than this run; it cannot start it")
        elif key in theirs and theirs[key] != ours:
            raise ValueError(f"init: {d} has a different {key} than this run; it cannot start it")
    sd = {k: v for k, v in load_file(str(f)).items() if not k.startswith("image.backbone.")}
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    missing = sorted(k for k in own if not k.startswith("image.backbone.") and k not in sd
                     and k not in model._external_keys())
    if bad or missing:
        raise ValueError(f"init: {d} does not fit this run's model: unexpected or mis-shaped {bad[:6]}, "
                         f"missing {missing[:6]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    logger.info("warm start from %s (%d tensors, image backbone excluded)", d, len(sd))


@torch.inference_mode()
def extract_features(model, images: np.ndarray, both_flips: bool, batch_size: int = 64) -> torch.Tensor:
    """Pooled tower features of every image (and of its mirror image): (N, 1|2, g*g, C) float16."""
    from tqdm.auto import tqdm

    pre = model.preprocess_config()
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="extract", leave=False):
        x = (torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        views = [x, x.flip(-1)] if both_flips else [x]
        out.append(torch.stack([model.image.pooled_features(v.to(model.device)).cpu() for v in views], 1).half())
    model.train()
    return torch.cat(out)


def train(cfg: UniPerceiverTrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (also written to ``metrics.json``)."""
    accelerate = require("accelerate", extra="train")
    from tqdm.auto import tqdm

    if cfg.stage not in ("joint", "tower", "decoder"):
        raise ValueError(f"stage must be 'joint', 'tower' or 'decoder', got {cfg.stage!r}")
    if cfg.qa not in ("annotations", "grid"):
        raise ValueError(f"qa must be 'annotations' or 'grid', got {cfg.qa!r}")
    if cfg.qa_cells not in ("train", "all"):
        raise ValueError(f"qa_cells must be 'train' or 'all', got {cfg.qa_cells!r}")
    if cfg.stage == "decoder" and not cfg.tower:
        raise ValueError("stage 'decoder' needs --tower (the output folder of a 'tower' run)")
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.amp)
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    images, records = load_synthdrive(cfg.data_dir, cfg.n_train, cfg.image_size)
    features = None
    if cfg.stage == "tower":
        model = TowerTagger(cfg.backbone, cfg.backbone_args, cfg.image_grid)
        sampler = StepSampler(images, records, cfg, [])
        groups = _loop.param_groups(model, cfg.weight_decay, no_decay=lambda name, p: p.ndim <= 1)
    else:
        model = build_model(cfg, records)
        if cfg.init:
            init_from(model, cfg.init)
        sampler = StepSampler(images, records, cfg, list(model.config.answers), model.preprocess_config())
        if cfg.stage == "decoder":
            load_tower(model, cfg.tower)
            model.image.backbone.requires_grad_(False)
            feat_file = out / "tower_features.pt"
            if feat_file.is_file():
                features = torch.load(feat_file, map_location="cpu", weights_only=True)  # a tensor, never objects
            else:
                features = extract_features(model, images, cfg.hflip)
                if acc.is_main_process:
                    torch.save(features, feat_file)
            sampler.with_images = False
        groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model, opt = acc.prepare(model, opt)
    core = acc.unwrap_model(model)
    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
    logger.info("stage %s: %.2fM trainable parameters, %d training images", cfg.stage, n_params / 1e6, len(records))

    step, history, elapsed, first_step = 0, [], 0.0, 0
    prog = _loop.load_checkpoint(acc, out, cfg.resume)
    if prog is not None:
        step, history, elapsed = prog["step"], prog["history"], prog.get("elapsed", 0.0)
        if prog.get("steps"):
            cfg.steps = prog["steps"]
        first_step = step
    _loop.set_lr(opt, cfg.lr * lr_factor(step, cfg))

    weights = {"caption": cfg.w_caption, "vqa": cfg.w_vqa, "vqa_gen": cfg.w_vqa_gen, "retrieval": cfg.w_retrieval,
               "cls": cfg.w_cls}

    def save() -> None:
        d = out / "checkpoints" / f"step_{step}"
        if (d / "progress.json").exists():
            return
        _loop.save_checkpoint(acc, out, {"step": step, "history": history, "elapsed": elapsed, "steps": cfg.steps},
                              cfg.keep_checkpoints)
        if acc.is_main_process:
            plot_history(history, out / "loss_curve.png")

    model.train()
    t_start, t_resume = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not acc.is_main_process)
    stopped_early = False
    while step < cfg.steps:
        batch = sampler(step)
        with acc.autocast():
            if cfg.stage == "tower":
                losses = _tower_losses(model, batch)
                loss = losses["tags"]
            else:
                pooled = None
                if features is not None:
                    pooled = features[batch["index"], batch["flip"].long() if features.shape[1] > 1 else 0].float()
                losses = core.losses(batch["images"], batch["captions"], batch["questions"], batch["answers"],
                                     batch["retrieval_texts"], batch["labels"], batch["answer_candidates"],
                                     pooled=pooled)
                loss = sum(weights[k] * v for k, v in losses.items() if k in weights)
        acc.backward(loss)
        if cfg.clip_grad:
            acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        _loop.set_lr(opt, cfg.lr * lr_factor(step, cfg))
        elapsed = time.time() - t_start
        rec = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], "time": elapsed}
        rec.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()})
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('vqa_acc', rec.get('tag_acc', 0)):.2f}")
        if step % cfg.log_every == 0 or step == 1:
            logger.info("step %d loss %.4f %s (%.2f s/step)", step, rec["loss"],
                        " ".join(f"{k} {rec[k]:.3f}" for k in losses), (time.time() - t_resume) / (step - first_step))
        if cfg.time_budget_min and step == cfg.calibration_steps and first_step < step:
            rate = (time.time() - t_resume) / (step - first_step)
            cfg.steps = max(step + 1, int(cfg.time_budget_min * 60 / rate))
            bar.total = cfg.steps
            logger.info("time budget %.1f min at %.2f s/step: training for %d steps", cfg.time_budget_min, rate,
                        cfg.steps)
            if acc.is_main_process:
                (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if _loop.out_of_time(cfg.max_minutes, elapsed, step, cfg.steps):
            stopped_early = True
            break
    bar.close()
    save()
    metrics = {"steps": step, "wall_time_s": round(elapsed, 1), "stopped_early": stopped_early,
               "final": {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1] if k != "step"}
               if history else {}}
    acc.wait_for_everyone()
    if acc.is_main_process:
        if cfg.stage == "tower":
            from safetensors.torch import save_file

            (out / "final").mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in core.backbone.state_dict().items()},
                      str(out / "final" / "backbone.safetensors"))
        else:
            core.save_pretrained(out / "final")
            if cfg.domain_fit > 0:
                from shusheng.train.domain import fit_and_save

                fit_and_save(out / "final", cfg.domain_fit)
        plot_history(history, out / "loss_curve.png")
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`UniPerceiverTrainConfig` field (``--backbone-args`` is JSON)."""
    _loop.add_config_arguments(p, UniPerceiverTrainConfig, json_fields=("backbone_args",),
                               optional_types={"n_train": int, "max_minutes": float, "time_budget_min": float},
                               help={"backbone_args": "JSON dict of backbone arguments"})


def config_from_args(args: argparse.Namespace) -> UniPerceiverTrainConfig:
    """The run of the parsed flags (``--text-init none`` = a randomly initialised text encoder)."""
    return _loop.config_from_args(UniPerceiverTrainConfig, args, none_strings_for=("text_init",))


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.uniperceiver", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
