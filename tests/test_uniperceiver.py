"""Unified decoder: masks, cached vs reference decoding, beam = greedy, shared weights, overfitting, persistence,
pipelines, CLI and bad inputs. Tiny random components only (seconds on a CPU)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shusheng.uniperceiver.decoding import beam_search, generate, greedy_decode, reference_decode  # noqa: E402
from shusheng.uniperceiver.masks import prefix_mask, two_stream_mask  # noqa: E402
from shusheng.uniperceiver.model import UniPerceiver  # noqa: E402
from shusheng.uniperceiver.tokenizers import TextTokenizer  # noqa: E402

CAPTIONS = [
    "a red car at night.", "two blue buses in the rain.", "a yellow truck on a foggy road.",
    "no vehicles on a sunny street.", "a green light and a stop sign.", "three people on the crosswalk.",
    "a white car and a black truck.", "an orange bus at dusk.",
]
ANSWERS = ["yes", "no", "red", "green", "blue, red", "2"]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer()


def tiny_model(tok, seed: int = 0, **kw) -> UniPerceiver:
    torch.manual_seed(seed)
    vocab = sorted({i for ids in tok.encode(CAPTIONS + ANSWERS) for i in ids} | {tok.eos_id})
    args = dict(backbone="internimage_test", backbone_args={"channels": 8}, image_size=64, image_grid=2,
                d_model=64, n_heads=4, n_layers=2, norm_first=True, text_init=None, freeze_word_embeddings=False,
                max_text_len=24, target_vocab=vocab, answers=ANSWERS,
                class_names={"time": ["daytime", "night"]}, vocab_size=tok.vocab_size)
    args.update(kw)
    m = UniPerceiver(args, tokenizer=tok)
    with torch.no_grad():  # sharper distributions than at init, so decoding choices are far from ties
        for s in m.logit_scale.values():
            s.fill_(math.log(60.0))
    return m


def images(n: int = 8, size: int = 64) -> torch.Tensor:
    """``n`` <= 8 noisy images around the 8 corners of the colour cube (far apart from each other)."""
    g = torch.Generator().manual_seed(1)
    corners = torch.tensor([[(k >> b) & 1 for b in range(3)] for k in range(8)], dtype=torch.float32) * 3 - 1.5
    return corners[:n, :, None, None] + 0.3 * torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------------- masks

def test_two_stream_mask_invariants():
    p, lw = 5, 4
    prefix_valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    word_valid = torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    m = two_stream_mask(prefix_valid, word_valid, lw)
    assert m.shape == (2, p + 2 * lw, p + 2 * lw)
    w0, s0 = p, p + lw
    for b in range(2):
        # prefix never sees text or slots
        assert not m[b, :p, p:].any()
        for i in range(lw):
            for j in range(lw):
                # word i sees words j <= i (valid); slot i sees words j < i and never another slot
                assert m[b, w0 + i, w0 + j] == (j <= i and bool(word_valid[b, j]))
                assert m[b, s0 + i, w0 + j] == (j < i and bool(word_valid[b, j]))
                assert m[b, s0 + i, s0 + j] == (i == j)
                assert not m[b, w0 + i, s0 + j]  # words never see slots
        # pads are never keys
        pads = torch.cat([~prefix_valid[b], ~word_valid[b], torch.zeros(lw, dtype=torch.bool)])
        assert not m[b][:, pads].any()
        # every row attends to something (SPE at 0 at least)
        assert m[b].any(-1).all() and m[b, :, 0].all()


def test_prefix_mask_pads_never_keys():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    m = prefix_mask(valid)
    assert m.shape == (2, 3, 3)
    assert torch.equal(m[0], torch.tensor([[1, 1, 0]] * 3, dtype=torch.bool))
    assert m.any(-1).all()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_read_out_computes_the_full_pass_at_its_positions(norm_first):
    from shusheng.uniperceiver.model import Encoder

    torch.manual_seed(0)
    enc = Encoder(32, 4, 3, norm_first=norm_first).eval()
    x = torch.randn(3, 7, 32)
    valid = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], dtype=torch.bool)
    index = torch.tensor([6, 4, 0])
    with torch.no_grad():
        full, _ = enc(x, prefix_mask(valid))
        at = enc.forward_at(x, prefix_mask(valid), index)
    assert at.shape == (3, 32)
    torch.testing.assert_close(at, full[torch.arange(3), index], atol=1e-5, rtol=1e-5)
    # a different position per row is read, not the same one for all
    assert not torch.allclose(at, full[:, 0], atol=1e-3)


# ---------------------------------------------------------------------------------------------------- decoding

@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok).eval()


def test_cached_equals_reference_decoding(model):
    x = images(3)
    with torch.no_grad():
        vf = model.vocab_features()
        pre = model.prefix(model.image_tokens(x))
        g = greedy_decode(model, pre, 10, vocab_feats=vf)
        r = reference_decode(model, pre, 10, vocab_feats=vf)
        assert g.tokens == r.tokens
        torch.testing.assert_close(g.logprob, r.logprob, rtol=1e-4, atol=1e-4)
        # with a question in the prefix (open VQA), padded questions of different lengths
        q = model.tokenizer.encode(["is there a red car?", "what?", "how many buses are in the rain?"])
        pq = model.prefix(model.image_tokens(x), q, spe_after_text=True)
        g = greedy_decode(model, pq, 6, "vqa", vf)
        r = reference_decode(model, pq, 6, "vqa", vf)
        assert g.tokens == r.tokens
        torch.testing.assert_close(g.logprob, r.logprob, rtol=1e-4, atol=1e-4)


def test_beam_one_is_greedy_and_beams_are_scored(model):
    x = images(3)
    with torch.no_grad():
        pre = model.prefix(model.image_tokens(x))
        g = greedy_decode(model, pre, 8)
        b1 = beam_search(model, pre, num_beams=1, max_len=8)
        assert b1.tokens == g.tokens
        torch.testing.assert_close(b1.logprob, g.logprob, rtol=1e-5, atol=1e-5)
        b3 = generate(model, pre, 8, num_beams=3)
        assert len(b3.tokens) == 3 and torch.isfinite(b3.logprob).all()
    with pytest.raises(ValueError):
        generate(model, pre, 8, num_beams=2, use_cache=False)


# ---------------------------------------------------------------------------------------------------- sharing

def test_inputs_and_targets_share_the_encoder(tok):
    m = tiny_model(tok).eval()
    x = images(2)
    with torch.no_grad():
        zi, zt, zv = m.embed_image(x), m.embed_text(["a red car"]), m.vocab_features()
        torch.testing.assert_close(zi.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(zt.norm(dim=-1), torch.ones(1))
        m.encoder.layers[0].fc1.weight.add_(0.2 * torch.randn_like(m.encoder.layers[0].fc1.weight))  # the one encoder
        assert not torch.allclose(m.embed_image(x), zi)
        assert not torch.allclose(m.embed_text(["a red car"]), zt)
        assert not torch.allclose(m.vocab_features(), zv)  # "full" targets go through it too
    encoders = [mod for mod in m.modules() if type(mod).__name__ == "Encoder"]
    assert len(encoders) == 1


def test_minilm_layers_match_transformers(tok):
    transformers = pytest.importorskip("transformers")
    from shusheng.text_encoders import minilm_path

    m = UniPerceiver(backbone="internimage_test", backbone_args={"channels": 8}, image_size=64, n_layers=1,
                     answers=["yes"], tokenizer=tok)
    bert = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    ids = torch.tensor([tok.encode(["is the traffic light red?"])[0]])
    pos = torch.arange(1, ids.shape[1] + 1)[None]
    with torch.no_grad():
        ours = m.text(ids, pos)
        ref = bert.embeddings(input_ids=ids, position_ids=pos, token_type_ids=torch.zeros_like(ids))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        h, _ = m.encoder(ours, torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool))
        out = bert.encoder.layer[0](ref)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(h, out, rtol=1e-4, atol=1e-4)


def test_decode_gives_back_words_with_inner_punctuation(tok):
    # WordPiece splits "give-way" into three pieces; decoding must not leave "give - way", which caption metrics
    # (and readers) take for two words
    for text in ["a rain-soaked street with a give-way sign and a speed limit of 30 km/h; the driver's lane.",
                 "at 5:30 a t-junction (left) with well-lit 3-lane roads: two cars."]:
        assert tok.decode(tok.encode([text], eos=True)[0]) == text
    assert tok.decode(tok.encode(["red, green"])[0]) == "red, green"


# ---------------------------------------------------------------------------------------------------- training

def test_overfits_eight_captions_and_reproduces_them(tok):
    # trains until greedy decoding gives back all eight captions, checked every 25 steps once the loss is low; a
    # fixed step budget was flaky (a near-tie left one caption one word off on a loaded machine)
    m = tiny_model(tok, seed=0).train()
    x = images(8)
    want = [c.lower() for c in CAPTIONS]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    texts, reproduced_at = [], None
    for step in range(1, 601):
        loss = m.losses(x, CAPTIONS)["caption"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 and loss.item() < 0.1:
            m.eval()
            with torch.no_grad():
                gen = greedy_decode(m, m.prefix(m.image_tokens(x)), 16)
            m.train()
            texts = [m.tokenizer.decode(t) for t in gen.tokens]
            if texts == want:
                reproduced_at = step
                break
    assert reproduced_at is not None, f"caption loss {loss.item():.3f} after {step} steps; decodes {texts}"


def test_multitask_losses_are_finite_and_reach_every_part(tok):
    m = tiny_model(tok).train()
    x = images(4)
    out = m.losses(x, CAPTIONS[:4], [["is it red?"], ["how many?", "is it night?"], ["what?"], ["yes?"]],
                   [["red"], ["2", "no"], ["blue, red"], ["yes"]], CAPTIONS[4:8],
                   {"time": [0, 1, 1, 0]})
    assert set(out) >= {"caption", "vqa", "vqa_gen", "retrieval", "cls"}
    total = sum(out[k] for k in ("caption", "vqa", "vqa_gen", "retrieval", "cls"))
    assert torch.isfinite(total)
    total.backward()
    for name in ("image.backbone.patch_embed.conv1.weight", "encoder.layers.0.q.weight", "head.proj.weight",
                 "text.spe", "logit_scale.vqa", "logit_scale.retrieval", "logit_scale.cls"):
        p = dict(m.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------- persistence

def test_save_load_round_trip(tok, tmp_path):
    m = tiny_model(tok).eval()
    m.save_pretrained(tmp_path / "m")
    m2 = UniPerceiver.from_pretrained(tmp_path / "m").eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(m.embed_image(x), m2.embed_image(x))
        assert torch.equal(m.vqa_match(x, ["is it red?", "what?"]), m2.vqa_match(x, ["is it red?", "what?"]))
        pre, pre2 = m.prefix(m.image_tokens(x)), m2.prefix(m2.image_tokens(x))
        assert greedy_decode(m, pre, 8).tokens == greedy_decode(m2, pre2, 8).tokens
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "uniperceiver" and cfg["config"]["image_size"] == 64
    assert cfg["preprocess"]["size"] == 64 and cfg["preprocess"]["resize"] == "squash"
    # composite: the backbone lives in its own folder and loads alone
    from shusheng.backbone import InternImage

    assert cfg["components"] == {"backbone": "image.backbone"}
    bb = InternImage.from_pretrained(tmp_path / "m" / "backbone").eval()
    with torch.no_grad():
        assert torch.equal(bb.forward_features(x), m.image.backbone.forward_features(x))


def test_frozen_minilm_embeddings_are_not_written(tok, tmp_path):
    from safetensors import safe_open

    m = UniPerceiver(backbone="internimage_test", backbone_args={"channels": 8}, image_size=64, n_layers=1,
                     answers=["yes", "no"], tokenizer=tok).eval()
    m.save_pretrained(tmp_path / "m", dtype=torch.float16)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "text.word.weight" not in keys and f.get_tensor("head.proj.weight").dtype == torch.float16
    m2 = UniPerceiver.from_pretrained(tmp_path / "m")
    assert torch.equal(m2.text.word.weight, m.text.word.weight)
    assert not m2.text.word.weight.requires_grad


# ---------------------------------------------------------------------------------------------------- pipelines, CLI

@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("up") / "model"
    tiny_model(tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(2):
        arr = (np.random.default_rng(i).random((80, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
        paths.append(str(d / f"im{i}.png"))
    (d / "bad.png").write_text("this is not an image")
    paths.append(str(d / "bad.png"))
    return paths


def test_pipelines(saved, image_files):
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAOutput, VQAPipeline

    cap = CaptionPipeline.from_pretrained(saved)
    out = cap(image_files[:2], max_new_tokens=8, num_beams=2)
    assert len(out.captions) == 2 and all(0 < s <= 1 for s in out.scores)
    vqa = VQAPipeline(cap.model)
    res = vqa(image_files[:2], "is there a red car?", top_k=3)
    assert isinstance(res, VQAOutput) and all(a in ANSWERS for a in res.answers)
    assert all(len(k) == 3 and abs(k[0][1] - s) < 1e-6 for k, s in zip(res.top_k, res.scores))
    gen = vqa(image_files[:2], ["what color?", "how many?"], mode="generate", max_new_tokens=4)
    assert gen.mode == "generate" and len(gen.answers) == 2


def test_bad_inputs_give_clear_errors(saved, image_files):
    from shusheng.data import ImageLoadError
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline

    vqa = VQAPipeline.from_pretrained(saved)
    with pytest.raises(ValueError, match="question is empty"):
        vqa(image_files[:1], "   ")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        vqa(image_files[2:], "is it red?", on_error="raise")
    with pytest.raises(ValueError, match="one question for all images or one per image"):
        vqa(image_files[:2], ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match="mode"):
        vqa(image_files[:1], "is it red?", mode="guess")
    with pytest.raises(ImageLoadError):
        CaptionPipeline(vqa.model)(image_files[2], on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        CaptionPipeline(vqa.model)(image_files[0], on_error="ignore")
    with pytest.raises(ValueError, match="no images"):
        CaptionPipeline(vqa.model)([])
    with pytest.raises(FileNotFoundError):
        CaptionPipeline.from_pretrained(saved.parent / "missing")


def test_a_bad_file_fails_only_its_own_item(saved, image_files):
    """good, bad, good in batches of 2: both good images get the results they get alone; the bad one an error."""
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline

    cap = CaptionPipeline.from_pretrained(saved)
    files = [image_files[0], image_files[2], image_files[1]]
    out = cap(files, max_new_tokens=6, batch_size=2)
    alone = cap([image_files[0], image_files[1]], max_new_tokens=6, batch_size=1)
    assert out.captions[0] == alone.captions[0] and out.captions[2] == alone.captions[1]
    assert out.captions[1] is None and out.scores[1] is None and out.in_domain[1] is None
    assert out.errors[0] is None and out.errors[2] is None and "not a recognised image" in out.errors[1]
    assert out.in_domain[0] is True and math.isnan(out.domain_score[0])  # this folder has no domain check
    res = VQAPipeline(cap.model)(files, ["a?", "b?", "is it red?"], batch_size=2)
    assert res.answers[1] is None and res.errors[1] and res.answers[0] in ANSWERS and res.answers[2] in ANSWERS


def test_cli_caption_and_ask_json(saved, image_files, capsys):
    from shusheng.cli import main

    assert main(["caption", *image_files[:2], "--model", str(saved), "--json", "--max-tokens", "6"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == image_files[:2]
    assert all(isinstance(r["caption"], str) and 0 < r["score"] <= 1 for r in rows)
    assert main(["ask", *image_files[:2], "-q", "is it red?", "--model", str(saved), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["answer"] in ANSWERS and 0 < r["score"] <= 1 for r in rows)
    assert main(["ask", image_files[0], "-q", " ", "--model", str(saved)]) == 2
    assert "question is empty" in capsys.readouterr().err
    # a bad file fails its own row; the good ones are still captioned; exit status 1
    assert main(["caption", image_files[0], image_files[2], image_files[1], "--model", str(saved), "--json",
                 "--max-tokens", "6"]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert isinstance(rows[0]["caption"], str) and isinstance(rows[2]["caption"], str)
    assert rows[1]["caption"] is None and "cannot load image" in rows[1]["error"]
    assert "cannot load image" in captured.err
    assert all(r.get("in_domain") in (True, None) for r in rows)


def test_gradio_tab_builds_and_answers(saved, image_files):
    gr = pytest.importorskip("gradio")
    from PIL import Image

    from shusheng.apps.tabs.caption_vqa import answer_question, caption_and_vqa_tab, caption_image
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline

    cap = CaptionPipeline.from_pretrained(saved)
    vqa = VQAPipeline(cap.model)
    sample = Image.open(image_files[0]).convert("RGB")
    with gr.Blocks() as demo:
        tab = caption_and_vqa_tab(cap, vqa, samples=[sample])
    assert isinstance(tab, gr.Tab) and isinstance(demo, gr.Blocks)
    assert "score" in caption_image(cap, sample, 1)
    line, table = answer_question(vqa, sample, "is it red?")
    assert "score" in line and len(table) == 5 and table[0][0] in ANSWERS
    assert answer_question(vqa, sample, "  ")[0].startswith("Type a question")
    assert caption_image(cap, None).startswith("Upload")
