"""Answer types: the options a question names, the answers each type allows, the head in matching, its fitting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_uniperceiver import images, tiny_model  # noqa: E402

from shusheng.uniperceiver.answer_types import AnswerTyper, allowed_answers, named_options  # noqa: E402
from shusheng.uniperceiver.model import UniPerceiver  # noqa: E402
from shusheng.uniperceiver.tokenizers import TextTokenizer  # noqa: E402

NAMES = ["yes", "no", "none", "0", "3", "5", "red", "white", "blue", "red car", "blue bus", "stop", "go",
         "speed limit 50", "yield", "night", "day"]


def _named(question):
    return [NAMES[k] for k in named_options(question, NAMES)]


def test_named_options_are_whole_words_and_number_words_in_a_choice_of_numbers():
    assert _named("Does the truck look red or white? Keep it short.") == ["red", "white"]
    assert _named("Is the nearest vehicle a red car or a blue bus?") == ["red", "blue", "red car", "blue bus"]
    assert _named("Are five or three automobiles on the road?") == ["3", "5"]
    assert _named("One question. Does the signal display red or amber?") == ["red"]  # "One" is no option
    assert _named("Must we stop, or may we go on?") == ["stop", "go"]
    assert _named("Does the road show a stop sign, speed limit 50 sign or yield sign?") == [
        "stop", "speed limit 50", "yield"]
    assert _named("Is the sky reddish or whitish?") == []  # inside other words: not named
    assert _named("Is there no car, or a truck?") == []  # yes / no are never options, lists neither
    assert named_options("Are there cars and buses?", ["bus, car", "car"]) == []


def test_allowed_answers_per_type():
    m = allowed_answers(["yesno", "number", "options", "options", "open"],
                        ["Is it day?", "How many cars?", "Is the light red or white?", "Red or what?",
                         "What colour is the car?"], NAMES)
    rows = [{NAMES[k] for k in torch.nonzero(r).flatten().tolist()} for r in m]
    assert rows[0] == {"yes", "no"}
    assert rows[1] == {"0", "3", "5"}
    assert rows[2] == {"red", "white"}
    assert rows[3] == set(NAMES) - {"yes", "no"}  # one option named: any value
    assert rows[4] == set(NAMES) - {"yes", "no"}
    # a type none of the candidates fits keeps them all rather than none
    assert allowed_answers(["number"], ["How many?"], ["yes", "red"]).all()
    with pytest.raises(ValueError, match="unknown answer type"):
        allowed_answers(["colour"], ["?"], NAMES)


def _toy_typer() -> AnswerTyper:
    """Fit on questions about three topics; "or", "is", "how many", "what" are shared by all three."""
    qs, types, facts = [], [], []
    for topic, a, b in (("light", "red", "green"), ("car", "blue", "white"), ("sky", "clear", "grey")):
        for q, t in ((f"is the {topic} {a}?", "yesno"), (f"is the {topic} {a} or {b}?", "options"),
                     (f"how many {topic}s are there?", "number"), (f"what is the {topic}?", "open"),
                     (f"is the {topic} {b}?", "yesno"), (f"what colour is the {topic}?", "open")):
            qs.append(q)
            types.append(t)
            facts.append(topic)
    return AnswerTyper.fit(qs, types, facts, min_facts=3, steps=200)


def test_typer_reads_the_shared_words_and_round_trips():
    typer = _toy_typer()
    assert "or" in typer.vocab and "how many" in typer.vocab and "light" not in typer.vocab  # topic words: out
    new = ["is the tree tall or short?", "is the tree tall?", "how many trees are there?", "what is the tree?"]
    assert typer.predict(new) == ["options", "yesno", "number", "open"]  # a topic it never saw
    again = AnswerTyper.from_dict(typer.to_dict())
    assert torch.allclose(again.probabilities(new), typer.probabilities(new), atol=1e-4)
    with pytest.raises(ValueError, match="unknown answer types"):
        AnswerTyper.fit(["a?"], ["colour"], ["x"])


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer()


def test_matching_leans_to_the_form_asked_and_survives_save_load(tok, tmp_path):
    m = tiny_model(tok).eval()
    x, qs = images(2), ["is the light red?", "is the light red or green?"]
    with torch.no_grad():
        free = m.vqa_match(x, qs)
        m.answer_typer = _toy_typer()
        p = m.vqa_match(x, qs)
        assert torch.equal(m.vqa_match(x, qs, match_form=False), free)
    names = m.config.answers  # yes, no, red, green, "blue, red", 2
    w = m.answer_form_weights(qs, list(names))
    yn = torch.tensor([a in ("yes", "no") for a in names])
    assert (w[0, yn] > 0.5).all() and (w[0, ~yn] < 0.5).all()  # a yes/no question
    assert w[1, names.index("red")] > 0.5 and w[1, names.index("2")] < 0.5  # red or green: options named
    assert torch.allclose(p.sum(-1), torch.ones(2))
    # each answer's probability moves by its form weight: the ratio of two answers follows the weights' ratio
    ratio = (p[0, 0] / p[0, 2]) / (free[0, 0] / free[0, 2])
    assert torch.allclose(ratio, w[0, 0] / w[0, 2], rtol=1e-3)
    # features given with their names: the same; features without names: nothing to weigh by
    feats = m.text_features(list(names))
    with torch.no_grad():
        assert torch.allclose(m.vqa_match(x, qs, list(names), answer_features=feats), p, atol=1e-6)
        assert torch.allclose(m.vqa_match(x, qs, answer_features=feats), free, atol=1e-6)
    m.save_pretrained(tmp_path / "m")
    m2 = UniPerceiver.from_pretrained(tmp_path / "m").eval()
    assert m2.answer_typer is not None and m2.answer_typer.vocab == m.answer_typer.vocab
    with torch.no_grad():
        assert torch.allclose(m2.vqa_match(x, qs), p, atol=1e-5)


def test_fitting_on_the_question_grid_carries_forms_to_held_out_cells():
    from shusheng.train.answer_types import fit_answer_types

    typer, metrics = fit_answer_types(n_scenes=40, val_n=20, steps=200)
    assert metrics["fit_questions"] > 500 and metrics["test_questions"] > 200
    assert set(metrics["test_accuracy_per_cell"]) >= {"weather / yesno", "time / either"}  # held-out cells too
    # test wordings, and cells never fitted on: forms carried over from other facts
    assert metrics["test_accuracy_seen_cells"] > 0.85 and metrics["test_accuracy_heldout_cells"] > 0.8
    assert typer.predict(["Is there a bus?", "Is it day or night?", "How many trucks are there?",
                          "What is the weather like?"]) == ["yesno", "options", "number", "open"]
