"""Faithfulness of generated driving scenes to their prompts, and the Fréchet distance on the project's own features.

    >>> from shusheng.generation.pipelines.faithfulness import FaithfulnessChecker, prompt_facts
    >>> [str(f) for f in prompt_facts("foggy morning, two cars at a red light")]
    ['weather: fog', 'time: day', 'vehicle: car', 'count: 2 cars', 'light: red light']
    >>> check = FaithfulnessChecker.from_pretrained()            # the bundled shusheng-mini-uniperceiver
    >>> res = check(images, prompts)                             # one result per (image, prompt)
    >>> res[0].share, [(c.kind, c.expected, c.observed, c.holds) for c in res[0].checks]

**Facts.** :func:`prompt_facts` reads the scene facts a prompt states with the LLM bridge's mention finder
(:func:`shusheng.llm.grounding.find_mentions`: SynthDrive's vocabulary, number words, negation), so prompts and
chat answers are read by one parser. Each mention becomes one or two :class:`Fact` s of these kinds:

==============  ====================================================================================
kind            value (``negated``: the prompt says it is absent)
==============  ====================================================================================
``time``        ``day`` | ``dusk`` | ``night``
``weather``     ``clear`` | ``rain`` | ``fog``
``vehicle``     ``"red car"``, ``"bus"``, ``"red vehicle"``, ``"vehicle"``: at least one such vehicle
``count``       the same subjects, ``"pedestrian"`` or ``"pedestrian on crosswalk"``, with ``count``: exactly
                that many ("two red cars" gives ``vehicle: red car`` and ``count: 2 red cars``; "no vehicles"
                gives ``count: 0 vehicles``)
``light``       ``red`` | ``yellow`` | ``green`` | ``any`` (a traffic light)
``sign``        ``stop`` | ``yield`` | ``speed_30`` .. | ``speed`` (any limit) | ``any``
``pedestrian``  ``any`` | ``on crosswalk`` | ``on sidewalk``
``crosswalk``   ``crosswalk``
==============  ====================================================================================

**The judge.** Every fact is a closed question to the bundled unified decoder (``shusheng-mini-uniperceiver``,
training wordings of :mod:`shusheng.data.synthdrive_qa`: "What time of day is it?", "Is there a white bus?", "How
many cars are there?"), asked through :class:`~shusheng.uniperceiver.pipelines.driving.DrivingChecklist`, which
also returns the boxes of the decoder tower's dense object head as evidence (one backbone pass for both) and the
decoder's in-domain check. A fact holds when the decoder's answer agrees with it; ``score`` is the probability
the decoder gave that answer.

Why the decoder decides the object facts too: on 80 validation scenes downsampled to 64 x 64 (the size of the
generated images; the pipelines upsample them to 128), "is there a <colour> <type>?" is answered right for 80 %
of the vehicles present by the decoder and for 48 % by the dense head (of the decoder's tower, or of the bundled
mini-clip's, :class:`~shusheng.detection.DenseObjectDetector`: the same 0.48-0.50), whose stride-8 cells lose
small vehicles at that size; the dense head is more precise on absent ones (0.99 against 0.85) but combining
the two (either, both, or the decoder's yes confirmed by a count) changes the balanced accuracy by at most
0.01. Counts: decoder 0.71 exact on present colour-type groups and 0.65 on the total, dense components
0.45-0.47 and 0.41-0.43 (touching objects merge). Lights read equally well (0.975 both); signs equally badly at
64 px (0.58: a speed limit at 64 px reads as a yield sign; 0.93 at 128 px). So the dense head gives the evidence
boxes, not the verdicts (the table is in docs/generation.md, section "Faithfulness check").

**The ceiling.** The judge errs on real scenes too; :func:`ceiling` runs it on held-out SynthDrive scenes (the
fixed test set by default, downsampled to the generated size) with their own captions, whose facts are all true:
the share of facts that hold there is the most a generator can score by this judge, reported beside its numbers.

**Fréchet distance.** :func:`frechet_distance` between two feature sets (Gaussian fit, as FID), on the bundled
mini-clip image embeddings (:func:`embed_images`) rather than Inception features: nothing can be downloaded
here, and those features know driving scenes. The estimate is biased upwards for small sets (384 dimensions);
compare only sets of the same size, against the floor of two real sets of that size.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from shusheng.uniperceiver.pipelines import VQAPipeline
    from shusheng.uniperceiver.pipelines.driving import ChecklistQuestion

logger = logging.getLogger(__name__)

__all__ = ["FACT_KINDS", "GENERATED_SIZE", "KIND_NAMES", "Fact", "FactCheck", "FaithfulnessChecker",
           "FaithfulnessResult", "ceiling", "embed_images", "fact_truth", "frechet_distance", "prompt_facts",
           "shares_by_kind", "synthdrive_images"]

#: fact kinds, in the order results are reported
FACT_KINDS = ("time", "weather", "vehicle", "count", "light", "sign", "pedestrian", "crosswalk")
#: readable names of the kinds (the bench's rows)
KIND_NAMES = {"time": "time of day", "weather": "weather", "vehicle": "vehicle colour and type", "count": "counts",
              "light": "traffic light", "sign": "signs", "pedestrian": "pedestrians", "crosswalk": "crosswalk"}
#: side of the generated images the judge and the ceiling are calibrated for
GENERATED_SIZE = 64

_COUNT_ANSWERS = ("0", "1", "2", "3", "4", "5")
_YES_NO = ("yes", "no")
_SIGN_ANSWERS = {"stop": "stop", "yield": "yield", "speed limit 30": "speed_30", "speed limit 50": "speed_50",
                 "speed limit 80": "speed_80", "none": "none"}
_PLURAL = {"car": "cars", "truck": "trucks", "bus": "buses", "vehicle": "vehicles", "pedestrian": "pedestrians"}


# --------------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------------

def _plural(subject: str) -> str:
    """``"red car"`` -> ``"red cars"``, ``"pedestrian on crosswalk"`` -> ``"pedestrians on crosswalk"``."""
    words = subject.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i] in _PLURAL:
            words[i] = _PLURAL[words[i]]
            break
    return " ".join(words)


@functools.cache
def _values(kind: str) -> frozenset[str]:
    """The values a fact of ``kind`` can have."""
    from shusheng.data.synthdrive_render import COLORS, LIGHTS, SIGNS, TIMES, VEHICLE_TYPES, WEATHERS

    vehicles = {"vehicle", *VEHICLE_TYPES, *(f"{c} {t}" for c in COLORS for t in (*VEHICLE_TYPES, "vehicle"))}
    places = ("on crosswalk", "on sidewalk")
    return frozenset({
        "time": TIMES, "weather": WEATHERS, "light": {*LIGHTS, "any"} - {"none"},
        "sign": {*SIGNS, "speed", "any"} - {"none"}, "crosswalk": {"crosswalk"}, "pedestrian": {"any", *places},
        "vehicle": vehicles, "count": {*vehicles, "pedestrian", *(f"pedestrian {p}" for p in places)},
    }[kind])


@dataclass(frozen=True)
class Fact:
    """One scene fact a prompt states (see the module docstring for kinds and values).

    Attributes:
        kind: one of :data:`FACT_KINDS`.
        value: the normalised claim.
        count: for ``count`` facts, the number stated; else None.
        negated: the prompt says it is absent ("no trucks", "not raining").
        text: the prompt's words it comes from.
    """

    kind: str
    value: str
    count: int | None = None
    negated: bool = False
    text: str = field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in FACT_KINDS:
            raise ValueError(f"unknown fact kind {self.kind!r}; expected one of {FACT_KINDS}")
        if (self.kind == "count") != (self.count is not None):
            raise ValueError(f"a count (and only a count fact) needs a number: {self.kind} {self.value!r} "
                             f"count={self.count}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < 0):
            raise ValueError(f"a count must be an integer >= 0, got {self.count!r}")
        any_limit = self.kind == "sign" and re.fullmatch(r"speed_\d+", self.value)  # "speed limit 40": never holds
        if self.value not in _values(self.kind) and not any_limit:
            raise ValueError(f"{self.value!r} is not a value of a {self.kind} fact (see the module docstring)")

    @property
    def key(self) -> tuple[str, str, int | None, bool]:
        """``(kind, value, count, negated)``: what the fact says, without the words."""
        return (self.kind, self.value, self.count, self.negated)

    @property
    def expected(self) -> str:
        """The claim in words: ``"night"``, ``"not rain"``, ``"no truck"``, ``"2 red cars"``, ``"red light"``,
        ``"speed limit 50 sign"``, ``"pedestrian on crosswalk"``."""
        k, v = self.kind, self.value
        if k == "count":
            return f"{self.count} {_plural(v) if self.count != 1 else v}"
        if k == "light":
            body = "traffic light" if v == "any" else f"{v} light"
        elif k == "sign":
            body = {"any": "sign", "speed": "speed limit sign"}.get(v) or (
                f"speed limit {v.split('_')[1]} sign" if v.startswith("speed_") else f"{v} sign")
        elif k == "pedestrian":
            body = "pedestrian" if v == "any" else f"pedestrian {v}"
        else:
            body = v
        return (("not " if k in ("time", "weather") else "no ") + body) if self.negated else body

    def __str__(self) -> str:
        return f"{self.kind}: {self.expected}"

    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "value"}`` plus ``count`` / ``negated`` when set (the bench prompts' format)."""
        d: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.count is not None:
            d["count"] = self.count
        if self.negated:
            d["negated"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fact:
        return cls(d["kind"], d["value"], d.get("count"), bool(d.get("negated", False)), d.get("text", ""))

    def mention(self):
        """The fact as a :class:`shusheng.llm.grounding.Mention` (what ``Evidence.supports`` judges)."""
        from shusheng.llm.grounding import Mention

        kind, value = self.kind, self.value
        if kind == "count":
            kind = "pedestrian" if value.startswith("pedestrian") else "vehicle"
            value = (value.removeprefix("pedestrian").strip() or "any") if kind == "pedestrian" else value
        zero = self.count == 0
        return Mention(kind, value, self.text, 0, len(self.text), self.negated or zero,
                       None if zero else self.count)


def _facts_of(m) -> list[Fact]:
    """The facts of one grounding mention."""
    if m.kind in ("time", "weather", "light", "sign", "crosswalk"):
        return [Fact(m.kind, m.value, None, m.negated, m.text)]
    if m.kind == "vehicle":
        if m.value == "vehicle" and (m.negated or m.count is not None):  # "no vehicles", "three vehicles"
            return [Fact("count", "vehicle", 0 if m.negated else m.count, False, m.text)]
        out = [Fact("vehicle", m.value, None, m.negated, m.text)]
        if m.count is not None and not m.negated:
            out.append(Fact("count", m.value, m.count, False, m.text))
        return out
    if m.kind == "pedestrian":
        out = [Fact("pedestrian", m.value, None, m.negated, m.text)]
        if m.count is not None and not m.negated:
            subject = "pedestrian" if m.value == "any" else f"pedestrian {m.value}"
            out.append(Fact("count", subject, m.count, False, m.text))
        return out
    return []


def _implied(f: Fact, facts: Sequence[Fact]) -> bool:
    """Whether a positive generic fact is implied by a more specific positive one ("a speed limit 50 sign" also
    finds "sign"; "traffic with a red car")."""
    if f.negated:
        return False
    others = [g for g in facts if g is not f and not g.negated]
    if f.kind in ("light", "pedestrian") and f.value == "any":
        return any(g.kind == f.kind for g in others)
    if f.kind == "sign" and f.value in ("any", "speed"):
        return any(g.kind == "sign" and g.value != "any" and (f.value == "any" or g.value.startswith("speed_"))
                   for g in others)
    if f.kind == "vehicle" and f.value == "vehicle":
        return any(g.kind in ("vehicle", "count") and not g.value.startswith("pedestrian")
                   and (g.kind == "vehicle" or (g.count or 0) > 0) for g in others)
    return False


def prompt_facts(prompt: str) -> list[Fact]:
    """The scene facts ``prompt`` states, in order of appearance, each once.

    Args:
        prompt: e.g. ``"no vehicles, just a stop sign at night"``.

    Returns:
        :class:`Fact` s (``[count: 0 vehicles, sign: stop, time: night]``); an empty list when the prompt states
        nothing the judge can check.
    """
    from shusheng.llm.grounding import find_mentions

    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    facts: list[Fact] = []
    for m in find_mentions(prompt):
        facts += _facts_of(m)
    seen: set[tuple] = set()
    out = []
    for f in facts:
        if f.key not in seen and not _implied(f, facts):
            seen.add(f.key)
            out.append(f)
    return out


def fact_truth(fact: Fact, attributes: Mapping[str, Any]) -> bool:
    """Whether ``fact`` is true of a SynthDrive scene with ``attributes`` (exact, from the annotation)."""
    from shusheng.llm.grounding import Evidence

    verdict = Evidence.from_attributes(attributes).supports(fact.mention())
    if verdict is None:  # pragma: no cover - every kind is decided by true attributes
        raise ValueError(f"attributes cannot decide {fact}")
    return verdict


# --------------------------------------------------------------------------------------------------------
# Questions: one closed question per fact subject; the fact holds when the answer agrees
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Ask:
    id: str
    question: str
    answers: tuple[str, ...]
    evidence: tuple[str, ...] = ()


def _vehicle_words(value: str) -> tuple[str | None, str | None]:
    """``"red car"`` -> ``("red", "car")``, ``"bus"`` -> ``(None, "bus")``, ``"vehicle"`` -> ``(None, None)``."""
    *color, vtype = value.split()
    return (color[0] if color else None), (None if vtype == "vehicle" else vtype)


def _vehicle_labels(color: str | None, vtype: str | None) -> tuple[str, ...]:
    from shusheng.data.synthdrive import DENSE_LABELS

    if color is None and vtype is None:
        return ("vehicle",)  # the checklist's name for the whole vehicle group
    out = []
    for label in DENSE_LABELS:
        c, _, t = label.partition(" ")
        if t in ("car", "truck", "bus") and color in (None, c) and vtype in (None, t):
            out.append(label)
    return tuple(out)


def _ask(fact: Fact) -> _Ask:
    """The question that decides ``fact``: a wording of the decoder's training pools
    (:mod:`shusheng.data.synthdrive_qa`), kept verbatim ("Is there a orange car?" included), with the answers of
    its cell and the dense labels that count as its evidence."""
    k, v = fact.kind, fact.value
    if k == "time":
        return _Ask("time", "What time of day is it?", ("day", "dusk", "night"))
    if k == "weather":
        return _Ask("weather", "What is the weather like?", ("clear", "rain", "fog"))
    if k == "light":
        return _Ask("light", "What color is the traffic light?", ("red", "yellow", "green", "none"),
                    ("light red", "light yellow", "light green"))
    if k == "sign":
        return _Ask("sign", "What sign is visible?", tuple(_SIGN_ANSWERS),
                    ("sign stop", "sign yield", "sign speed_30", "sign speed_50", "sign speed_80"))
    if k == "crosswalk":
        return _Ask("crosswalk", "Is there a crosswalk?", _YES_NO)
    if k == "pedestrian":
        if v == "any":
            return _Ask("pedestrian", "Are there any pedestrians?", _YES_NO,
                        ("person on crosswalk", "person on sidewalk"))
        place = v.removeprefix("on ")
        return _Ask(f"pedestrian {v}", f"Is anyone on the {place}?", _YES_NO, (f"person {v}",))
    if k == "vehicle":
        color, vtype = _vehicle_words(v)
        if color is None and vtype is None:
            q = "Are there any vehicles?"
        elif color is None:
            q = f"Is there a {vtype}?"
        else:
            q = f"Is there a {color} {vtype or 'vehicle'}?"
        return _Ask(f"vehicle {v}", q, _YES_NO, _vehicle_labels(color, vtype))
    if k == "count":
        if v.startswith("pedestrian"):
            where = v.removeprefix("pedestrian").strip()  # "", "on crosswalk", "on sidewalk"
            if not where:
                return _Ask(f"count {v}", "How many pedestrians are there?", _COUNT_ANSWERS,
                            ("person on crosswalk", "person on sidewalk"))
            q = f"How many pedestrians are on the {where.removeprefix('on ')}?"
            return _Ask(f"count {v}", q, _COUNT_ANSWERS, (f"person {where}",))
        color, vtype = _vehicle_words(v)
        return _Ask(f"count {v}", f"How many {_plural(v)} are there?", _COUNT_ANSWERS, _vehicle_labels(color, vtype))
    raise ValueError(f"no question for {fact}")  # pragma: no cover - Fact validates its kind


def _present(fact: Fact, answer: str) -> bool:
    """Whether the decoder's ``answer`` to :func:`_ask`'s question shows what ``fact`` names (before negation)."""
    k, v = fact.kind, fact.value
    if k in ("time", "weather"):
        return answer == v
    if k == "light":
        return answer != "none" if v == "any" else answer == v
    if k == "sign":
        sign = _SIGN_ANSWERS.get(answer, answer)
        if v == "any":
            return sign != "none"
        return sign.startswith("speed_") if v == "speed" else sign == v
    if k == "count":
        return answer == str(fact.count)
    return answer == "yes"  # crosswalk, pedestrian, vehicle: yes/no


# --------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------

@dataclass
class FactCheck:
    """The verdict on one fact of one image.

    Attributes:
        kind: the fact's kind; ``expected``: the claim in words (:attr:`Fact.expected`).
        observed: the decoder's answer to ``question``.
        holds: whether the image shows the fact.
        score: the probability the decoder gave its answer.
        question: what the decoder was asked.
        evidence: the dense-head boxes behind the answer (``[{"box": [x, y, w, h], "label", "score"}]`` in pixels
            of the image as given).
        fact: the :class:`Fact`.
    """

    kind: str
    expected: str
    observed: str
    holds: bool
    score: float
    question: str
    evidence: list[dict[str, Any]]
    fact: Fact

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fact"] = self.fact.to_dict()
        return d


@dataclass
class FaithfulnessResult:
    """The verdicts on one (image, prompt) pair.

    Attributes:
        prompt: the prompt (None when facts were given directly).
        checks: one :class:`FactCheck` per fact, in the prompt's order.
        share: the share of facts that hold (None when the prompt states no fact the judge can check).
        in_domain, domain_score: the decoder's in-domain check of the image (a generated image that looks unlike
            SynthDrive's scenes is out of domain, and its verdicts mean little).
    """

    prompt: str | None
    checks: list[FactCheck]
    share: float | None
    in_domain: bool | None
    domain_score: float

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "share": self.share, "in_domain": self.in_domain,
                "domain_score": self.domain_score, "checks": [c.to_dict() for c in self.checks]}


def shares_by_kind(results: Iterable[FaithfulnessResult], strict: bool = False) -> dict[str, dict[str, float | int]]:
    """``{kind: {"share", "holds", "n"}}`` over all checks of ``results`` (kinds without facts are left out), plus
    ``"all"`` over every fact. ``strict``: a fact of an image that the decoder's in-domain check rejects counts as
    not holding (the judge's verdicts on pictures unlike its training scenes are not evidence)."""
    holds: dict[str, list[bool]] = {k: [] for k in (*FACT_KINDS, "all")}
    for r in results:
        for c in r.checks:
            ok = bool(c.holds) and (not strict or r.in_domain is not False)
            holds[c.kind].append(ok)
            holds["all"].append(ok)
    return {k: {"share": sum(v) / len(v), "holds": sum(v), "n": len(v)} for k, v in holds.items() if v}


# --------------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------------

def _to_pil(x: Any, index: int, n: int) -> Image.Image:
    """One input image -> RGB PIL image via ``shusheng.data.load_image``; NumPy ``(H, W, 3)`` arrays (uint8, or
    floats in [0, 1] as ``output_type="np"`` gives them) are accepted too."""
    from PIL import Image

    from shusheng.data import ImageLoadError, load_image

    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[-1] not in (3, 4):
            raise ImageLoadError(f"<array {x.shape}>", f"expected an (H, W, 3) array (image {index} of {n})")
        if x.dtype != np.uint8:
            x = np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        x = Image.fromarray(x)
    try:
        return load_image(x)
    except ImageLoadError as e:
        raise ImageLoadError(e.source, f"{e.reason} (image {index} of {n})") from e


class FaithfulnessChecker:
    """Decides for images whether the facts of their prompts hold (see the module docstring).

    Args:
        vqa: the decoder's :class:`~shusheng.uniperceiver.pipelines.VQAPipeline`; its image backbone must have a
            dense object head (the bundled one has).
        threshold: dense-head cell threshold of the evidence boxes.
    """

    def __init__(self, vqa: VQAPipeline, threshold: float = 0.5):
        if not hasattr(vqa.model.image.backbone, "features_and_dense"):
            raise ValueError("the decoder's image backbone has no dense object head (the bundled "
                             "shusheng-mini-uniperceiver has one)")
        self.vqa, self.threshold = vqa, float(threshold)

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: str = "cpu", **kwargs: Any) -> FaithfulnessChecker:
        """The checker over a saved decoder (default: the bundled ``shusheng-mini-uniperceiver``)."""
        from shusheng.uniperceiver.pipelines import VQAPipeline

        return cls(VQAPipeline.from_pretrained(path, device=device), **kwargs)

    @staticmethod
    def questions(facts: Iterable[Fact]) -> list[ChecklistQuestion]:
        """The checklist questions that decide ``facts`` (each once)."""
        from shusheng.uniperceiver.pipelines.driving import ChecklistQuestion

        asks = {}
        for f in facts:
            a = _ask(f)
            asks.setdefault(a.id, a)
        return [ChecklistQuestion(a.id, a.question, a.answers, a.evidence) for a in asks.values()]

    def __call__(self, images: Any, prompts: str | Sequence[str], batch_size: int = 32
                 ) -> list[FaithfulnessResult]:
        """Check each image against its prompt.

        Args:
            images: one image or a list (paths, bytes, file objects, PIL images, ``(H, W, 3)`` arrays).
            prompts: one prompt per image (a single string for a single image).
            batch_size: images per backbone pass.

        Returns:
            One :class:`FaithfulnessResult` per image.

        Raises:
            ValueError: the numbers of images and prompts differ, or there are none.
            TypeError: a prompt is not a string.
            shusheng.data.ImageLoadError: an image cannot be read (the message says which).
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        from shusheng.pipelines import as_image_list

        images = as_image_list(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"give one prompt per image: got {len(images)} images and {len(prompts)} prompts")
        facts = [prompt_facts(p) for p in prompts]  # TypeError for a prompt that is not a string
        return self.check_facts(images, facts, prompts, batch_size)

    def check_facts(self, images: Sequence[Any], facts: Sequence[Sequence[Fact]],
                    prompts: Sequence[str | None] | None = None, batch_size: int = 32) -> list[FaithfulnessResult]:
        """Check each image against its own list of facts (what :meth:`__call__` does after :func:`prompt_facts`).

        Every image is read once, in batches; each batch is asked the questions of its images' facts together.
        """
        from shusheng.uniperceiver.pipelines.driving import DrivingChecklist

        n = len(images)
        if len(facts) != n:
            raise ValueError(f"give one list of facts per image: got {n} images and {len(facts)} lists")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompts = list(prompts) if prompts is not None else [None] * n
        out: list[FaithfulnessResult] = []
        for s in range(0, n, batch_size):
            chunk = [_to_pil(images[i], i, n) for i in range(s, min(n, s + batch_size))]
            chunk_facts = facts[s:s + len(chunk)]
            questions = self.questions(f for fs in chunk_facts for f in fs)
            checklist = DrivingChecklist(self.vqa, questions, threshold=self.threshold)
            res = checklist(chunk, batch_size=len(chunk), on_error="raise")
            by_id = {q.id: q for q in questions}
            for j, fs in enumerate(chunk_facts):
                checks = []
                for f in fs:
                    a = _ask(f)
                    r = res.results[j][a.id]
                    holds = _present(f, r["answer"]) != f.negated
                    checks.append(FactCheck(f.kind, f.expected, r["answer"], bool(holds), float(r["score"]),
                                            by_id[a.id].question, list(r["evidence"]), f))
                share = sum(c.holds for c in checks) / len(checks) if checks else None
                out.append(FaithfulnessResult(prompts[s + j], checks, share, res.in_domain[j],
                                              float(res.domain_score[j])))
        return out


# --------------------------------------------------------------------------------------------------------
# Real scenes: the ceiling, and feature sets for the Fréchet distance
# --------------------------------------------------------------------------------------------------------

def synthdrive_images(n: int, seed: int | None = None, size: int = GENERATED_SIZE, start: int = 0
                      ) -> tuple[list[Image.Image], list[Any]]:
    """SynthDrive scenes ``start .. start+n-1`` of split seed ``seed`` (default the fixed test seed), rendered
    at the test size (128 px) and downsampled to ``size`` (bicubic, antialiased): ``(images, annotations)``.

    The test set's annotations are defined at 128 px; downsampling keeps them exact at any size.
    """
    from PIL import Image

    from shusheng.data import synthdrive as sd

    seed = sd.TEST_SEED if seed is None else int(seed)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed == sd.TEST_SEED and start + n > sd.TEST_SIZE:
        raise ValueError(f"the fixed test set has {sd.TEST_SIZE} scenes; asked for {start} .. {start + n - 1}")
    images, anns = [], []
    for i in range(start, start + n):
        img, ann = sd.sample(seed, i, sd.TEST_IMAGE_SIZE)
        if size != sd.TEST_IMAGE_SIZE:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        images.append(img)
        anns.append(ann)
    return images, anns


def ceiling(n: int = 200, seed: int | None = None, size: int = GENERATED_SIZE,
            checker: FaithfulnessChecker | None = None, batch_size: int = 32) -> dict[str, Any]:
    """The judge on real scenes with their own captions: the most a generator can score by it.

    Each scene's facts are those its five captions state (each once); all are true of the scene, so the share
    that holds is the judge's recall per kind.

    Args:
        n: scenes (the first ``n`` of the split).
        seed: split seed (default ``shusheng.data.synthdrive.TEST_SEED``, the fixed test set).
        size: image side the scenes are downsampled to (the generated size).
        checker: default ``FaithfulnessChecker.from_pretrained()``.
        batch_size: images per backbone pass.

    Returns:
        ``{"per_kind": {kind: {"share", "holds", "n"}, ..., "all": ...}, "n_images", "seed", "size",
        "false_facts"}``; ``false_facts`` counts caption facts the annotation contradicts (0 unless
        :func:`prompt_facts` misreads a caption; they are left out).
    """
    from shusheng.data import synthdrive as sd

    checker = checker or FaithfulnessChecker.from_pretrained()
    seed = sd.TEST_SEED if seed is None else int(seed)
    images, anns = synthdrive_images(n, seed, size)
    facts, false_facts = [], 0
    for ann in anns:
        mine: dict[tuple, Fact] = {}
        for caption in ann.captions:
            for f in prompt_facts(caption):
                mine.setdefault(f.key, f)
        true = [f for f in mine.values() if fact_truth(f, ann.attributes)]
        false_facts += len(mine) - len(true)
        facts.append(true)
    results = checker.check_facts(images, facts, [a.captions[0] for a in anns], batch_size)
    return {"per_kind": shares_by_kind(results), "n_images": n, "seed": seed, "size": size,
            "false_facts": false_facts,
            "in_domain": sum(bool(r.in_domain) for r in results) / len(results)}


def embed_images(images: Sequence[Any], model: Any = None, batch_size: int = 32) -> np.ndarray:
    """``(n, 384)`` float64 image features for :func:`frechet_distance`: the bundled mini-clip's L2-normalised
    image embeddings (``model``: any :class:`~shusheng.miniclip.MiniClip`; images are resized by its own
    preprocessing, so 64 x 64 images are upsampled to its 128)."""
    if model is None:
        from shusheng.miniclip import load_bundled

        model = load_bundled()
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    pil = [_to_pil(x, i, len(images)) for i, x in enumerate(images)]
    if not pil:
        raise ValueError("no images given")
    return model.embed_images(pil, batch_size=batch_size).astype(np.float64)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n_a, d)`` and ``(n_b, d)``:

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (the FID formula; the trace of the matrix
    square root is taken from the eigenvalues of the symmetric ``S_a^1/2 S_b S_a^1/2``, which has the same trace
    root as ``S_a S_b``, so no complex parts or ``sqrtm`` are needed). Covariances are the unbiased sample ones.

    Raises:
        ValueError: not two 2-D sets of the same width with at least 2 rows each, or non-finite values.
    """
    a, b = (np.asarray(x, dtype=np.float64) for x in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) feature sets of the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 rows per set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinity")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^1/2
    m = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root))  # >= 0 up to rounding
