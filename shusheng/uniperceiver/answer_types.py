"""The form of answer a question asks for, so that matching only picks answers of that form.

A question asks for one of four kinds of answer, whatever it is about:

* ``yesno``: "Is it raining?", "Is there any truck?", "Is there no crosswalk?" -> ``yes`` / ``no``;
* ``options``: "Is it day or night?", "Does the truck look red or white?" -> one of the options it names;
* ``number``: "How many cars are there?" -> a number;
* ``open``: "What is the weather like?" -> a value (anything but yes/no).

:class:`AnswerTyper` reads the kind from the question's words: a logistic regression over word unigrams and
bigrams, limited to those used in questions about several different facts (``min_facts``: "is there", "or",
"how many", "what", but not "raining" or "truck"). The kind is carried by such words; a typer that can also read
the topic words learns which facts were asked in which forms, and misreads a question that asks a fact in a form
it never saw that fact asked in. (Measured when it was chosen, on the SynthDrive question grid, fitted on the
training wordings of 1000 train scenes without the six held-out cells, tested on the test wordings of 300 val
scenes: with every word, 0.976 on the seen cells and 0.712 on the held-out ones; with words of three facts or
more, 0.963 / 0.945. A linear head on the decoder's own text read-out of the question instead, fitted on 2000
scenes and tested on 500: 0.864 overall, 0.458 on the held-out cells.) ``shusheng train answer-types`` fits it
and stores it next to the model's weights (``answer_types.json``); the model card has its numbers.

Which answers an ``options`` question names is read from its text (:func:`named_options`). Matching then
renormalises over the answers the question's kind allows (:func:`allowed_answers`); a question whose allowed set
would be empty keeps every answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ANSWER_TYPES", "ANSWER_TYPES_FILE", "FORM_TYPES", "AnswerTyper", "allowed_answers", "named_options", "type_masks"]

ANSWER_TYPES = ("open", "yesno", "options", "number")
#: the file next to a model's weights that holds its :class:`AnswerTyper`
ANSWER_TYPES_FILE = "answer_types.json"
#: the SynthDrive question grid's forms (``shusheng.data.synthdrive_qa.FORMS``) -> the answer type they ask for
FORM_TYPES = {"open": "open", "yesno": "yesno", "exist": "yesno", "negated": "yesno", "either": "options",
              "count": "number"}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _features(question: str) -> set[str]:
    """Word unigrams and bigrams of a question (lower case, punctuation dropped)."""
    w = _words(question).split()
    return set(w) | {f"{a} {b}" for a, b in zip(w, w[1:])}


class AnswerTyper:
    """Which of :data:`ANSWER_TYPES` a question asks for, from its words (see the module docstring).

    Args:
        vocab: the word features it reads.
        weight: ``(len(vocab), 4)``; bias: ``(4,)``.
    """

    def __init__(self, vocab: Sequence[str], weight: torch.Tensor, bias: torch.Tensor):
        self.vocab = list(vocab)
        self.index = {f: i for i, f in enumerate(self.vocab)}
        self.weight, self.bias = weight.detach().float(), bias.detach().float()
        if self.weight.shape != (len(self.vocab), len(ANSWER_TYPES)) or self.bias.shape != (len(ANSWER_TYPES),):
            raise ValueError(f"weight must be ({len(self.vocab)}, {len(ANSWER_TYPES)}) and bias "
                             f"({len(ANSWER_TYPES)},), got {tuple(self.weight.shape)} and {tuple(self.bias.shape)}")

    def _matrix(self, questions: Sequence[str]) -> torch.Tensor:
        x = torch.zeros(len(questions), len(self.vocab))
        for i, q in enumerate(questions):
            cols = [self.index[f] for f in _features(q) if f in self.index]
            x[i, cols] = 1.0
        return x

    def probabilities(self, questions: Sequence[str]) -> torch.Tensor:
        """``(B, 4)`` probabilities over :data:`ANSWER_TYPES`."""
        return (self._matrix(questions) @ self.weight + self.bias).softmax(-1)

    def predict(self, questions: Sequence[str]) -> list[str]:
        """The most probable answer type of each question."""
        return [ANSWER_TYPES[i] for i in self.probabilities(questions).argmax(-1).tolist()]

    @classmethod
    def fit(cls, questions: Sequence[str], types: Sequence[str], facts: Sequence[str], min_facts: int = 3,
            steps: int = 300, lr: float = 0.05, l2: float = 1e-4) -> AnswerTyper:
        """Fit on ``questions`` of known answer ``types``, each about one of ``facts`` (any labels): the word
        features are those found in questions about at least ``min_facts`` different facts; every type weighs
        the same in the loss (full-batch Adam from zeros: deterministic)."""
        if not questions or not (len(questions) == len(types) == len(facts)):
            raise ValueError("need as many types and facts as questions, and at least one question")
        unknown = sorted(set(types) - set(ANSWER_TYPES))
        if unknown:
            raise ValueError(f"unknown answer types {unknown}; expected {ANSWER_TYPES}")
        seen: dict[str, set[str]] = defaultdict(set)
        for q, f in zip(questions, facts):
            for feat in _features(q):
                seen[feat].add(f)
        vocab = sorted(feat for feat, fs in seen.items() if len(fs) >= min_facts)
        x = cls(vocab, torch.zeros(len(vocab), len(ANSWER_TYPES)), torch.zeros(len(ANSWER_TYPES)))._matrix(questions)
        y = torch.tensor([ANSWER_TYPES.index(t) for t in types])
        counts = torch.bincount(y, minlength=len(ANSWER_TYPES)).float()
        balance = counts.sum() / (len(ANSWER_TYPES) * counts.clamp(min=1))
        with torch.enable_grad():  # also when called under no_grad
            w = torch.zeros(len(vocab), len(ANSWER_TYPES), requires_grad=True)
            b = torch.zeros(len(ANSWER_TYPES), requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=lr)
            for _ in range(steps):
                loss = F.cross_entropy(x @ w + b, y, weight=balance) + l2 * (w ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(vocab, w, b)

    def to_dict(self) -> dict[str, Any]:
        return {"types": list(ANSWER_TYPES), "vocab": self.vocab,
                "weight": [[round(v, 5) for v in row] for row in self.weight.tolist()],
                "bias": [round(v, 5) for v in self.bias.tolist()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerTyper:
        if list(d.get("types", [])) != list(ANSWER_TYPES):
            raise ValueError(f"answer types {d.get('types')} differ from {list(ANSWER_TYPES)}")
        return cls(d["vocab"], torch.tensor(d["weight"], dtype=torch.float32).reshape(-1, len(ANSWER_TYPES)),
                   torch.tensor(d["bias"], dtype=torch.float32))


def _words(text: str) -> str:
    """Lower case, punctuation as spaces, one space between words, padded by spaces."""
    words = re.sub(r"[^0-9a-z]+", " ", text.lower()).split()
    return " " + " ".join(words) + " "


def _option_keys(answers: Sequence[str]) -> list[str | None]:
    """Each answer as it would be named in a question (``_words``), None for those that are never options."""
    keys = []
    for a in answers:
        key = _words(a)
        keys.append(None if "," in a or key.strip() in ("", "yes", "no") else key)
    return keys


def named_options(question: str, answers: Sequence[str], keys: Sequence[str | None] | None = None) -> list[int]:
    """Indices of the ``answers`` that ``question`` names as whole words (number words read as digits too when
    it names two or more numbers); yes/no and lists ("car, truck") are never options. ``keys``: the answers'
    :func:`_option_keys`, when asking about many questions."""
    plain = _words(question)
    # number words name numbers only in a choice between numbers ("four or two"), not in "One question."
    numbers = [w for w in plain.split() if w in _NUMBER_WORDS or w.isdigit()]
    digits = " " + " ".join(_NUMBER_WORDS.get(w, w) for w in plain.split()) + " " if len(numbers) >= 2 else plain
    keys = _option_keys(answers) if keys is None else keys
    return [k for k, key in enumerate(keys) if key is not None and (key in plain or key in digits)]


def type_masks(questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """``(B, 4, A)`` bool: for each question, the answers each of :data:`ANSWER_TYPES` allows: ``open`` any
    answer but yes/no; ``yesno`` yes and no; ``options`` the answers the question names when it names two or more
    (else as ``open``); ``number`` the numbers. A type none of the answers fits allows them all."""
    a = len(answers)
    yes_no = torch.tensor([x in ("yes", "no") for x in answers], dtype=torch.bool)
    number = torch.tensor([x.isdigit() for x in answers], dtype=torch.bool)
    keys = _option_keys(answers)
    out = torch.zeros(len(questions), len(ANSWER_TYPES), a, dtype=torch.bool)
    out[:, ANSWER_TYPES.index("open")] = ~yes_no
    out[:, ANSWER_TYPES.index("yesno")] = yes_no
    out[:, ANSWER_TYPES.index("number")] = number
    opt = ANSWER_TYPES.index("options")
    for i, q in enumerate(questions):
        named = named_options(q, answers, keys)
        if len(named) >= 2:
            out[i, opt, named] = True
        else:  # fewer than two options found in the text: any value
            out[i, opt] = ~yes_no
    empty = ~out.any(-1)  # (B, 4)
    out[empty] = True
    return out


def allowed_answers(types: Sequence[str], questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """``(B, A)`` bool: the answers each question's type allows (see :func:`type_masks`)."""
    unknown = sorted(set(types) - set(ANSWER_TYPES))
    if unknown:
        raise ValueError(f"unknown answer type {unknown[0]!r}; expected one of {ANSWER_TYPES}")
    masks = type_masks(questions, answers)
    idx = torch.tensor([ANSWER_TYPES.index(t) for t in types], dtype=torch.long)
    return masks[torch.arange(len(questions)), idx] if len(questions) else torch.zeros(0, len(answers), dtype=torch.bool)
