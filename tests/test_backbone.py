"""InternImage model: official layout, features, timm interface, registry, FLOPs (CPU, tiny or meta models)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shusheng.backbone as bb
from shusheng.backbone import InternImage, count_flops, create_model, flop_breakdown, registry
from shusheng.backbone import internimage as ii
from shusheng.ops import DCNv3

KEYS_DIR = Path(__file__).parent / "data" / "internimage_keys"
VARIANTS = ["T", "S", "B", "L", "XL", "H", "G"]

# A tiny trunk used for real-tensor tests (level widths 8/16/32/64, one group per 8 channels).
TINY = dict(channels=8, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), mlp_ratio=2.0, drop_path_rate=0.0,
            num_classes=7, backend="reference")
TINY_CLIP = dict(use_clip_projector=True, clip_embed_dim=16, clip_num_heads=2, clip_out_dim=12)


def _keys(variant: str) -> dict:
    return json.loads((KEYS_DIR / f"keys_{variant}.json").read_text())


def _randomize_offsets(model: torch.nn.Module, std: float = 0.5) -> None:
    """Official init zeroes offset/mask weights (so the dw-conv branch gets no gradient); give them values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DCNv3):
                for p in (m.offset.weight, m.offset.bias, m.mask.weight, m.mask.bias):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                if m.center_feature_scale:
                    m.center_feature_scale_proj_weight.copy_(torch.randn(m.center_feature_scale_proj_weight.shape,
                                                                         generator=g) * std)


# --------------------------------------------------------------------------------------------------------
# Official layout: every variant, built on the meta device
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_equals_official(variant):
    ref = _keys(variant)
    with torch.device("meta"):
        model = create_model(f"internimage_{variant.lower()}")
        from_kwargs = InternImage(**ref["constructor_kwargs"])  # the official constructor arguments
    for m in (model, from_kwargs):
        sd = m.state_dict()
        assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, s) for k, s in ref["keys"].items()]
        assert len(sd) == ref["num_state_dict_entries"]
        assert sum(p.numel() for p in m.parameters()) == ref["params"]
    assert model.config.drop_path_rate == ref["constructor_kwargs"]["drop_path_rate"]


@pytest.mark.parametrize("variant,res,official", [
    ("t", 224, 4.90), ("s", 224, 8.33), ("b", 224, 16.22), ("l", 384, 107.95), ("xl", 384, 163.12),
    ("h", 224, 182.18), pytest.param("g", 512, 2702.5, marks=pytest.mark.slow),
])
def test_flops_match_official(variant, res, official):
    with torch.device("meta"):
        model = create_model(f"internimage_{variant}")
    gmacs = count_flops(model, (3, res, res))
    assert abs(gmacs - official) / official < 0.01, (variant, gmacs, official)


def test_flops_dcn_core_term_and_model_untouched():
    model = create_model("internimage_test", backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = flop_breakdown(model, (3, 64, 64))
    c, d = model.channels, model.depths
    expected = sum(d[i] * 5 * (16 // 2 ** i) ** 2 * 9 * c * 2 ** i for i in range(4)) / 1e9
    assert b["dcn_core"] == pytest.approx(expected, rel=1e-12)
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
    assert b["linear"] > 0 and b["conv"] > 0 and b["norm"] > 0 and b["pool"] > 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flop_rules_exact_on_small_modules():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),  # 9*3*4 MACs + 4 bias per position, 64 positions
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depth-wise: 9*4 per position
        torch.nn.BatchNorm2d(4),  # 2 * numel (affine)
        torch.nn.GELU(),  # not counted
        torch.nn.AdaptiveAvgPool2d(1),  # numel of the input
        torch.nn.Flatten(),
        torch.nn.Linear(4, 5),  # numel(in) * out, no bias term
        torch.nn.LayerNorm(5),  # 2 * numel
        torch.nn.ReLU(),  # numel
    )
    b = flop_breakdown(net, (3, 8, 8))
    assert b["conv"] * 1e9 == pytest.approx(9 * 3 * 4 * 64 + 4 * 64 + 9 * 4 * 64)
    assert b["norm"] * 1e9 == pytest.approx(2 * 4 * 64 + 2 * 5)
    assert b["pool"] * 1e9 == pytest.approx(4 * 64)
    assert b["linear"] * 1e9 == pytest.approx(20)
    assert b["act"] * 1e9 == pytest.approx(5)
    assert count_flops(net, (3, 8, 8)) * 1e9 == pytest.approx(6912 + 256 + 2304 + 522 + 256 + 20 + 5)


def test_meta_forward_shapes_internimage_h():
    with torch.device("meta"):
        model = create_model("internimage_h").eval()
        fused, feats = model.forward_intermediates(torch.empty(1, 3, 224, 224), intermediates_only=False)
        out = model.forward_head(fused)
    assert [tuple(f.shape) for f in feats] == [(1, 320 * 2 ** i, 56 // 2 ** i, 56 // 2 ** i) for i in range(4)]
    assert tuple(fused.shape) == (1, 1024, 14, 14) and tuple(out.shape) == (1, 1000)
    assert model.num_features == 1024 and model.head_hidden_size == 768  # fused stride-16 map, pooled to 768


# --------------------------------------------------------------------------------------------------------
# Block patterns, level norms, post norms, drop path
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_scale,post_norm,res_post_norm", [
    (None, True, False), (None, True, True), (None, False, True), (None, False, False),
    (0.5, True, False), (0.5, False, False), (0.5, False, True),
])
def test_block_update_rules(layer_scale, post_norm, res_post_norm):
    torch.manual_seed(0)
    blk = ii.InternImageBlock(8, 2, mlp_ratio=2.0, post_norm=post_norm, layer_scale=layer_scale,
                              res_post_norm=res_post_norm, backend="reference").eval()
    _randomize_offsets(blk)
    with torch.no_grad():
        for p in blk.parameters():  # non-trivial norms so that every norm placement matters
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, 6, 8)
    n1, n2, dcn, mlp = blk.norm1, blk.norm2, blk.dcn, blk.mlp
    if layer_scale is None and post_norm:
        y = x + n1(dcn(x))
        want = y + n2(mlp(y))
    elif layer_scale is None and res_post_norm:
        y = x + blk.res_post_norm1(dcn(n1(x)))
        want = y + blk.res_post_norm2(mlp(n2(y)))
    elif layer_scale is None:
        y = x + dcn(n1(x))
        want = y + mlp(n2(y))
    elif post_norm:
        y = x + blk.gamma1 * n1(dcn(x))
        want = y + blk.gamma2 * n2(mlp(y))
    else:  # layer scale wins over res_post_norm (whose norms exist but are unused, as in the official code)
        y = x + blk.gamma1 * dcn(n1(x))
        want = y + blk.gamma2 * mlp(n2(y))
    torch.testing.assert_close(blk(x), want)
    assert hasattr(blk, "gamma1") == (layer_scale is not None)
    assert hasattr(blk, "res_post_norm1") == res_post_norm


@pytest.mark.parametrize("post_norm,cfs,has_norm", [(False, False, True), (True, False, False),
                                                    (True, True, True), (False, True, True)])
def test_level_norm_presence(post_norm, cfs, has_norm):
    model = InternImage(**TINY, post_norm=post_norm, center_feature_scale=cfs)
    assert all((lvl.norm is not None) == has_norm for lvl in model.levels)
    assert any(k.startswith("levels.0.norm.0.") for k in model.state_dict()) == has_norm


def test_level2_post_norms_follow_their_blocks():
    model = InternImage(**dict(TINY, depths=(1, 1, 4, 1)), level2_post_norm=True,
                        level2_post_norm_block_ids=(1, 3)).eval()
    level = model.levels[2]
    assert len(level.post_norms) == 2 and not hasattr(model.levels[1], "post_norms")
    calls = []
    for name, m in [("b0", level.blocks[0]), ("b1", level.blocks[1]), ("b2", level.blocks[2]),
                    ("b3", level.blocks[3]), ("p0", level.post_norms[0]), ("p1", level.post_norms[1]),
                    ("norm", level.norm)]:
        m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
    model(torch.randn(1, 3, 64, 64))
    assert calls == ["b0", "b1", "p0", "b2", "b3", "p1", "norm"]
    with pytest.raises(ValueError, match="not blocks of level 2"):
        InternImage(**TINY, level2_post_norm=True, level2_post_norm_block_ids=(5,))


def test_drop_path_rates_and_stochasticity():
    model = InternImage(**dict(TINY, drop_path_rate=0.3))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for lvl in model.levels for b in lvl.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 5).tolist())
    assert isinstance(model.levels[0].blocks[0].drop_path, torch.nn.Identity)  # rate 0 -> Identity
    uni = InternImage(**dict(TINY, drop_path_rate=0.3), drop_path_type="uniform")
    assert all(b.drop_path.drop_prob == 0.3 for lvl in uni.levels for b in lvl.blocks)
    x = torch.randn(4, 3, 32, 32)
    uni.train()
    torch.manual_seed(0)
    a = uni.forward_features(x)
    b = uni.forward_features(x)
    assert not torch.allclose(a, b)
    uni.eval()
    torch.testing.assert_close(uni.forward_features(x), uni.forward_features(x))
    # the kept samples are rescaled by 1/keep_prob (timm semantics)
    y = ii.drop_path(torch.ones(1000, 1), 0.25, training=True)
    torch.testing.assert_close(torch.unique(y), torch.tensor([0.0, 1 / 0.75]))


def test_dw_kernel_size_and_remove_center_shapes():
    model = InternImage(**TINY, dw_kernel_size=5, remove_center=True).eval()
    sd = model.state_dict()
    assert tuple(sd["levels.1.blocks.0.dcn.dw_conv.0.weight"].shape) == (16, 1, 5, 5)
    assert tuple(sd["levels.1.blocks.0.dcn.mask.weight"].shape) == (2 * 8, 16)
    assert tuple(sd["levels.1.blocks.0.dcn.offset.weight"].shape) == (2 * 8 * 2, 16)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_core_op_and_backend_mapping():
    def backends(m):
        return {d.backend for d in m.modules() if isinstance(d, DCNv3)}

    base = {k: v for k, v in TINY.items() if k != "backend"}
    assert backends(InternImage(**base, core_op="DCNv3")) == {None}
    assert backends(InternImage(**base, core_op="DCNv3_pytorch")) == {"reference"}
    assert backends(InternImage(**base, core_op="DCNv3_pytorch", backend="cpu")) == {"cpu"}
    with pytest.raises(ValueError, match="core_op"):
        InternImage(**base, core_op="DCNv4")
    with pytest.raises(TypeError, match="unknown InternImage argument"):
        InternImage(**base, out_indices=(0, 1))
    with pytest.raises(ValueError, match="not divisible"):
        InternImage(**dict(base, groups=(3, 2, 4, 8)))


# --------------------------------------------------------------------------------------------------------
# Real forward/backward on tiny models covering every feature
# --------------------------------------------------------------------------------------------------------

FEATURE_CONFIGS = {
    "t_pattern": dict(),
    "post_norm_layer_scale": dict(post_norm=True, layer_scale=1e-2),
    "pre_norm_layer_scale": dict(layer_scale=1e-2),
    "post_norm": dict(post_norm=True),
    "h_pattern": dict(res_post_norm=True, center_feature_scale=True, dw_kernel_size=5, level2_post_norm=True,
                      level2_post_norm_block_ids=(0, 1), **TINY_CLIP),
    "g_pattern": dict(post_norm=True, center_feature_scale=True, dw_kernel_size=5, level2_post_norm=True,
                      level2_post_norm_block_ids=(1,), **TINY_CLIP),
    "remove_center_offset_scale": dict(remove_center=True, offset_scale=2.0),
    "bn_relu": dict(norm_layer="BN", act_layer="ReLU"),
}


@pytest.mark.parametrize("name", list(FEATURE_CONFIGS))
def test_forward_backward_every_param_gets_grad(name):
    torch.manual_seed(0)
    model = InternImage(**TINY, **FEATURE_CONFIGS[name]).train()
    _randomize_offsets(model, std=0.3)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    (out ** 2).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_reduced_depth_t_like_model():
    torch.manual_seed(0)
    model = InternImage(channels=64, depths=(1, 1, 2, 1), groups=(4, 8, 16, 32), num_classes=1000,
                        drop_path_rate=0.1, backend="reference").train()
    _randomize_offsets(model, std=0.1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.num_features == 512 and model.head_hidden_size == 768


def test_official_size_clip_head_forward():
    model = InternImage(**TINY, use_clip_projector=True).eval()  # 1024-d tokens, 16 heads, 768-d output
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1024, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 768)
    assert model(x).shape == (2, 7)
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 7)  # not a multiple of 32: upsampled map is cropped


def test_gradient_checkpointing_same_result(monkeypatch):
    torch.manual_seed(0)
    ref = InternImage(**TINY, with_cp=False).train()
    _randomize_offsets(ref)
    cp = InternImage(**TINY, with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    calls = []
    real = ii.checkpoint
    monkeypatch.setattr(ii, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, cp):
        m(x).sum().backward()
    assert len(calls) == 5 and all(k == {"use_reentrant": False} for k in calls)
    for (n, p), q in zip(ref.named_parameters(), cp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    calls.clear()
    with torch.no_grad():
        cp(x)
    assert not calls  # no checkpointing without autograd
    cp.set_grad_checkpointing(False)
    cp(x).sum().backward()
    assert not calls and not cp.grad_checkpointing


# --------------------------------------------------------------------------------------------------------
# timm interface
# --------------------------------------------------------------------------------------------------------

def test_forward_intermediates_shapes_strides_and_values():
    model = create_model("internimage_test", backend="reference").eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_intermediates(x)
    assert len(feats) == 4
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["module"] for i in model.feature_info] == [f"levels.{i}" for i in range(4)]
    # level outputs before downsampling, after the level norm
    x_nhwc = model.patch_embed(x)
    _, pre0 = model.levels[0](x_nhwc, return_wo_downsample=True)
    torch.testing.assert_close(feats[0], pre0.permute(0, 3, 1, 2))
    torch.testing.assert_close(feats[3], model.forward_features(x))
    assert [f.shape[1] for f in model.forward_intermediates(x, indices=2)] == [32, 64]
    assert [f.shape[1] for f in model.forward_intermediates(x, indices=[0, -1])] == [8, 64]
    nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC")
    torch.testing.assert_close(nhwc[0], feats[1].permute(0, 2, 3, 1))
    final, inter = model.forward_intermediates(x, intermediates_only=False)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 4
    final, inter = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=False)
    torch.testing.assert_close(final, feats[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_forward_features_head_and_classifier():
    model = create_model("internimage_test", backend="reference").eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)  # NCHW pre-pool map
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model(x), model.get_classifier()(pre))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.5) and not model.head.bias.any()
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_prune_intermediate_layers():
    model = create_model("internimage_test", backend="reference").eval()
    x = torch.randn(1, 3, 64, 64)
    want = model.forward_intermediates(x)
    kept = model.prune_intermediate_layers(indices=[0, 2])
    assert kept == [0, 2] and len(model.levels) == 3 and model.levels[-1].downsample is None
    assert not hasattr(model, "conv_head") and model.num_features == 32
    torch.testing.assert_close(model.forward_features(x), want[2])
    assert model(x).shape == (1, 32)
    with pytest.raises(ValueError, match="prune_intermediate_layers"):
        model.save_pretrained("unused")


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = InternImage(**TINY, post_norm=True, layer_scale=0.1)
    _randomize_offsets(model)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their init
    model.eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), architecture=None)
    out = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["layer_scale"] == 0.1 and cfg["model_args"]["depths"] == [1, 1, 2, 1]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded = InternImage.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.pretrained_cfg["input_size"] == [3, 32, 32] and loaded.pretrained_cfg["file"].endswith(
        "model.safetensors")
    other = InternImage.from_pretrained(out, num_classes=3)  # a new classifier, the rest loaded
    assert other(x).shape == (2, 3)
    torch.testing.assert_close(other.forward_features(x), model.forward_features(x))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        InternImage.from_pretrained(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------------
# Registry, pretrained configs, timm
# --------------------------------------------------------------------------------------------------------

def test_registry_lists_and_builds():
    names = bb.list_models("internimage_*")
    assert names == sorted(f"internimage_{v}" for v in ["b", "g", "h", "l", "s", "t", "test", "xl"])
    assert bb.is_model("internimage_l.in22k") and not bb.is_model("resnet50")
    with pytest.raises(ValueError, match="did you mean"):
        create_model("internimage_tt")
    model = create_model("internimage_test", num_classes=4, backend="reference")
    assert model.num_classes == 4 and model.pretrained_cfg["architecture"] == "internimage_test"
    assert 5_000 < sum(p.numel() for p in model.parameters()) < 100_000


def test_register_duplicate_warns(monkeypatch):
    monkeypatch.setattr(registry, "_model_entrypoints", {})
    monkeypatch.setattr(registry, "_register_with_timm", lambda fn: None)

    def fake(pretrained=False, **kwargs):
        return torch.nn.Identity()

    registry.register_model(fake)
    with pytest.warns(UserWarning, match="already registered"):
        registry.register_model(fake)
    assert registry.list_models() == ["fake"]


def test_pretrained_cfgs_describe_official_checkpoints():
    with torch.device("meta"):
        t = create_model("internimage_t")
        l22k = create_model("internimage_l.in22k")
        h = create_model("internimage_h")
    cfg = t.pretrained_cfg
    assert cfg["checkpoint_filename"] == "internimage_t_1k_224.pth" and cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic" and cfg["license"] == "mit"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["origin_url"] == "https://github.com/OpenGVLab/InternImage"
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # nothing to download from
    assert l22k.num_classes == 21841 and l22k.pretrained_cfg["input_size"] == (3, 384, 384)
    assert h.pretrained_cfg["input_size"] == (3, 640, 640)
    assert bb.resolve_data_config(h)["input_size"] == (3, 640, 640)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        create_model("internimage_t.in22k")


def test_pretrained_without_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(bb.PretrainedWeightsNotFound) as e:
        create_model("internimage_t", pretrained=True)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "internimage_t_1k_224.pth" in msg and "never" in msg and "downloads" in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg and "checkpoint_path=" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("internimage_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "x.pth")))
    with pytest.raises(FileNotFoundError, match="no official pretrained weights"):
        create_model("internimage_test", pretrained=True)


def test_pretrained_from_local_file(tmp_path):
    src = create_model("internimage_test", backend="reference").eval()
    path = tmp_path / "internimage_test.pth"
    torch.save({"model": src.state_dict()}, path)
    x = torch.randn(1, 3, 32, 32)
    a = create_model("internimage_test", pretrained=True, backend="reference",
                     pretrained_cfg_overlay=dict(file=str(path))).eval()
    b = create_model("internimage_test", checkpoint_path=str(path), backend="reference").eval()
    for m in (a, b):
        torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)
        assert m.pretrained_cfg["file"] == str(path)
    c = create_model("internimage_test", pretrained=True, num_classes=3, backend="reference",
                     pretrained_cfg_overlay=dict(file=str(path)))  # other class count: head re-initialised
    torch.testing.assert_close(c.forward_features(x), src.forward_features(x))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_timm_create_model_registered_lazily(tmp_path):
    pytest.importorskip("timm")
    ckpt = tmp_path / "w.pth"
    torch.save({"model": create_model("internimage_test").state_dict()}, ckpt)
    r = _run(f"""
        import sys, torch
        import shusheng.backbone as bb
        assert "timm" not in sys.modules, "importing shusheng.backbone must not import timm"
        import timm
        m = timm.create_model("internimage_test", backend="reference").eval()
        assert type(m).__name__ == "InternImage" and m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert "internimage_t" in timm.list_models("internimage*")
        with torch.device("meta"):
            t = timm.create_model("internimage_t", num_classes=5)
        assert t.num_classes == 5 and sum(p.numel() for p in t.parameters()) < 29_918_424
        cfg = timm.data.resolve_data_config(model=timm.create_model("internimage_test"))
        assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic", cfg
        w = timm.create_model("internimage_test", checkpoint_path={str(ckpt)!r})
        ref = torch.load({str(ckpt)!r}, weights_only=True)["model"]
        assert all(torch.equal(v, ref[k]) for k, v in w.state_dict().items())
        folder = w.save_pretrained({str(tmp_path / "saved")!r})
        d = timm.create_model("local-dir:" + str(folder), pretrained=True)
        assert all(torch.equal(v, ref[k]) for k, v in d.state_dict().items())
        try:
            timm.create_model("internimage_t.in1k", pretrained=True)
        except FileNotFoundError as e:
            assert "internimage_t_1k_224.pth" in str(e)
        else:
            raise AssertionError("pretrained=True without a file must fail")
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_import_and_use_without_timm():
    r = _run("""
        import sys
        sys.modules["timm"] = None  # make `import timm` fail
        import torch
        import shusheng.backbone as bb
        m = bb.create_model("internimage_test", backend="reference").eval()
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        try:
            bb.register_timm_models()
        except ImportError as e:
            assert "pip install" in str(e) and "backbone" in str(e)
        else:
            raise AssertionError("register_timm_models must fail without timm")
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
