"""``shusheng train detect`` and the COCO evaluation of detectors (tiny random models, 64 px scenes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shusheng.backbone import create_backbone
from shusheng.data import sample
from shusheng.data.synthdrive import COCO_CATEGORIES
from shusheng.detection.evaluate import (
    Scene,
    coco_eval,
    coco_ground_truth,
    confusion_miou,
    evaluate_detector,
    iou_table,
    synthdrive_scenes,
)
from shusheng.detection.model import DetectorConfig, InternImageDetector
from shusheng.train import detect as td

pytest.importorskip("pycocotools")
TINY_ARGS = {"channels": 8}


def _cfg(tmp_path, **kw) -> td.DetectTrainConfig:
    base = dict(output=str(tmp_path / "run"), backbone_args=TINY_ARGS, backbone_init=None, image_size=64,
                fpn_channels=64, box_head_dim=32, mask_head_dim=16, rpn_proposals=50, roi_batch=16, steps=3,
                batch_size=2, train_n=100, val_n=3, eval_every=0, save_every=2, log_every=1, warmup_steps=1)
    return td.DetectTrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ evaluation

def _scene_with(boxes: list[list[float]], cats: list[int]) -> Scene:
    return Scene(np.zeros((64, 64, 3), np.uint8),
                 [{"category_id": c, "bbox": b, "area": b[2] * b[3]} for b, c in zip(boxes, cats)])


def test_coco_eval_perfect_partial_and_empty() -> None:
    scenes = [_scene_with([[4, 4, 20, 10], [30, 30, 12, 24]], [1, 4]), _scene_with([], [])]
    gt = coco_ground_truth(scenes, COCO_CATEGORIES)
    perfect = [{"image_id": 0, "category_id": 1, "score": 0.9, "bbox": [4, 4, 20, 10]},
               {"image_id": 0, "category_id": 4, "score": 0.8, "bbox": [30, 30, 12, 24]}]
    r = coco_eval(gt, perfect)
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0)
    assert r["per_class"]["car"] == pytest.approx(1.0) and r["per_class"]["person"] == pytest.approx(1.0)
    assert r["per_class"]["bus"] is None  # no bus in the ground truth: no AP, not -1
    # the person found with the wrong class: half the classes found
    wrong = [perfect[0], {**perfect[1], "category_id": 2}]
    assert coco_eval(gt, wrong)["AP"] == pytest.approx(0.5)
    # a box shifted by half its width: IoU 1/3, below every threshold
    shifted = [{**perfect[0], "bbox": [14, 4, 20, 10]}, perfect[1]]
    assert coco_eval(gt, shifted)["per_class"]["car"] == pytest.approx(0.0)
    # nothing found, and no ground truth at all: zeros, no pycocotools exception
    assert coco_eval(gt, [])["AP"] == 0.0 and coco_eval(gt, [])["per_class"]["car"] == 0.0
    empty_gt = coco_ground_truth([_scene_with([], [])], COCO_CATEGORIES)
    assert coco_eval(empty_gt, perfect)["AP"] == 0.0


def test_confusion_and_iou() -> None:
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 9]])  # 9: outside the classes, ignored
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    conf = confusion_miou(pred, target, 3)
    assert conf.sum() == 7 and conf[0, 0] == 2 and conf[0, 1] == 1 and conf[2, 0] == 1
    t = iou_table(conf, ["a", "b", "c"])
    # a: tp 2, gt 3, pred 3 (the ignored pixel's prediction does not count) -> 2/4; b: 2/3; c: 1/2
    assert t["per_class"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 0.5})
    assert t["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert iou_table(confusion_miou(pred, np.zeros_like(target), 3), ["a", "b", "c"])["per_class"]["b"] is None


def test_synthdrive_scenes_any_resolution() -> None:
    s = synthdrive_scenes("test", n=2, size=64)
    img, ann = sample(2023, 1, 64)
    assert s[1].image.shape == (64, 64, 3) and np.array_equal(s[1].image, np.asarray(img))
    assert s[1].objects == ann.objects and s[1].semantic.shape == (64, 64)


def test_evaluate_detector_runs_on_a_random_model() -> None:
    torch.manual_seed(0)
    model = InternImageDetector(DetectorConfig(backbone="internimage_test", backbone_args=TINY_ARGS, head="maskrcnn",
                                               fpn_channels=64, min_size=64, max_size=64, box_head_dim=32,
                                               mask_head_dim=16, rpn_proposals=50, roi_batch=16))
    r = evaluate_detector(model, synthdrive_scenes("val", 2, 64))
    assert set(r) == {"bbox", "segm", "n_images", "n_objects"} and r["n_images"] == 2
    assert 0.0 <= r["bbox"]["AP"] <= 1.0 and r["segm"] is not None
    assert model.training  # evaluation gives back the mode it found


def test_evaluate_detector_rejects_unknown_labels() -> None:
    model = InternImageDetector(DetectorConfig(backbone="internimage_test", backbone_args=TINY_ARGS, head="fcos",
                                               labels=["car", "zebra"], min_size=64, max_size=64))
    with pytest.raises(ValueError, match="zebra"):
        evaluate_detector(model, [])


# ------------------------------------------------------------------------------------------ training

def test_scene_targets_match_the_annotation() -> None:
    img, ann = sample(0, 3, 64)
    t = td.scene_targets(ann, masks=True)
    assert t["boxes"].shape == (len(ann.objects), 4) and t["masks"].shape == (len(ann.objects), 64, 64)
    for box, o, m in zip(t["boxes"], ann.objects, t["masks"]):
        x, y, w, h = o["bbox"]
        assert box.tolist() == [x, y, x + w, y + h]
        ys, xs = np.nonzero(m.numpy())
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
    assert t["labels"].tolist() == [o["category_id"] for o in ann.objects]


def test_batch_indices_are_a_function_of_the_step(tmp_path) -> None:
    cfg = _cfg(tmp_path, train_n=10, batch_size=4)
    epoch0 = td.batch_indices(cfg, 0) + td.batch_indices(cfg, 1)
    assert len(set(epoch0)) == 8 and td.batch_indices(cfg, 1) == td.batch_indices(cfg, 1)
    assert td.batch_indices(cfg, 2) != td.batch_indices(cfg, 0)  # the next epoch is another permutation


def test_backbone_init_copies_weights_and_refuses_mismatches(tmp_path) -> None:
    from safetensors.torch import save_file

    src = create_backbone("internimage_test", channels=8)
    save_file({f"tower.backbone.{k}": v.contiguous() for k, v in src.state_dict().items()
               if v.dtype.is_floating_point}, str(tmp_path / "w.safetensors"))
    dst = create_backbone("internimage_test", channels=8)
    assert td.load_backbone_init(dst, str(tmp_path / "w.safetensors")) > 10
    for k, v in src.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(ValueError, match="shape"):
        td.load_backbone_init(create_backbone("internimage_test", channels=16), str(tmp_path / "w.safetensors"))
    with pytest.raises(FileNotFoundError):
        td.load_backbone_init(dst, str(tmp_path / "nothing"))


def test_bundled_tower_init_fits_the_default_config() -> None:
    cfg = td.DetectTrainConfig()
    tower = create_backbone(cfg.backbone, **cfg.backbone_args)
    assert td.load_backbone_init(tower, cfg.backbone_init) == len(
        [k for k in tower.state_dict() if not k.startswith("conv_head")])


@pytest.mark.parametrize("head", ["maskrcnn", "fcos"])
def test_train_resume_and_final(tmp_path, head: str) -> None:
    cfg = _cfg(tmp_path, head=head, steps=2)
    td.train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_2" / "progress.json").exists()
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["steps"] == 2 and "box_AP" in m2 and (m2["mask_AP"] is None) == (head == "fcos")
    td.train(_cfg(tmp_path, head=head, steps=3, resume="auto"))
    m3 = json.loads((run / "metrics.json").read_text())
    # the resumed run keeps the first two steps' history and adds one
    assert m3["steps"] == 3 and [h["step"] for h in m3["history"]] == [1, 2, 3]
    assert m3["history"][:2] == m2["history"]
    final = InternImageDetector.from_pretrained(run / "final")
    assert final.config.head == head and final.config.min_size == 64
    card = (run / "final" / "MODEL_CARD.md").read_text()
    assert "shusheng train detect" in card and "--steps 3" in card


def test_cli_flags(tmp_path) -> None:
    import argparse

    p = argparse.ArgumentParser()
    td.add_train_arguments(p)
    args = p.parse_args(["--head", "fcos", "--backbone-init", "none", "--backbone-args", '{"channels": 8}',
                         "--steps", "5"])
    cfg = td.config_from_args(args)
    assert cfg.head == "fcos" and cfg.backbone_init is None and cfg.backbone_args == {"channels": 8}
    light = td.config_from_args(p.parse_args(["--head", "fcos", "--backbone-args", '{"channels": 8}', "--backbone-init",
                                              "none", "--backbone-indices", "1,2,3", "--head-convs", "2"]))
    model = InternImageDetector(light.detector_config())
    assert model.fpn.strides == [8, 16, 32, 64]  # the pyramid starts at stride 8
    assert len(model.detector.head.classification_head.conv) == 2 * 3  # conv, GroupNorm, ReLU per layer
    assert len(model.detector.head.regression_head.conv) == 2 * 3
    with pytest.raises(ValueError, match="head"):
        td.DetectTrainConfig(head="yolo")


def test_fine_tune_from_a_saved_detector_at_mixed_render_sizes(tmp_path, monkeypatch) -> None:
    """``--init DIR`` starts from the whole saved detector (not only its tower); ``--render-sizes`` renders scene i
    at size i mod n, and the detector trains on them at its own input size."""
    torch.manual_seed(0)
    start = InternImageDetector(_cfg(tmp_path).detector_config())
    start.save_pretrained(tmp_path / "start")
    rendered: list[int] = []
    from shusheng.data import synthdrive as sd

    real_sample = sd.sample

    def spy(seed, index, size=128, **kw):
        rendered.append((index, size))
        return real_sample(seed, index, size, **kw)

    monkeypatch.setattr("shusheng.data.synthdrive.sample", spy)
    cfg = _cfg(tmp_path, init=str(tmp_path / "start"), render_sizes="48,64", steps=2, lr=0.0, val_n=0)
    assert cfg.scene_sizes() == [48, 64]
    td.train(cfg)
    want = [(i, (48, 64)[i % 2]) for step in range(2) for i in td.batch_indices(cfg, step)]
    assert rendered == want and {s for _, s in want} == {48, 64}
    tuned = InternImageDetector.from_pretrained(tmp_path / "run" / "final")
    for k, v in start.state_dict().items():  # lr 0: the weights are the starting detector's (fp16 on disk)
        if v.dtype.is_floating_point:
            torch.testing.assert_close(tuned.state_dict()[k].float(), v.half().float(), msg=k)
    card = (tmp_path / "run" / "final" / "MODEL_CARD.md").read_text()
    assert "fine-tuned" in card and "48/64 px" in card
    other = InternImageDetector(_cfg(tmp_path, fpn_channels=96).detector_config())
    with pytest.raises(ValueError, match="architecture"):
        td.load_detector_init(other, str(tmp_path / "start"))
    with pytest.raises(ValueError, match="render_sizes"):
        _cfg(tmp_path, render_sizes="16,64")
