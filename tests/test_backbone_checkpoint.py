"""Loading InternImage checkpoints in the official, Hugging Face, mmdet/mmseg and safetensors layouts."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

from shusheng.backbone import (
    CheckpointMismatchError,
    InternImage,
    checkpoint_filter_fn,
    create_model,
    filter_state_dict,
    load_checkpoint,
)
from shusheng.backbone.checkpoint import _remove_center
from shusheng.ops import DCNv3

TINY = dict(channels=8, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), mlp_ratio=2.0, drop_path_rate=0.0,
            num_classes=10, backend="reference")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trained(seed: int = 0, **kwargs) -> InternImage:
    """A tiny model whose every tensor (buffers included) differs from a fresh init."""
    torch.manual_seed(seed)
    model = InternImage(**{**TINY, **kwargs})
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v) * 0.2 + (1.0 if v.dim() == 1 else 0.0))
            else:
                v.fill_(7)
    return model.eval()


def _fresh(**kwargs) -> InternImage:
    torch.manual_seed(123)
    return InternImage(**{**TINY, **kwargs}).eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("container", ["model", "state_dict", None])
def test_official_pth_loads_strict(tmp_path, container):
    src = _trained()
    sd = src.state_dict()
    path = tmp_path / "internimage_test_1k_224.pth"
    torch.save({container: sd, "epoch": 300, "max_accuracy": 83.5} if container else sd, path)
    model = _fresh()
    report = load_checkpoint(model, path)
    assert report.ok and report.loaded == len(sd) and report.container_key == container
    assert not report.dropped_keys and not report.converted_keys
    _assert_same_weights(model, src)
    torch.testing.assert_close(model(X), src(X), rtol=0, atol=0)


def test_ema_weights_on_request(tmp_path):
    plain, ema = _trained(0), _trained(1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": plain.state_dict(), "model_ema": ema.state_dict()}, path)
    m = _fresh()
    assert load_checkpoint(m, path).container_key == "model"
    _assert_same_weights(m, plain)
    assert load_checkpoint(m, path, use_ema=True).container_key == "model_ema"
    _assert_same_weights(m, ema)


def test_huggingface_port_names(tmp_path):
    src = _trained(post_norm=True, layer_scale=1e-5)
    hf = {}
    for k, v in src.state_dict().items():
        hf["model." + k.replace("gamma1", "layer_scale1").replace("gamma2", "layer_scale2")] = v
    assert any(".layer_scale1" in k for k in hf)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    model = _fresh(post_norm=True, layer_scale=1e-5)
    report = load_checkpoint(model, path)
    assert report.ok and "huggingface" in report.formats
    assert sum("layer_scale1/2 -> gamma1/2" in w for w in report.converted_keys.values()) == 10  # 5 blocks x 2
    _assert_same_weights(model, src)
    # timm-style filter: plain load_state_dict(strict=True) afterwards
    fresh = _fresh(post_norm=True, layer_scale=1e-5)
    fresh.load_state_dict(checkpoint_filter_fn(hf, fresh), strict=True)
    _assert_same_weights(fresh, src)


def test_mmdet_backbone_prefix_and_ddp(tmp_path):
    src = _trained()
    sd = {f"module.backbone.{k}": v for k, v in src.state_dict().items()
          if not k.startswith(("conv_head.", "head."))}
    sd["module.neck.lateral_convs.0.conv.weight"] = torch.randn(4, 8, 1, 1)
    sd["module.rpn_head.rpn_cls.weight"] = torch.randn(3, 4, 1, 1)
    path = tmp_path / "mask_rcnn_internimage_t_fpn_1x_coco.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12, "CLASSES": ("car", "person")}}, path)

    model = _fresh()
    with pytest.raises(CheckpointMismatchError, match="missing") as e:
        load_checkpoint(model, path)  # the detector checkpoint has no classifier
    assert "conv_head.0.weight" in e.value.report.missing_keys
    report = load_checkpoint(model, path, strict=False)
    assert {"ddp", "mmdet/mmseg"} <= set(report.formats)
    assert set(report.dropped_keys) == {"neck.lateral_convs.0.conv.weight", "rpn_head.rpn_cls.weight"}
    assert all("not part of the backbone" in why for why in report.dropped_keys.values())
    assert sorted(report.missing_keys) == sorted(k for k in model.state_dict() if k.startswith(("conv_head", "head")))
    _assert_same_weights(model, src, skip=report.missing_keys)
    torch.testing.assert_close(model.forward_intermediates(X)[2], src.forward_intermediates(X)[2])


def test_layer_scale_added_for_detection_is_reported_missing():
    src = _trained()  # like the T classifier: no layer scale
    det = _fresh(layer_scale=1.0)  # like the official T detection configs
    report = load_checkpoint(det, src.state_dict(), strict=False)
    assert report.missing_keys == sorted(k for k in det.state_dict() if k.endswith(("gamma1", "gamma2")))
    sd = det.state_dict()
    assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in report.missing_keys)  # keep their init 1.0
    src_sd = src.state_dict()
    assert all(torch.equal(v, src_sd[k]) for k, v in sd.items() if k not in report.missing_keys)


def test_classifier_with_other_class_count(tmp_path, caplog):
    src = _trained(num_classes=21841)
    path = tmp_path / "internimage_l_22k_192to384.pth"
    torch.save({"model": src.state_dict()}, path)

    model = _fresh()  # 10 classes
    head_before = model.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="shusheng.backbone.checkpoint"):
        report = load_checkpoint(model, path)  # strict is fine: the dropped head is deliberate
    assert set(report.dropped_keys) == {"head.weight", "head.bias"}
    assert "21841 classes" in report.dropped_keys["head.weight"]
    assert report.reinitialized_keys == ["head.bias", "head.weight"] and report.ok
    assert torch.equal(model.head.weight, head_before)
    _assert_same_weights(model, src, skip=("head.weight", "head.bias"))
    assert "dropped 2" in caplog.text and "21841" in caplog.text

    kept = _fresh()
    load_checkpoint(kept, path, keep_head=True)
    assert kept.num_classes == 21841 and kept(X).shape == (2, 21841)
    _assert_same_weights(kept, src)

    rows = [5, 17, 21000, 3]
    mapped = _fresh()
    report = load_checkpoint(mapped, path, num_classes=4, class_map=rows)
    assert mapped.num_classes == 4 and "head.weight" in report.converted_keys
    assert torch.equal(mapped.head.weight, src.head.weight[rows])
    assert torch.equal(mapped.head.bias, src.head.bias[rows])
    map_file = tmp_path / "map22kto1k.txt"
    map_file.write_text("\n".join(map(str, rows)) + "\n")
    from_file = _fresh(num_classes=4)
    load_checkpoint(from_file, path, class_map=map_file)
    assert torch.equal(from_file.head.weight, src.head.weight[rows])

    headless = _fresh(num_classes=0)
    report = load_checkpoint(headless, path)
    assert "no classifier" in report.dropped_keys["head.weight"] and report.ok


def test_remove_center_conversion_matches_model_ignoring_centre():
    src = _trained(offset_scale=1.0)
    # make the centre point irrelevant in the source: a very negative mask logit for point 4 of each group
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, DCNv3):
                m.mask.bias.view(m.group, 9)[:, 4] = -1e4
    target = _fresh(remove_center=True)
    report = load_checkpoint(target, src.state_dict())
    n_dcn = sum(isinstance(m, DCNv3) for m in target.modules())
    assert sum("remove_center" in w for w in report.converted_keys.values()) == 4 * n_dcn and report.ok
    s, t = src.state_dict(), target.state_dict()
    key = "levels.2.blocks.1.dcn."
    g = 4
    keep = [p for p in range(9) if p != 4]
    assert torch.equal(t[key + "mask.weight"], s[key + "mask.weight"].view(g, 9, -1)[:, keep].reshape(g * 8, -1))
    assert torch.equal(t[key + "offset.bias"], s[key + "offset.bias"].view(g, 9, 2)[:, keep].reshape(-1))
    assert torch.equal(t[key + "offset.weight"],
                       s[key + "offset.weight"].view(g, 9, 2, -1)[:, keep].reshape(g * 16, -1))
    # the same function: sampling positions of the kept points and softmax over them are unchanged
    torch.testing.assert_close(target(X), src(X), rtol=1e-4, atol=1e-5)


def test_remove_center_generalises_to_other_kernels():
    G, P, C = 3, 25, 4  # 5x5 kernel, centre point 12
    t = torch.arange(G * P * 2 * C, dtype=torch.float32).view(G * P * 2, C)
    out = _remove_center(t, G * (P - 1) * 2, per_point=2)
    keep = [p for p in range(P) if p != 12]
    assert torch.equal(out, t.view(G, P, 2, C)[:, keep].reshape(-1, C))
    assert _remove_center(torch.zeros(G * 8), G * 7, per_point=1) is None  # 8 points: not a square kernel


def test_shape_mismatch_strict_and_lenient():
    src = _trained()
    sd = dict(src.state_dict())
    sd["levels.1.blocks.0.mlp.fc1.weight"] = torch.randn(99, 16)
    sd["extra.thing"] = torch.randn(3)
    model = _fresh()
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    text = str(e.value)
    assert "shape mismatch levels.1.blocks.0.mlp.fc1.weight: checkpoint [99, 16] vs model [32, 16]" in text
    assert "unexpected 1: extra.thing" in text
    before = model.levels[1].blocks[0].mlp.fc1.weight.clone()
    report = load_checkpoint(model, sd, strict=False)
    assert report.unexpected_keys == ["extra.thing"]
    assert "levels.1.blocks.0.mlp.fc1.weight" in report.mismatched_keys
    assert torch.equal(model.levels[1].blocks[0].mlp.fc1.weight, before)
    _assert_same_weights(model, src, skip=("levels.1.blocks.0.mlp.fc1.weight",))


def test_stem_adapted_to_in_chans():
    src = _trained()
    gray = _fresh(in_chans=1)
    report = load_checkpoint(gray, src.state_dict())
    assert "patch_embed.conv1.weight" in report.converted_keys
    assert torch.equal(gray.patch_embed.conv1.weight, src.patch_embed.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray(X.mean(1, keepdim=True)).shape, torch.Size([2, 10]))


def test_untrusted_pickles_are_refused_with_advice(tmp_path):
    path = tmp_path / "with_config.pth"
    torch.save({"model": _trained().state_dict(), "config": _OpaqueConfig()}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        load_checkpoint(_fresh(), path)
    assert load_checkpoint(_fresh(), path, weights_only=False).ok


class _OpaqueConfig:
    """Stands in for the yacs config some official training checkpoints carry."""


def test_filter_state_dict_report_and_missing_file(tmp_path):
    sd, report = filter_state_dict({"model": _trained().state_dict()}, _fresh())
    assert report.container_key == "model" and set(sd) == set(_fresh().state_dict())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(_fresh(), tmp_path / "nope.pth")


def test_meta_model_materialised_with_assign():
    src = _trained()
    with torch.device("meta"):
        model = InternImage(**TINY)
    load_checkpoint(model, src.state_dict(), assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(model.eval()(X), src(X))


def test_save_pretrained_folder_loads_through_factory(tmp_path):
    src = create_model("internimage_test", backend="reference").eval()
    folder = src.save_pretrained(tmp_path / "ft")
    model = create_model("internimage_test", pretrained=True, backend="reference",
                         pretrained_cfg_overlay=dict(file=str(folder))).eval()
    torch.testing.assert_close(model(X), src(X), rtol=0, atol=0)
