"""Vehicle colours from instance masks (``shusheng.detection.colors``): features, the head, its fit, and where it
is used (``DetectionPipeline``, ``shusheng train colors``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shusheng.detection.colors import COLOR_FILE, N_FEATURES, ColorHead, fit_color_head, region_features

pytest.importorskip("pycocotools")


def test_region_features_read_the_mask_and_the_whole_image() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    img[5:10, 5:15] = (200, 20, 40)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:15] = True
    f = region_features(img, mask)
    assert f.shape == (N_FEATURES,) and f.dtype == np.float32
    red = np.array([200, 20, 40]) / 255
    np.testing.assert_allclose(f[0:3], red, atol=1e-6)           # mean inside the mask
    np.testing.assert_allclose(f[3:6], 0, atol=1e-6)             # no spread inside
    np.testing.assert_allclose(f[6:18].reshape(4, 3), np.tile(red, (4, 1)), atol=1e-6)  # quartiles
    np.testing.assert_allclose(f[18:21], red * 50 / 400, atol=1e-6)  # the image's mean: 50 of 400 pixels red
    # an empty mask stands for the whole image
    np.testing.assert_allclose(region_features(img, np.zeros_like(mask))[0:3], f[18:21], atol=1e-6)
    with pytest.raises(ValueError, match="mask shape"):
        region_features(img, mask[:10])
    with pytest.raises(ValueError, match="RGB"):
        region_features(img[..., 0], mask)


def test_fit_names_colours_far_above_chance_and_round_trips(tmp_path) -> None:
    head, m = fit_color_head(n_scenes=60, sizes=(128,), val_n=30, epochs=40, progress=False)
    assert m["train_vehicles"] > 60 and m["val_vehicles"] > 20
    assert m["val_accuracy"] > 0.5  # 8 colours: chance is 0.125
    path = head.save(tmp_path, m)
    assert path.name == COLOR_FILE
    loaded = ColorHead.load(tmp_path)
    x = torch.randn(5, N_FEATURES)
    torch.testing.assert_close(loaded(x), head(x))
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:12, 4:12] = (236, 204, 30)
    m1 = np.zeros((16, 16), bool)
    m1[4:12, 4:12] = True
    (name, p), = loaded.predict(img, [m1])
    assert name in loaded.names and 0 < p <= 1
    assert ColorHead.load(tmp_path / "nothing") is None
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad" / COLOR_FILE), metadata={"foo": "bar"})
    with pytest.raises(ValueError, match="not a colour head"):
        ColorHead.load(tmp_path / "bad")


def _tiny_detector(head: str):
    from shusheng.detection.model import DetectorConfig, InternImageDetector

    torch.manual_seed(0)
    return InternImageDetector(DetectorConfig(head=head, backbone="internimage_test", backbone_args={"channels": 8},
                                              fpn_channels=64, min_size=64, max_size=128, score_threshold=0.0,
                                              detections_per_image=30))


def test_pipeline_names_vehicle_colours_from_masks(tmp_path) -> None:
    from shusheng.data import sample
    from shusheng.detection.pipelines import DetectionPipeline

    model = _tiny_detector("maskrcnn")
    model.save_pretrained(tmp_path)
    plain = DetectionPipeline.from_pretrained(tmp_path)
    assert plain.color_head is None
    torch.manual_seed(1)
    # the random detector finds mostly signs: a head that names the colours of signs tests the same path
    ColorHead(["red", "blue", "green"], applies_to=("sign", "bus")).save(tmp_path)
    pipe = DetectionPipeline.from_pretrained(tmp_path)
    assert pipe.color_head is not None and pipe.color_head.names == ["red", "blue", "green"]
    img = sample(0, 3, 128)[0]
    found = pipe(img, threshold=0.0).detections[0]
    without = plain(img, threshold=0.0).detections[0]
    assert [d["box"] for d in found] == [d["box"] for d in without]  # colours add keys, nothing else
    named = [d for d in found if d["label"] in ("sign", "bus")]
    assert named and all(d["color"] in ("red", "blue", "green") and 0 < d["color_score"] <= 1 for d in named)
    assert all("color" not in d for d in found if d["label"] not in ("sign", "bus"))
    # a head for labels the detector did not find names nothing
    pipe.color_head = ColorHead(["red", "blue"], applies_to=("car",))
    assert not any("color" in d for d in pipe(img, threshold=0.0).detections[0] if d["label"] != "car")
    assert all("color" not in d for d in without)
    with pytest.raises(ValueError, match="maskrcnn"):
        DetectionPipeline(_tiny_detector("fcos"), color_head=ColorHead(["red", "blue"]))


def test_train_colors_cli(tmp_path, capsys) -> None:
    from shusheng.cli import main

    _tiny_detector("fcos").save_pretrained(tmp_path / "fcos")
    with pytest.raises(SystemExit, match="masks"):
        main(["train", "colors", "--model", str(tmp_path / "fcos"), "--n-scenes", "4"])
    _tiny_detector("maskrcnn").save_pretrained(tmp_path / "mrcnn")
    assert main(["train", "colors", "--model", str(tmp_path / "mrcnn"), "--n-scenes", "20", "--val-n", "5",
                 "--epochs", "3", "--sizes", "64", "--masks", "truth"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_scenes"] == 20 and out["sizes"] == [64] and "--n-scenes 20" in out["command"]
    assert out["masks"] == "truth" and "--masks truth" in out["command"]
    assert ColorHead.load(tmp_path / "mrcnn") is not None


class _TruthDetector:
    """A stand-in Mask R-CNN that finds every vehicle of the SynthDrive scenes it is shown, in order, with its
    true mask shifted by ``shift`` pixels to the right (and one sign, which the colour samples must skip)."""

    labels = ["car", "truck", "bus", "person", "traffic light", "sign"]

    def __init__(self, seed, indices, size, shift=0):
        from pycocotools import mask as mask_util

        from shusheng.data import sample

        self.queue = []
        for i in indices:
            _, ann = sample(seed, i, size)
            n = len(ann.attributes["vehicles"])
            ms = [np.roll(mask_util.decode(o["segmentation"]), shift, axis=1) for o in ann.objects[:n]]
            ms.append(np.zeros((size, size), np.uint8))
            self.queue.append((ms, [1] * n + [6]))

    def label_name(self, k):
        return self.labels[k - 1]

    def __call__(self, images):
        masks, labels = self.queue.pop(0)
        return [{"masks": torch.from_numpy(np.stack(masks)).float()[:, None], "labels": torch.tensor(labels)}]


def test_colour_samples_from_detected_masks() -> None:
    from shusheng.data import synthdrive as sd
    from shusheng.detection.colors import scene_color_samples

    idx = range(6)
    xt, yt = scene_color_samples(sd.VAL_SEED, idx, (128,))
    assert len(yt) > 6
    # a detector whose masks are the true ones gives the true samples; "both" gives each twice
    xd, yd = scene_color_samples(sd.VAL_SEED, idx, (128,), detector=_TruthDetector(sd.VAL_SEED, idx, 128),
                                 masks="detector")
    np.testing.assert_allclose(xd, xt)
    assert yd == yt
    xb, yb = scene_color_samples(sd.VAL_SEED, idx, (128,), detector=_TruthDetector(sd.VAL_SEED, idx, 128),
                                 masks="both")
    assert len(yb) == 2 * len(yt) and yb[::2] == yt
    # masks far off their vehicles match none of them: no samples
    far = _TruthDetector(sd.VAL_SEED, idx, 128, shift=40)
    _, yf = scene_color_samples(sd.VAL_SEED, idx, (128,), detector=far, masks="detector")
    assert len(yf) < len(yt)
    with pytest.raises(ValueError, match="needs a detector"):
        scene_color_samples(sd.VAL_SEED, idx, masks="detector")
    with pytest.raises(ValueError, match="masks must be"):
        scene_color_samples(sd.VAL_SEED, idx, masks="boxes")
