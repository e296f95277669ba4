"""The pipeline base: streamed decoding, per-item errors, and the in-domain check."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shusheng.backbone import create_model  # noqa: E402
from shusheng.pipelines import DOMAIN_FILE, DomainCheck, Pipeline  # noqa: E402


class _Counting(Sequence):
    """A list of images that records which items were read, and when."""

    def __init__(self, images):
        self.images, self.read = images, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.read.append(i)
        return self.images[i]


def _pipe(check=None) -> Pipeline:
    return Pipeline(create_model("internimage_test"), check)


def _img(seed=0, size=40):
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def test_stream_decodes_one_batch_at_a_time_and_reports_bad_items():
    images = _Counting([_img(0), b"not an image", _img(1), _img(2), _img(3)])
    batches = _pipe().batches(images, batch_size=2)
    first = next(batches)
    assert images.read == [0, 1]  # nothing past the first batch has been touched
    assert first.index == [0] and first.pixels.shape == (1, 3, 64, 64)  # internimage_test: 64 px
    assert first.errors[0][0] == 1 and "cannot load image" in first.errors[0][1]
    rest = list(batches)
    assert [b.index for b in rest] == [[2, 3], [4]] and images.read == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot load image"):
        list(_pipe().batches([b"junk"], batch_size=1, on_error="raise"))


def test_all_items_of_a_batch_failing_gives_no_pixels():
    (batch,) = list(_pipe().batches([b"x", b"y"], batch_size=4))
    assert batch.pixels is None and [i for i, _ in batch.errors] == [0, 1]


def test_domain_check_flags_shifted_data_and_survives_save(tmp_path):
    g = torch.Generator().manual_seed(0)
    cov = torch.randn(12, 12, generator=g)
    sample = lambda n, shift=0.0: torch.randn(n, 12, generator=g) @ cov + shift  # noqa: E731
    check = DomainCheck.fit(sample(2000), sample(1000), alpha=0.01, info={"what": "test"})
    ok, scores = check.score(sample(1000))
    assert 0.97 <= np.mean(ok) <= 1.0 and all(0 < s <= 1 for s in scores)
    # a p-value: about uniform on in-domain data
    assert 0.4 < np.mean(scores) < 0.6
    far_ok, far_scores = check.score(sample(200, shift=6.0))
    assert not any(far_ok) and max(far_scores) < 0.01
    # a direction the fit never varied in is out of domain even when each coordinate looks ordinary
    odd = sample(200)
    odd[:, 0] = -odd[:, 0]
    assert np.mean(check.score(odd)[0]) < np.mean(ok)
    check.save(tmp_path)
    again = DomainCheck.load(tmp_path)
    assert again.alpha == 0.01 and again.info["what"] == "test" and again.info["n_fit"] == 2000
    x = sample(50, shift=1.0)
    assert np.allclose(again.score(x)[1], check.score(x)[1], atol=2e-3)
    assert DomainCheck.load(tmp_path / "elsewhere") is None


def test_no_check_means_in_domain_with_nan_scores():
    flags, scores = _pipe().check_domain(torch.zeros(2, 3, 64, 64))
    assert flags == [True, True] and all(math.isnan(s) for s in scores)


# ----------------------------------------------------------------------------------- the bundled models' checks

def _bundled_check(name):
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        folder = bundled_path(name)
    except BundledWeightsNotFound:
        return None
    return folder if (folder / DOMAIN_FILE).is_file() else None


@pytest.mark.parametrize("name", ["shusheng-mini-uniperceiver", "shusheng-mini-clip"])
def test_bundled_model_knows_its_domain(name):
    """SynthDrive test scenes pass; photographs and non-scenes are flagged (the full measurement is
    ``python bench/domain_check.py``)."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = _bundled_check(name)
    if folder is None:
        pytest.skip(f"{name} or its domain check is not bundled here")
    from shusheng.data import TEST_SEED, load_image, sample
    from shusheng.data.nonscenes import nonscene_images
    from shusheng.miniclip.pipelines import EmbeddingPipeline
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    cls = CaptionPipeline if name == "shusheng-mini-uniperceiver" else EmbeddingPipeline
    pipe = cls.from_pretrained(folder)
    scenes = [sample(TEST_SEED, i, 128)[0] for i in range(12)]
    photo_dir = os.path.dirname(skimage_data.__file__)
    photos = [load_image(os.path.join(photo_dir, f)) for f in ("astronaut.png", "chelsea.png", "coffee.png",
                                                                "rocket.jpg", "camera.png", "motorcycle_left.png")]
    with torch.no_grad():
        ok, _ = pipe.check_domain(torch.stack([pipe.transform(im) for im in scenes]))
        assert all(ok)
        far, _ = pipe.check_domain(torch.stack([pipe.transform(im) for im in photos]))
        assert not any(far)
        # one of each non-scene kind; the decoder's check lets one flat colour through (score 0.006 against
        # alpha 0.005: it reads as a scene in thick fog), measured in bench/domain_check.py
        far, _ = pipe.check_domain(torch.stack([pipe.transform(im) for im in nonscene_images(8)]))
        assert sum(far) <= 1


def test_stream_can_keep_each_image_at_its_own_size():
    wide, tall = _img(0, 40).resize((50, 30)), _img(1, 40).resize((20, 36))
    (batch,) = list(_pipe().batches([wide, b"junk", tall], batch_size=3, own_size=True))
    assert batch.pixels is None and batch.index == [0, 2] and batch.errors[0][0] == 1
    assert [tuple(t.shape) for t in batch.images] == [(3, 30, 50), (3, 36, 20)]
    assert all(0.0 <= float(t.min()) and float(t.max()) <= 1.0 for t in batch.images)
    assert torch.allclose(batch.images[0][:, 0, 0] * 255, torch.tensor(wide.getpixel((0, 0)), dtype=torch.float32))
