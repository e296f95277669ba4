"""The detection pipeline around a saved detector (tiny random models, 64 px): the bundled ``shusheng-mini-det`` as
the default of the pipeline, ``shusheng detect`` and ingest's ``--detect``; large images downscaled before the
model with boxes and masks mapped back; the in-domain check of a detector (``shusheng train domain-check``),
read from the detection pass itself (``return_levels``, no hooks); ``--detector DIR`` for ingest."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shusheng.cli import main
from shusheng.data import synthdrive as sd
from shusheng.detection.domain import tower_level_stats
from shusheng.detection.model import DetectorConfig, InternImageDetector
from shusheng.detection.pipelines import DetectionPipeline, PipelineDetector, detector_input_size
from shusheng.pipelines import DOMAIN_FILE

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

TINY = dict(backbone="internimage_test", backbone_args={"channels": 8}, head="maskrcnn", fpn_channels=32,
            min_size=64, max_size=64, box_head_dim=32, mask_head_dim=16, rpn_proposals=50, roi_batch=16,
            score_threshold=0.0, detections_per_image=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("det") / "final"
    InternImageDetector(DetectorConfig(**TINY)).save_pretrained(folder, dtype=torch.float16)  # as bundled: fp16
    return folder


@pytest.fixture(scope="module")
def checked(saved, tmp_path_factory) -> Path:
    """The tiny detector with an in-domain check fitted by ``shusheng train domain-check``."""
    folder = tmp_path_factory.mktemp("det-checked") / "final"
    shutil.copytree(saved, folder)
    assert main(["train", "domain-check", "--model", str(folder), "--n-fit", "100", "--n-calibration", "120",
                 "--alpha", "0.01"]) == 0
    return folder


@pytest.fixture
def bundled(saved, tmp_path, monkeypatch) -> Path:
    """An installation whose only bundled model is the tiny detector, as ``shusheng-mini-det``."""
    from shusheng import weights

    shutil.copytree(saved, tmp_path / "weights" / "shusheng-mini-det")
    monkeypatch.setattr(weights, "_ROOT", tmp_path / "weights")
    return tmp_path / "weights" / "shusheng-mini-det"


@pytest.fixture
def nothing_bundled(tmp_path, monkeypatch) -> None:
    from shusheng import weights

    (tmp_path / "no-weights").mkdir()
    monkeypatch.setattr(weights, "_ROOT", tmp_path / "no-weights")


def scene_file(folder: Path, i: int = 0, size: int = 64, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"scene{i}.png")
    sd.sample(sd.TEST_SEED, i, size)[0].save(path)
    return path


# ------------------------------------------------------------------------------------------- bundled default
def test_the_bundled_detector_is_the_default(bundled, tmp_path, capsys) -> None:
    pipe = DetectionPipeline.from_pretrained()
    assert pipe.model.config.min_size == 64 and pipe.domain_check is None
    img = scene_file(tmp_path / "in")
    assert main(["detect", str(img), "--json", "--threshold", "0"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["image"] == str(img) and row["in_domain"] is True and row["domain_score"] is None
    assert row["detections"] and set(row["detections"][0]) == {"label", "score", "box", "mask"}
    assert "resized_from" not in row and "error" not in row  # a 64 px image goes in as it is


def test_without_a_bundled_detector_the_error_says_what_to_do(nothing_bundled, tmp_path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no bundled detector.*shusheng train detect.*--model DIR"):
        DetectionPipeline.from_pretrained()
    assert main(["detect", str(scene_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "no bundled detector" in err and "--model DIR" in err and "shusheng train detect" in err


# ------------------------------------------------------------------------------------------- large images
def test_input_size_is_the_detectors_own_resize() -> None:
    assert detector_input_size(4000, 3000, 256, 256) == (256, 192)
    assert detector_input_size(3000, 4000, 256, 512) == (256, 341)
    assert detector_input_size(100, 2000, 64, 512) == (26, 512)  # the longer side binds
    model = InternImageDetector(DetectorConfig(**{**TINY, "max_size": 96})).eval()
    for w, h in ((4000, 3000), (333, 1000), (1000, 333)):
        tw, th = detector_input_size(w, h, 64, 96)
        image_list, _ = model.detector.transform([torch.rand(3, th, tw)])
        assert tuple(image_list.image_sizes[0]) == (th, tw)  # the detector keeps a pre-resized image as it is


def test_a_large_image_is_downscaled_before_the_model(saved, tmp_path, capsys) -> None:
    """A 2000 x 1500 photograph: the model sees 64 x 48 (never the full size), boxes and masks come back in the
    photograph's pixels, and ``--json`` says it was resized."""
    big = Image.new("RGB", (2000, 1500), (90, 90, 100))
    big.paste(sd.sample(sd.TEST_SEED, 1, 256)[0].resize((1500, 1500)), (250, 0))
    path = tmp_path / "big.jpg"
    big.save(path, quality=90)
    pipe = DetectionPipeline.from_pretrained(saved)
    seen = []
    handle = pipe.model.register_forward_pre_hook(lambda m, args: seen.extend(t.shape for t in args[0]))
    try:
        out = pipe([str(path)], threshold=0.0)
    finally:
        handle.remove()
    assert seen == [(3, 48, 64)] and out.input_sizes == [(64, 48)] and out.sizes == [(2000, 1500)]
    assert out.resized(0)
    dets = out.detections[0]
    assert dets and all(0 <= d["box"][0] and d["box"][0] + d["box"][2] <= 2000.01 for d in dets)
    assert max(d["box"][0] + d["box"][2] for d in dets) > 64  # in the photograph's pixels, not the model's
    from shusheng.detection.visualize import decode_mask

    assert all(decode_mask(d["mask"]).shape == (1500, 2000) for d in dets)
    # the same boxes as the detector finds on the 64 x 48 copy, scaled by 2000 / 64 and 1500 / 48
    small = pipe([big.resize((64, 48), Image.Resampling.BILINEAR)], threshold=0.0).detections[0]
    np.testing.assert_allclose([d["box"] for d in dets], [[x * 31.25 for x in d["box"]] for d in small],
                               atol=0.5, rtol=0.02)

    assert main(["detect", str(path), "--model", str(saved), "--json", "--threshold", "0"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["resized_from"] == [2000, 1500] and row["resized_to"] == [64, 48]
    assert main(["detect", str(path), "--model", str(saved), "--threshold", "0"]) == 0
    assert "(seen at 64x48)" in capsys.readouterr().out


def test_non_images_fail_their_own_item(saved, tmp_path, capsys) -> None:
    good = scene_file(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    draw = tmp_path / "drawn"
    rc = main(["detect", str(text), str(good), str(tmp_path / "missing.jpg"), "--model", str(saved), "--json",
               "--threshold", "0", "--draw", str(draw)])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 1 and [("error" in r) for r in rows] == [True, False, True]
    assert rows[1]["detections"] and Path(rows[1]["drawn"]).is_file()
    with Image.open(rows[1]["drawn"]) as drawn:  # boxes and masks drawn over the scene
        assert drawn.size == (64, 64) and np.any(np.asarray(drawn.convert("RGB")) != np.asarray(Image.open(good)))
    assert sorted(p.name for p in draw.iterdir()) == ["scene0.png"]


# ------------------------------------------------------------------------------------------- in-domain check
def test_level_stats_leave_the_padding_out() -> None:
    f = torch.randn(1, 4, 8, 8)
    padded = torch.cat([f[:, :, :, :6], torch.zeros(1, 4, 8, 2)], dim=3)  # an image 6 cells wide, padded to 8
    stats = tower_level_stats([padded], [4], sizes=[(32, 24)])  # 32 x 24 px at stride 4: 8 x 6 cells
    x = f[0, :, :, :6].flatten(1)
    torch.testing.assert_close(stats[0], torch.cat([x.mean(1), x.std(1, unbiased=False)]))
    assert tower_level_stats([f, f[:, :, ::2, ::2]], [4, 8]).shape == (1, 16)
    assert tower_level_stats([f, f[:, :, ::2, ::2]]).shape == (1, 16)  # whole maps need no strides
    with pytest.raises(ValueError, match="stride"):
        tower_level_stats([f], sizes=[(32, 24)])
    import shusheng.detection.pipelines as pipelines

    assert pipelines.tower_level_stats is tower_level_stats  # one implementation, re-exported


def direct_level_stats(model: InternImageDetector, images: list[torch.Tensor]) -> torch.Tensor:
    """The in-domain features written out by hand: each image alone through the detector's transform and
    ``forward_intermediates`` of its tower, then the per-channel mean and std of every level."""
    fpn = model.fpn
    rows = []
    for img in images:
        batch, _ = model.detector.transform([img])
        levels = fpn.backbone.forward_intermediates(batch.tensors, fpn.indices, intermediates_only=True)
        h, w = batch.image_sizes[0]
        cells = [f[0, :, :math.ceil(h / s), :math.ceil(w / s)].float().flatten(1)
                 for f, s in zip(levels, fpn.strides[:-1])]
        rows.append(torch.cat([c.mean(1) for c in cells] + [c.std(1, unbiased=False) for c in cells]))
    return torch.stack(rows)


@pytest.mark.parametrize("head", ["maskrcnn", "fcos"])
def test_return_levels_is_torchvisions_inference_with_the_tower_levels(head: str) -> None:
    """``model(images, return_levels=True)`` gives exactly what torchvision's own forward gives, and the tower
    levels of that pass: those of ``forward_intermediates`` on the padded batch."""
    torch.manual_seed(0)
    fpn_channels = 64 if head == "fcos" else 32  # FCOS group-normalises in 32 groups
    model = InternImageDetector(DetectorConfig(**{**TINY, "head": head, "max_size": 96,
                                                  "fpn_channels": fpn_channels})).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 90), torch.rand(3, 70, 50)]  # padded batch, mixed sizes
    with torch.inference_mode():
        plain = model(images)
        found, levels, sizes = model(images, return_levels=True)
        batch, _ = model.detector.transform(images)
        want = model.fpn.backbone.forward_intermediates(batch.tensors, model.fpn.indices, intermediates_only=True)
    assert sizes == [tuple(s) for s in batch.image_sizes] and len(found) == 3
    assert any(len(r["boxes"]) for r in plain)  # score_threshold 0: something to compare
    for a, b in zip(found, plain):
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [f.shape for f in levels] == [f.shape for f in want]
    assert all(torch.equal(a, b) for a, b in zip(levels, want))
    assert model.level_strides == [4, 8, 16, 32]
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(images, return_levels=True)


def test_domain_check_of_a_detector(checked) -> None:
    """``shusheng train domain-check`` fits a detector's check; the pipeline reads it from its own detection pass:
    real scores instead of NaN, the same as the check's features of the transformed images give. (A random tiny
    tower does not tell scenes from noise; the trained tower does: ``test_the_trained_tower_knows_its_domain``.)"""
    assert (checked / DOMAIN_FILE).is_file()
    pipe = DetectionPipeline.from_pretrained(checked)
    check = pipe.domain_check
    assert check is not None and check.info["features"] == "DetectionPipeline.domain_features"
    assert check.mean.shape == (2 * (8 + 16 + 32 + 64),)  # mean and std of the four tower levels
    # the SynthDrive train scenes the check was fitted on are in its domain
    fitted = [sd.sample(sd.TRAIN_SEED, i, 64)[0] for i in range(24)]
    assert all(pipe(fitted, batch_size=8).in_domain)
    scenes = [sd.sample(sd.TEST_SEED, i, 64)[0] for i in range(6)]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    flat = Image.new("RGB", (64, 64), (40, 160, 40))
    wide = sd.sample(sd.TEST_SEED, 9, 64)[0].resize((64, 40))  # padded in a batch of squares
    out = pipe([*scenes, noise, flat, b"junk", wide], threshold=0.5, batch_size=5)
    assert all(0 < s <= 1 for s in out.domain_score[:8]) and math.isnan(out.domain_score[8])
    assert out.in_domain[8] is None and out.errors[8] is not None
    # the same scores as the features computed by hand, each image alone (no padding), from forward_intermediates
    tensors = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
               for im in [*scenes, noise, flat, wide]]
    with torch.inference_mode():
        direct = direct_level_stats(pipe.model, [t.to(pipe.dtype) for t in tensors])
    ok, scores = check.score(direct)
    np.testing.assert_allclose(out.domain_score[:8] + out.domain_score[9:], scores, atol=1e-6)
    assert out.in_domain[:8] + out.in_domain[9:] == ok
    ok, scores = pipe.check_domain(torch.stack([pipe.transform(im) for im in [*scenes, noise, flat]]))
    np.testing.assert_allclose(out.domain_score[:8], scores, atol=1e-6)
    assert out.in_domain[:8] == ok
    assert sum(out.in_domain[:6]) >= 5


def test_domain_scores_hold_when_threads_share_a_pipeline(checked) -> None:
    """The levels come back from the model's pass itself (no hooks, no state on shared modules): two threads
    calling one pipeline with differently padded batches get what each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = DetectionPipeline.from_pretrained(checked)
    square = [sd.sample(sd.TEST_SEED, i, 64)[0] for i in range(4)]
    wide = [im.resize((64, 36)) for im in square]
    alone = [pipe(square, batch_size=2).domain_score, pipe(wide, batch_size=2).domain_score]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            together = list(pool.map(lambda ims: pipe(ims, batch_size=2).domain_score, [square, wide]))
            np.testing.assert_allclose(together, alone, atol=1e-6)


def test_cli_reports_a_real_domain_score(checked, tmp_path, capsys) -> None:
    from shusheng.pipelines import DomainCheck

    scene = scene_file(tmp_path)
    assert main(["detect", str(scene), "--model", str(checked), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["in_domain"] is True and isinstance(row["domain_score"], float) and 0 < row["domain_score"] <= 1
    # a check whose calibration scenes all lie at distance 0: every image is out of the domain
    strict = tmp_path / "strict"
    shutil.copytree(checked, strict)
    check = DomainCheck.load(strict)
    DomainCheck(check.mean, check.whiten, torch.zeros(500), alpha=0.01).save(strict)
    assert main(["detect", str(scene), "--model", str(strict), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["in_domain"] is False and row["domain_score"] == round(1 / 501, 4)
    assert main(["detect", str(scene), "--model", str(strict)]) == 0
    assert "unlike the training scenes: domain score 0.002" in capsys.readouterr().out


@pytest.mark.slow
def test_the_trained_tower_knows_its_domain() -> None:
    """The tower the bundled detector starts from (the bundled decoder's InternImage) at 256 px: a check fitted on
    1,000 train scenes passes the test scenes and flags photographs and non-scenes (measured: all of them)."""
    skimage_data = pytest.importorskip("skimage.data")
    from shusheng.data import load_image
    from shusheng.data.nonscenes import nonscene_images
    from shusheng.train.detect import DetectTrainConfig, load_backbone_init
    from shusheng.train.domain import fit_domain_check
    from shusheng.weights import BundledWeightsNotFound

    model = InternImageDetector(DetectTrainConfig().detector_config())
    try:
        load_backbone_init(model.fpn.backbone, "shusheng-mini-uniperceiver")
    except BundledWeightsNotFound:
        pytest.skip("shusheng-mini-uniperceiver is not bundled here")
    pipe = DetectionPipeline(model)
    pipe.domain_check = fit_domain_check(pipe, 1000, 250)
    photo_dir = Path(skimage_data.__file__).parent
    photos = [load_image(photo_dir / f) for f in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                                  "camera.png", "motorcycle_left.png")]
    scenes = [sd.sample(sd.TEST_SEED, i, 256)[0] for i in range(40)]
    ok = lambda images: pipe.check_domain(torch.stack([pipe.transform(im) for im in images]))[0]  # noqa: E731
    assert sum(ok(scenes)) >= 39
    assert not any(ok(photos)) and not any(ok(nonscene_images(16, size=256)))


# ------------------------------------------------------------------------------------------- ingest --detect
@pytest.fixture
def color_embedder():
    pytest.importorskip("faiss")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_retrieval_index import ColorEmbedder

    from shusheng.retrieval_index import embedders as emb_mod

    emb_mod.register_embedder("test-color-det")(lambda checkpoint=None, device=None: ColorEmbedder())
    yield "test-color-det"
    emb_mod._EMBEDDERS.pop("test-color-det", None)


def _index(folder: Path, capsys, *flags: str) -> dict:
    capsys.readouterr()
    assert main(["index", str(folder), "--embedder", "test-color-det", "--json", "--quiet", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_ingest_detector_option(saved, tmp_path, capsys, caplog, color_embedder) -> None:
    folder = tmp_path / "photos"
    for i in range(2):
        scene_file(folder, i)
    caplog.set_level(logging.INFO, logger="shusheng.retrieval_index.cli")
    report = _index(folder, capsys, "--detector", str(saved), "--detect-threshold", "0.01")
    assert report["regions"] > 0 and f"the detector of {saved}" in caplog.text
    assert main(["index", str(folder), "--embedder", "test-color-det", "--detector", str(tmp_path / "nothing"),
                 "--quiet"]) == 2
    assert "cannot load the detector" in caplog.text


def test_ingest_detect_prefers_the_bundled_detector(bundled, tmp_path, capsys, caplog, color_embedder) -> None:
    folder = tmp_path / "photos"
    scene_file(folder, 3)
    caplog.set_level(logging.INFO, logger="shusheng.retrieval_index.cli")
    report = _index(folder, capsys, "--detect", "--detect-threshold", "0.01")
    assert report["regions"] > 0 and "the detector of shusheng-mini-det" in caplog.text


def test_pipeline_detector_over_the_bundled_model(bundled) -> None:
    det = PipelineDetector(DetectionPipeline.from_pretrained(), threshold=0.01)
    boxes = det(sd.sample(sd.TEST_SEED, 0, 64)[0])
    assert boxes and all(isinstance(v, int) for b in boxes for v in b)
