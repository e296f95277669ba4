"""shusheng.generation.pipelines.faithfulness: prompt facts, the decoder judge on real scenes, the Fréchet distance, and
bench/generation.py's real-scene baselines (and, on a tiny random pipeline, its generation part)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shusheng.data import ImageLoadError
from shusheng.data import synthdrive as sd
from shusheng.generation.pipelines import faithfulness as ff
from shusheng.generation.pipelines.faithfulness import Fact, prompt_facts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = json.loads((ROOT / "bench" / "generation_prompts.json").read_text())["prompts"]
N_SCENES = 16


def keys(text: str) -> list[tuple]:
    return sorted((f.key for f in prompt_facts(text)), key=str)


# --------------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", PROMPTS, ids=lambda it: it["prompt"][:40])
def test_prompt_facts_reads_the_facts_each_bench_prompt_lists(item):
    assert keys(item["prompt"]) == sorted((Fact.from_dict(f).key for f in item["facts"]), key=str)


def test_bench_prompts_cover_every_kind_and_are_not_synthdrive_captions():
    assert len(PROMPTS) >= 55
    assert {f["kind"] for it in PROMPTS for f in it["facts"]} == set(ff.FACT_KINDS)
    assert sum(1 for it in PROMPTS for f in it["facts"] if f.get("negated") or f.get("count") == 0) >= 10
    captions = {c.lower() for i in range(200) for c in sd.sample(sd.TRAIN_SEED, i, 32)[1].captions}
    assert not captions & {it["prompt"].lower() for it in PROMPTS}


@pytest.mark.parametrize("text, expected", [
    # counts as words and digits, plural and synonym nouns, adjectives in between
    ("Two parked red cars and 3 lorries.", [("count", "red car", 2, False), ("count", "truck", 3, False),
                                              ("vehicle", "red car", None, False), ("vehicle", "truck", None, False)]),
    ("a single grey coach", [("count", "silver bus", 1, False), ("vehicle", "silver bus", None, False)]),
    # negation: of a kind, of a total, of time and weather; "no" does not reach past a preposition
    ("No trucks and no fog, but three buses at night.",
     [("count", "bus", 3, False), ("time", "night", None, False), ("vehicle", "bus", None, False),
      ("vehicle", "truck", None, True), ("weather", "fog", None, True)]),
    ("zero vehicles", [("count", "vehicle", 0, False)]),
    ("no traffic at the traffic light", [("count", "vehicle", 0, False), ("light", "any", None, False)]),
    ("no cars at the red light", [("light", "red", None, False), ("vehicle", "car", None, True)]),
    ("It is not raining.", [("weather", "rain", None, True)]),
    ("There is no crosswalk and nobody is walking.", [("crosswalk", "crosswalk", None, True),
                                                     ("pedestrian", "any", None, True)]),
    ("no sign of rain", [("weather", "rain", None, True)]),
    # places of pedestrians; a pedestrian crossing is the crosswalk
    ("a woman crossing the road", [("pedestrian", "on crosswalk", None, False)]),
    ("two children on the pavement by a pedestrian crossing",
     [("count", "pedestrian on sidewalk", 2, False), ("crosswalk", "crosswalk", None, False),
      ("pedestrian", "on sidewalk", None, False)]),
    # a specific sign or light makes the generic one redundant; "dark blue" is a colour, not the night
    ("a speed limit 50 sign", [("sign", "speed_50", None, False)]),
    ("the signal is amber", [("light", "yellow", None, False)]),
    ("a dark blue car at dawn", [("time", "dusk", None, False), ("vehicle", "blue car", None, False)]),
    ("cloudless midday", [("time", "day", None, False), ("weather", "clear", None, False)]),
    ("a portrait of a cat", []),
])
def test_prompt_facts_on_tricky_wordings(text, expected):
    assert keys(text) == sorted(expected, key=str)


def test_facts_validate_print_and_round_trip():
    f = Fact("count", "red car", 2, text="two red cars")
    assert str(f) == "count: 2 red cars" and Fact.from_dict(f.to_dict()) == f
    facts = [Fact("light", "any", None, True), Fact("sign", "speed_30"), Fact("weather", "fog", None, True),
             Fact("pedestrian", "on crosswalk"), Fact("vehicle", "bus", None, True)]
    assert [f.expected for f in facts] == ["no traffic light", "speed limit 30 sign", "not fog",
                                           "pedestrian on crosswalk", "no bus"]
    with pytest.raises(ValueError, match="unknown fact kind"):
        Fact("colour", "red")
    with pytest.raises(ValueError, match="needs a number"):
        Fact("count", "car")
    with pytest.raises(ValueError, match="not a value"):
        Fact("time", "noon")
    with pytest.raises(ValueError, match="integer >= 0"):
        Fact("count", "car", -1)
    assert keys("a speed limit 40 sign") == [("sign", "speed_40", None, False)]  # not a SynthDrive limit: kept
    with pytest.raises(TypeError, match="string"):
        prompt_facts(None)


def test_fact_truth_follows_the_scene_attributes():
    anns = [sd.sample(sd.VAL_SEED, i, 32)[1] for i in range(N_SCENES)]
    own = [ff.fact_truth(f, a.attributes) for a in anns for c in a.captions for f in prompt_facts(c)]
    other = [ff.fact_truth(f, anns[(i + 1) % N_SCENES].attributes)
             for i, a in enumerate(anns) for f in prompt_facts(a.captions[0])]
    assert all(own) and len(own) > 100
    assert sum(other) / len(other) < 0.6


# --------------------------------------------------------------------------------------------------------
# The judge on real scenes
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checker():
    torch.manual_seed(0)
    return ff.FaithfulnessChecker.from_pretrained()


@pytest.fixture(scope="module")
def scenes():
    return ff.synthdrive_images(N_SCENES, sd.VAL_SEED)  # 64 x 64, like generated images


@pytest.fixture(scope="module")
def own_and_swapped(checker, scenes):
    images, anns = scenes
    own = [a.captions[0] for a in anns]
    swapped = [anns[(i + 1) % N_SCENES].captions[0] for i in range(N_SCENES)]
    return checker(images, own), checker(images, swapped)


def test_own_captions_mostly_hold_and_swapped_ones_far_less(own_and_swapped):
    own, swapped = own_and_swapped
    mean = lambda rs: float(np.mean([r.share for r in rs]))  # noqa: E731
    assert mean(own) >= mean(swapped) + 0.3
    by_kind = ff.shares_by_kind(own)
    # time of day and weather come from the decoder, which reads them from the sky and the haze
    assert by_kind["time"]["share"] >= 0.9 and by_kind["weather"]["share"] >= 0.9
    assert by_kind["all"]["n"] == sum(len(r.checks) for r in own)
    # strict: the facts of images the in-domain check rejects count as failing
    import dataclasses

    half = [dataclasses.replace(r, in_domain=False) if i % 2 else r for i, r in enumerate(own)]
    strict = ff.shares_by_kind(half, strict=True)["all"]
    kept = sum(bool(c.holds) for i, r in enumerate(own) if not i % 2 and r.in_domain is not False for c in r.checks)
    assert strict["n"] == by_kind["all"]["n"] and strict["holds"] == kept < by_kind["all"]["holds"]
    assert ff.shares_by_kind(half)["all"] == by_kind["all"]  # not strict: the domain is ignored


def test_verdicts_agree_with_the_annotations(own_and_swapped, scenes):
    _, anns = scenes
    pairs = [(c.holds, ff.fact_truth(c.fact, anns[i].attributes))
             for results in own_and_swapped for i, r in enumerate(results) for c in r.checks]
    on_true = [h for h, t in pairs if t]
    on_false = [not h for h, t in pairs if not t]
    assert len(on_true) >= 50 and len(on_false) >= 50
    # balanced accuracy: 0.5 for a judge that always (or never, or randomly) says "holds"
    assert (np.mean(on_true) + np.mean(on_false)) / 2 >= 0.75


def test_results_carry_questions_scores_evidence_and_the_domain_check(own_and_swapped):
    own, _ = own_and_swapped
    for r in own:
        assert r.in_domain in (True, False) and 0 < r.domain_score <= 1
        assert r.share == pytest.approx(np.mean([c.holds for c in r.checks]))
        for c in r.checks:
            assert c.question.endswith("?") and 0 <= c.score <= 1 and c.expected == c.fact.expected
            for b in c.evidence:
                x, y, w, h = b["box"]
                assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
    assert sum(bool(r.in_domain) for r in own) >= N_SCENES - 2
    d = own[0].to_dict()
    assert json.loads(json.dumps(d))["checks"][0]["fact"]["kind"] in ff.FACT_KINDS


def test_arrays_are_judged_like_images_and_bad_inputs_fail_clearly(checker, scenes, tmp_path):
    images, anns = scenes
    prompt = anns[0].captions[0]
    arr = np.asarray(images[0], dtype=np.float32) / 255.0  # what output_type="np" gives
    a, b = checker([arr, images[0]], [prompt, prompt])
    assert [c.observed for c in a.checks] == [c.observed for c in b.checks]
    assert checker(images[0], prompt)[0].prompt == prompt
    assert checker(images[0], "a portrait of a cat")[0].share is None  # nothing to check
    with pytest.raises(ValueError, match="one prompt per image"):
        checker(images[:2], [prompt])
    with pytest.raises(TypeError):
        checker(images[:1], [3])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ImageLoadError, match="image 1 of 2"):
        checker([images[0], bad], [prompt, prompt])


def test_ceiling_counts_every_caption_fact_once_and_none_are_false(checker):
    res = ff.ceiling(4, sd.VAL_SEED, checker=checker)
    assert res["false_facts"] == 0 and res["n_images"] == 4 and res["size"] == ff.GENERATED_SIZE
    per = res["per_kind"]
    assert per["all"]["n"] == sum(v["n"] for k, v in per.items() if k != "all")
    assert {"time", "weather", "vehicle"} <= set(per) and all(0 <= v["share"] <= 1 for v in per.values())
    with pytest.raises(ValueError, match="fixed test set"):
        ff.synthdrive_images(2, sd.TEST_SEED, start=sd.TEST_SIZE - 1)


# --------------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))  # correlated features
    assert ff.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(a, rowvar=False)))
    shift = rng.normal(size=12)
    assert ff.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_distance_equals_the_closed_form_for_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.0
    b = 0.5 * rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) - 2.0
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed = float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a + s_b - 2 * scipy_linalg.sqrtm(s_a @ s_b).real))
    assert ff.frechet_distance(a, b) == pytest.approx(closed, rel=1e-6)
    assert ff.frechet_distance(b, a) == pytest.approx(closed, rel=1e-6)
    # scaling a set by s scales its covariance by s^2: |mu (1 - s)|^2 + tr(S) (1 - s)^2
    s = 3.0
    assert ff.frechet_distance(a, s * a) == pytest.approx(
        float(mu_a @ mu_a) * (1 - s) ** 2 + np.trace(s_a) * (1 - s) ** 2, rel=1e-6)
    for x, y in ((a, b[:, :5]), (a[:1], b), (a, np.full_like(b, np.nan))):
        with pytest.raises(ValueError):
            ff.frechet_distance(x, y)


def test_embeddings_separate_scenes_from_noise(scenes):
    images, _ = scenes
    other, _ = ff.synthdrive_images(N_SCENES, sd.TRAIN_SEED)
    noise = [np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8) for k in range(N_SCENES)]
    e_scenes, e_other, e_noise = (ff.embed_images(x) for x in (images, other, noise))
    assert e_scenes.shape == (N_SCENES, 384) and np.allclose(np.linalg.norm(e_scenes, axis=1), 1, atol=1e-3)
    assert ff.frechet_distance(e_scenes, e_other) < 0.5 * ff.frechet_distance(e_scenes, e_noise)


# --------------------------------------------------------------------------------------------------------
# bench/generation.py
# --------------------------------------------------------------------------------------------------------

def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "bench" / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "reexec_with_bench_env", lambda memory=False: None)  # stay in this process
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored after the test
    return bench


def _rows(path: Path) -> dict:
    return {r["key"]: r for r in json.loads(path.read_text())["rows"]}


def test_bench_ceiling_only_reports_the_ceiling_and_the_frechet_floor(tmp_path, monkeypatch, capsys):
    bench = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--ceiling-only", "--n", "4", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = _rows(tmp_path / "generation_ceiling.json")
    assert {"faith_time", "faith_weather", "faith_all", "fd_floor", "in_domain"} <= set(rows)
    assert rows["faith_time"]["target"] == ">= 0.9" and 0 <= rows["faith_all"]["value"] <= 1
    assert rows["fd_floor"]["value"] > 0 and "ceiling" in capsys.readouterr().out


def test_bench_without_a_model_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    bench = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(tmp_path / "missing"), "--threads", "1", "--out", str(tmp_path)]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "not a folder" in capsys.readouterr().err


def test_bench_generation_part_on_a_tiny_random_pipeline(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from shusheng.generation import Text2ImagePipeline, UNetConfig, make_unet

    torch.manual_seed(0)
    unet = make_unet(UNetConfig(sample_size=16, block_out_channels=(8, 16), cross_attention_levels=1,
                                attention_heads=2, norm_num_groups=4))
    pipe = Text2ImagePipeline(unet, DDIMScheduler(num_train_timesteps=100), text_encoder_ref="all-MiniLM-L6-v2")
    pipe.save_pretrained(tmp_path / "t2i")
    bench = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(tmp_path / "t2i"), "--max-prompts", "3", "--seeds", "2", "--steps", "2",
                           "--n", "4", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "out" / "generation.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert {"faith_time", "faith_all", "in_domain", "fd", "speed_one", "speed_batch8", "speed_batch_ratio"} <= set(rows)
    assert rows["faith_all"]["n"] == sum(len(it["facts"]) for it in PROMPTS[:3]) * 2
    assert 0 <= rows["faith_all"]["value"] <= 1 and rows["faith_time"]["real"] != ""
    assert rows["fd"]["value"] > 0 and rows["speed_one"]["value"] > 0
    assert rows["speed_one"]["meets"] in ("yes", "no") and data["meta"]["size"] == 16
    assert len(data["meta"]["per_prompt"]) == 3 and not math.isnan(rows["fd"]["real"])
