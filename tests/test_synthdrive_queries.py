"""SynthDrive attribute classes, targets, training texts and query ground truth (`shusheng.data`), the rendered-split
cache, and mini-clip's evaluation (`shusheng.miniclip.evaluation`). Layer rules: tests/test_layers.py."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import torch

from shusheng.data import synthdrive as sd
from shusheng.data import synthdrive_queries as q
from shusheng.data.synthdrive_render import COLORS, LIGHTS, SIGNS, TIMES, VEHICLE_TYPES, WEATHERS

ROOT = Path(__file__).resolve().parents[1]


def _scenes(n: int = 60, seed: int = 3, size: int = 96):
    return [sd.sample(seed, i, size)[1] for i in range(n)]


def test_attribute_classes_use_the_render_vocabulary():
    assert {g: tuple(m) for g, m in q.ATTRIBUTE_CLASSES.items()} == {
        "time": TIMES, "weather": WEATHERS, "light": LIGHTS, "sign": SIGNS}
    for mapping in q.ATTRIBUTE_CLASSES.values():
        assert len(set(mapping.values())) == len(mapping)
    a = {"time": "dusk", "weather": "fog", "light": "none", "sign": "speed_50"}
    assert q.attribute_labels(a) == {"time": 1, "weather": 2, "light": 3, "sign": 3}


def test_answers_cover_every_generated_answer():
    answers = q.synthdrive_answers()
    assert len(answers) == len(set(answers))
    seen = {qa["answer"] for ann in _scenes() for qa in ann.qa}
    assert seen <= set(answers), seen - set(answers)


def test_targets_and_tags_state_the_attributes():
    for ann in _scenes():
        a = ann.attributes
        t = q.attribute_targets(a)
        assert len(t) == 61 and set(t) <= {0.0, 1.0}
        assert t[TIMES.index(a["time"])] == 1 and sum(t[:3]) == 1
        assert t[3 + WEATHERS.index(a["weather"])] == 1 and sum(t[3:6]) == 1
        ct = t[17:17 + len(COLORS) * len(VEHICLE_TYPES)]
        want = {(v["color"], v["type"]) for v in a["vehicles"]}
        assert {(c, vt) for k, (c, vt) in enumerate((c, vt) for c in COLORS for vt in VEHICLE_TYPES) if ct[k]} == want
        assert t[-1] == float(not a["pedestrians"])
        tags = q.attribute_tags(a)
        assert set(tags) == {g for g, _ in q.TAG_GROUPS} and len(tags) == len(q.TAG_GROUPS)
        assert all(0 <= tags[g] < n for g, n in q.TAG_GROUPS)
        assert tags["n_car"] == min(5, sum(v["type"] == "car" for v in a["vehicles"]))


def test_training_texts_pick_the_first_caption_and_true_phrases():
    anns = _scenes(12)
    attrs, caps = [a.attributes for a in anns], [a.captions for a in anns]
    texts, cap_ids, phr_ids = q.training_texts(attrs, caps)
    assert (texts, cap_ids, phr_ids) == q.training_texts(attrs, caps)  # deterministic
    assert len(texts) == len(set(texts))
    for i, (c, p) in enumerate(zip(cap_ids, phr_ids)):
        assert len(c) == 2 and texts[c[0]] == caps[i][0] and texts[c[1]] in caps[i][1:]
        rng = np.random.default_rng([0, 7, i])
        rng.permutation(np.arange(1, len(caps[i])))  # the caption draw comes first
        assert [texts[j] for j in p] == q.attribute_phrases(attrs[i], rng, 6)
    assert q.training_texts(attrs, caps, start=5)[0] != texts  # the scene index seeds the draws
    texts3, cap3, phr3 = q.training_texts(attrs, caps, seed=1, captions_per_image=3, phrases_per_image=2)
    assert all(len(c) == 3 for c in cap3) and all(len(p) <= 2 for p in phr3)


def test_training_text_defaults_are_the_clip_recipe():
    """bench/retrieval_quality.py rebuilds the training vocabulary from these defaults (it may not import train)."""
    import importlib.util

    from shusheng.train.clip import ClipConfig

    d = ClipConfig()
    params = inspect.signature(q.training_texts).parameters
    assert (params["seed"].default, params["captions_per_image"].default, params["phrases_per_image"].default) == (
        d.seed, d.captions_per_image, d.phrases_per_image)
    spec = importlib.util.spec_from_file_location("bench_retrieval_quality", ROOT / "bench" / "retrieval_quality.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert bench.TRAIN_IMAGE_SIZE == d.image_size and d.train_seed == sd.TRAIN_SEED


def test_queries_and_relevance():
    assert len(q.PLAIN_QUERIES) == len(q.PARAPHRASE_QUERIES) == 50
    assert len({x.text for x in q.PLAIN_QUERIES + q.PARAPHRASE_QUERIES}) == 100
    attrs = [a.attributes for a in _scenes(80)]
    rel = q.relevance_matrix(q.PLAIN_QUERIES, attrs)
    assert rel.shape == (50, 80) and rel.dtype == bool and rel.any(axis=1).sum() >= 25
    np.testing.assert_array_equal(rel, q.relevance_matrix(q.PARAPHRASE_QUERIES, attrs))  # same ground truth
    for a, r in zip(attrs, rel[q.PLAIN_QUERIES.index(next(x for x in q.PLAIN_QUERIES if x.text == "a stop sign"))]):
        assert r == (a["sign"] == "stop")


def test_evaluate_queries_precision_and_dense_groups():
    from shusheng.data.synthdrive import DENSE_LABELS
    from shusheng.miniclip.evaluation import DENSE_GROUPS, evaluate_queries

    queries = (q.Query("night", lambda a: a["time"] == "night"), q.Query("fog", lambda a: a["weather"] == "fog"))
    attrs = [{"time": t, "weather": w} for t, w in
             [("night", "fog"), ("day", "fog"), ("night", "clear"), ("day", "clear")]]
    image_emb = np.eye(4, dtype=np.float32)
    query_emb = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.9, 0.8]], dtype=np.float32)  # 2nd ranks 2 wrong ones
    res = evaluate_queries(image_emb, query_emb, queries, attrs, k=2)
    assert [r["p_at_k"] for r in res["per_query"]] == [0.5, 0.0] and res["p_at_k"] == 0.25 and res["k"] == 2
    assert [r["n_relevant"] for r in res["per_query"]] == [2, 2]
    covered = sorted(i for a, b in DENSE_GROUPS.values() for i in range(a, b))
    assert covered == list(range(len(DENSE_LABELS)))
    assert DENSE_LABELS[DENSE_GROUPS["traffic light"][0]].startswith("light ")


def test_split_cache_renders_once(tmp_path, monkeypatch):
    from shusheng.data.synthdrive_cache import load_split_cache

    split = load_split_cache(tmp_path, seed=4, n=3, size=32, start=2, progress=False)
    assert split.images.shape == (3, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.shape == (3, 32, 32) and (split.seed, split.start) == (4, 2)
    img, ann = sd.sample(4, 3, 32)
    assert torch.equal(split.images[1], torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert split.attributes[1] == ann.attributes and split.captions[1] == ann.captions

    def no_render(*a, **k):
        raise AssertionError("rendered again")

    monkeypatch.setattr(sd, "sample", no_render)
    again = load_split_cache(tmp_path, seed=4, n=3, size=32, start=2, progress=False)
    assert torch.equal(again.images, split.images) and again.attributes == split.attributes
