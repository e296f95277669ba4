"""shusheng.generation: the text-to-image pipeline (tiny random UNet + a tiny BERT behind MiniLM's tokenizer), the
PNG parameters, ``shusheng generate`` and loading diffusers' own pipelines (a tiny Stable Diffusion built from
configs). Nothing is downloaded; the real all-MiniLM-L6-v2 is only loaded as the default text reference."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from shusheng.generation.config import SCHEDULERS, UNetConfig, make_unet  # noqa: E402
from shusheng.generation.pipeline import (  # noqa: E402
    Text2ImagePipeline,
    UntrainedGeneratorError,
    check_pipeline_folder,
    load_pipeline,
)
from shusheng.generation.png import GenerationParameters, read_parameters, save_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(sample_size=16, block_out_channels=(8, 16), attention_heads=2, cross_attention_levels=1,
                 cross_attention_dim=32, norm_num_groups=4)
PROMPTS = ["a red car on a wet street", "a bus, at dusk: two pedestrians on the crosswalk and a stoplight"]


def tiny_text_encoder(folder: Path) -> Path:
    """A 1-layer, 32-wide BERT behind all-MiniLM-L6-v2's tokenizer, saved as a Hugging Face folder."""
    from shusheng.text_encoders import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ddim(**kw):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction", timestep_spacing="trailing", **kw)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return tiny_text_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def pipe(text_dir) -> Text2ImagePipeline:
    torch.manual_seed(0)
    p = Text2ImagePipeline(make_unet(TINY_UNET), ddim(), text_encoder_ref=str(text_dir), model_name="tiny-t2i")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t2i") / "pipe"
    pipe.save_pretrained(folder)
    return folder


def gen(pipe, prompt=PROMPTS[0], **kw):
    kw = {"num_inference_steps": 3, "output_type": "np", "progress": False, **kw}
    return pipe(prompt, **kw)


# --------------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------------

def test_output_types_seeds_and_parameters(pipe):
    out = gen(pipe, PROMPTS, num_images_per_prompt=2, seed=123, output_type="pil")
    assert len(out.images) == 4 and all(im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    assert out.seeds == [123, 124, 125, 126] and out.steps_done == 3
    assert out.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and out.negative_prompts == [""] * 4
    p = GenerationParameters.from_text(out.parameters[3])
    assert (p.prompt, p.negative_prompt, p.steps, p.sampler, p.cfg_scale, p.seed, p.width, p.height, p.model) == (
        PROMPTS[1], "", 3, "ddim", 5.0, 126, 16, 16, "tiny-t2i")
    assert p.model_hash == pipe.model_hash and len(p.model_hash) == 10
    arr = gen(pipe, seed=1).images
    assert arr.shape == (1, 16, 16, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    pt = gen(pipe, seed=1, output_type="pt").images
    assert pt.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pt.permute(0, 2, 3, 1).numpy(), arr, rtol=0, atol=0)
    rand = gen(pipe, num_images_per_prompt=2)  # no seed: random ones, reported
    assert all(isinstance(s, int) for s in rand.seeds) and rand.seeds[0] != rand.seeds[1]
    torch.testing.assert_close(gen(pipe, seed=rand.seeds[1]).images[0], rand.images[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm draws noise at every step, from each image's seed
def test_image_k_of_a_batch_equals_generating_it_alone(pipe, scheduler):
    batch = gen(pipe, PROMPTS, num_images_per_prompt=2, seed=[11, 12, 13, 14], negative_prompt=["fog", ""],
                scheduler=scheduler)
    for k, (prompt, neg) in enumerate([(PROMPTS[0], "fog")] * 2 + [(PROMPTS[1], "")] * 2):
        alone = gen(pipe, prompt, negative_prompt=neg, seed=11 + k, scheduler=scheduler)
        np.testing.assert_allclose(batch.images[k], alone.images[0], rtol=0, atol=1e-5)
    # the same noise from the caller's generators; one generator draws every image's seed, reproducibly
    gens = gen(pipe, PROMPTS, num_images_per_prompt=2, negative_prompt=["fog", ""], scheduler=scheduler,
               generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)])
    assert gens.seeds == [None] * 4
    np.testing.assert_allclose(gens.images, batch.images, rtol=0, atol=1e-6)
    one = gen(pipe, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), scheduler=scheduler)
    again = gen(pipe, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), scheduler=scheduler)
    assert one.seeds == again.seeds and None not in one.seeds
    np.testing.assert_array_equal(one.images, again.images)
    np.testing.assert_allclose(gen(pipe, seed=one.seeds[1], scheduler=scheduler).images[0], one.images[1],
                               rtol=0, atol=1e-5)


def test_guidance_negative_prompt_and_prompt_change_the_image(pipe):
    base = gen(pipe, seed=3).images
    assert np.abs(gen(pipe, seed=3, negative_prompt="fog").images - base).max() > 1e-4
    assert np.abs(gen(pipe, seed=3, guidance_scale=1.0).images - base).max() > 1e-4
    assert np.abs(gen(pipe, PROMPTS[1], seed=3).images - base).max() > 1e-4
    assert np.abs(gen(pipe, seed=4).images - base).max() > 1e-4
    # w <= 1 runs the prompt alone: the negative prompt has no effect
    np.testing.assert_array_equal(gen(pipe, seed=3, guidance_scale=1.0, negative_prompt="fog").images,
                                  gen(pipe, seed=3, guidance_scale=1.0).images)


def test_every_named_scheduler_runs_and_unknown_names_are_listed(pipe):
    labels = {}
    for name in SCHEDULERS:
        out = gen(pipe, seed=0, scheduler=name, num_inference_steps=2)
        assert np.isfinite(out.images).all() and out.steps_done == 2
        labels[name] = GenerationParameters.from_text(out.parameters[0]).sampler
    assert labels == {name: name for name in SCHEDULERS}
    assert "Sampler: DPM++ 2M," in gen(pipe, seed=0, scheduler="dpm", num_inference_steps=2).parameters[0]
    assert type(pipe.scheduler) is diffusers.DDIMScheduler  # a call's scheduler never replaces the pipeline's
    with pytest.raises(ValueError, match="ddim, dpm, euler, ddpm"):
        gen(pipe, scheduler="heun")


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "prompt 0 is empty"),
    (dict(prompt=["a car", "  "]), "prompt 1 is empty"),
    (dict(prompt=[]), "no prompt"),
    (dict(prompt="car " * 80), "^prompt 0 has .* more than the text encoder's 64"),
    (dict(prompt=["a car", "car " * 80]), "^prompt 1 has .* more than the text encoder's 64"),
    (dict(negative_prompt="fog " * 80), "^negative prompt 0 has .* more than the text encoder's 64"),
    (dict(num_inference_steps=0), r"\[1, 1000\]"),
    (dict(num_inference_steps=1001), r"\[1, 1000\]"),
    (dict(height=15), "not a multiple of 2"),
    (dict(width=2048), r"\[8, 1024\]"),
    (dict(height=4), r"\[8, 1024\]"),
    (dict(guidance_scale=-0.5), "guidance_scale must be >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be >= 0"),
    (dict(output_type="latent"), "output_type"),
    (dict(seed=[1, 2]), "2 seeds for 1 images"),
    (dict(seed=1, generator=torch.Generator()), "not both"),
    (dict(negative_prompt=["a", "b"]), "one negative prompt"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_inputs_are_clear_value_errors(pipe, kwargs, match):
    kwargs = {"prompt": PROMPTS[0], "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_other_sizes_and_interrupting_from_a_callback(pipe):
    assert gen(pipe, seed=0, height=8, width=24).images.shape == (1, 8, 24, 3)
    seen = []

    def stop_after_two(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        if i == 1:
            p.interrupt = True
        return {}

    out = gen(pipe, seed=0, num_inference_steps=5, callback_on_step_end=stop_after_two)
    assert out.steps_done == 2 and seen == [(0, (1, 3, 16, 16)), (1, (1, 3, 16, 16))]
    assert "Stopped at: 2" in out.parameters[0] and out.images.shape == (1, 16, 16, 3)
    assert pipe.interrupt  # stays set until the next call, which starts afresh
    assert gen(pipe, seed=0).steps_done == 3 and not pipe.interrupt

    def blank_at_the_end(p, i, t, tensors):  # returned tensors replace the pipeline's
        assert set(tensors) == {"latents", "prompt_embeds"} and tensors["prompt_embeds"].shape[0] == 2
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = gen(pipe, seed=0, callback_on_step_end=blank_at_the_end,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    np.testing.assert_array_equal(out.images, np.full((1, 16, 16, 3), 0.5, np.float32))


def test_callbacks_can_read_the_denoised_estimate_for_previews(pipe):
    seen = []

    def record(p, i, t, tensors):
        seen.append((tensors["denoised"].clone(), tensors["latents"].clone()))
        return {"denoised": torch.zeros_like(tensors["denoised"])}  # read-only: ignored

    out = gen(pipe, seed=0, num_inference_steps=4, callback_on_step_end=record,
              callback_on_step_end_tensor_inputs=["denoised", "latents"])
    assert len(seen) == 4 and seen[0][0].shape == (1, 3, 16, 16)
    assert (seen[0][0] - seen[0][1]).abs().max() > 1e-3  # DDIM's x0 estimate, not the noisy latents
    torch.testing.assert_close(seen[-1][0], seen[-1][1])  # the last step's estimate is the result
    np.testing.assert_array_equal(out.images, gen(pipe, seed=0, num_inference_steps=4).images)
    np.testing.assert_allclose(pipe.decode_latents(seen[-1][0]).permute(0, 2, 3, 1).numpy(), out.images, atol=1e-6)
    dpm = []  # a scheduler without an estimate of its own: the current latents
    gen(pipe, seed=0, scheduler="dpm", num_inference_steps=2,
        callback_on_step_end_tensor_inputs=["denoised", "latents"],
        callback_on_step_end=lambda p, i, t, x: dpm.append(torch.equal(x["denoised"], x["latents"])) or {})
    assert dpm == [True, True]


def test_save_and_load_round_trip_generates_identical_images(pipe, saved, text_dir):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "Text2ImagePipeline" and index["text_encoder_ref"] == str(text_dir)
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert sorted(p.name for p in saved.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert pipe.text_encoder is not None  # saving by reference leaves the pipeline whole
    back = Text2ImagePipeline.from_pretrained(saved)
    assert back.model_hash == pipe.model_hash and back.model_label == "tiny-t2i"
    kw = dict(prompt=PROMPTS, num_images_per_prompt=2, seed=77, negative_prompt="fog")
    np.testing.assert_array_equal(gen(back, **kw).images, gen(pipe, **kw).images)
    assert gen(back, **kw).parameters == gen(pipe, **kw).parameters
    assert load_pipeline(saved).__class__ is Text2ImagePipeline
    # a folder that holds its own text encoder (no reference) round-trips too
    own = Text2ImagePipeline(back.unet, back.scheduler, back.text_encoder, back.tokenizer)
    own.save_pretrained(saved.parent / "own")
    assert {"text_encoder", "tokenizer"} <= {p.name for p in (saved.parent / "own").iterdir()}
    np.testing.assert_array_equal(gen(Text2ImagePipeline.from_pretrained(saved.parent / "own"), seed=2).images,
                                  gen(pipe, seed=2).images)


def test_default_text_encoder_is_minilm_by_reference(tmp_path):
    torch.manual_seed(0)
    p = Text2ImagePipeline(make_unet({**TINY_UNET, "cross_attention_dim": 384}), ddim(),
                           text_encoder_ref="all-MiniLM-L6-v2")
    context, mask = p.encode_prompt(["a car", "a red car at night"])
    assert context.shape[0] == 2 and context.shape[-1] == 384 and mask[0].sum() < mask[1].sum()
    p.save_pretrained(tmp_path / "m")
    size = sum(f.stat().st_size for f in (tmp_path / "m").rglob("*") if f.is_file())
    assert size < 2_000_000 and not (tmp_path / "m" / "text_encoder").exists()  # MiniLM's 90 MB stay out
    back = Text2ImagePipeline.from_pretrained(tmp_path / "m")
    assert back.text_encoder.config.hidden_size == 384 and back.text_encoder.config.num_hidden_layers == 6
    np.testing.assert_array_equal(gen(back, seed=9).images, gen(p, seed=9).images)


def test_folders_that_are_not_pipelines_are_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Text2ImagePipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        load_pipeline(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((saved / "model_index.json").read_text())
    (broken / "scheduler").mkdir()
    (broken / "scheduler" / "scheduler_config.json").write_text((saved / "scheduler" / "scheduler_config.json")
                                                                .read_text())
    with pytest.raises(FileNotFoundError, match=r"missing: unet/ \(a UNet2DConditionModel\)"):
        Text2ImagePipeline.from_pretrained(broken)
    (broken / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="missing: unet/config.json"):
        check_pipeline_folder(broken)
    index = json.loads((saved / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "text_encoder_ref": None}))
    (broken / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no text encoder"):
        Text2ImagePipeline.from_pretrained(broken)
    with pytest.raises(ValueError, match="text_encoder_ref"):
        Text2ImagePipeline(make_unet(TINY_UNET), ddim())


def test_no_bundled_model_names_the_train_command(monkeypatch, capsys):
    import shusheng.generation.pipeline as gp

    monkeypatch.setattr(gp, "BUNDLED_MODEL", "shusheng-mini-t2i-not-here")  # as on an installation without it
    with pytest.raises(UntrainedGeneratorError, match="shusheng train t2i"):
        Text2ImagePipeline.from_pretrained()
    from shusheng.cli import main

    assert main(["generate", "a red car"]) == 2
    err = capsys.readouterr().err
    assert "shusheng train t2i" in err and "--model" in err


# --------------------------------------------------------------------------------------------------------
# diffusers' own pipelines
# --------------------------------------------------------------------------------------------------------

def clip_tokenizer():
    """A CLIPTokenizer with CLIP's real BPE vocabulary, from the copy open_clip ships (offline)."""
    import open_clip.tokenizer as ot

    merges = gzip.open(ot.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(ot.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)},
                                      merges=[tuple(m.split()) for m in merges], model_max_length=77)


def test_load_pipeline_uses_diffusers_class_for_stable_diffusion(tmp_path):
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                                          cross_attention_dim=32, down_block_types=("DownBlock2D",
                                                                                    "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=49408,
        max_position_embeddings=77))
    sd = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                           scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
                                           safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(tmp_path / "sd")
    assert type(loaded) is diffusers.StableDiffusionPipeline
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    a = loaded("a red car", generator=torch.Generator().manual_seed(0), **kw).images
    b = sd("a red car", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="load_pipeline"):
        Text2ImagePipeline.from_pretrained(tmp_path / "sd")


# --------------------------------------------------------------------------------------------------------
# PNG parameters
# --------------------------------------------------------------------------------------------------------

def test_parameters_text_round_trips_awkward_prompts():
    p = GenerationParameters(prompt='a bus, at dusk: "two" pedestrians\nsecond line, with commas',
                             negative_prompt="fog, rain\nand snow", steps=20, sampler="dpm", cfg_scale=7.5,
                             seed=2**40, width=96, height=64, model="my, model", model_hash="0123456789",
                             extra={"Stopped at": "3"})
    text = p.to_text()
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1099511627776, '
                                     'Size: 96x64, Model hash: 0123456789, Model: "my, model", Stopped at: 3')
    assert GenerationParameters.from_text(text) == p
    plain = GenerationParameters("a car", seed=123)
    assert plain.to_text() == "a car\nSteps: 20, Sampler: DDIM, CFG scale: 5.0, Seed: 123, Size: 64x64"
    assert GenerationParameters.from_text(plain.to_text()) == plain


def test_parses_automatic1111_text():
    text = ("masterpiece, 1girl, (red:1.2) car, street\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 3456789012, Size: 512x768, Model hash: 6ce0161689, "
            'Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.9.4')
    p = GenerationParameters.from_text(text)
    assert p.prompt == "masterpiece, 1girl, (red:1.2) car, street" and p.negative_prompt == "lowres, bad anatomy"
    assert (p.steps, p.sampler, p.cfg_scale, p.seed, p.width, p.height) == (28, "Euler a", 7.0, 3456789012, 512, 768)
    assert p.model == "v1-5-pruned-emaonly" and p.model_hash == "6ce0161689"
    assert p.extra == {"Lora hashes": "a: 1, b: 2", "Version": "v1.9.4"}
    assert GenerationParameters.from_text("a car\nSteps: 5, Sampler: euler").sampler == "euler"
    with pytest.raises(ValueError, match="no line starts with 'Steps:'"):
        GenerationParameters.from_text("just a caption, nothing else")
    with pytest.raises(ValueError, match="unreadable"):
        GenerationParameters.from_text("a car\nSteps: many, Seed: 1")


def test_save_png_is_atomic_and_never_overwrites(tmp_path):
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    params = GenerationParameters("a red square, small", seed=1, width=8, height=8)
    first = save_png(red, tmp_path / "out", "square", params)
    second = save_png(blue, tmp_path / "out", "square", params)
    assert (first.name, second.name) == ("square.png", "square-1.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["square-1.png", "square.png"]  # no temp files
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0) and Image.open(second).getpixel((0, 0)) == (0, 0, 255)
    assert read_parameters(first) == params
    assert Image.open(first).info["parameters"] == params.to_text()
    red.save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="holds no 'parameters' text"):
        read_parameters(tmp_path / "plain.png")
    with pytest.raises(FileNotFoundError):
        read_parameters(tmp_path / "none.png")


# --------------------------------------------------------------------------------------------------------
# shusheng generate
# --------------------------------------------------------------------------------------------------------

def test_generate_cli_writes_pngs_and_regenerates_them_from_png(saved, tmp_path, capsys):
    from PIL import Image

    from shusheng.cli import main

    out = tmp_path / "out"
    argv = ["generate", "a bus, at dusk", "-n", "2", "--seed", "5", "--steps", "3", "--guidance", "4",
            "--negative", "fog", "--model", str(saved), "--out", str(out), "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["prompt"], r["seed"], r["checks"]) for r in rows] == [("a bus, at dusk", 5, None),
                                                                      ("a bus, at dusk", 6, None)]
    files = [Path(r["file"]) for r in rows]
    assert [f.name for f in files] == ["a-bus-at-dusk-5.png", "a-bus-at-dusk-6.png"]
    p = read_parameters(files[1])
    assert (p.prompt, p.negative_prompt, p.steps, p.cfg_scale, p.seed, p.sampler) == ("a bus, at dusk", "fog", 3, 4.0,
                                                                                       6, "ddim")
    # the same command again: new files, the old ones untouched
    before = files[0].read_bytes()
    assert main(argv) == 0
    again = [Path(r["file"]).name for r in json.loads(capsys.readouterr().out)]
    assert again == ["a-bus-at-dusk-5-1.png", "a-bus-at-dusk-6-1.png"] and files[0].read_bytes() == before
    # --from-png: the identical image (pixels and parameters)
    assert main(["generate", "--from-png", str(files[1]), "--model", str(saved), "--out", str(tmp_path / "re")]) == 0
    made = Path(capsys.readouterr().out.split()[0])
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(files[1])))
    assert read_parameters(made) == p
    # random seeds are printed and stored
    assert main(["generate", "a car", "--steps", "2", "--model", str(saved), "--out", str(out), "--size", "16x8"]) == 0
    line = capsys.readouterr().out.strip()
    seed = int(line.rsplit("seed ", 1)[1].rstrip(")"))
    made = Path(line.split()[0])
    assert read_parameters(made).seed == seed and Image.open(made).size == (8, 16)


@pytest.mark.parametrize("argv, match", [
    (["--from-png", "x.png", "--seed", "3"], "drop --seed"),
    (["a car", "--from-png", "x.png"], "drop PROMPT"),
    ([], "give a prompt"),
    (["a car", "-n", "0"], "-n must be >= 1"),
    (["a car", "--size", "15x16"], "not a multiple of 2"),
    (["a car", "--steps", "0"], "[1, 1000]"),
    (["--from-png", "missing.png"], "not found"),
])
def test_generate_cli_refuses_bad_arguments(saved, tmp_path, capsys, argv, match):
    from shusheng.cli import main

    assert main(["generate", *argv, "--model", str(saved), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not list(tmp_path.glob("*.png"))


def test_generate_check_reports_which_facts_hold(saved, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from shusheng.cli import main
    from shusheng.generation.pipelines import faithfulness as ff

    prompt = "two red cars at night in the fog"
    base = ["generate", prompt, "-n", "2", "--seed", "3", "--steps", "2", "--model", str(saved), "--out",
            str(tmp_path / "out")]
    # without --check the checker is never loaded, and the checks are null
    real_from_pretrained = ff.FaithfulnessChecker.from_pretrained

    def not_without_check(cls, *args, **kwargs):
        raise AssertionError("the checker was loaded without --check")

    monkeypatch.setattr(ff.FaithfulnessChecker, "from_pretrained", classmethod(not_without_check))
    assert main([*base, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["checks"], r["share"], r["in_domain"]) for r in rows] == [(None, None, None)] * 2
    # a checker that cannot be loaded: a clear error before any image is made
    def no_decoder(cls, *args, **kwargs):
        raise FileNotFoundError("no decoder")

    monkeypatch.setattr(ff.FaithfulnessChecker, "from_pretrained", classmethod(no_decoder))
    assert main([*base, "--out", str(tmp_path / "none"), "--check"]) == 2
    assert "--check needs the bundled decoder" in capsys.readouterr().err and not (tmp_path / "none").exists()
    monkeypatch.setattr(ff.FaithfulnessChecker, "from_pretrained", real_from_pretrained)

    assert main([*base, "--check", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    facts = ff.prompt_facts(prompt)
    checker = ff.FaithfulnessChecker.from_pretrained()
    judged = checker([Image.open(r["file"]) for r in rows], [prompt] * 2)  # the checker on the PNGs written
    for r, res in zip(rows, judged):
        assert [(c["kind"], c["expected"]) for c in r["checks"]] == [(f.kind, f.expected) for f in facts]
        assert [(c["observed"], c["holds"]) for c in r["checks"]] == [(c.observed, c.holds) for c in res.checks]
        assert all(isinstance(c["holds"], bool) and 0 <= c["score"] <= 1 and c["question"] for c in r["checks"])
        assert r["share"] == pytest.approx(sum(c["holds"] for c in r["checks"]) / len(facts))
        assert r["in_domain"] is bool(res.in_domain)
    # the human output: which facts hold, per image
    assert main([*base, "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("  check: ") == 2 and "vehicle: red car" in out and "count: 2 red cars" in out
    for res in judged:
        assert f"check: {sum(c.holds for c in res.checks)} of 4 facts hold" in out
    assert main(["generate", "a portrait of a cat", "--steps", "2", "--model", str(saved), "--out",
                 str(tmp_path / "out"), "--check"]) == 0
    assert "the prompt states no scene fact the judge knows" in capsys.readouterr().out


def test_check_lines_say_which_facts_hold_and_when_the_image_is_out_of_domain():
    from shusheng.generation.cli import check_lines, check_rows
    from shusheng.generation.pipelines.faithfulness import FactCheck, FaithfulnessResult, prompt_facts

    night, car = prompt_facts("a car at night")[::-1]
    checks = [FactCheck("time", "night", "night", True, 0.9, "What time of day is it?", [], night),
              FactCheck("vehicle", "car", "no", False, 0.7, "Is there a car?", [], car)]
    lines = check_lines(FaithfulnessResult("a car at night", checks, 0.5, False, 0.01))
    assert lines[0] == "  check: 1 of 2 facts hold"
    assert lines[1].split() == ["holds", "time:", "night", "(decoder:", "night,", "0.90)"]
    assert lines[2].split()[:5] == ["does", "not", "hold", "vehicle:", "car"]
    assert "does not look like the driving scenes" in lines[3] and len(lines) == 4
    assert len(check_lines(FaithfulnessResult("a car at night", checks, 0.5, True, 0.6))) == 3
    assert check_rows(FaithfulnessResult("x", checks, 0.5, True, 0.6))[1] == {
        "kind": "vehicle", "expected": "car", "observed": "no", "holds": False, "score": 0.7,
        "question": "Is there a car?"}


def test_a_bundled_pipeline_folder_is_found_checked_and_loaded(pipe, saved, tmp_path, monkeypatch, capsys):
    import shutil

    import test_modeling

    import shusheng.weights as weights
    from shusheng.cli import main

    root = tmp_path / "weights"
    folder = root / "shusheng-mini-t2i"
    shutil.copytree(saved, folder)
    monkeypatch.setattr(weights, "_ROOT", root)  # as if shusheng-mini-t2i were bundled (and nothing else)
    assert weights.list_bundled() == ["shusheng-mini-t2i"] and weights.bundled_path("shusheng-mini-t2i") == folder
    with pytest.raises(AssertionError, match="MODEL_CARD.md"):  # the schema test checks diffusers folders too
        test_modeling.test_bundled_folders_use_the_schema()
    (folder / "MODEL_CARD.md").write_text("# shusheng-mini-t2i (a tiny random test model)\n")
    test_modeling.test_bundled_folders_use_the_schema()
    back = Text2ImagePipeline.from_pretrained()  # None = the bundled folder, through weights.bundled_path
    assert back.model_hash == pipe.model_hash
    np.testing.assert_array_equal(gen(back, seed=4).images, gen(pipe, seed=4).images)
    assert main(["generate", "a car", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "out")]) == 0
    assert read_parameters(capsys.readouterr().out.split()[0]).model_hash == pipe.model_hash
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": [None, None], "scheduler": [None, None]}))
    with pytest.raises(AssertionError, match="names no component"):
        test_modeling.test_bundled_folders_use_the_schema()
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(AssertionError, match="scheduler/ is missing"):
        test_modeling.test_bundled_folders_use_the_schema()
    (folder / "model_index.json").unlink()  # neither index file: not a bundled model
    assert weights.list_bundled() == []
    with pytest.raises(UntrainedGeneratorError, match="shusheng train t2i"):
        Text2ImagePipeline.from_pretrained()


def test_from_png_of_another_model_asks_for_it(saved, tmp_path, capsys):
    from PIL import Image

    from shusheng.cli import main

    save_png(Image.new("RGB", (16, 16)), tmp_path, "x", GenerationParameters("a car", seed=1, model="elsewhere"))
    assert main(["generate", "--from-png", str(tmp_path / "x.png")]) == 2
    assert "made with the model 'elsewhere'" in capsys.readouterr().err


def test_import_generation_is_light():
    probe = ("import shusheng, shusheng.generation, shusheng.generation.png, shusheng.generation.cli, sys; "
             "print(' '.join(m for m in ('diffusers', 'transformers', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == []


def test_unet_config_checks_its_sizes():
    assert UNetConfig().diffusers_kwargs()["down_block_types"] == (
        "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(6, 12), cross_attention_levels=1)
    with pytest.raises(ValueError, match="downsampling factor 16"):
        UNetConfig(sample_size=40)
    with pytest.raises(ValueError, match="cross_attention_levels"):
        UNetConfig(cross_attention_levels=6)


def test_the_models_default_guidance_is_used_when_none_is_given(pipe):
    old = pipe.config.default_guidance
    try:
        pipe.register_to_config(default_guidance=1.0)
        default = pipe(PROMPTS[0], num_inference_steps=2, seed=0, progress=False)
        assert "CFG scale: 1.0" in default.parameters[0]
        same = pipe(PROMPTS[0], num_inference_steps=2, seed=0, guidance_scale=1.0, progress=False)
        other = pipe(PROMPTS[0], num_inference_steps=2, seed=0, guidance_scale=5.0, progress=False)
        np.testing.assert_array_equal(np.asarray(default.images[0]), np.asarray(same.images[0]))
        assert not np.array_equal(np.asarray(default.images[0]), np.asarray(other.images[0]))
    finally:
        pipe.register_to_config(default_guidance=old)
