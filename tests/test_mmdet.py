"""shusheng.detection.mmdet: InternImage in mmdet 3 / mmseg 1 (README, "mmdet 3 / mmseg 1").

Runs in the default test run when mmdet (with mmcv 2.1's compiled ops) imports; skipped otherwise. The UperNet
tests also need mmsegmentation 1.x. Models use the pure-PyTorch DCNv3 core (``core_op="DCNv3_pytorch"``) on CPU.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mmdet

mmdet = pytest.importorskip("mmdet", reason="mmdet 3 / mmcv 2.1 not installed (README: mmdet 3 / mmseg 1)")
pytest.importorskip("mmcv.ops", reason="mmcv without compiled ops")

from shusheng.backbone import InternImage  # noqa: E402
from shusheng.backbone.checkpoint import PretrainedWeightsNotFound  # noqa: E402
from shusheng.detection import mmdet as ss_mmdet  # noqa: E402

SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs" / "keys"
REF = dict(core_op="DCNv3_pytorch")  # the reference core: no compiled kernel needed
TINY = dict(REF, channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], mlp_ratio=2.0, drop_path_rate=0.0)
# structural variants of the trunk: T (pre-norm + layer scale), S-L (post-norm + layer scale, no level norm),
# H (res-post-norm, 5x5 dw conv, centre feature scale, level-2 post norms), G (post-norm without layer scale)
TINY_KINDS = {
    "t": dict(TINY, layer_scale=1.0, post_norm=False),
    "s": dict(TINY, layer_scale=1.0, post_norm=True, offset_scale=2.0),
    "h": dict(TINY, layer_scale=None, dw_kernel_size=5, res_post_norm=True, level2_post_norm=True,
              level2_post_norm_block_ids=[1], center_feature_scale=True),
    "g": dict(TINY, layer_scale=None, post_norm=True, dw_kernel_size=5, level2_post_norm=True,
              level2_post_norm_block_ids=[0, 1], center_feature_scale=True),
}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (non-zero DCN offsets included), so equalities below are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _image(seed: int = 0, size: int = 128) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# Registration and the backbone
# ------------------------------------------------------------------------------------------------------------

def test_register_is_idempotent_and_builds_every_scope() -> None:
    from mmdet.registry import MODELS

    scopes = ss_mmdet.register()
    assert ss_mmdet.register() == scopes and "mmdet" in scopes
    assert MODELS.get("InternImage") is ss_mmdet.InternImageBackbone
    try:
        from mmseg.registry import MODELS as SEG_MODELS
    except ImportError:
        assert scopes == ["mmdet"]
    else:
        assert scopes == ["mmdet", "mmseg"] and SEG_MODELS.get("InternImage") is ss_mmdet.InternImageBackbone

    class Other(torch.nn.Module):
        pass

    MODELS.register_module(name="InternImage", module=Other, force=True)
    try:
        with pytest.raises(RuntimeError, match="force=True"):
            ss_mmdet.register()
        ss_mmdet.register(force=True)
        assert MODELS.get("InternImage") is ss_mmdet.InternImageBackbone
    finally:
        ss_mmdet.register(force=True)

    bb = MODELS.build(dict(type="InternImage", **TINY, out_indices=(1, 3), frozen_stages=1,
                           num_classes=1000, cls_scale=1.5))  # classifier arguments are ignored
    assert isinstance(bb, InternImage) and not hasattr(bb, "conv_head")
    assert not any(k.startswith(("conv_head", "head")) for k in bb.state_dict())
    bb.train()
    assert not bb.levels[0].training and bb.levels[1].training
    assert not any(p.requires_grad for p in bb.levels[0].parameters())
    assert all(p.requires_grad for p in bb.levels[1].parameters())
    with pytest.raises(ValueError, match="out_indices"):
        MODELS.build(dict(type="InternImage", **TINY, out_indices=(4,)))


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_backbone_equals_forward_intermediates(kind: str) -> None:
    args = TINY_KINDS[kind]
    bb = ss_mmdet.InternImageBackbone(**args).eval()
    _randomize(bb)
    ref = InternImage(**args, num_classes=0).eval()
    missing, unexpected = ref.load_state_dict(bb.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("conv_head.") for k in missing)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = bb(x)
        want = ref.forward_intermediates(x)
    assert isinstance(outs, tuple) and len(outs) == 4
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.shape == (2, 8 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i) and o.is_contiguous()
        assert torch.equal(o, w), f"level {i}"
    bb.out_indices = (1, 3)
    with torch.no_grad():
        sub = bb(x)
    assert len(sub) == 2 and torch.equal(sub[0], want[1]) and torch.equal(sub[1], want[3])


def test_backbone_t_equals_forward_intermediates_and_official_keys() -> None:
    cfg = ss_mmdet.backbone_config("t", **REF)
    assert cfg["layer_scale"] == 1.0 and cfg["drop_path_rate"] == 0.2 and cfg["out_indices"] == (0, 1, 2, 3)
    cfg.pop("type")
    bb = ss_mmdet.InternImageBackbone(**cfg).eval()
    _randomize(bb, seed=1)
    ref = InternImage(**{k: v for k, v in cfg.items() if k not in ("out_indices", "init_cfg")}, num_classes=0)
    ref.load_state_dict(bb.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(bb(x), ref.eval().forward_intermediates(x)))
    # the official T classifier's keys minus its head, plus the gammas of layer_scale=1.0
    spec = json.loads((SPECS / "keys_T.json").read_text())["keys"] if SPECS.is_dir() else None
    if spec is not None:
        want = {k for k in spec if not k.startswith(("conv_head.", "head."))}
        got = set(bb.state_dict())
        assert got - want == {k for k in got if k.endswith((".gamma1", ".gamma2"))}
        assert want <= got


def test_init_weights_loads_a_local_checkpoint_and_refuses_urls(tmp_path: Path) -> None:
    # an official classification checkpoint: {'model': ...} with conv_head/head and no gammas
    cls = InternImage(**TINY, num_classes=10)
    _randomize(cls, seed=2)
    torch.save({"model": cls.state_dict()}, tmp_path / "cls.pth")
    bb = ss_mmdet.InternImageBackbone(**TINY, layer_scale=1.0,
                                      init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "cls.pth")))
    bb.init_weights()
    assert bb.is_init
    sd = bb.state_dict()
    for k, v in cls.state_dict().items():
        if not k.startswith(("conv_head.", "head.")):
            assert torch.equal(sd[k], v), k
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in sd.items() if ".gamma" in k)  # kept at 1.0

    # mmseg's EncoderDecoder(pretrained=...) spelling, from a detector checkpoint (backbone. prefix, heads dropped)
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, "neck.x": torch.zeros(1)}},
               tmp_path / "det.pth")
    bb2 = ss_mmdet.InternImageBackbone(**TINY, layer_scale=1.0, pretrained=tmp_path / "det.pth")
    bb2.init_weights()
    assert all(torch.equal(bb2.state_dict()[k], v) for k, v in sd.items())

    url = ss_mmdet.InternImageBackbone(**TINY, init_cfg=dict(
        type="Pretrained", checkpoint="https://huggingface.co/OpenGVLab/InternImage/resolve/main/x.pth"))
    with pytest.raises(PretrainedWeightsNotFound, match="never downloads"):
        url.init_weights()


# ------------------------------------------------------------------------------------------------------------
# Mask R-CNN (mmdet 3)
# ------------------------------------------------------------------------------------------------------------

def _det_sample(size: int = 128):
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 120.0, 100.0]])
    gt.labels = torch.tensor([1, 3])
    masks = np.zeros((2, size, size), dtype=np.uint8)
    masks[0, 20:90, 10:60] = 1
    masks[1, 30:100, 70:120] = 1
    gt.masks = BitmapMasks(masks, size, size)
    sample.gt_instances = gt
    return sample


def test_mask_rcnn_t_trains_and_predicts_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cls = InternImage(**dict(ss_mmdet.BACKBONE_ARGS["t"], **REF, layer_scale=None), num_classes=5)  # the T classifier
    torch.save({"model": cls.state_dict()}, tmp_path / "internimage_t_1k_224.pth")
    cfg = ss_mmdet.mask_rcnn_config("t", num_classes=6, pretrained=tmp_path / "internimage_t_1k_224.pth",
                                    backbone=REF)
    assert cfg["model"]["neck"]["in_channels"] == [64, 128, 256, 512]
    model = ss_mmdet.build_model(cfg)
    assert 48.5e6 < sum(p.numel() for p in model.parameters()) < 49.5e6  # official: 49M
    model.init_weights()  # mmengine's flow: loads the local backbone checkpoint
    assert torch.equal(model.backbone.patch_embed.conv1.weight, cls.patch_embed.conv1.weight)

    model.train()
    data = model.data_preprocessor(dict(inputs=[_image()], data_samples=[_det_sample()]), training=True)
    losses = model(**data, mode="loss")
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc"} <= set(losses)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.levels[3].blocks[0].dcn.input_proj.weight.grad is not None

    model.eval()
    model.roi_head.test_cfg.score_thr = 0.0  # random heads score below the default 0.05
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[_image(1)], data_samples=[_det_sample()]), training=False)
        pred = model(**data, mode="predict")[0].pred_instances
    n = len(pred)
    assert n > 0 and pred.bboxes.shape == (n, 4) and pred.masks.shape == (n, 128, 128)
    assert pred.labels.max() < 6 and (pred.bboxes >= 0).all() and (pred.bboxes <= 128).all()


def test_mask_rcnn_config_runs_in_mmengines_runner(tmp_path: Path) -> None:
    """The whole config (data pipelines, custom_imports, hooks, schedule) through mmengine's Runner: one epoch of
    one iteration on a 2-image COCO folder, then the COCO evaluation."""
    import multiprocessing

    import numpy as np
    from mmengine.config import Config
    from mmengine.runner import Runner
    from PIL import Image

    root = tmp_path / "coco"
    images, anns = [], []
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
    for i in range(2):
        pixels = np.random.RandomState(i).randint(0, 255, (96, 128, 3), dtype=np.uint8)
        for split in ("train2017", "val2017"):
            Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=128, height=96))
        anns.append(dict(id=i + 1, image_id=i, category_id=1 + i, bbox=[10, 20, 50, 60], area=3000, iscrowd=0,
                         segmentation=[[10, 20, 60, 20, 60, 80, 10, 80]]))
    (root / "annotations").mkdir()
    coco = dict(images=images, annotations=anns, categories=[dict(id=1, name="car"), dict(id=2, name="truck")])
    for name in ("instances_train2017.json", "instances_val2017.json"):
        (root / "annotations" / name).write_text(json.dumps(coco))

    cfg = ss_mmdet.mask_rcnn_config("t", num_classes=2, backbone=TINY, data_root=f"{root}/", max_epochs=1)
    for loader in ("train_dataloader", "val_dataloader"):
        cfg[loader].update(num_workers=0, persistent_workers=False)
        cfg[loader]["dataset"]["metainfo"] = dict(classes=("car", "truck"))
        for step in cfg[loader]["dataset"]["pipeline"]:
            if step["type"] == "Resize":
                step["scale"] = (128, 96)
    cfg["test_dataloader"] = cfg["val_dataloader"]
    cfg["default_hooks"]["checkpoint"] = None  # nothing to keep
    cfg["env_cfg"]["mp_cfg"]["mp_start_method"] = multiprocessing.get_start_method()  # leave it as it is
    runner = Runner.from_cfg(Config(dict(cfg, work_dir=str(tmp_path / "work"))))
    runner.train()
    assert runner.iter == 1 and runner.epoch == 1
    assert isinstance(runner.model.backbone, ss_mmdet.InternImageBackbone)
    hub = runner.message_hub  # the validation after the epoch: COCO box and mask AP
    assert hub.get_scalar("val/coco/bbox_mAP") is not None and hub.get_scalar("val/coco/segm_mAP") is not None


def test_optimizer_groups_follow_the_official_no_decay_rule() -> None:
    from mmengine.optim import build_optim_wrapper

    cfg = ss_mmdet.mask_rcnn_config("t", num_classes=3, backbone=TINY)
    model = ss_mmdet.build_model(cfg)
    wrapper = build_optim_wrapper(model, cfg["optim_wrapper"])
    opt = wrapper.optimizer
    assert type(opt).__name__ == "AdamW" and opt.defaults["lr"] == 1e-4
    for group in opt.param_groups:
        (p,) = group["params"]
        assert group["weight_decay"] == (0.0 if p.ndim == 1 else 0.05)


def _official_config(package: str, path: str) -> dict:
    from mmengine.config import Config

    return Config.fromfile(str(files(package) / ".mim" / "configs" / path)).to_dict()


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def test_mask_rcnn_config_is_mmdets_recipe_with_the_official_changes() -> None:
    ours = _plain(ss_mmdet.mask_rcnn_config("t"))
    base = _plain(_official_config("mmdet", "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"))
    # helper variables of mmdet's config files (used inside the entries below)
    assert set(base) - set(ours) == {"backend_args", "data_root", "dataset_type", "test_pipeline", "train_pipeline"}
    assert set(ours) - set(base) == {"custom_imports"}
    for key in set(ours) - {"model", "optim_wrapper", "default_hooks", "custom_imports"}:
        assert ours[key] == base[key], key
    for key in set(base["model"]) - {"backbone", "neck"}:
        assert ours["model"][key] == base["model"][key], key
    assert ours["model"]["neck"] == dict(base["model"]["neck"], in_channels=[64, 128, 256, 512])
    bb = ours["model"]["backbone"]
    assert bb["type"] == "InternImage" and bb["channels"] == 64 and bb["depths"] == [4, 4, 18, 4]
    assert bb["groups"] == [4, 8, 16, 32] and bb["init_cfg"] is None
    assert ours["optim_wrapper"]["optimizer"] == dict(type="AdamW", lr=1e-4, weight_decay=0.05)
    assert ours["default_hooks"] == dict(base["default_hooks"], checkpoint=dict(
        type="CheckpointHook", interval=1, max_keep_ckpts=3, save_last=True, save_best="auto"))
    assert ours["custom_imports"]["imports"] == ["shusheng.detection.mmdet"]
    # the other variants: FPN widths follow the backbone
    assert ss_mmdet.mask_rcnn_config("b")["model"]["neck"]["in_channels"] == [112, 224, 448, 896]
    assert ss_mmdet.mask_rcnn_config("InternImage_XL")["model"]["backbone"]["offset_scale"] == 2.0
    with pytest.raises(ValueError, match="unknown InternImage variant"):
        ss_mmdet.mask_rcnn_config("m")


# ------------------------------------------------------------------------------------------------------------
# Checkpoint conversion (official mmdet 2.28 detector checkpoints)
# ------------------------------------------------------------------------------------------------------------

def _mmdet2_mask_rcnn_keys(in_channels: list[int], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Neck/head entries of an mmdet 2.28 Mask R-CNN FPN checkpoint (names and shapes of mmdet 2.28's FPN,
    RPNHead, Shared2FCBBoxHead and FCNMaskHead; written out here, not read from mmdet 3)."""
    keys: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(in_channels):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(len(in_channels)):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    keys.update({
        "rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
        "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
        "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,),
        "roi_head.bbox_head.fc_cls.weight": (num_classes + 1, 1024), "roi_head.bbox_head.fc_cls.bias": (num_classes + 1,),
        "roi_head.bbox_head.fc_reg.weight": (4 * num_classes, 1024), "roi_head.bbox_head.fc_reg.bias": (4 * num_classes,),
        "roi_head.bbox_head.shared_fcs.0.weight": (1024, 256 * 7 * 7), "roi_head.bbox_head.shared_fcs.0.bias": (1024,),
        "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024), "roi_head.bbox_head.shared_fcs.1.bias": (1024,),
    })
    for i in range(4):
        keys[f"roi_head.mask_head.convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"roi_head.mask_head.convs.{i}.conv.bias"] = (256,)
    keys.update({
        "roi_head.mask_head.upsample.weight": (256, 256, 2, 2), "roi_head.mask_head.upsample.bias": (256,),
        "roi_head.mask_head.conv_logits.weight": (num_classes, 256, 1, 1),
        "roi_head.mask_head.conv_logits.bias": (num_classes,),
    })
    return keys


def _official_t_backbone_keys() -> dict[str, tuple[int, ...]]:
    """The backbone of mask_rcnn_internimage_t_fpn_1x_coco.pth: the T classifier's entries (spec key list) minus
    the head, plus gamma1/gamma2 per block (layer_scale=1.0 in the detection config)."""
    if not SPECS.is_dir():
        pytest.skip("shared/specs/keys not present")
    spec = json.loads((SPECS / "keys_T.json").read_text())["keys"]
    keys = {k: tuple(s) for k, s in spec.items() if not k.startswith(("conv_head.", "head."))}
    for k, s in list(keys.items()):
        if k.endswith(".norm1.0.weight") and ".blocks." in k:
            block = k[: -len("norm1.0.weight")]
            keys[block + "gamma1"] = keys[block + "gamma2"] = tuple(s)
    return keys


def test_convert_official_mmdet2_checkpoint_loads_strict(tmp_path: Path) -> None:
    from mmdet.registry import MODELS  # noqa: F401  (mmdet importable)

    backbone = _official_t_backbone_keys()
    assert sum(k.endswith(".gamma1") for k in backbone) == 30
    shapes = {f"backbone.{k}": s for k, s in backbone.items()} | _mmdet2_mask_rcnn_keys([64, 128, 256, 512], 80)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ckpt = {"meta": {"mmdet_version": "2.28.1", "CLASSES": ("person", "bicycle"), "epoch": 12},
            "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "mask_rcnn_internimage_t_fpn_1x_coco.pth")

    model = ss_mmdet.build_model(ss_mmdet.mask_rcnn_config("t", num_classes=80, backbone=REF))
    converted = ss_mmdet.convert_mmdet2_checkpoint(tmp_path / "mask_rcnn_internimage_t_fpn_1x_coco.pth")
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = model.state_dict()
    assert set(got) == set(state)  # nothing differs between mmdet 2.28 and 3.3 for Mask R-CNN
    assert all(torch.equal(got[k], v) for k, v in state.items())

    # with the model: the backbone goes through shusheng's converter (same result here); DDP prefix; bare dict
    ddp = {f"module.{k}": v for k, v in state.items()}
    again = ss_mmdet.convert_mmdet2_checkpoint({"state_dict": ddp, "meta": {}}, model=model)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    bad = dict(state, **{"backbone.levels.0.blocks.0.mlp.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="do not fit"):
        ss_mmdet.convert_mmdet2_checkpoint(bad, model=model)


# ------------------------------------------------------------------------------------------------------------
# UperNet (mmseg 1)
# ------------------------------------------------------------------------------------------------------------

def test_upernet_t_trains_and_predicts_on_cpu() -> None:
    pytest.importorskip("mmseg", reason="mmsegmentation 1.x not installed")
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    cfg = ss_mmdet.upernet_config("t", num_classes=12, backbone=REF, crop_size=(128, 128))
    assert cfg["model"]["decode_head"]["in_channels"] == [64, 128, 256, 512]
    assert cfg["model"]["auxiliary_head"]["in_channels"] == 256
    model = ss_mmdet.build_model(cfg)
    assert type(model).__name__ == "EncoderDecoder" and isinstance(model.backbone, ss_mmdet.InternImageBackbone)

    def sample():
        s = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 12, (1, 128, 128)))
        return s

    model.train()  # the pooling branch's BatchNorm needs 2 images in train mode
    data = model.data_preprocessor(dict(inputs=[_image(0), _image(1)], data_samples=[sample(), sample()]), True)
    losses = model(**data, mode="loss")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[_image(2)], data_samples=[sample()]), False)
        out = model(**data, mode="predict")[0]
    assert out.pred_sem_seg.data.shape == (1, 128, 128) and out.seg_logits.data.shape == (12, 128, 128)
    assert int(out.pred_sem_seg.data.max()) < 12


def test_upernet_config_is_mmsegs_recipe_with_the_official_changes() -> None:
    pytest.importorskip("mmseg", reason="mmsegmentation 1.x not installed")
    ours = _plain(ss_mmdet.upernet_config("t"))
    base = _plain(_official_config("mmseg", "upernet/upernet_r50_4xb4-160k_ade20k-512x512.py"))
    # helper variables of mmseg's config files, and its optional test-time augmentation (not in the official recipe)
    assert set(base) - set(ours) == {"crop_size", "data_preprocessor", "data_root", "dataset_type", "img_ratios",
                                     "norm_cfg", "optimizer", "test_pipeline", "train_pipeline", "tta_model",
                                     "tta_pipeline"}
    assert set(ours) - set(base) == {"custom_imports"}
    changed = {"model", "optim_wrapper", "default_hooks", "custom_imports", "param_scheduler", "train_dataloader",
               "val_dataloader", "test_dataloader"}
    for key in set(ours) - changed:
        assert ours[key] == base[key], key
    assert ours["test_dataloader"] == ours["val_dataloader"]
    assert ours["default_hooks"] == dict(base["default_hooks"], checkpoint=ours["default_hooks"]["checkpoint"])
    for key in set(base["model"]) - {"backbone", "decode_head", "auxiliary_head", "pretrained"}:
        assert ours["model"][key] == base["model"][key], key
    assert ours["model"]["decode_head"] == dict(base["model"]["decode_head"], in_channels=[64, 128, 256, 512])
    assert ours["model"]["auxiliary_head"] == dict(base["model"]["auxiliary_head"], in_channels=256)
    assert ours["model"]["pretrained"] is None
    assert ours["train_dataloader"] == dict(base["train_dataloader"], batch_size=2)  # 8 GPUs x 2 images
    test_pipeline = base["test_pipeline"]
    assert ours["val_dataloader"]["dataset"]["pipeline"] == [
        *test_pipeline[:2], dict(type="ResizeToMultiple", size_divisor=32), *test_pipeline[2:]]
    assert ours["optim_wrapper"]["optimizer"] == dict(type="AdamW", lr=6e-5, betas=[0.9, 0.999], weight_decay=0.05)
    assert ours["param_scheduler"] == [
        dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)]
    assert ours["default_hooks"]["checkpoint"] == dict(type="CheckpointHook", by_epoch=False, interval=1000,
                                                       max_keep_ckpts=1, save_best="mIoU")
    h = ss_mmdet.upernet_config("h")["model"]
    assert h["decode_head"]["in_channels"] == [320, 640, 1280, 2560] and h["auxiliary_head"]["in_channels"] == 1280
    assert h["backbone"]["level2_post_norm_block_ids"] == [5, 11, 17, 23, 29] and h["backbone"]["with_cp"]
