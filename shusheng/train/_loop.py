"""Scaffolding shared by the training loops of :mod:`shusheng.train`: checkpoints and exact resume, AdamW parameter
groups, the warm-up + cosine learning-rate schedule, warm-up and EMA decay scaled to the length of a run, and the
loss plot.

Checkpoints are folders ``<output>/checkpoints/step_<N>`` holding the accelerate state (model, optimiser, RNGs and
whatever was registered for checkpointing) and ``progress.json`` (the loop's own counters and history; written
last, so a folder without it is incomplete and ignored). The learning rate is a pure function of the step
(:func:`warmup_cosine`, applied with :func:`set_lr`), so a resumed run needs no scheduler state to follow the
uninterrupted one.

The command line of a trainer is its config dataclass: :func:`add_config_arguments` makes one flag per field,
:func:`config_from_args` turns the parsed flags back into the config, :func:`print_metrics` reports a run and
:func:`run_main` is the ``python -m shusheng.train.<task>`` entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shusheng._deps import require

logger = logging.getLogger(__name__)

__all__ = ["LOG_FORMAT", "NONE_STRINGS", "add_config_arguments", "checkpoint_dirs", "config_from_args",
           "load_checkpoint", "log_losses_step", "losses_step", "no_weight_decay", "param_groups", "plot_history", "print_metrics", "prune",
           "resume_dir", "run_main", "save_checkpoint", "scaled_ema_decay", "scaled_warmup", "set_lr",
           "sorted_by_step", "warmup_cosine"]

# --------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def sorted_by_step(paths: Iterable[Path]) -> list[Path]:
    """``step_<N>`` files or folders (any suffix) in increasing ``N``."""
    return sorted(paths, key=_step_of)


def prune(paths: Sequence[Path], keep: int) -> None:
    """Delete all but the last ``keep`` of ``paths`` (files or folders; ``keep <= 0`` keeps everything)."""
    if keep <= 0:
        return
    for old in paths[:-keep]:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run (``<out>/checkpoints/step_<N>`` with ``progress.json``), oldest first."""
    return sorted_by_step(p for p in (Path(out) / "checkpoints").glob("step_*") if (p / "progress.json").exists())


def resume_dir(out: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from: ``"auto"`` = the newest of ``out`` (None if there is none), a path =
    that folder, None = start afresh."""
    if resume == "auto":
        ckpts = checkpoint_dirs(out)
        return ckpts[-1] if ckpts else None
    return Path(resume) if resume else None


def load_checkpoint(acc, out: str | Path, resume: str | None,
                    extra: Mapping[str, nn.Module] | None = None) -> dict[str, Any] | None:
    """Restore the accelerate state of the checkpoint :func:`resume_dir` picks, and each module of ``extra`` from
    its ``<name>.safetensors`` there; returns its ``progress.json`` (None when the run starts afresh)."""
    d = resume_dir(out, resume)
    if d is None:
        return None
    acc.load_state(str(d))
    if extra:
        from safetensors.torch import load_file

        for name, module in extra.items():
            module.load_state_dict(load_file(str(d / f"{name}.safetensors"), device="cpu"))
    progress = json.loads((d / "progress.json").read_text())
    logger.info("resumed from %s at step %d", d, progress["step"])
    return progress


def save_checkpoint(acc, out: str | Path, progress: dict[str, Any], keep: int,
                    extra: Mapping[str, nn.Module] | None = None) -> Path:
    """Write ``<out>/checkpoints/step_<progress["step"]>`` (accelerate state, ``<name>.safetensors`` of each module
    of ``extra`` (state the optimiser does not own, e.g. EMA weights or adapters inside a frozen model: tensors
    only, never pickled objects) and ``progress.json``, written last) and keep only the newest ``keep``
    checkpoints. A step already saved is left alone (e.g. a periodic save that falls on the last step)."""
    d = Path(out) / "checkpoints" / f"step_{progress['step']}"
    if (d / "progress.json").exists():
        return d
    acc.save_state(str(d))
    if acc.is_main_process:
        if extra:
            from safetensors.torch import save_file

            for name, module in extra.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(d / f"{name}.safetensors"))
        (d / "progress.json").write_text(json.dumps(progress))
        prune(checkpoint_dirs(out), keep)
    return d


# --------------------------------------------------------------------------------------------------------
# Parameter groups and learning rate
# --------------------------------------------------------------------------------------------------------


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """The usual AdamW exemption: 1-D parameters (norms, scales) and biases."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None,
                 no_decay: Callable[[str, nn.Parameter], bool] = no_weight_decay) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, one per (weight decay, lr scale), in order of first
    appearance.

    Args:
        model: the module whose ``named_parameters`` are grouped.
        weight_decay: decay of every parameter that ``no_decay`` does not exempt (those get 0).
        lr_scale: per parameter name, a factor on the scheduled lr (stored as ``lr_scale``; :func:`set_lr` applies
            it). None = 1 for all.
        no_decay: ``(name, param) -> bool``; default :func:`no_weight_decay`.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if no_decay(name, p) else weight_decay
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        groups.setdefault((wd, scale), {"params": [], "weight_decay": wd, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, warmup: int, decay_start: int, decay_steps: int, floor: float = 0.0,
                  start: float = 0.0) -> float:
    """Learning-rate factor of the update after ``step`` finished updates: a linear warm-up, then cosine decay.

    ``step < warmup``: from ``start`` rising linearly by ``(1 - start) / warmup`` per step; afterwards
    ``floor + (1 - floor) * (1 + cos(pi * t)) / 2`` with ``t = (step - decay_start) / decay_steps`` clipped to
    ``[0, 1]`` (so the factor is 1 between the two phases and ``floor`` once the decay is over).

    timm's ``CosineLRScheduler`` (``t_initial=T``, ``cycle_limit=1``, ``lr_min = floor * lr``,
    ``warmup_lr_init = start * lr``, ``warmup_t=W``) is ``decay_start=0, decay_steps=T`` (the warm-up overlaid on
    the cosine, the official InternImage recipe) or, with ``warmup_prefix=True``, ``decay_start=W, decay_steps=T``.
    """
    if step < warmup:
        return start + step * (1.0 - start) / warmup
    t = min(1.0, max(0.0, (step - decay_start) / max(1, decay_steps)))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def out_of_time(max_minutes: float | None, elapsed: float, step: int, total: int) -> bool:
    """Whether a run with ``--max-minutes`` must stop (and save) now, before its last step; logs why."""
    if max_minutes is None or elapsed <= max_minutes * 60 or step >= total:
        return False
    logger.warning("time limit of %.1f min reached at step %d; stopping", max_minutes, step)
    return True


def stage_tail(history: Sequence[Mapping[str, Any]], stage: str, n: int) -> float | None:
    """Mean ``loss`` of the last ``n`` entries of ``history`` whose ``stage`` is ``stage`` (None when there are none):
    the final loss a run reports, less noisy than its last step."""
    vals = [h["loss"] for h in history if h.get("stage") == stage][-n:]
    return float(sum(vals) / len(vals)) if vals else None


def losses_step(acc, model: nn.Module, optimizer: torch.optim.Optimizer, losses: Mapping[str, torch.Tensor],
                step: int, clip_grad: float = 0.0) -> torch.Tensor:
    """One update from a dict of named losses (a torchvision detector's, a segmenter's main + auxiliary): their
    sum is back-propagated through ``acc``, gradients clipped to ``clip_grad`` (0: not clipped), the optimiser
    stepped and its gradients cleared. Returns the summed loss.

    Raises:
        FloatingPointError: the summed loss is not finite (the message lists each loss at ``step``).
    """
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at step {step}: { {k: float(v) for k, v in losses.items()} }")
    acc.backward(loss)
    if clip_grad:
        acc.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def log_losses_step(history: list[dict[str, Any]], step: int, loss: torch.Tensor, losses: Mapping[str, torch.Tensor],
                    lr: float, elapsed: float, log_every: int, seconds_per_step: float) -> None:
    """Append step ``step``'s summed and named losses, lr and time to ``history`` and, every ``log_every`` steps
    (and at step 1), log them."""
    history.append({"step": step, "loss": float(loss.detach()), "lr": lr, "time": elapsed,
                    **{k: float(v.detach()) for k, v in losses.items()}})
    if step % log_every == 0 or step == 1:
        logger.info("step %d loss %.4f (%s) lr %.2e (%.2f s/step)", step, history[-1]["loss"],
                    ", ".join(f"{k} {history[-1][k]:.3f}" for k in sorted(losses)), lr, seconds_per_step)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# --------------------------------------------------------------------------------------------------------
# Run-length scaling of warm-up and EMA
# --------------------------------------------------------------------------------------------------------


def scaled_warmup(official_steps: int, total_steps: int, share: float = 1 / 15) -> int:
    """Warm-up steps of a run of ``total_steps``: the recipe's ``official_steps``, but at most ``share`` of the
    run (with the default 1/15, a 300-epoch run keeps a 20-epoch warm-up; a 3-epoch run warms up for 0.2
    epochs instead of never leaving the warm-up)."""
    return max(0, min(int(official_steps), round(share * total_steps)))


def scaled_ema_decay(total_steps: int, official: float, horizon: float = 0.05, min_steps: float = 2.0) -> float:
    """EMA decay whose averaging horizon ``1 / (1 - decay)`` is ``horizon`` of the run (at least ``min_steps``
    steps), capped at ``official``.

    A decay of 0.9999 averages over ~10,000 steps: right for the ~375,000 steps of 300 ImageNet epochs at a global
    batch of 1024, but in a run of a few hundred steps the average would still be mostly the random initial
    weights. Runs long enough that ``horizon`` of them exceeds the official horizon keep ``official``.
    """
    return min(official, 1.0 - 1.0 / max(min_steps, horizon * total_steps))


# --------------------------------------------------------------------------------------------------------
# Loss plot
# --------------------------------------------------------------------------------------------------------


def plot_history(history: Sequence[dict[str, float]], path: str | Path, losses: Sequence[str] = ("loss",),
                 accuracies: Sequence[str] = (), evals: Sequence[tuple[str, Sequence[int], Sequence[float]]] = (),
                 ylabel: str = "loss", eval_ylabel: str = "score", title: str = "training",
                 log_scale: bool = False) -> None:
    """Training curves to a PNG: the ``losses`` keys of ``history`` smoothed over ``len(history) / 50`` steps (a
    single loss also per step), ``evals`` (``(label, steps, values in [0, 1])``) on a twin axis, and the
    ``accuracies`` keys, smoothed, on a second panel. Keys missing from ``history`` are skipped."""
    matplotlib = require("matplotlib", extra="train")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    losses = [k for k in losses if k in history[0]]
    accuracies = [k for k in accuracies if k in history[0]]
    steps = [h["step"] for h in history]
    w = max(1, len(history) // 50)

    def smooth(key: str) -> np.ndarray:
        return np.convolve([h[key] for h in history], np.ones(w) / w, mode="valid")

    fig, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(11 if accuracies else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for k in losses:
        if len(losses) == 1:
            ax.plot(steps, [h[k] for h in history], lw=0.6, alpha=0.5, label=f"{k} (per step)")
        ax.plot(steps[w - 1:], smooth(k), lw=1.5, label=f"{k} ({w}-step mean)" if len(losses) == 1 else k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        for i, (label, e_steps, values) in enumerate(evals):
            ax2.plot(e_steps, values, "os^v"[i % 4] + "-", c=f"C{i + 2}", label=label)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel(eval_ylabel)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    if accuracies:
        for k in accuracies:
            axes[0, 1].plot(steps[w - 1:], smooth(k), label=k)
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_ylabel("train accuracy")
        axes[0, 1].legend()
        axes[0, 1].set_title("accuracy on the training batches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# Command line: config dataclass <-> flags
# --------------------------------------------------------------------------------------------------------

#: the log line of ``python -m shusheng.train.<task>``
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: what :func:`config_from_args` reads as None in the fields named by ``none_strings_for``
NONE_STRINGS = ("none", "None", "")


def _int_tuple(s: str) -> tuple[int, ...]:
    """``"1,1,3,1"`` → ``(1, 1, 3, 1)``: the flag type of a tuple-of-int field."""
    return tuple(int(x) for x in s.split(","))


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, json_fields: Collection[str] = (),
                         optional_types: Mapping[str, Callable[[str], Any]] | None = None,
                         help: Mapping[str, str] | None = None, skip: Collection[str] = ()) -> None:
    """One flag per field of the dataclass ``config_cls``, in field order, defaulting to ``config_cls()``'s value.

    A field ``some_name`` becomes ``--some-name``; how its string is read depends on the default:

    * a name in ``json_fields``: a JSON document (``json.loads``; e.g. a dict of model arguments; help
      "JSON dict" unless ``help`` says otherwise);
    * a bool: ``--some-name`` / ``--no-some-name`` (``argparse.BooleanOptionalAction``);
    * None: ``optional_types[name]`` (default ``str``), since the default cannot say;
    * a tuple of ints: comma-separated integers (``--depths 1,1,3,1``);
    * anything else: the default's type (``int``, ``float``, ``str``).

    Args:
        parser: receives the flags.
        config_cls: a dataclass whose fields all have defaults.
        json_fields: fields read as JSON.
        optional_types: per field with a None default, the flag's type (default ``str``).
        help: per field, the flag's help text (default none).
        skip: fields that get no flag here (e.g. ones the caller adds by hand, or internal ``extra`` dicts).

    Raises:
        TypeError: a field's default is a container other than a tuple of ints and the field is neither in
            ``json_fields`` nor in ``skip``.
    """
    optional_types, help = optional_types or {}, help or {}
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        name = f.name
        if name in skip:
            continue
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if name in json_fields:
            parser.add_argument(flag, type=json.loads, default=value, help=help.get(name, "JSON dict"))
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help.get(name))
        elif value is None:
            parser.add_argument(flag, type=optional_types.get(name, str), default=None, help=help.get(name))
        elif isinstance(value, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            parser.add_argument(flag, type=_int_tuple, default=value,
                                help=help.get(name, "comma-separated integers"))
        elif isinstance(value, (dict, list, tuple, set)):
            raise TypeError(f"{config_cls.__name__}.{name}: a {type(value).__name__} default has no flag type; "
                            f"name it in json_fields or skip")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=help.get(name))


def config_from_args(config_cls: type, args: argparse.Namespace, *, none_strings_for: Collection[str] = ()):
    """``config_cls`` from the parsed flags: every attribute of ``args`` named like a field (others, e.g. the
    sub-command, are ignored); in the fields ``none_strings_for`` a value of :data:`NONE_STRINGS` (``"none"``,
    ``"None"``, ``""``) becomes None, so a field with a non-None default can be switched off from the command
    line (``--tower-init none``)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    for name in none_strings_for:
        if isinstance(kw.get(name), str) and kw[name] in NONE_STRINGS:
            kw[name] = None
    return config_cls(**kw)


def print_metrics(metrics: Mapping[str, Any]) -> int:
    """Print a run's metrics as one JSON line (what ``shusheng train <task>`` ends with); returns 0, the exit
    status."""
    print(json.dumps(metrics))
    return 0


def run_main(prog: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None, *,
             log_format: str = LOG_FORMAT) -> int:
    """The ``python -m shusheng.train.<task>`` entry point: parse ``argv`` (None = ``sys.argv[1:]``) with the
    flags of ``add_arguments`` (``--help`` shows ``doc``, the module docstring, as written), log INFO to stderr
    in ``log_format`` (unless logging is already configured) and return ``run(args)``, the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=log_format)
    return run(args)
