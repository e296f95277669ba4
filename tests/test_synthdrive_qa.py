"""The SynthDrive question grid: answers vs attributes, answer forms, disjoint wording pools, held-out cells."""

from __future__ import annotations

import functools
import itertools
import re
import string
from collections import Counter

import numpy as np
import pytest

from shusheng.data import synthdrive as sd
from shusheng.data import synthdrive_qa as g
from shusheng.data.synthdrive_queries import synthdrive_answers
from shusheng.data.synthdrive_text import _SLOTS, _TEMPLATES, _TYPE_PLURAL

N = 160  # scenes (attributes only matter; 64 px renders are fast)


@functools.cache
def _scenes():
    return [sd.sample(21, i, 64)[1].attributes for i in range(N)]


def _stop(a) -> bool:
    return a["light"] == "red" or a["sign"] == "stop" or any(p["on_crosswalk"] for p in a["pedestrians"])


def _expected(q: dict, a: dict) -> str:
    """An independent reading of the grid's conventions, written out case by case."""
    f, m, p = q["type"], q["form"], q["params"]
    vs, peds = a["vehicles"], a["pedestrians"]
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if (f, m) == ("stop", "yesno"):
        return yn(_stop(a) == p["polarity"])
    if (f, m) == ("stop", "negated"):
        return yn(not _stop(a))
    if (f, m) == ("stop", "either"):
        return "stop" if _stop(a) else "go"
    if (f, m) == ("weather", "yesno"):
        return yn(a["weather"] == p["value"])
    if (f, m) == ("weather", "negated"):
        return yn(a["weather"] != p["value"])
    if (f, m) in (("time", "either"), ("weather", "either"), ("light", "either")):
        return a[f]
    if (f, m) == ("light", "negated"):
        return yn(a["light"] == "none")
    if (f, m) == ("sign", "negated"):
        return yn(a["sign"] == "none")
    if (f, m) == ("speed_limit", "open"):
        return {"speed_30": "30", "speed_50": "50", "speed_80": "80"}.get(a["sign"], "none")
    if (f, m) == ("crosswalk", "negated"):
        return yn(not a["crosswalk"])
    if (f, m) == ("pedestrians", "count"):
        return str(len(peds))
    if (f, m) == ("pedestrian_location", "count"):
        return str(sum(x["on_crosswalk"] == (p["place"] == "crosswalk") for x in peds))
    if (f, m) == ("pedestrian_location", "negated"):
        return yn(not any(x["on_crosswalk"] == (p["place"] == "crosswalk") for x in peds))
    if (f, m) == ("vehicle_count", "count"):
        return str(len([v for v in vs if p["vehicle_type"] in (None, v["type"])]))
    if (f, m) == ("vehicle_count", "negated"):
        return yn(not vs)
    if (f, m) == ("vehicle_types", "open"):
        return ", ".join(sorted({v["type"] for v in vs})) or "none"
    if (f, m) == ("vehicle_types", "exist"):
        return yn(any(v["type"] == p["vehicle_type"] for v in vs))
    if (f, m) == ("color_of_type", "count"):
        return str(sum(v["type"] == p["vehicle_type"] and v["color"] == p["color"] for v in vs))
    if (f, m) == ("color_of_type", "either"):
        return next(v["color"] for v in vs if v["type"] == p["vehicle_type"])
    if (f, m) == ("nearest_vehicle", "open"):
        if not vs:
            return "none"
        v = max(vs, key=lambda v: (v["box"][1] + v["box"][3], v["box"][2] * v["box"][3]))  # ties: the larger
        return f"{v['color']} {v['type']}"
    return None  # not re-derived independently here (grid_answer's own re-derivation is checked below)


def _questions(pool="train", cells=g.CELLS, seed=0):
    rng = np.random.default_rng(seed)
    return [(q, a) for a in _scenes() for q in g.grid_questions(a, rng, pool, cells)]


def test_every_cell_is_asked_and_answers_follow_the_attributes():
    qs = _questions()
    asked = Counter(f'{q["type"]}/{q["form"]}' for q, _ in qs)
    assert set(asked) == {c.name for c in g.CELLS}
    assert len(g.CELLS) >= 50 and set(g.FORMS) == {c.form for c in g.CELLS}
    known = set(synthdrive_answers())
    checked = 0
    for q, a in qs:
        assert q["answer"] == g.grid_answer(q["type"], q["form"], a, **q["params"])
        assert q["answer"] in known, q
        want = _expected(q, a)
        if want is not None:
            assert q["answer"] == want, q
            checked += 1
    assert checked > N * 15


def test_answers_take_the_form_of_the_question():
    for q, _ in _questions("test"):
        assert g.answer_matches_form(q["type"], q["form"], q["params"], q["answer"]), q
        if q["form"] in g.YES_NO_FORMS:
            assert q["answer"] in ("yes", "no")
        elif q["form"] == "either":
            assert q["answer"] in q["params"]["options"] and 2 <= len(q["params"]["options"]) <= 3
            assert len(set(q["params"]["options"])) == len(q["params"]["options"])
        elif q["form"] == "count":
            assert q["answer"].isdigit()
    # the judge of form consistency rejects answers of another form
    assert not g.answer_matches_form("weather", "yesno", {"value": "rain"}, "clear")
    assert not g.answer_matches_form("time", "either", {"options": ["day", "night"]}, "dusk")
    assert not g.answer_matches_form("pedestrians", "count", {}, "yes")
    assert not g.answer_matches_form("weather", "open", {}, "no")
    assert not g.answer_matches_form("light", "open", {}, "3")
    assert g.answer_matches_form("speed_limit", "open", {}, "50")
    assert not g.answer_matches_form("speed_limit", "open", {}, "yield")


def test_yes_no_questions_are_balanced_and_both_polarities_of_stop_are_asked():
    by_cell = {}
    for q, _ in _questions(seed=1):
        by_cell.setdefault((q["type"], q["form"]), Counter())[q["answer"]] += 1
    for (f, m), c in by_cell.items():
        if m == "yesno":
            share = c["yes"] / (c["yes"] + c["no"])
            assert 0.15 < share < 0.85, (f, m, c)  # asked about true and false values alike (when one exists)
    stops = [q for q, _ in _questions(seed=2) if (q["type"], q["form"]) == ("stop", "yesno")]
    assert {q["params"]["polarity"] for q in stops} == {True, False}
    # "can we go?" is answered the other way round from "should we stop?" on the same scene
    a = next(a for a in _scenes() if _stop(a))
    rng = np.random.default_rng(0)
    got = {}
    while len(got) < 2:
        q = g.grid_question(g.Cell("stop", "yesno"), a, rng)
        got[q["params"]["polarity"]] = q["answer"]
    assert got == {True: "yes", False: "no"}


def _norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", s.lower()))


def _expand(template: str) -> set[str]:
    """Every filling of a template's slots (per-cell slots get every value they can take)."""
    slots = dict(_SLOTS)
    slots.update(vt=("car", "truck", "lorry", "bus", "coach"), vts=tuple(w for ws in _TYPE_PLURAL.values() for w in ws),
                 color=("red", "blue"), c=("red",), place=("crosswalk", "sidewalk", "zebra crossing", "pavement"),
                 n=("two",), v=("V",), opts=("A or B",))
    slots["vehicles"] = tuple(slots["vehicles"]) + slots["vts"]
    names = [n for _, n, _, _ in string.Formatter().parse(template) if n]
    out = set()
    for values in itertools.product(*(slots[n] for n in names)):
        out.add(_norm(template.format(**dict(zip(names, values)))))
    return out


def test_train_and_test_wordings_are_disjoint_pools():
    for cell in g.CELLS:
        params = [{}] if (cell.fact, cell.form) not in (("weather", "yesno"), ("stop", "yesno")) else (
            [{"value": v} for v in ("rain", "fog", "clear")] + [{"polarity": True}, {"polarity": False}])
        for p in params:
            train = set().union(*(_expand(t) for t in g.wording_pool(cell, "train", p)))
            test = set().union(*(_expand(t) for t in g.wording_pool(cell, "test", p)))
            assert train and test and not train & test, (cell.name, train & test)
    # generated questions: no test-pool question is ever a training question
    train_q = {_norm(q["question"]) for q, _ in _questions("train", seed=3)}
    test_q = {_norm(q["question"]) for q, _ in _questions("test", seed=4)}
    assert not train_q & test_q
    # the held-out wordings of open questions are not in SynthDrive's original template pool either
    old = set().union(*(_expand(t) for ts in _TEMPLATES.values() for t in ts))
    for cell in g.CELLS:
        if cell.form == "open" and cell.fact in _TEMPLATES:
            assert not old & set().union(*(_expand(t) for t in g.wording_pool(cell, "test"))), cell.name


def test_held_out_cells_are_never_trained_but_their_form_and_fact_are():
    held = set(g.HELDOUT_CELLS)
    assert held and held <= set(g.CELLS) and not held & set(g.TRAIN_CELLS)
    for cell in held:
        assert any(c.form == cell.form for c in g.TRAIN_CELLS), cell
        assert any(c.fact == cell.fact for c in g.TRAIN_CELLS), cell
    rng = np.random.default_rng(5)
    drawn = {f'{q["type"]}/{q["form"]}' for a in _scenes() for q in g.grid_questions(a, rng, k=4)}
    assert not drawn & {c.name for c in held}
    assert len(drawn) == len(g.TRAIN_CELLS)


def test_trainer_draws_grid_questions_from_training_cells_only():
    from shusheng.train import uniperceiver as tu

    cfg = tu.UniPerceiverTrainConfig(n_train=16, batch_size=16, image_size=64, vqa_per_image=4, qa="grid",
                                     answer_pool=32)
    _, records = tu.load_synthdrive(None, cfg.n_train, cfg.image_size)
    images = np.zeros((len(records), 64, 64, 3), np.uint8)
    sampler = tu.StepSampler(images, records, cfg, synthdrive_answers())
    cells, forms = set(), set()
    for step in range(12):
        b = sampler(step)
        assert [len(x) for x in b["questions"]] == [4] * 16
        for cs, ans in zip(b["question_cells"], b["answers"]):
            cells.update(cs)
            forms.update(c.split("/")[1] for c in cs)
            assert set(ans) <= set(b["answer_candidates"])
    assert not cells & {c.name for c in g.HELDOUT_CELLS}
    assert forms == set(g.FORMS)
    # the same step is the same batch (exact resume)
    assert sampler(3)["questions"] == sampler(3)["questions"]
    with pytest.raises(ValueError, match="qa must be"):
        tu.train(tu.UniPerceiverTrainConfig(qa="templates"))
    with pytest.raises(ValueError, match="qa_cells must be"):
        tu.train(tu.UniPerceiverTrainConfig(qa="grid", qa_cells="some"))
    # a final model for users may be trained on every cell, held-out ones included
    cfg.qa_cells = "all"
    every = tu.StepSampler(images, records, cfg, synthdrive_answers())
    drawn = {c for step in range(40) for cs in every(step)["question_cells"] for c in cs}
    assert drawn & {c.name for c in g.HELDOUT_CELLS}


def test_nearest_vehicle_is_the_lowest_box():
    a = {"vehicles": [{"type": "car", "color": "red", "box": [10, 40, 8, 6]},
                      {"type": "bus", "color": "blue", "box": [30, 50, 20, 20]},
                      {"type": "truck", "color": "white", "box": [60, 60, 4, 4]}]}
    assert g.nearest_vehicle(a)["type"] == "bus"  # bottom 70 > 64 > 46
    assert g.grid_answer("nearest_vehicle", "open", {**a, "pedestrians": []}) == "blue bus"
    assert g.nearest_vehicle({"vehicles": []}) is None
    with pytest.raises(ValueError, match="no cell"):
        g.grid_answer("crosswalk", "open", {})


def _words(t: str) -> list[str]:
    return re.sub(r"[^a-z0-9{} ]", " ", t.lower()).split()


def _edit(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_added_training_wordings_stay_clear_of_the_test_pool_and_fill():
    """The stop-29 wordings: none within two words (or a quarter of its length) of any test wording, each uses only
    slots its cell fills, and every one turns into a question with its answer."""
    from shusheng.data.synthdrive_qa_extra import EXTRA_CELLS, EXTRA_STOP_YESNO, EXTRA_WEATHER_YESNO

    tests = {t for cell in g.CELLS for p in ([{}] if cell.name not in ("weather/yesno", "stop/yesno") else
                                              [{"value": "rain"}, {"value": "fog"}, {"value": "clear"},
                                               {"polarity": True}, {"polarity": False}])
             for t in g.wording_pool(cell, "test", p)}
    extra = [t for ts in (*EXTRA_CELLS.values(), *EXTRA_WEATHER_YESNO.values(), *EXTRA_STOP_YESNO.values())
             for t in ts]
    assert len(extra) > 300
    for t in extra:
        close = [u for u in tests if _edit(_words(t), _words(u)) <= max(2, len(_words(u)) // 4)]
        assert not close, (t, close)
    generic = {"image", "ego", "light", "peds", "vehicles", "vehicle"}
    for key, more in EXTRA_CELLS.items():
        fact, form = key.split("/")
        cell = g.Cell(fact, form)
        base = set(g.wording_pool(cell, "train")) - set(more)
        own = {n for t in base for _, n, _, _ in string.Formatter().parse(t) if n}
        for t in more:
            assert t in g.wording_pool(cell, "train")
            used = {n for _, n, _, _ in string.Formatter().parse(t) if n}
            assert used <= own | generic, (key, t, used - own - generic)
    # every training wording of every cell becomes a question about some scene
    rng = np.random.default_rng(0)
    scenes = [sd.sample(sd.VAL_SEED, i)[1].attributes for i in range(40)]
    for cell in g.CELLS:
        for a in scenes:
            params = g._draw_params(cell, a, rng)
            if params is not None:
                break
        assert params is not None, cell.name
        for t in g.wording_pool(cell, "train", params):
            text = t.format(**g._fill(cell, params, rng))
            assert "{" not in text and text.endswith(("?", ".")), (cell.name, text)
