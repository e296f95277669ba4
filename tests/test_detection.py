"""Detection first slice: the feature pyramid, Mask R-CNN / FCOS on it, the pipeline and ``shusheng detect``
(tiny random models: ``internimage_test`` with 8 channels, 64-128 px images)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from shusheng.backbone import create_backbone
from shusheng.cli import main
from shusheng.data import ImageLoadError, sample
from shusheng.detection import Detector
from shusheng.detection.fpn import BackboneFPN
from shusheng.detection.model import DetectorConfig, InternImageDetector
from shusheng.detection.pipelines import DetectionPipeline, PipelineDetector

TINY = dict(backbone="internimage_test", backbone_args={"channels": 8}, fpn_channels=64, min_size=64, max_size=128)


def tiny(head: str, **kw) -> InternImageDetector:
    torch.manual_seed(0)
    return InternImageDetector(DetectorConfig(head=head, **{**TINY, **kw}))


def scene(i: int = 0, size: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A SynthDrive image in [0, 1] and its torchvision target (boxes x0y0x1y1, labels, instance masks)."""
    img, ann = sample(0, i, size)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    boxes = torch.tensor([o["bbox"] for o in ann.objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = np.stack([ann.instance == o["instance_id"] for o in ann.objects]).astype(np.uint8)
    return x, {"boxes": boxes, "labels": torch.tensor([o["category_id"] for o in ann.objects]),
               "masks": torch.from_numpy(masks)}


def test_fpn_levels_shapes_and_strides() -> None:
    fpn = BackboneFPN(create_backbone("internimage_test", channels=8), out_channels=16)
    maps = fpn(torch.randn(2, 3, 128, 96))
    assert list(maps) == ["0", "1", "2", "3", "pool"] == fpn.names
    assert fpn.strides == [4, 8, 16, 32, 64] and fpn.out_channels == 16
    for (name, m), s in zip(maps.items(), fpn.strides):
        assert m.shape == (2, 16, math.ceil(128 / s), math.ceil(96 / s)), name
    # the classifier head is pruned away: the pyramid reads only the levels
    assert not hasattr(fpn.backbone, "conv_head")
    sub = BackboneFPN(create_backbone("internimage_test", channels=8), out_channels=16, indices=[1, 2, 3])
    assert sub.strides == [8, 16, 32, 64] and sub(torch.randn(1, 3, 64, 64))["0"].shape == (1, 16, 8, 8)


def test_detector_on_a_timm_tower() -> None:
    pytest.importorskip("timm")
    model = InternImageDetector(backbone="resnet18", backbone_indices=[1, 2, 3, 4], head="fcos", fpn_channels=64,
                                min_size=64, max_size=64).eval()
    assert model.fpn.strides == [4, 8, 16, 32, 64]
    assert [m.shape[-1] for m in model.fpn(torch.randn(1, 3, 64, 64)).values()] == [16, 8, 4, 2, 1]
    with torch.no_grad():
        assert set(model([torch.rand(3, 64, 80)])[0]) == {"boxes", "scores", "labels"}


def test_fpn_rejects_a_tower_without_levels() -> None:
    with pytest.raises(TypeError, match="forward_intermediates"):
        BackboneFPN(torch.nn.Conv2d(3, 8, 3))


def test_config_checks() -> None:
    c = DetectorConfig()
    assert c.labels == ["car", "truck", "bus", "person", "traffic light", "sign"] and c.num_classes == 6
    assert DetectorConfig(labels=[], num_classes=2).labels == ["class_1", "class_2"]
    with pytest.raises(ValueError, match="num_classes=3"):
        DetectorConfig(labels=["a", "b"], num_classes=3)
    with pytest.raises(ValueError, match="head"):
        DetectorConfig(head="retina")
    for bad in (16, 32, 80):
        with pytest.raises(ValueError, match="multiple of 32"):
            DetectorConfig(head="fcos", fpn_channels=bad)
    with pytest.raises(TypeError, match="unknown"):
        DetectorConfig.from_any({"backbone": "internimage_test", "heads": "fcos"})


@pytest.mark.parametrize(("head", "loss_names"), [
    ("maskrcnn", {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}),
    ("fcos", {"classification", "bbox_regression", "bbox_ctrness"}),
])
def test_train_losses_and_gradients(head: str, loss_names: set[str]) -> None:
    model = tiny(head).train()
    x, t = scene(0)
    losses = model([x], [t])
    assert set(losses) == loss_names and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.fpn.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("head", ["maskrcnn", "fcos"])
def test_eval_detections_format(head: str) -> None:
    model = tiny(head, score_threshold=0.0, detections_per_image=20).eval()
    x, _ = scene(1)
    with torch.no_grad():
        (res,) = model([x[:, :96, :]])  # non-square input
    n = len(res["boxes"])
    assert 0 < n <= 20 and res["boxes"].shape == (n, 4) and res["scores"].shape == res["labels"].shape == (n,)
    assert int(res["labels"].min()) >= 1 and int(res["labels"].max()) <= 6
    assert ("masks" in res) == (head == "maskrcnn")
    if head == "maskrcnn":
        assert res["masks"].shape == (n, 1, 96, 128)


def test_fcos_topk_candidates_caps_cells_per_level() -> None:
    """``topk_candidates`` is the cap per pyramid level before NMS: with 1 candidate per level and NMS off, at most
    one detection per level comes out, the best-scoring of the uncapped run among them."""
    x, _ = scene(1)
    full = tiny("fcos", score_threshold=0.0, detections_per_image=1000).eval()
    capped = tiny("fcos", score_threshold=0.0, detections_per_image=1000, topk_candidates=1).eval()
    capped.load_state_dict(full.state_dict())
    for m in (full, capped):
        m.detector.nms_thresh = 1.0  # keep every candidate
    with torch.no_grad():
        a, b = full([x])[0], capped([x])[0]
    levels = len(capped.fpn.strides)
    assert capped.detector.topk_candidates == 1 and full.detector.topk_candidates == 1000
    assert 0 < len(b["scores"]) <= levels < len(a["scores"])
    assert float(b["scores"].max()) == pytest.approx(float(a["scores"].max()))
    with pytest.raises(ValueError, match="topk_candidates"):
        DetectorConfig(head="fcos", fpn_channels=64, topk_candidates=0)


@pytest.mark.parametrize("head", ["maskrcnn", "fcos"])
def test_set_inference_threshold_keeps_the_detections_above_it(head: str) -> None:
    """Raising the score threshold to t drops exactly the detections up to t (a box is suppressed only by a better
    one); fewer RPN proposals change Mask R-CNN's inference setting; bad values are refused."""
    x, _ = scene(1)
    model = tiny(head, score_threshold=0.0, detections_per_image=1000).eval()
    with torch.no_grad():
        full = model([x])[0]
    t = float(full["scores"].median())
    assert model.set_inference(score_threshold=t) is model and model.config.score_threshold == t
    with torch.no_grad():
        cut = model([x])[0]
    keep = full["scores"] > t  # torchvision keeps scores above the threshold
    assert 0 < len(cut["scores"]) < len(full["scores"])

    def rows(scores, boxes):  # (score, box) rows in a fixed order, ties included
        r = torch.cat([scores[:, None], boxes], 1).numpy()
        return r[np.lexsort(r.T[::-1])]

    np.testing.assert_allclose(rows(cut["scores"], cut["boxes"]), rows(full["scores"][keep], full["boxes"][keep]))
    with pytest.raises(ValueError, match="score_threshold"):
        model.set_inference(score_threshold=1.0)
    if head == "fcos":
        with pytest.raises(ValueError, match="FCOS"):
            model.set_inference(proposals=10)
        return
    model.set_inference(proposals=7)
    rpn = model.detector.rpn
    assert rpn.post_nms_top_n() == 7 and rpn._post_nms_top_n["training"] == model.config.rpn_proposals
    with torch.no_grad():
        few = model([x])[0]
    assert len(few["scores"]) <= 7 * model.config.num_classes
    with pytest.raises(ValueError, match="proposals"):
        model.set_inference(proposals=0)


@pytest.mark.parametrize("head", ["maskrcnn", "fcos"])
def test_save_load_round_trip(head: str, tmp_path) -> None:
    model = tiny(head, score_threshold=0.0).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "detector" and cfg["config"]["head"] == head
    assert cfg["preprocess"]["mean"] == list(model.fpn.backbone.preprocess_config().mean)
    loaded = InternImageDetector.from_pretrained(tmp_path)
    x, _ = scene(2)
    with torch.no_grad():
        a, b = model([x])[0], loaded([x])[0]
    assert a.keys() == b.keys() and len(a["boxes"]) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    tiny("maskrcnn", score_threshold=0.0, detections_per_image=30).save_pretrained(d)
    return d


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_pipeline_boxes_in_original_pixels_and_errors(saved, tmp_path) -> None:
    pipe = DetectionPipeline.from_pretrained(saved)
    wide = Image.fromarray((np.random.default_rng(0).random((100, 256, 3)) * 255).astype(np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = pipe([wide, str(bad)], threshold=0.0, batch_size=2)
    assert out.errors[0] is None and out.errors[1] is not None and out.detections[1] is None
    assert out.sizes == [(256, 100), None] and out.in_domain == [True, None]
    assert math.isnan(out.domain_score[0])
    dets = out.detections[0]
    assert dets and [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    right = [d["box"][0] + d["box"][2] for d in dets]
    bottom = [d["box"][1] + d["box"][3] for d in dets]
    # the model saw a 128 x 50 resize; boxes come back in the 256 x 100 image's own pixels
    assert max(right) <= 256.01 and max(bottom) <= 100.01 and max(right) > 128
    from pycocotools import mask as mask_utils

    m = dets[0]["mask"]
    assert m["size"] == [100, 256]
    assert mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).shape == (100, 256)
    assert all(d["score"] >= 0.1 for d in pipe(wide, threshold=0.1).detections[0])
    with pytest.raises(ImageLoadError, match="bad.png"):
        pipe([str(bad)], on_error="raise")


def test_pipeline_detector_protocol(saved) -> None:
    img, _ = sample(0, 3, 96)
    det = PipelineDetector(DetectionPipeline.from_pretrained(saved), threshold=0.0)
    assert isinstance(det, Detector) and det.name == "internimage_test-maskrcnn"
    found = det.detect(img)
    boxes = det(img)
    assert len(found) == len(boxes) > 0 and set(found[0]) == {"box", "label", "score"}
    for d, b in zip(found, boxes):
        assert all(isinstance(v, int) for v in b)
        assert b[0] <= d["box"][0] and b[0] + b[2] >= d["box"][0] + d["box"][2] - 1e-6


def test_pipeline_without_bundled_detector(monkeypatch, tmp_path) -> None:
    from shusheng import weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path)  # an installation without shusheng-mini-det
    with pytest.raises(FileNotFoundError, match="no bundled detector"):
        DetectionPipeline.from_pretrained()


def test_cli_detect_json_draw_and_errors(saved, tmp_path, capsys) -> None:
    img, _ = sample(0, 4, 64)
    good = tmp_path / "scene.png"
    img.save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00" * 10)
    draw = tmp_path / "drawn"
    rc = main(["detect", str(good), str(bad), "--model", str(saved), "--json", "--threshold", "0.0",
               "--draw", str(draw)])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 1 and [r["image"] for r in rows] == [str(good), str(bad)]
    assert "error" not in rows[0] and rows[0]["in_domain"] is True and rows[0]["domain_score"] is None
    assert rows[0]["detections"] and set(rows[0]["detections"][0]) == {"label", "score", "box", "mask"}
    assert "error" in rows[1] and "detections" in rows[1] and rows[1]["detections"] is None
    with Image.open(draw / "scene.png") as drawn:
        assert drawn.size == (64, 64)
        assert np.abs(np.asarray(drawn.convert("RGB"), dtype=int) - np.asarray(img, dtype=int)).sum() > 0
    assert sorted(p.name for p in draw.iterdir()) == ["scene.png"]

    assert main(["detect", str(good), "--model", str(saved)]) == 0
    assert "detection(s)" in capsys.readouterr().out


def test_cli_detect_without_model(tmp_path, capsys, monkeypatch) -> None:
    from shusheng import weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path)  # an installation without shusheng-mini-det
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["detect", str(img)]) == 2
    err = capsys.readouterr().err
    assert "no bundled detector" in err and "--model DIR" in err
    assert main(["detect", str(img), "--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_lazy_exports() -> None:
    import shusheng.detection as det

    assert det.DetectionPipeline is DetectionPipeline and det.InternImageDetector is InternImageDetector
    assert det.BackboneFPN is BackboneFPN and det.PipelineDetector is PipelineDetector
    from shusheng.detection.pipelines import SegmentationPipeline
    from shusheng.detection.segment import InternImageSegmenter

    assert det.SegmentationPipeline is SegmentationPipeline and det.InternImageSegmenter is InternImageSegmenter
    with pytest.raises(AttributeError, match="YoloPipeline"):
        det.YoloPipeline  # noqa: B018 - no such export
