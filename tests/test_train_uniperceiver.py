"""`shusheng train uniperceiver` on a tiny config: outputs, exact resume, warm start (seconds on a CPU)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shusheng.data.synthdrive_queries import synthdrive_answers  # noqa: E402
from shusheng.train import uniperceiver as tu  # noqa: E402
from shusheng.uniperceiver.model import UniPerceiver  # noqa: E402


def tiny_cfg(out, **kw) -> tu.UniPerceiverTrainConfig:
    args = dict(data_dir=None, n_train=8, image_size=64, output=str(out), backbone="internimage_test",
                backbone_args={"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]}, image_grid=2,
                text_init=None, n_layers=1, d_model=32, n_heads=2, max_text_len=48, steps=4, batch_size=4,
                vqa_per_image=1, answer_pool=16, warmup_steps=1, save_every=2, log_every=1, domain_fit=32)
    args.update(kw)
    return tu.UniPerceiverTrainConfig(**args)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    metrics = tu.train(tiny_cfg(out))
    return out, metrics


def test_run_writes_checkpoints_curve_and_a_loadable_model(full_run):
    out, metrics = full_run
    assert metrics["steps"] == 4 and not metrics["stopped_early"]
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([h["caption"], h["vqa"], h["retrieval"], h["cls"]])).all() for h in hist)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    model = UniPerceiver.from_pretrained(out / "final")
    assert model.config.d_model == 32 and len(model.config.answers) >= len(synthdrive_answers())
    # the in-domain check is fitted with the weights and read back by the pipelines
    from shusheng.pipelines import DomainCheck

    check = DomainCheck.load(out / "final")
    assert check is not None and check.info["n_fit"] == 32 and check.info["n_calibration"] == 16


def test_resume_follows_the_uninterrupted_run(full_run, tmp_path):
    out, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints" / "step_2", run / "checkpoints" / "step_2")
    tu.train(tiny_cfg(run, resume="auto"))
    full = json.loads((out / "metrics.json").read_text())["history"]
    resumed = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed]), torch.tensor([h["loss"] for h in full]),
                               rtol=1e-4, atol=1e-5)


def test_warm_start_copies_everything_but_the_image_backbone(full_run, tmp_path):
    out, _ = full_run
    cfg = tiny_cfg(tmp_path / "warm", backbone_args={"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]})
    _, records = tu.load_synthdrive(None, cfg.n_train, cfg.image_size)
    model = tu.build_model(cfg, records)
    # the image projection reads the backbone's channels: a wider tower cannot take the old projection
    with pytest.raises(ValueError, match="does not fit"):
        tu.init_from(model, out / "final")
    cfg = tiny_cfg(tmp_path / "warm")
    model = tu.build_model(cfg, records)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("image.backbone.")}
    tu.init_from(model, out / "final")
    trained = UniPerceiver.from_pretrained(out / "final").state_dict()
    n = 0
    for k, v in model.state_dict().items():
        if k.startswith("image.backbone."):
            torch.testing.assert_close(v, before[k])  # the tower is the run's own, not the folder's
        else:
            torch.testing.assert_close(v, trained[k])
            n += 1
    assert n > 10
    with pytest.raises(ValueError, match="different d_model"):
        tu.init_from(tu.build_model(tiny_cfg(tmp_path / "w2", d_model=64), records), out / "final")
    with pytest.raises(FileNotFoundError, match="not a UniPerceiver folder"):
        tu.init_from(model, tmp_path)


def test_caption_full_p_picks_the_complete_caption_and_leaves_other_draws_alone():
    cfg = tiny_cfg("unused", n_train=16, batch_size=16)
    _, records = tu.load_synthdrive(None, cfg.n_train, cfg.image_size)
    images = torch.zeros(len(records), cfg.image_size, cfg.image_size, 3, dtype=torch.uint8).numpy()
    answers = synthdrive_answers()
    plain = tu.StepSampler(images, records, cfg, answers)
    always = tu.StepSampler(images, records, tiny_cfg("unused", n_train=16, batch_size=16, caption_full_p=1.0),
                            answers)
    half = tu.StepSampler(images, records, tiny_cfg("unused", n_train=16, batch_size=16, caption_full_p=0.5),
                          answers)
    n_full_plain = n_full_half = 0
    for step in range(6):
        a, b, c = plain(step), always(step), half(step)
        assert b["captions"] == [r["captions"][0] for r in b["records"]]
        # the option has its own random stream: everything else in the batch is drawn as before
        assert a["questions"] == b["questions"] and a["retrieval_texts"] == b["retrieval_texts"]
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["flip"], b["flip"])
        n_full_plain += sum(cap == r["captions"][0] for cap, r in zip(a["captions"], a["records"]))
        n_full_half += sum(cap == r["captions"][0] for cap, r in zip(c["captions"], c["records"]))
    # uniform over five captions: about 1/5 complete ones; with p = 0.5: 0.5 + 0.5/5 = 0.6 of 96 draws
    assert n_full_plain < 35 < 45 < n_full_half
