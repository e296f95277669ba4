"""Semantic segmentation: the UperNet segmenter, its pipeline, ``shusheng segment``, ``shusheng train segment`` and
the mIoU evaluation (tiny random models, 64 px images)."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from shusheng.cli import main
from shusheng.data import ImageLoadError, sample
from shusheng.data.synthdrive import CLASSES
from shusheng.detection import segment
from shusheng.detection.evaluate import Scene, evaluate_segmenter, synthdrive_scenes
from shusheng.detection.pipelines import SegmentationPipeline
from shusheng.detection.segment import PALETTE, InternImageSegmenter, SegmenterConfig, colorize, overlay

TINY = dict(backbone="internimage_test", backbone_args={"channels": 8}, channels=16, image_size=64)


def tiny(**kw) -> InternImageSegmenter:
    torch.manual_seed(0)
    return InternImageSegmenter(SegmenterConfig(**{**TINY, **kw}))


def scene_pixels(model: InternImageSegmenter, n: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """SynthDrive scenes normalised as the model expects, and their semantic masks."""
    from shusheng.train.segment import scene_batch

    pre = model.preprocess_config()
    return scene_batch(list(range(n)), size, pre.mean, pre.std)


# ------------------------------------------------------------------------------------------ model

def test_config_defaults_and_checks() -> None:
    c = SegmenterConfig()
    assert c.labels == list(CLASSES) and c.num_classes == 12 and c.channels == 128 and c.pool_scales == [1, 2, 3, 6]
    assert SegmenterConfig.from_any(c.to_dict()) == c
    for bad in (dict(labels=["road"]), dict(labels=["a", "a"]), dict(channels=0), dict(pool_scales=[]),
                dict(pool_scales=[0, 2]), dict(image_size=16), dict(aux_weight=-1.0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            SegmenterConfig(**bad)
    with pytest.raises(TypeError, match="unknown"):
        SegmenterConfig.from_any({"chanels": 8})


def test_forward_shapes_losses_and_gradients() -> None:
    model = tiny()
    x, y = scene_pixels(model)
    assert model(x).shape == (2, 12, 64, 64)
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 12, 64, 96)  # not square, not the config's size
    assert [f.shape[-1] for f in model.forward_features(x)] == [16, 8, 4, 2]
    losses = model(x, y)
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # every head part is used (DCNv3's zero-initialised offsets leave its dw_conv without gradient at first)
    assert [n for n, p in model.named_parameters() if not n.startswith("backbone.") and not p.grad.any()] == []
    for level in range(4):
        assert any(p.grad.any() for n, p in model.named_parameters() if n.startswith(f"backbone.levels.{level}."))

    model.eval()  # no dropout: the losses are the cross-entropy of the logits forward() returns
    logits, losses = model(x), model(x, y)
    assert losses["loss_seg"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    aux = F.interpolate(model.aux_head(model.forward_features(x)[2]), size=(64, 64), mode="bilinear")
    assert losses["loss_aux"].item() == pytest.approx(0.4 * F.cross_entropy(aux, y).item(), rel=1e-5)
    y_ignored = y.clone()
    y_ignored[:, :32] = 255  # ignored pixels do not count
    assert model(x, y_ignored)["loss_seg"].item() == pytest.approx(
        F.cross_entropy(logits[:, :, 32:], y[:, 32:]).item(), rel=1e-5)


def test_no_aux_head_and_level_subset() -> None:
    model = tiny(aux_weight=0.0, backbone_indices=[1, 2, 3])
    assert model.aux_head is None and model.indices == [1, 2, 3]
    x, y = scene_pixels(model)
    assert set(model(x, y)) == {"loss_seg"} and model(x).shape == (2, 12, 64, 64)
    assert [f.shape[-1] for f in model.forward_features(x)] == [8, 4, 2]


def test_resize_logits_matches_interpolate_and_strips() -> None:
    torch.manual_seed(1)
    lg = torch.randn(12, 16, 16)
    for w, h in ((50, 37), (10, 7), (16, 16)):  # up, down, same size
        ref = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(segment.resize_logits(lg, (w, h)), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(segment.resize_logits(lg, (w, h), (3, 6)), ref[:, 3:6], atol=1e-5, rtol=0)
    whole = segment.logits_to_ids(lg, (50, 37))
    assert whole.shape == (37, 50) and whole.dtype == np.int64
    assert np.array_equal(segment.logits_to_ids(lg, (50, 37), max_elements=12 * 50 * 4), whole)  # 4-row strips


def test_predict_ids_at_each_images_own_size() -> None:
    model = tiny()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), np.asarray(sample(0, 1, 64)[0]),
              rng.integers(0, 256, (100, 30, 3), dtype=np.uint8)]
    model.train()
    out = model.predict(images, batch_size=2)
    assert model.training  # the mode is restored
    assert [o.shape for o in out] == [(40, 90), (64, 64), (100, 30)]
    assert all(o.dtype == np.int64 and o.min() >= 0 and o.max() < 12 for o in out)
    # an image at the model's own size is not resized: predict is the argmax of forward()
    model.eval()
    x = (torch.from_numpy(images[1].copy()).permute(2, 0, 1).float() / 255 - torch.tensor(model._mean).view(3, 1, 1)) \
        / torch.tensor(model._std).view(3, 1, 1)
    ref = model(x[None]).argmax(1)[0].numpy()
    assert (out[1] == ref).mean() > 0.999
    with pytest.raises(ValueError, match="H, W, 3"):
        model.predict([np.zeros((8, 8), np.uint8)])


def test_save_load_round_trip_identical_logits(tmp_path) -> None:
    model = tiny()
    x, _ = scene_pixels(model)
    model.train()
    model(x)  # moves the BatchNorm running statistics away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "seg")
    meta = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert meta["model_type"] == "segmenter" and meta["config"]["labels"] == list(CLASSES)
    assert meta["preprocess"]["size"] == 64 and meta["preprocess"]["resize"] == "squash"
    loaded = InternImageSegmenter.from_pretrained(tmp_path / "seg")
    assert torch.equal(model(x), loaded(x))
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    torch.testing.assert_close(InternImageSegmenter.from_pretrained(tmp_path / "half")(x), model(x),
                               atol=0.05, rtol=0.05)
    from shusheng.detection.model import InternImageDetector

    with pytest.raises(ValueError, match="segmenter"):
        InternImageDetector.from_pretrained(tmp_path / "seg")


def test_palette_and_overlay() -> None:
    ids = np.array([[0, 1], [8, 11]])
    assert colorize(ids).tolist() == [[list(PALETTE[0]), list(PALETTE[1])], [list(PALETTE[8]), list(PALETTE[11])]]
    assert colorize(np.array([[20]])).shape == (1, 1, 3)  # beyond the SynthDrive palette: fixed extra colours
    assert np.array_equal(colorize(np.array([[20]])), colorize(np.array([[20]])))
    img = np.full((2, 2, 3), 100, np.uint8)
    assert np.array_equal(overlay(img, ids, 0.0), img) and np.array_equal(overlay(img, ids, 1.0), colorize(ids))
    assert overlay(img, ids, 0.5)[0, 0].tolist() == [50, 50, 50]  # half of black over grey 100
    with pytest.raises(ValueError):
        overlay(img, np.zeros((3, 3), int))


# ------------------------------------------------------------------------------------------ pipeline and CLI

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    tiny().save_pretrained(d)
    return d


def test_pipeline_maps_shares_and_per_item_errors(saved, tmp_path) -> None:
    pipe = SegmentationPipeline.from_pretrained(saved)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 256, 3), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = pipe([wide, str(bad), sample(0, 2, 64)[0]], batch_size=2)
    assert out.errors[0] is None and out.errors[2] is None and "bad.png" in out.errors[1]
    assert out.class_ids[1] is None and out.shares[1] is None and out.sizes == [(256, 100), None, (64, 64)]
    assert out.in_domain == [True, None, True] and math.isnan(out.domain_score[0]) and out.labels == list(CLASSES)
    ids = out.class_ids[0]
    assert ids.shape == (100, 256) and ids.dtype == np.int64
    assert np.array_equal(ids, pipe.model.predict([np.asarray(wide)])[0])  # the same preprocessing as predict
    counts = np.bincount(ids.reshape(-1), minlength=12)
    assert list(out.shares[0]) == list(CLASSES) and sum(out.shares[0].values()) == pytest.approx(1.0)
    assert [out.shares[0][c] for c in CLASSES] == pytest.approx((counts / ids.size).tolist())
    with pytest.raises(ImageLoadError, match="bad.png"):
        pipe([str(bad)], on_error="raise")
    only_bad = pipe([str(bad)])
    assert only_bad.class_ids == [None] and only_bad.errors[0] is not None


def direct_level_stats(model: InternImageSegmenter, pixels: torch.Tensor) -> torch.Tensor:
    """The in-domain features written out by hand from the tower's ``forward_intermediates``: the per-channel mean
    and standard deviation of every level the head reads."""
    levels = model.backbone.forward_intermediates(pixels, model.indices, intermediates_only=True)
    cells = [f.float().flatten(2) for f in levels]
    return torch.cat([c.mean(-1) for c in cells] + [c.std(-1, unbiased=False) for c in cells], dim=1)


@pytest.fixture(scope="module")
def checked(saved, tmp_path_factory):
    """The tiny segmenter with an in-domain check fitted by ``shusheng train domain-check``."""
    import shutil

    d = tmp_path_factory.mktemp("seg-checked") / "final"
    shutil.copytree(saved, d)
    assert main(["train", "domain-check", "--model", str(d), "--n-fit", "64", "--n-calibration", "80",
                 "--alpha", "0.01"]) == 0
    return d


def test_pipeline_domain_check_reads_the_tower_levels_of_its_own_pass(checked) -> None:
    """``shusheng train domain-check`` fits a segmenter's check on the level statistics a detector's uses (one
    implementation); the pipeline scores each image from the level maps of its segmentation pass: the same as the
    features computed by hand from ``forward_intermediates``, and the fitted SynthDrive scenes are in-domain."""
    from shusheng.data import TRAIN_SEED
    from shusheng.detection.domain import LevelStatsDomain
    from shusheng.detection.pipelines import DetectionPipeline
    from shusheng.train.domain import pipeline_for

    assert pipeline_for(checked) is SegmentationPipeline  # shusheng train domain-check knows segmenters
    assert SegmentationPipeline.domain_features is DetectionPipeline.domain_features is LevelStatsDomain.domain_features
    pipe = SegmentationPipeline.from_pretrained(checked)
    check = pipe.domain_check
    assert check is not None and check.info["features"] == "SegmentationPipeline.domain_features"
    assert check.info["dim"] == 2 * (8 + 16 + 32 + 64) and pipe.model.level_strides == [4, 8, 16, 32]
    assert "64 px" in check.info["data"]  # fitted at the model's image_size
    # the SynthDrive train scenes the check was fitted on are in its domain
    assert all(pipe([sample(TRAIN_SEED, i, 64)[0] for i in range(24)], batch_size=8).in_domain)

    rng = np.random.default_rng(0)
    images = [sample(0, 3, 64)[0], sample(0, 5, 64)[0].resize((96, 40)),
              Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)), Image.new("RGB", (64, 64), "green")]
    out = pipe(images, batch_size=3)
    assert all(0.0 < s <= 1.0 for s in out.domain_score) and all(isinstance(v, bool) for v in out.in_domain)
    pixels = torch.stack([pipe.transform(im) for im in images])
    with torch.inference_mode():
        direct = direct_level_stats(pipe.model, pixels)
        torch.testing.assert_close(pipe.domain_features(pixels), direct)
    ok, scores = check.score(direct)
    np.testing.assert_allclose(out.domain_score, scores, atol=1e-6)
    assert out.in_domain == ok
    assert pipe.check_domain(pixels) == (ok, scores)


def test_cli_segment_writes_class_and_overlay_pngs(saved, tmp_path, capsys) -> None:
    img = sample(0, 4, 64)[0]
    (tmp_path / "a").mkdir()
    good, twin = tmp_path / "scene.png", tmp_path / "a" / "scene.png"
    img.save(good)
    img.resize((80, 48)).save(twin)  # same stem: written as scene_2_*
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    rc = main(["segment", str(good), str(bad), str(twin), "--out", str(out), "--model", str(saved), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 1 and [r["image"] for r in rows] == [str(good), str(bad), str(twin)] and "error" in rows[1]
    assert sorted(p.name for p in out.iterdir()) == ["scene_2_classes.png", "scene_2_overlay.png",
                                                     "scene_classes.png", "scene_overlay.png"]
    expected = SegmentationPipeline.from_pretrained(saved)([str(good), str(twin)]).class_ids
    for r, ids, size in zip((rows[0], rows[2]), expected, ((64, 64), (80, 48))):
        assert set(r) == {"image", "classes", "overlay", "shares", "in_domain", "domain_score"}
        with Image.open(r["classes"]) as c:
            assert c.mode == "L" and c.size == size
            written = np.asarray(c)
        assert written.max() < len(CLASSES) and np.array_equal(written, ids)
        assert r["shares"] == {k: round(float((ids == i).mean()), 4) for i, k in enumerate(CLASSES)}
        with Image.open(r["overlay"]) as o:
            assert o.mode == "RGB" and o.size == size
            blended = np.asarray(o, dtype=int)
        src = np.asarray(Image.open(r["image"]).convert("RGB"), dtype=int)
        assert np.array_equal(blended, overlay(src.astype(np.uint8), ids, 0.5).astype(int))
        assert np.abs(blended - src).sum() > 0
    assert main(["segment", str(good), "--out", str(out), "--model", str(saved)]) == 0
    text = capsys.readouterr().out  # a new run writes the same names again
    assert "scene_classes.png" in text and "scene_overlay.png" in text and "%" in text
    assert sorted(p.name for p in out.iterdir())[-1] == "scene_overlay.png" and len(list(out.iterdir())) == 4


def test_cli_segment_without_a_model(monkeypatch, tmp_path, capsys) -> None:
    import shusheng.weights as weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path / "no_weights")  # as if shusheng-mini-seg were not bundled
    (tmp_path / "no_weights").mkdir()
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["segment", str(img), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "shusheng train segment" in err and "--model" in err
    assert main(["segment", str(img), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lazy_exports() -> None:
    import shusheng.detection as det

    assert det.InternImageSegmenter is InternImageSegmenter and det.SegmenterConfig is SegmenterConfig
    assert det.SegmentationPipeline is SegmentationPipeline


# ------------------------------------------------------------------------------------------ evaluation

def test_evaluate_segmenter_known_answer() -> None:
    z = np.zeros((2, 3, 3), np.uint8)
    scenes = [Scene(z, semantic=np.array([[0, 0, 1], [2, 2, 1]])),
              Scene(z, semantic=np.array([[1, 1, 1], [0, 7, 0]]))]  # 7: not a class of ["a", "b", "c"], ignored
    preds = [np.array([[0, 1, 1], [2, 0, 1]]), np.array([[1, 1, 0], [0, 2, 2]])]
    calls = []

    def predict(images):
        calls.append(len(images))
        start = sum(calls[:-1])
        return preds[start:start + len(images)]

    r = evaluate_segmenter(predict, scenes, ["a", "b", "c"], batch_size=1)
    assert calls == [1, 1] and r["n_images"] == 2
    # a: gt 4 px, predicted 4 px (the ignored pixel's prediction excluded), 2 right -> 2 / 6
    # b: gt 5, predicted 5, 4 right -> 4 / 6; c: gt 2, predicted 2 (one on "a"), 1 right -> 1 / 3
    assert r["per_class"] == pytest.approx({"a": 2 / 6, "b": 4 / 6, "c": 1 / 3})
    assert r["mIoU"] == pytest.approx((2 / 6 + 4 / 6 + 1 / 3) / 3)
    assert r["pixel_accuracy"] == pytest.approx(7 / 11)
    calls.clear()
    assert evaluate_segmenter(predict, scenes, ["a", "b", "c"], batch_size=2)["per_class"] == r["per_class"]
    perfect = evaluate_segmenter(lambda ims: [s.semantic for s in scenes][:len(ims)], scenes[:1], ["a", "b", "c"])
    assert perfect["mIoU"] == 1.0 and perfect["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match="semantic"):
        evaluate_segmenter(lambda ims: [np.zeros((2, 3), int)] * len(ims), [Scene(z)], ["a", "b", "c"])


def test_evaluate_segmenter_on_scenes_with_a_model() -> None:
    model = tiny()
    scenes = synthdrive_scenes("val", n=2, size=64)
    r = evaluate_segmenter(model.predict, scenes, model.labels)
    assert 0.0 <= r["mIoU"] <= 1.0 and set(r["per_class"]) == set(CLASSES)
    assert r["per_class"]["road"] is not None  # every scene has road


# ------------------------------------------------------------------------------------------ training

def _train_cfg(tmp_path, **kw):
    from shusheng.train import segment as ts

    base = dict(output=str(tmp_path / "run"), backbone_args={"channels": 8}, backbone_init=None, image_size=64,
                channels=16, steps=3, batch_size=2, train_n=100, val_n=2, eval_every=2, save_every=2, log_every=1,
                warmup_steps=1)
    return ts.SegmentTrainConfig(**{**base, **kw})


def test_train_segment_checkpoints_and_final(tmp_path) -> None:
    from shusheng.train import segment as ts

    metrics = ts.train(_train_cfg(tmp_path, class_balance=True, train_n=20))
    run = tmp_path / "run"
    assert metrics["steps"] == 3 and 0.0 <= metrics["mIoU"] <= 1.0 and set(metrics["per_class_iou"]) == set(CLASSES)
    assert len(metrics["class_weights"]) == 12 and not metrics["stopped_early"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_3"]
    final = run / "final"
    assert {"config.json", "model.safetensors", "metrics.json", "MODEL_CARD.md"} <= {p.name for p in final.iterdir()}
    meta = json.loads((final / "config.json").read_text())
    assert meta["weights_dtype"] == "float16" and meta["metadata"]["steps"] == 3
    card = (final / "MODEL_CARD.md").read_text()
    assert "shusheng train segment" in card and "--class-balance" in card and "seed 0" in card
    assert f"mIoU {metrics['mIoU']:.3f}" in card and "| traffic_light |" in card
    model = InternImageSegmenter.from_pretrained(final)
    assert model.config.channels == 16 and model.predict([np.zeros((40, 50, 3), np.uint8)])[0].shape == (40, 50)
    full = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in full["evals"]] == [2, 3] and len(full["history"]) == 3


def test_train_segment_flags() -> None:
    from shusheng.cli import build_parser
    from shusheng.train.detect import command_flags
    from shusheng.train.segment import SegmentTrainConfig, config_from_args

    args = build_parser().parse_args(["train", "segment", "--pool-scales", "1,2", "--backbone-init", "none",
                                      "--class-balance", "--backbone-args", '{"channels": 8}'])
    cfg = SegmentTrainConfig(pool_scales=(1, 2), backbone_init=None, class_balance=True, backbone_args={"channels": 8})
    assert config_from_args(args) == cfg
    # the command recorded in the model card gives the same config back
    flags = command_flags(cfg)
    assert "--pool-scales 1,2" in flags and "--class-balance" in flags and "--backbone-init none" in flags
    assert config_from_args(build_parser().parse_args(["train", "segment", *shlex.split(flags)])) == cfg


def test_train_segment_resume_follows_the_uninterrupted_run(tmp_path) -> None:
    from shusheng.train import segment as ts

    kw = dict(steps=4, val_n=1, eval_every=0, save_every=2)
    straight = ts.train(_train_cfg(tmp_path / "a", **kw))
    stopped = ts.train(_train_cfg(tmp_path / "b", max_minutes=0.0, **kw))  # out of time after the first step
    assert stopped["steps"] == 1 and stopped["stopped_early"]
    assert (tmp_path / "b" / "run" / "checkpoints" / "step_1" / "progress.json").exists()
    resumed = ts.train(_train_cfg(tmp_path / "b", resume="auto", **kw))
    assert resumed["steps"] == 4 and not resumed["stopped_early"]
    a = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["history"]
    b = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in b] == [1, 2, 3, 4]
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-5)
    assert [h["lr"] for h in b] == pytest.approx([h["lr"] for h in a])
    assert resumed["mIoU"] == pytest.approx(straight["mIoU"])
    assert sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_train_batches_are_a_function_of_seed_and_step() -> None:
    from shusheng.train import segment as ts
    from shusheng.train.detect import batch_indices

    cfg = ts.SegmentTrainConfig(train_n=40, batch_size=4)
    assert batch_indices(cfg, 7) == batch_indices(ts.SegmentTrainConfig(train_n=40, batch_size=4), 7)
    assert batch_indices(cfg, 7) != batch_indices(ts.SegmentTrainConfig(train_n=40, batch_size=4, seed=1), 7)
    epoch = sum((batch_indices(cfg, s) for s in range(10)), [])
    assert sorted(epoch) == list(range(40))  # one epoch: every scene once
    x, y = ts.scene_batch([3, 5], 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    img, ann = sample(0, 5, 32)
    assert x.shape == (2, 3, 32, 32) and np.array_equal(y[1].numpy(), ann.semantic.astype(np.int64))
    torch.testing.assert_close(x[1], (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
    with pytest.raises(ValueError, match="batch_size"):
        ts.SegmentTrainConfig(batch_size=1)


def test_class_balance_weights_favour_rare_classes() -> None:
    from shusheng.train.segment import class_balance_weights

    w = class_balance_weights(12, 32, n=6)
    assert w.shape == (12,) and w.mean().item() == pytest.approx(1.0)
    by = dict(zip(CLASSES, w.tolist()))
    assert by["traffic_light"] > by["vehicle"] > by["road"] and by["sign"] > by["sky"]


def test_default_tower_loads_the_bundled_backbone_init() -> None:
    from shusheng.train import segment as ts
    from shusheng.train.detect import load_backbone_init

    cfg = ts.SegmentTrainConfig()
    try:
        from shusheng.weights import bundled_path

        bundled_path(cfg.backbone_init)
    except FileNotFoundError:
        pytest.skip("shusheng-mini-uniperceiver is not bundled here")
    model = InternImageSegmenter(cfg.segmenter_config())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    n = load_backbone_init(model.backbone, cfg.backbone_init)
    assert n > 0 and any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
