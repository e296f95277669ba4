"""Classification training: a tiny InternImage learns a generated two-class image folder, resumes, evaluates;
warm-up and EMA follow the length of the run."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shusheng.train.classify import (
    OFFICIAL_EMA_DECAY,
    OFFICIAL_WARMUP_EPOCHS,
    ClassifyConfig,
    build_param_groups,
    evaluate_checkpoint,
    layer_id_for_internimage,
    resolve_schedule,
    train,
)

pytest.importorskip("accelerate")
pytest.importorskip("timm")


def make_folder(root, n_per_class=12, size=32, seed=0):
    """Two visually distinct classes: a bright disc vs. a dark horizontal bar, on noise."""
    rng = np.random.default_rng(seed)
    for cls in ("bar", "disc"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            img = Image.fromarray(arr)
            d = ImageDraw.Draw(img)
            c = rng.integers(8, size - 8, 2)
            if cls == "disc":
                d.ellipse([c[0] - 6, c[1] - 6, c[0] + 6, c[1] + 6], fill=(250, 250, 250))
            else:
                d.rectangle([2, c[1] - 2, size - 3, c[1] + 2], fill=(0, 0, 255))
            img.save(root / cls / f"{i}.png")
    return root


def tiny_cfg(tmp_path, **kw):
    base = dict(data_dir=str(tmp_path / "data"), output=str(tmp_path / "run"), model="internimage_test",
                img_size=32, epochs=30, warmup_epochs=0, batch_size=8, lr=1.0, min_lr=1e-3, warmup_lr=1e-3,
                drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, aa=None, reprob=0.0, color_jitter=0.0,
                ema_decay=0.9, workers=0, seed=0, log_every=1000)
    base.update(kw)
    return ClassifyConfig(**base)


def test_train_loss_falls_resume_and_eval(tmp_path):
    make_folder(tmp_path / "data")
    full = train(tiny_cfg(tmp_path, output=str(tmp_path / "full"), max_steps=12, val_dir=str(tmp_path / "data")))
    hist = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    assert full["steps"] == 12 and len(hist) == 12
    first, last = np.mean([h["loss"] for h in hist[:4]]), np.mean([h["loss"] for h in hist[-4:]])
    assert last < 0.8 * first, (first, last)

    # interrupted run: 3 batches per epoch, checkpoints at epoch ends and every 5 steps; stop mid-epoch at 5
    train(tiny_cfg(tmp_path, max_steps=5, save_every=5))
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_3", "step_5"]
    progress = json.loads((ckpts[-1] / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (5, 1, 2)
    resumed = train(tiny_cfg(tmp_path, max_steps=12, resume="auto"))
    assert resumed["steps"] == 12
    hist2 = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist2] == list(range(1, 13))
    # same data order, same RNG: the resumed run follows the uninterrupted one
    np.testing.assert_allclose([h["loss"] for h in hist2], [h["loss"] for h in hist], rtol=1e-3, atol=1e-4)

    # evaluation of the saved model equals evaluation of the in-memory one, and a manual top-1 count
    m = evaluate_checkpoint(str(tmp_path / "full" / "final"), str(tmp_path / "data"), img_size=32)
    assert m["images"] == 24
    assert m["loss"] == pytest.approx(full["val"]["loss"], rel=1e-5)
    assert m["top1"] == pytest.approx(full["val"]["top1"])
    from shusheng.backbone import InternImage
    from shusheng.train.classify import _image_folder, _transforms

    model = InternImage.from_pretrained(tmp_path / "full" / "final").eval()
    ds = _image_folder(str(tmp_path / "data"), _transforms(tiny_cfg(tmp_path), model, training=False))
    with torch.no_grad():
        preds = [model(x[None]).argmax(1).item() for x, _ in ds]
    assert m["top1"] == pytest.approx(100 * np.mean([p == y for p, (_, y) in zip(preds, ds.samples)]))


def test_cli_train_and_eval(tmp_path, capsys):
    from shusheng.cli import main

    make_folder(tmp_path / "data", n_per_class=4)
    assert main(["train", "classify", "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "r"),
                 "--model", "internimage_test", "--img-size", "32", "--batch-size", "4", "--epochs", "1",
                 "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--workers", "0",
                 "--no-ema"]) == 0
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"] == "internimage_test"
    capsys.readouterr()
    assert main(["eval", "classify", "--data-dir", str(tmp_path / "data"), "--checkpoint",
                 str(tmp_path / "r" / "final"), "--img-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == 8 and 0 <= out["top1"] <= 100


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_cfg(tmp_path, data_dir=str(tmp_path / "nope")))


def test_param_groups_weight_decay_layer_decay_and_dcn_multiplier():
    from shusheng.backbone import create_model

    model = create_model("internimage_test")
    groups = build_param_groups(model, 0.05, layer_decay=0.9, dcn_lr_mul=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # no decay for biases and 1-D params, decay for matrices
    assert by_param[id(named["patch_embed.conv1.bias"])]["weight_decay"] == 0
    assert by_param[id(named["patch_embed.conv1.weight"])]["weight_decay"] == 0.05
    depths = list(model.depths)
    n = sum(depths) + 1
    off = next(k for k in named if k.startswith("levels.0.blocks.0.dcn.offset.weight"))
    assert by_param[id(named[off])]["lr_scale"] == pytest.approx(0.9 ** (n - 1) * 0.1)
    head = next(k for k in named if k.startswith("head."))
    assert by_param[id(named[head])]["lr_scale"] == 1.0
    # official numbering: downsample of level i shares the id of level i+1's first block
    assert layer_id_for_internimage("levels.0.downsample.conv.weight", depths) == depths[0] + 1
    assert layer_id_for_internimage("levels.1.blocks.0.mlp.fc1.weight", depths) == depths[0] + 1
    assert layer_id_for_internimage("patch_embed.conv1.weight", depths) == 1
    assert torch.is_tensor(named[head])


def make_colour_folder(root, n_per_class, size=32, seed=0):
    """Three classes of noisy solid colours (mostly red, green or blue)."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(("red", "green", "blue")):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            base = np.full(3, 30.0)
            base[k] = 200
            arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def test_default_schedule_learns_in_a_few_epochs(tmp_path):
    """3 epochs of 6 steps with the default recipe: model and EMA both learn the colours.

    Measured: the default (scaled) recipe gives val loss 0.58 for model and EMA; the official 20-epoch warm-up and
    EMA 0.9999 (the defaults before the recipe scaled with the run) give the model val loss 0.80 (still warming
    up) and the EMA 60 % / loss 1.08 (its random initial weights). ``lr`` is per 512 images: a batch of 8 at the
    default 5e-4 would move the weights by ~1e-5 per step.
    """
    make_colour_folder(tmp_path / "train", 16)
    make_colour_folder(tmp_path / "val", 5, seed=1)
    cfg = ClassifyConfig(data_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), output=str(tmp_path / "r"),
                         model="internimage_test", img_size=32, epochs=3, batch_size=8, lr=0.2, workers=0,
                         log_every=1000)
    m = train(cfg)
    assert m["steps"] == 18 and m["warmup_steps"] == 1 and 0 < m["ema_decay"] < 0.9
    for key in ("val", "val_ema"):
        assert m[key]["top1"] >= 80 and m[key]["loss"] < 0.65 * math.log(3), (key, m[key])


def test_recipe_scales_warmup_and_ema_with_the_run():
    official = ClassifyConfig(recipe="official")
    assert resolve_schedule(official, 100) == (OFFICIAL_WARMUP_EPOCHS * 100, OFFICIAL_EMA_DECAY)
    assert resolve_schedule(ClassifyConfig(recipe="official", epochs=3), 100) == (2000, OFFICIAL_EMA_DECAY)
    # the official length (300 epochs of ImageNet at a global batch of 1024): the scaled recipe is the official one
    assert resolve_schedule(ClassifyConfig(), 1251) == (OFFICIAL_WARMUP_EPOCHS * 1251, OFFICIAL_EMA_DECAY)
    # a short run: warm-up 1/15 of it, EMA horizon 1/(1 - decay) = 5 % of its steps
    warmup, ema = resolve_schedule(ClassifyConfig(epochs=3), 100)
    assert warmup == 20 and 1 / (1 - ema) == pytest.approx(15)
    # explicit values win over either recipe; 0 turns EMA off
    assert resolve_schedule(ClassifyConfig(epochs=3, warmup_epochs=0.5, ema_decay=0.99), 100) == (50, 0.99)
    assert resolve_schedule(ClassifyConfig(recipe="official", warmup_epochs=0, ema_decay=0.0), 100) == (0, 0.0)
    with pytest.raises(ValueError, match="recipe"):
        ClassifyConfig(recipe="fast")


def test_cli_recipe_and_schedule_flags():
    import argparse

    from shusheng.train.classify import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(["--data-dir", "d"]))
    assert (cfg.recipe, cfg.warmup_epochs, cfg.ema_decay) == ("scaled", None, None)
    cfg = config_from_args(p.parse_args(["--data-dir", "d", "--recipe", "official", "--warmup-epochs", "5",
                                         "--no-ema"]))
    assert (cfg.recipe, cfg.warmup_epochs, cfg.ema_decay) == ("official", 5.0, 0.0)
    assert config_from_args(p.parse_args(["--data-dir", "d", "--ema-decay", "0.999"])).ema_decay == 0.999
