"""bench/llm_bridge.py on a tiny random bridge (a random 2-layer Llama with a byte-level BPE tokenizer trained here,
a tiny InternImage tower): every row is written, shares are in [0, 1], speeds are positive, the cold start of
``shusheng chat`` is measured; without a bridge the bench says how to make one."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOWER = {"tower": "internimage_test", "tower_args": {"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]},
         "tower_init": None, "num_image_tokens": 4, "image_size": 64}


def tiny_bridge(folder: Path) -> tuple[Path, Path]:
    """A saved random bridge over a tiny random Llama: ``(bridge folder, LM folder)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from shusheng.data import synthdrive as sd
    from shusheng.llm import LLMBridge

    texts = []
    for i in range(4):
        _, ann = sd.sample(sd.TRAIN_SEED, i, 64)
        texts += ann.captions + [q["question"] + " " + q["answer"] for q in ann.qa]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", bos_token="<|im_start|>")
    hf.chat_template = CHATML
    cfg = transformers.LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
                                   bos_token_id=hf.bos_token_id, tie_word_embeddings=True, initializer_range=0.3)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg)
    lm_dir = folder / "tiny-lm"
    lm.save_pretrained(lm_dir)
    hf.save_pretrained(lm_dir)
    bridge = LLMBridge({**TOWER, "lm": str(lm_dir)}, lm_model=lm, tokenizer=hf)
    return bridge.save_pretrained(folder / "bridge"), lm_dir


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_llm_bridge", ROOT / "bench" / "llm_bridge.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "reexec_with_bench_env", lambda memory=False: None)  # stay in this process
    return bench


def test_bench_writes_every_row_on_a_tiny_bridge(tmp_path, monkeypatch, capsys):
    bridge, lm_dir = tiny_bridge(tmp_path)
    bench = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(bridge), "--lm", str(lm_dir), "--n", "4", "--describe", "2",
                           "--questions-per-image", "12", "--prior-train", "10", "--answer-tokens", "4",
                           "--describe-tokens", "12", "--speed-tokens", "8", "--repeats", "1", "--threads", "1",
                           "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "out" / "llm_bridge.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    want = {"vqa_all", "vqa_seen", "vqa_heldout_wording", "vqa_heldout_cell", "form_consistency", "blind_all",
            "blind_seen", "blind_heldout_wording", "blind_heldout_cell", "prior_all", "prior_seen",
            "prior_heldout_wording", "prior_heldout_cell", "hallucination", "hallucinating_descriptions",
            "mentions_per_description", "ttft", "tps_batch1", "tps_batch8", "speedup_batch8", "tps_lm_text",
            "cold_start"} | {f"vqa_form_{f}" for f in ("open", "yesno", "either", "count", "exist", "negated")}
    assert set(rows) == want
    for r in rows.values():
        if r["unit"] == "share":
            assert isinstance(r["value"], float) and 0.0 <= r["value"] <= 1.0, r
        else:
            assert isinstance(r["value"], float) and r["value"] > 0, r
    # every issue-16 target is printed next to its number, judged
    for key in ("vqa_all", "vqa_heldout_wording", "blind_all", "hallucination", "ttft", "tps_batch1", "tps_batch8",
                "cold_start"):
        assert rows[key]["target"] and rows[key]["meets"] in ("yes", "no"), rows[key]
    assert rows["vqa_all"]["n"] == 4 * 12 and rows["hallucination"]["n"] >= 0
    assert "shusheng chat" in rows["cold_start"]["metric"]
    md = (tmp_path / "out" / "llm_bridge.md").read_text()
    assert md.count("\n") == len(rows) + 2 and "target (issue 16)" in md
    grid = json.loads((tmp_path / "out" / "llm_bridge_vqa_grid.json").read_text())["rows"]
    assert sum(r["n"] for r in grid) == 4 * 12
    assert result["meta"]["n_questions"] == 4 * 12 and len(result["meta"]["describe_examples"]) == 2
    assert "VQA accuracy" in capsys.readouterr().out


def test_normalize_answers(monkeypatch):
    bench = load_bench(monkeypatch)
    assert bench.normalize("Yes.") == "yes"
    assert bench.normalize("Two.") == bench.normalize("2") == "2"
    assert bench.normalize("The bus, car!") == "bus car" == bench.normalize("bus, car")
    assert bench.normalize("A speed limit 30 sign") == "speed limit 30 sign"
    assert bench.normalize(None) == ""


def test_bench_without_a_bridge_names_the_training_command(monkeypatch, capsys):
    from shusheng import weights

    def missing(name):
        raise weights.BundledWeightsNotFound(name)

    monkeypatch.setattr(weights, "bundled_path", missing)
    bench = load_bench(monkeypatch)
    assert bench.main([]) == 2
    assert "shusheng train bridge" in capsys.readouterr().err
    assert bench.main(["--model", str(ROOT / "no-such-bridge")]) == 2
    assert "not a bridge folder" in capsys.readouterr().err
    assert sys.modules.get("bench_llm_bridge") is None  # loaded as a file, not registered
