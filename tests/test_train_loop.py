"""The shared training scaffolding (`shusheng.train._loop`): lr schedule, parameter groups, checkpoints, scaling."""

import json
import math

import pytest
import torch
from torch import nn

from shusheng.train import _loop


@pytest.mark.parametrize("prefix", [False, True])
def test_warmup_cosine_matches_timm(prefix):
    timm_sched = pytest.importorskip("timm.scheduler")
    lr, floor_lr, start_lr, warmup, total = 0.1, 1e-4, 1e-6, 7, 40
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = timm_sched.CosineLRScheduler(opt, t_initial=total, lr_min=floor_lr, warmup_t=warmup,
                                         warmup_lr_init=start_lr, warmup_prefix=prefix, cycle_limit=1,
                                         t_in_epochs=False)
    for step in range(total + warmup + 5):
        sched.step_update(step)
        ours = lr * _loop.warmup_cosine(step, warmup, decay_start=warmup if prefix else 0, decay_steps=total,
                                        floor=floor_lr / lr, start=start_lr / lr)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step


def test_uniperceiver_schedule_is_its_own_warmup_then_cosine():
    from shusheng.train.uniperceiver import UniPerceiverTrainConfig, lr_factor

    for warmup in (0, 1, 4):
        cfg = UniPerceiverTrainConfig(steps=20, warmup_steps=warmup, min_lr_ratio=0.05)
        for step in range(25):
            if step < warmup:
                want = (step + 1) / warmup
            else:
                t = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
                want = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))
            assert lr_factor(step, cfg) == pytest.approx(want, rel=1e-12), (warmup, step)


def test_param_groups_and_set_lr():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = _loop.param_groups(model, 0.05, lr_scale=lambda name: 0.5 if name.startswith("2.") else 1.0)
    # (decay, scale) groups in order of first appearance; frozen parameters left out
    assert [(g["weight_decay"], g["lr_scale"], len(g["params"])) for g in groups] == [
        (0.05, 1.0, 1), (0.0, 1.0, 3), (0.0, 0.5, 1)]
    assert groups[2]["params"][0] is model[2].bias
    opt = torch.optim.AdamW(groups, lr=1.0)
    _loop.set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2, 0.1]
    only_1d = _loop.param_groups(model, 0.05, no_decay=lambda name, p: p.ndim <= 1)
    assert [len(g["params"]) for g in only_1d] == [1, 4]


class _FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.loaded = None

    def save_state(self, d):
        from pathlib import Path

        Path(d).mkdir(parents=True)
        (Path(d) / "state.bin").write_text("x")

    def load_state(self, d):
        self.loaded = d


def test_checkpoints_save_list_prune_and_resume(tmp_path):
    acc = _FakeAccelerator()
    assert _loop.resume_dir(tmp_path, "auto") is None and _loop.load_checkpoint(acc, tmp_path, "auto") is None
    for step in (2, 9, 10):
        _loop.save_checkpoint(acc, tmp_path, {"step": step, "history": [step]}, keep=2)
    (tmp_path / "checkpoints" / "step_11").mkdir()  # incomplete: no progress.json
    assert [p.name for p in _loop.checkpoint_dirs(tmp_path)] == ["step_9", "step_10"]  # numeric order, pruned
    _loop.save_checkpoint(acc, tmp_path, {"step": 10, "history": ["again"]}, keep=2)  # a saved step is kept
    assert json.loads((tmp_path / "checkpoints" / "step_10" / "progress.json").read_text())["history"] == [10]
    prog = _loop.load_checkpoint(acc, tmp_path, "auto")
    assert prog == {"step": 10, "history": [10]} and acc.loaded.endswith("step_10")
    assert _loop.resume_dir(tmp_path, str(tmp_path / "checkpoints" / "step_9")).name == "step_9"
    assert _loop.resume_dir(tmp_path, None) is None

    files = [tmp_path / f"step_{i}.pt" for i in (1, 3, 20)]
    for f in files:
        f.write_text("x")
    _loop.prune(_loop.sorted_by_step(reversed(files)), keep=1)
    assert [f.exists() for f in files] == [False, False, True]
    _loop.prune([files[2]], keep=0)  # 0 keeps everything
    assert files[2].exists()


def test_scaled_warmup_and_ema_decay():
    # the official 300-epoch run keeps the official values
    assert _loop.scaled_warmup(20 * 1251, 300 * 1251) == 20 * 1251
    assert _loop.scaled_ema_decay(300 * 1251, 0.9999) == 0.9999
    # short runs: 1/15 of the run, a horizon of 5 % of the steps (at least 2)
    assert _loop.scaled_warmup(20 * 30, 3 * 30) == 6
    assert 1 / (1 - _loop.scaled_ema_decay(1000, 0.9999)) == pytest.approx(50)
    assert _loop.scaled_ema_decay(10, 0.9999) == 0.5


def test_plot_history_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    hist = [{"step": i, "loss": 2.0 / i, "caption": 1.0 / i, "vqa_acc": i / 120} for i in range(1, 120)]
    _loop.plot_history(hist, tmp_path / "a.png", losses=("loss", "caption", "missing"), accuracies=("vqa_acc",),
                       log_scale=True)
    _loop.plot_history(hist, tmp_path / "b.png", evals=[("val", [50, 100], [0.3, 0.6])])
    _loop.plot_history([], tmp_path / "c.png")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
    assert not (tmp_path / "c.png").exists()


def test_losses_step_updates_and_refuses_a_non_finite_loss():
    import accelerate

    from shusheng.train import _loop

    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    x = torch.ones(2, 3)
    losses = {"a": model(x).pow(2).mean(), "b": model(x).abs().mean()}
    loss = _loop.losses_step(acc, model, opt, losses, step=0, clip_grad=1.0)
    assert float(loss) == pytest.approx(float(losses["a"] + losses["b"]))
    assert not torch.equal(model.weight, before) and model.weight.grad is None  # stepped, gradients cleared
    history = []
    _loop.log_losses_step(history, 1, loss, losses, 0.1, 2.0, log_every=10, seconds_per_step=2.0)
    assert history == [{"step": 1, "loss": float(loss), "lr": 0.1, "time": 2.0, "a": float(losses["a"]),
                        "b": float(losses["b"])}]
    with pytest.raises(FloatingPointError, match="step 7"):
        _loop.losses_step(acc, model, opt, {"a": model(x).sum() * float("nan")}, step=7)
