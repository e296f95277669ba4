"""The Detect tab (shusheng/apps/tabs/detect.py) over a tiny random detector and segmenter: without a detector the
tab says why and adds no API; with the bundled one it is built; a detection draws boxes and masks, counts the
classes and (with a segmenter) shows the overlay, else says the segmenter is missing; bad uploads and thresholds
get a message and never reach the model; ``shusheng demo --detector/--segmenter``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytest.importorskip("pycocotools")
torch = pytest.importorskip("torch")

from app_helpers import component, fn, hostile, public_api  # noqa: E402
from PIL import Image  # noqa: E402

from shusheng.apps.gradio_app import build_demo  # noqa: E402
from shusheng.apps.safety import AppLimits  # noqa: E402
from shusheng.apps.tabs import AppContext, detect, load_tabs  # noqa: E402
from shusheng.data import synthdrive as sd  # noqa: E402
from shusheng.detection.model import DetectorConfig, InternImageDetector  # noqa: E402
from shusheng.detection.pipelines import DetectionPipeline, SegmentationPipeline  # noqa: E402
from shusheng.detection.segment import InternImageSegmenter, SegmenterConfig  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools

TOWER = dict(backbone="internimage_test", backbone_args={"channels": 8})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny random models: ``detector`` (Mask R-CNN, every detection reported) and ``segmenter``."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    InternImageDetector(DetectorConfig(**TOWER, head="maskrcnn", fpn_channels=32, min_size=64, max_size=64,
                                       box_head_dim=32, mask_head_dim=16, rpn_proposals=50, roi_batch=16,
                                       score_threshold=0.0, detections_per_image=8)).save_pretrained(root / "det")
    InternImageSegmenter(SegmenterConfig(**TOWER, channels=16, image_size=64)).save_pretrained(root / "seg")
    return {"detector": root / "det", "segmenter": root / "seg"}


@pytest.fixture(scope="module")
def pipes(models):
    return DetectionPipeline.from_pretrained(models["detector"]), SegmentationPipeline.from_pretrained(
        models["segmenter"])


def scene(i: int = 0) -> Image.Image:
    return sd.sample(sd.TEST_SEED, i, 64)[0]


def build(detector, segmenter=None, limits: AppLimits | None = None, **kwargs):
    with gr.Blocks() as demo:
        detect.detect_tab(detector, AppContext(limits=limits or AppLimits()), segmenter, samples=[scene()], **kwargs)
    return demo


def markdown(demo) -> str:
    return "\n".join(b.value or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown))


def install(tmp_path: Path, monkeypatch, **folders: Path) -> None:
    """An installation whose bundled models are ``folders`` (name -> folder), nothing else."""
    from shusheng import weights

    root = tmp_path / "weights"
    root.mkdir()
    for name, folder in folders.items():
        shutil.copytree(folder, root / name)
    monkeypatch.setattr(weights, "_ROOT", root)


def test_without_a_detector_the_tab_says_why_and_adds_no_api(monkeypatch, tmp_path):
    install(tmp_path, monkeypatch)
    titles = [t.title for t in load_tabs()]
    assert "Detect" in titles and titles.index("Detect") == titles.index("Generate") - 1
    reason = detect.TAB.available()
    assert "shusheng-mini-det" in reason and "shusheng train detect" in reason and "shusheng demo --detector" in reason
    other = detect.DetectTab(os.fspath(tmp_path / "nothing")).available()
    assert "not a detector folder" in other and "--detector" in other
    demo = build_demo(None, None, tabs=[detect.TAB])
    assert "**Detect is not available here.**" in markdown(demo) and "shusheng train detect" in markdown(demo)
    assert not public_api(demo)
    # a folder with a config.json of another kind of model: found while building, shown the same way
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "miniclip", "config": {}, "preprocess": {}}')
    demo = build_demo(None, None, tabs=[detect.DetectTab(os.fspath(tmp_path / "other"))])
    assert "**Detect is not available here.**" in markdown(demo) and "cannot be loaded" in markdown(demo)


def test_the_bundled_detector_makes_the_tab_and_says_the_segmenter_is_missing(monkeypatch, tmp_path, models):
    install(tmp_path, monkeypatch, **{"shusheng-mini-det": models["detector"]})
    assert detect.TAB.available() is None
    demo = build_demo(None, None, tabs=[detect.DetectTab()])
    assert public_api(demo) == {"detect"}
    assert "No segmentation here: no segmenter is bundled (`shusheng-mini-seg`)" in markdown(demo)
    assert "shusheng train segment" in markdown(demo)
    threshold = component(demo, "detect-threshold")
    assert (threshold.minimum, threshold.maximum, threshold.value) == (0.0, 1.0, 0.5)
    drawn, notice, counts = fn(demo, "detect")(scene(), 0.0)
    assert isinstance(drawn, Image.Image) and counts


def test_with_both_bundled_models_the_overlay_is_shown(monkeypatch, tmp_path, models):
    install(tmp_path, monkeypatch, **{"shusheng-mini-det": models["detector"],
                                      "shusheng-mini-seg": models["segmenter"]})
    demo = build_demo(None, None, tabs=[detect.DetectTab()])
    assert "No segmentation here" not in markdown(demo)
    drawn, notice, counts, overlay, classes = fn(demo, "detect")(scene(), 0.0)
    assert overlay.size == drawn.size == (64, 64) and classes.startswith("Largest classes: ")


def test_a_detection_draws_counts_and_segments(pipes):
    detector, segmenter = pipes
    demo = build(detector, segmenter)
    img = scene(1)
    drawn, notice, counts, overlay, classes = fn(demo, "detect")(img, 0.0)
    direct = detector([img], threshold=0.0).detections[0]
    assert len(direct) == 8 and notice == ""
    # one row per class: its count and best score, most frequent first; the counts add up to the detections
    assert sum(r[1] for r in counts) == len(direct) and [r[1] for r in counts] == sorted((r[1] for r in counts),
                                                                                          reverse=True)
    best = {}
    for d in direct:
        best[d["label"]] = max(best.get(d["label"], 0.0), d["score"])
    assert {r[0]: r[2] for r in counts} == {k: round(v, 3) for k, v in best.items()}
    # the drawing: the scene with boxes and masks over it; the overlay: the scene blended with the class colours
    assert drawn.size == img.size and np.any(np.asarray(drawn) != np.asarray(img))
    from shusheng.detection.segment import overlay as blend

    ids = segmenter([img]).class_ids[0]
    np.testing.assert_array_equal(np.asarray(overlay), blend(np.asarray(img), ids, 0.5, len(segmenter.model.labels)))
    assert classes.startswith("Largest classes: ")
    # a high threshold: nothing found, said in words; the table is empty
    drawn, notice, counts, _, _ = fn(demo, "detect")(img, 1.0)
    assert counts == [] and "No object scores 1.00 or more." in notice
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(img))


def test_a_large_upload_is_seen_smaller_and_drawn_at_its_size(pipes, tmp_path):
    detector, _ = pipes
    path = tmp_path / "big.png"
    scene(2).resize((400, 300)).save(path)
    drawn, notice, counts = fn(build(detector, segmenter_reason="none here"), "detect")(os.fspath(path), 0.0)
    assert drawn.size == (400, 300) and "The detector saw this 400×300 image at 64×48." in notice


def test_out_of_domain_images_get_a_notice(pipes, models, tmp_path):
    from shusheng.pipelines import DomainCheck

    detector, _ = pipes
    x = torch.stack([detector.transform(scene(i)) for i in range(4)])
    feats = detector.domain_features(x)
    strict = DomainCheck(feats.mean(0), torch.eye(feats.shape[1]), torch.zeros(300), alpha=0.01)  # flags everything
    checked = DetectionPipeline(detector.model, strict)
    _, notice, _ = fn(build(checked), "detect")(scene(), 0.5)
    assert "does not look like the driving scenes" in notice and "the detection is unreliable" in notice


def test_bad_uploads_and_thresholds_get_a_message_and_never_reach_the_model(pipes, tmp_path):
    detector, segmenter = pipes
    calls = []
    handle = detector.model.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        run = fn(build(detector, segmenter, limits=AppLimits(max_upload_pixels=50_000)), "detect")
        for name, path in hostile(tmp_path).items():
            drawn, notice, counts, overlay, classes = run(os.fspath(path), 0.5)
            assert drawn is None and counts == [] and overlay is None and notice, name
            assert "image" in notice.lower(), (name, notice)
        assert run(None, 0.5)[1] == "Upload or pick an image first."
        for bad in (-0.1, 1.5, "high", float("nan"), None, True):
            drawn, notice, *_ = run(scene(), bad)
            assert drawn is None and notice.startswith("⚠️ The threshold must be a number from 0 to 1"), bad
        assert calls == []
        good = tmp_path / "good.png"
        scene().save(good)
        assert run(os.fspath(good), "0.25")[0].size == (64, 64) and calls == [1]
    finally:
        handle.remove()


def test_parse_threshold():
    assert detect.parse_threshold(0.3) == 0.3 and detect.parse_threshold("1") == 1.0
    with pytest.raises(detect.UserInputError, match=r"not 'x{36}\.\.\.\.$"):  # never echoed whole
        detect.parse_threshold("x" * 100)


def test_demo_detector_option_puts_those_folders_in_the_detect_tab(tmp_path, monkeypatch, caplog, models):
    from test_app_chat import MeanColourEmbedder

    from shusheng.apps import gradio_app
    from shusheng.cli import main
    from shusheng.retrieval_index import embedders as emb_mod

    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path / "cache"))
    assert main(["demo", "--no-browser", "--detector", os.fspath(tmp_path / "none")]) == 2
    assert "--detector" in caplog.text and "not a detector folder" in caplog.text
    assert main(["demo", "--no-browser", "--segmenter", os.fspath(tmp_path / "none")]) == 2
    assert "not a segmenter folder" in caplog.text
    assert not (tmp_path / "cache" / "demo").exists()  # refused before generating anything
    built = {}

    class Built(Exception):
        pass

    def fake_build_demo(*args, tabs=None, **kwargs):
        built["tabs"] = tabs
        raise Built

    monkeypatch.setattr(gradio_app, "build_demo", fake_build_demo)
    monkeypatch.setitem(emb_mod._EMBEDDERS, "test-mean-colour",
                        lambda checkpoint=None, device=None: MeanColourEmbedder())
    with pytest.raises(Built):
        main(["demo", "--no-browser", "--n", "2", "--embedder", "test-mean-colour", "--detector",
              os.fspath(models["detector"]), "--segmenter", os.fspath(models["segmenter"])])
    titles = [t.title for t in built["tabs"]]
    assert titles == [t.title for t in load_tabs()]
    tab = built["tabs"][titles.index("Detect")]
    assert isinstance(tab, detect.DetectTab) and tab.available() is None
    assert (tab.detector, tab.segmenter) == (os.fspath(models["detector"]), os.fspath(models["segmenter"]))
    assert built["tabs"][titles.index("Generate")] is load_tabs()[titles.index("Generate")]  # the others as they were
