"""shusheng train t2i: a tiny pixel-space run (samples, checkpoints, the fp16 EMA pipeline in final/), exact resume,
caption dropout, and a tiny latent run (VAE first). Tiny random UNets and a tiny BERT behind MiniLM's tokenizer on
a handful of 16x16 SynthDrive scenes; nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from shusheng.train import t2i  # noqa: E402


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide BERT behind all-MiniLM-L6-v2's tokenizer."""
    from shusheng.text_encoders import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_cfg(text_dir, out, **kw) -> t2i.T2ITrainConfig:
    args = dict(n_train=8, image_size=16, output=str(out), block_out_channels=(8, 16), attention_heads=2,
                cross_attention_levels=1, cross_attention_dim=32, norm_num_groups=4, text_encoder=str(text_dir),
                steps=6, batch_size=4, lr=2e-3, warmup_steps=1, save_every=3, keep_checkpoints=0, sample_every=3,
                sample_steps=2, n_val=2, log_every=1, model_name="tiny-t2i")
    args.update(kw)
    return t2i.T2ITrainConfig(**args)


@pytest.fixture(scope="module")
def trained(text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i-run")
    t0 = time.perf_counter()
    metrics = t2i.train(tiny_cfg(text_dir, out))
    return out, metrics, time.perf_counter() - t0


def test_train_t2i_writes_samples_checkpoints_and_an_fp16_pipeline(trained):
    from PIL import Image
    from safetensors import safe_open

    from shusheng.generation import Text2ImagePipeline

    out, metrics, seconds = trained
    assert metrics["steps"] == metrics["unet_steps"] == 6 and not metrics["stopped_early"] and seconds < 30
    assert metrics["space"] == "pixel" and np.isfinite(metrics["final_loss"]) and np.isfinite(metrics["val_loss"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["caption_dropout"] == 0.1 and cfg["prediction_type"] == "v_prediction"
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, 7)) and all(np.isfinite(h["loss"]) for h in hist)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert (out / "loss_curve.png").is_file() and (out / "samples" / "prompts.txt").is_file()
    for step in (3, 6):  # rows: prompts, columns: seeds
        grid = Image.open(out / "samples" / f"step_{step}.png")
        assert grid.size == (2 * 18 + 2, len(t2i.SAMPLE_PROMPTS) * 18 + 2)
    final = out / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["text_encoder_ref"] == cfg["text_encoder"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["model_name"] == "tiny-t2i"
    with safe_open(str(final / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) < 40_000_000
    info = json.loads((final / "metrics.json").read_text())
    assert info["steps"] == 6 and info["weights"] == "EMA of the UNet, fp16"
    card = (final / "MODEL_CARD.md").read_text()
    assert "--image-size 16" in card and "v_prediction" in card
    pipe = Text2ImagePipeline.from_pretrained(final)
    assert pipe.unet.dtype == torch.float32 and pipe.scheduler.config.prediction_type == "v_prediction"
    out_img = pipe("A sunny city street with a red car.", seed=0, num_inference_steps=2, output_type="np",
                   progress=False).images
    assert out_img.shape == (1, 16, 16, 3) and np.isfinite(out_img).all()
    # the EMA, not the last raw weights, is what was saved
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "checkpoints" / "step_6" / "model.safetensors"))
    saved = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    k = "conv_in.weight"
    assert not torch.allclose(ckpt[k].half(), saved[k])


def test_resume_follows_the_uninterrupted_run(trained, text_dir, tmp_path):
    from safetensors.torch import load_file

    out, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints" / "step_3", run / "checkpoints" / "step_3")
    t2i.train(tiny_cfg(text_dir, run, resume="auto", sample_every=0, n_val=0))
    full = json.loads((out / "metrics.json").read_text())["history"]
    resumed = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in resumed] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed]), torch.tensor([h["loss"] for h in full]),
                               rtol=1e-5, atol=1e-6)
    a = load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_batches_are_a_pure_function_of_seed_and_step_with_caption_dropout():
    captions = [[f"scene {i} caption {j}" for j in range(3)] for i in range(40)]
    cfg = t2i.T2ITrainConfig(batch_size=8, caption_dropout=0.3)
    a, b = t2i.StepSampler(captions, cfg), t2i.StepSampler(captions, cfg)
    assert a(17) == b(17) and a(17) != a(18)
    idx, caps, _ = a(3)
    assert len(idx) == 8 and all(c == "" or c.startswith(f"scene {i} ") for i, c in zip(idx, caps))
    epoch = [i for s in range(5) for i in a(s)[0]]  # 40 images, 8 per step: one epoch visits each once
    assert sorted(epoch) == list(range(40))
    dropped = np.mean([c == "" for s in range(200) for c in a(s)[1]])
    assert 0.25 < dropped < 0.35
    assert not any(c == "" for s in range(50) for c in t2i.StepSampler(captions, t2i.T2ITrainConfig(
        batch_size=8, caption_dropout=0.0))(s)[1])


def test_latent_run_trains_a_vae_first(text_dir, tmp_path):
    from shusheng.generation import Text2ImagePipeline

    out = tmp_path / "latent"
    metrics = t2i.train(tiny_cfg(text_dir, out, latent=True, vae_block_out_channels=(8, 16), vae_steps=2, steps=2,
                                 image_size=16, sample_every=0, save_every=0, block_out_channels=(8, 16)))
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in hist] == ["vae", "vae", "unet", "unet"] and "rec" in hist[0]
    assert metrics["space"] == "latent" and metrics["vae_steps"] == 2 and metrics["unet_steps"] == 2
    pipe = Text2ImagePipeline.from_pretrained(out / "final")
    assert pipe.vae is not None and pipe.vae.config.scaling_factor != 1.0 and pipe.unet.config.sample_size == 8
    assert pipe.default_size == 16 and pipe.size_multiple == 4
    img = pipe("a bus", seed=1, num_inference_steps=2, output_type="np", progress=False).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_cli_flags_make_the_config(text_dir, tmp_path):
    from shusheng.cli import build_parser

    args = build_parser(["train", "t2i"]).parse_args(
        ["train", "t2i", "--block-out-channels", "8,16", "--latent", "--caption-dropout", "0.2", "--max-minutes",
         "5", "--prediction-type", "epsilon", "--resume", "auto"])
    cfg = t2i.config_from_args(args)
    assert cfg.block_out_channels == (8, 16) and cfg.latent and cfg.caption_dropout == 0.2
    assert cfg.max_minutes == 5.0 and cfg.prediction_type == "epsilon" and cfg.resume == "auto"
    assert t2i.command_flags(cfg) == ("--block-out-channels 8,16 --prediction-type epsilon --caption-dropout 0.2 "
                                      "--latent --max-minutes 5.0")
    with pytest.raises(ValueError, match="prediction_type"):
        t2i.T2ITrainConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="differs from the width"):
        t2i.train(t2i.T2ITrainConfig(text_encoder=str(text_dir), output=str(tmp_path / "run"), n_train=1))
