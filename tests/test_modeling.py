"""modeling: the one save/load schema (all three families, composite folders, older layouts) and the
preprocessing that travels with the weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shusheng.backbone import InternImage, create_model  # noqa: E402
from shusheng.modeling import Preprocess, read_config, resolve_transform  # noqa: E402


def _photo(w=90, h=60, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ preprocessing

def test_preprocess_record_round_trip_and_validation():
    p = Preprocess(size=96, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="resize"):
        Preprocess(resize="stretch")
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(crop_pct=0.0)
    t = Preprocess.from_timm({"input_size": (3, 160, 160), "crop_pct": 0.875, "interpolation": "bilinear"})
    assert (t.size, t.crop_pct, t.resize, t.interpolation) == (160, 0.875, "shorter_crop", "bilinear")


def test_shorter_crop_transform_equals_timm_eval_transform():
    timm_data = pytest.importorskip("timm.data")
    img = _photo()
    for crop_pct in (1.0, 0.875):
        p = Preprocess(size=48, crop_pct=crop_pct)
        ref = timm_data.create_transform(input_size=(3, 48, 48), is_training=False, interpolation="bicubic",
                                         mean=p.mean, std=p.std, crop_pct=crop_pct, crop_mode="center")
        assert torch.equal(resolve_transform(p)(img), ref(img))


def test_squash_transform_equals_resize_then_normalise():
    img = _photo()
    p = Preprocess(size=40, resize="squash")
    arr = np.asarray(img.resize((40, 40), Image.Resampling.BICUBIC), dtype=np.float32)
    want = (torch.from_numpy(arr).permute(2, 0, 1) / 255.0 - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(
        p.std).view(3, 1, 1)
    got = resolve_transform(p)(img)
    assert got.shape == (3, 40, 40) and torch.equal(got, want)


def test_resolve_transform_reads_models_and_timm_configs():
    model = create_model("internimage_t")
    t = resolve_transform(model)  # the official eval transform (224 px)
    assert t(_photo()).shape == (3, 224, 224)
    assert model.preprocess_config().crop_pct == model.pretrained_cfg["crop_pct"]
    with pytest.raises(TypeError, match="preprocessing"):
        resolve_transform(object())


# ------------------------------------------------------------------------------------------------ InternImage

def test_internimage_folder_schema_and_old_layout(tmp_path):
    torch.manual_seed(0)
    model = create_model("internimage_test", num_classes=5).eval()
    out = model.save_pretrained(tmp_path / "new")
    cfg = read_config(out)
    assert cfg["model_type"] == "internimage" and cfg["config"]["num_classes"] == 5
    assert cfg["preprocess"] == Preprocess.from_timm(model.pretrained_cfg).to_dict()
    assert cfg["architecture"] == "internimage_test" and "pretrained_cfg" in cfg  # timm's local-dir keys
    # the layout written before the shared schema: no model_type/config/preprocess
    old = {k: cfg[k] for k in ("architecture", "num_classes", "num_features", "model_args", "pretrained_cfg")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    (tmp_path / "old" / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for folder in ("new", "old"):
            loaded = InternImage.from_pretrained(tmp_path / folder)
            assert torch.equal(loaded(x), model(x)), folder
            assert loaded.preprocess_config() == model.preprocess_config()


def test_a_refused_save_writes_nothing(tmp_path):
    model = create_model("internimage_test")
    model.prune_intermediate_layers(2)
    with pytest.raises(ValueError, match="prune_intermediate_layers"):
        model.save_pretrained(tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


def test_wrong_family_missing_weights_and_bad_json_are_clear_errors(tmp_path):
    from shusheng.miniclip import MiniClip

    out = create_model("internimage_test").save_pretrained(tmp_path / "ii")
    with pytest.raises(ValueError, match="holds a 'internimage' model"):
        MiniClip.from_pretrained(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        InternImage.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        InternImage.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        InternImage.from_pretrained(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ MiniClip

def test_miniclip_old_layout_loads(tmp_path):
    from shusheng.miniclip import MiniClip

    torch.manual_seed(0)
    model = MiniClip(channels=8, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8), mlp_ratio=2.0, image_size=64,
                     num_dense_labels=35, dense_dim=16, dcn_backend="reference").eval()
    out = model.save_pretrained(tmp_path / "new", dtype=torch.float16)
    cfg = read_config(out)
    assert cfg["model_type"] == "miniclip" and cfg["weights_dtype"] == "float16"
    old = {"model_type": "shusheng-mini-clip", "name": cfg["name"], "embed_dim": cfg["embed_dim"],
           "model_args": cfg["config"], "text_encoder": cfg["text_encoder"], "weights_dtype": "float16"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    (tmp_path / "old" / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    x = resolve_transform(model)(_photo(64, 64))[None]
    a = MiniClip.from_pretrained(tmp_path / "new", dcn_backend="reference")
    b = MiniClip.from_pretrained(tmp_path / "old", dcn_backend="reference")
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert a.preprocess_config() == b.preprocess_config() == Preprocess(size=64)


# ------------------------------------------------------------------------------------------------ composites

def test_uniperceiver_composite_folder_and_old_single_file_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    from shusheng.uniperceiver.model import UniPerceiver

    torch.manual_seed(0)
    m = UniPerceiver(backbone="internimage_test", backbone_args={"channels": 8}, image_size=64, image_grid=2,
                     d_model=64, n_heads=4, n_layers=1, norm_first=True, text_init=None,
                     freeze_word_embeddings=False, max_text_len=16, answers=["yes", "no"]).eval()
    out = m.save_pretrained(tmp_path / "new")
    assert read_config(out)["components"] == {"backbone": "image.backbone"}
    assert read_config(out / "backbone")["model_type"] == "internimage"
    assert not any(k.startswith("image.backbone.") for k in load_file(str(out / "model.safetensors")))
    # the pre-schema layout: one file with every tensor, {"architecture", "config", "preprocessing"}
    old = tmp_path / "old"
    old.mkdir()
    merged = {**load_file(str(out / "model.safetensors")),
              **{"image.backbone." + k: v for k, v in load_file(str(out / "backbone" / "model.safetensors")).items()}}
    save_file(merged, str(old / "model.safetensors"))
    cfg = read_config(out)
    (old / "config.json").write_text(json.dumps({"architecture": "UniPerceiver", "config": cfg["config"],
                                                 "preprocessing": {"input_size": [3, 64, 64]},
                                                 "external_tensors": []}))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for folder in (out, old):
            loaded = UniPerceiver.from_pretrained(folder)
            assert torch.equal(loaded.embed_image(x), m.embed_image(x)), folder
    # a composite folder whose component is missing says which one
    (out / "backbone" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="'backbone' component"):
        UniPerceiver.from_pretrained(out)


def test_dense_tower_backbone_saves_and_loads_alone(tmp_path):
    from shusheng.backbone import DenseTowerBackbone, create_backbone

    torch.manual_seed(0)
    bb = create_backbone("shusheng-mini-clip-tower", grid=2, channels=8, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8),
                         num_dense_labels=35, dense_dim=16, image_size=64).eval()
    out = bb.save_pretrained(tmp_path / "tower")
    loaded = DenseTowerBackbone.from_pretrained(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), bb.forward_features(x))
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_backbone("shusheng-mini-clip-tower", pretrained=True)


def test_bundled_folders_use_the_schema():
    """Every bundled folder has a model card and one of the two index files: a ``config.json`` of the one
    save/load schema, or a diffusers ``model_index.json`` whose components all have their sub-folder.
    (tests/test_generation.py also runs this test over a fake bundled diffusers folder, and a broken one.)"""
    from shusheng.weights import bundled_path, list_bundled

    for name in list_bundled():
        folder = bundled_path(name)
        assert (folder / "MODEL_CARD.md").is_file(), f"{name} has no MODEL_CARD.md"
        if (folder / "config.json").is_file():
            cfg = read_config(folder)
            assert {"model_type", "config", "preprocess"} <= set(cfg), name
            # the detectors and the segmenter were trained at 256 px (small objects), the others at 128
            expected = 256 if cfg["model_type"] in ("detector", "segmenter") else 128
            assert Preprocess.from_dict(cfg["preprocess"]).size == expected, name
            continue
        index = json.loads((folder / "model_index.json").read_text())
        assert isinstance(index.get("_class_name"), str) and index["_class_name"], name
        components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
        named = {k: v for k, v in components.items() if len(v) == 2 and v[0] is not None}
        assert named, f"{name}/model_index.json names no component"
        for component, (library, class_name) in named.items():
            assert isinstance(library, str) and isinstance(class_name, str), (name, component)
            sub = folder / component
            assert sub.is_dir() and any(sub.glob("*.json")), f"{name}/{component}/ is missing or has no config"


def test_model_class_for_reads_new_and_old_layouts(tmp_path):
    from shusheng.miniclip import MiniClip
    from shusheng.modeling import model_class_for
    from shusheng.uniperceiver.model import UniPerceiver

    new = create_model("internimage_test").save_pretrained(tmp_path / "new")
    assert model_class_for(new) is InternImage
    cfg = read_config(new)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({k: cfg[k] for k in ("architecture", "num_classes", "model_args",
                                                                        "pretrained_cfg")}))
    assert model_class_for(old) is InternImage  # not mistaken for an old mini-clip folder (both have model_args)
    old_clip = tmp_path / "old_clip"
    old_clip.mkdir()
    (old_clip / "config.json").write_text(json.dumps({"model_type": "shusheng-mini-clip",
                                                      "model_args": {"image_size": 64}}))
    assert model_class_for(old_clip) is MiniClip
    old_up = tmp_path / "old_up"
    old_up.mkdir()
    (old_up / "config.json").write_text(json.dumps({"architecture": "UniPerceiver", "config": {}}))
    assert model_class_for(old_up) is UniPerceiver
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "spaceship", "config": {},
                                                             "preprocess": {}}))
    with pytest.raises(ValueError, match="known model types"):
        model_class_for(tmp_path / "odd")
