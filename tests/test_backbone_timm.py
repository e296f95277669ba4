"""InternImage keeps timm's whole model contract: the checks of timm's own ``tests/test_models.py`` (default
cfgs, unpooled features, features_only, forward_intermediates, torch.fx), written here from its assertions."""

from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

import shusheng.backbone  # noqa: E402,F401  (registers the variants with timm)

FAST = ["internimage_test"]
SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in ("internimage_t", "internimage_s")]


def _size(model, cap=96):
    c, h, w = model.pretrained_cfg["input_size"]
    return (c, min(h, cap), min(w, cap))


@pytest.mark.parametrize("name", FAST + SLOW)
def test_default_cfgs_and_unpooled_features(name):
    model = timm.create_model(name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert tuple(feats.shape[-2:]) == tuple(cfg["pool_size"]) and feats.shape[1] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        model.reset_classifier(0, "")  # no classifier, no pooling
        unpooled = model(x)
        assert unpooled.ndim == 4 and tuple(unpooled.shape[-2:]) == tuple(cfg["pool_size"])
        # the same through the constructor
        again = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        assert again(x).ndim == 4
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert timm.create_model(name).pretrained_cfg["classifier"] + ".weight" in timm.create_model(name).state_dict()
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")


def test_no_pooling_needs_no_classifier():
    model = timm.create_model("internimage_test", num_classes=5, global_pool="").eval()
    with pytest.raises(ValueError, match="num_classes=0"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", FAST + SLOW)
def test_features_only(name):
    model = timm.create_model(name, pretrained=False, features_only=True).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == 4 and reduction == [4, 8, 16, 32]
    c, h, w = _size(model.model)
    with torch.no_grad():
        outs = model(torch.randn(1, c, h, w))
    assert len(outs) == len(channels)
    for ch, r, o in zip(channels, reduction, outs):
        assert o.shape[1] == ch and o.shape[2] <= math.ceil(h / r) + 1 and o.shape[3] <= math.ceil(w / r) + 1
        assert not torch.isnan(o).any()
    # a subset, as detection frameworks ask for it
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)).eval()
    assert sub.feature_info.channels() == channels[1:]
    with torch.no_grad():
        assert [o.shape[1] for o in sub(torch.randn(1, c, h, w))] == channels[1:]


def test_features_equal_the_backbone_intermediates():
    torch.manual_seed(0)
    model = timm.create_model("internimage_test").eval()
    feats = timm.create_model("internimage_test", features_only=True, out_indices=(1, 2, 3)).eval()
    feats.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1, 2, 3])
        got = feats(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_forward_intermediates_timm_signature():
    model = timm.create_model("internimage_test").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, intermediates_only=False)
        assert torch.equal(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, output_fmt="NHWC")
    assert [t.shape[1] for t in inter] == [info["num_chs"] for info in model.feature_info]
    assert all(a.permute(0, 3, 1, 2).shape == b.shape for a, b in zip(nhwc, inter))


def test_fx_feature_extraction_matches_eager():
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = timm.create_model("internimage_test").eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (out,) = fx(x).values()
        assert torch.allclose(out, model(x), atol=1e-6)


def test_eager_forward_logs_nothing_about_fx(caplog):
    """The fx guard in the blocks must not cost eager users a log line per call."""
    model = timm.create_model("internimage_test").eval()
    with caplog.at_level("DEBUG"), torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert "is_fx_tracing" not in caplog.text
