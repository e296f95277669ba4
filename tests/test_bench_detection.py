"""bench/detection.py on tiny random models (Mask R-CNN, FCOS, a segmenter; 3 test scenes): every row is written and
the issue-18 targets judged; without models the bench says how to make them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

ROOT = Path(__file__).resolve().parents[1]
TOWER = dict(backbone="internimage_test", backbone_args={"channels": 8}, min_size=64, max_size=64)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_detection", ROOT / "bench" / "detection.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "reexec_with_bench_env", lambda memory=False: None)  # stay in this process
    return bench


def test_bench_writes_every_row_on_tiny_models(tmp_path, monkeypatch, capsys):
    from shusheng.detection.model import DetectorConfig, InternImageDetector
    from shusheng.detection.segment import InternImageSegmenter, SegmenterConfig

    torch.manual_seed(0)
    InternImageDetector(DetectorConfig(**TOWER, head="maskrcnn", fpn_channels=32, box_head_dim=32, mask_head_dim=16,
                                       rpn_proposals=50, roi_batch=16)).save_pretrained(tmp_path / "maskrcnn")
    InternImageDetector(DetectorConfig(**TOWER, head="fcos", fpn_channels=64)).save_pretrained(tmp_path / "fcos")
    InternImageSegmenter(SegmenterConfig(backbone="internimage_test", backbone_args={"channels": 8}, channels=16,
                                         image_size=64)).save_pretrained(tmp_path / "seg")
    bench = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(tmp_path / "maskrcnn"), "--model", str(tmp_path / "fcos"), "--segmenter",
                           str(tmp_path / "seg"), "--n", "3", "--repeats", "1", "--threads", "1",
                           "--out", str(tmp_path / "out"), "--figure", str(tmp_path / "fig.png")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "out" / "detection.json").read_text())
    rows = {(r["model"], r["key"]): r for r in result["rows"]}
    per_model = {"box_AP", "box_AP50", "box_AP75", "latency_b1", "latency_b8", "pipeline_b1"}
    assert set(rows) == ({("maskrcnn", k) for k in per_model | {"mask_AP"}} | {("fcos", k) for k in per_model}
                         | {("fcos vs maskrcnn", "onestage_speedup"), ("fcos vs maskrcnn", "onestage_box_AP_ratio"),
                            ("fcos vs maskrcnn", "paired_b1_maskrcnn"), ("fcos vs maskrcnn", "paired_b1_fcos"),
                            ("seg", "mIoU"), ("seg", "pixel_accuracy")})
    for (_, key), r in rows.items():
        if r["unit"] in ("AP", "IoU", "share"):
            assert 0.0 <= r["value"] <= 1.0, r
        elif key != "onestage_box_AP_ratio":  # random models find nothing: the ratio is NaN
            assert r["value"] > 0, r
    for key in ("box_AP", "box_AP50"):  # every issue-18 target is printed next to its number, judged
        assert rows[("maskrcnn", key)]["target"] and rows[("fcos", key)]["meets"] in ("yes", "no")
    assert rows[("maskrcnn", "mask_AP")]["target"] == ">= 0.45" and rows[("seg", "mIoU")]["meets"] in ("yes", "no")
    assert rows[("fcos vs maskrcnn", "onestage_speedup")]["meets"] in ("yes", "no")
    pair = [rows[("fcos vs maskrcnn", k)]["value"] for k in ("paired_b1_maskrcnn", "paired_b1_fcos", "onestage_speedup")]
    assert pair[2] == pytest.approx(pair[0] / pair[1])  # the speed-up is the ratio of the times measured in turns
    assert result["meta"]["n"] == 3 and result["meta"]["detectors"]["maskrcnn"]["head"] == "maskrcnn"
    per_class = json.loads((tmp_path / "out" / "detection_per_class.json").read_text())["rows"]
    assert {r["class"] for r in per_class if r["model"] == "fcos"} == {"car", "truck", "bus", "person",
                                                                       "traffic light", "sign"}
    assert len([r for r in per_class if r["model"] == "seg"]) == 12  # SynthDrive's semantic classes
    md = (tmp_path / "out" / "detection.md").read_text()
    assert md.count("\n") == len(rows) + 2 and "target (issue 18)" in md
    assert "box AP@[.5:.95]" in capsys.readouterr().out
    from PIL import Image

    fig = Image.open(tmp_path / "fig.png")  # 4 columns (scene, two detectors, segmenter) of the 3 scenes
    assert fig.size == (4 * (256 + 4) + 4, 18 + 3 * (256 + 4) + 4)


def test_bench_without_models_names_the_training_command(monkeypatch, capsys, tmp_path):
    from shusheng import weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path)
    bench = load_bench(monkeypatch)
    assert bench.main([]) == 2
    assert "shusheng train detect" in capsys.readouterr().err
    assert bench.main(["--model", str(tmp_path / "no-such-detector")]) == 2
    assert "not a detector folder" in capsys.readouterr().err
    assert sys.modules.get("bench_detection") is None  # loaded as a file, not registered
