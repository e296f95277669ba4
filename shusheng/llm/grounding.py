"""Grounding check: which objects and attributes a text names that the image evidence does not support.

A chat answer about a SynthDrive scene names things from a small vocabulary: vehicles (car, truck, bus, with
one of eight colours and maybe a number), the traffic light and its state, signs (stop, yield, speed limits),
pedestrians (on the crosswalk or the sidewalk), the crosswalk, the weather and the time of day.
:func:`find_mentions` finds those mentions (with simple negation: "no crosswalk", "it is not raining") and
:func:`unsupported_mentions` keeps the ones the evidence contradicts:

* the scene's true ``attributes`` (``shusheng.data`` annotations): everything is known, counts included;
* detections ``[{"label": ..., ...}]`` of the bundled dense detector
  (:class:`shusheng.detection.DenseObjectDetector`, labels ``shusheng.data.synthdrive.DENSE_LABELS``): vehicles,
  pedestrians, light state, signs and crosswalk; it cannot see the weather or the time, and merges touching
  objects, so those mentions and exact counts are not judged.

    >>> unsupported_mentions("A red bus waits at a green light in the rain.", scene_attributes)
    [Mention(kind='vehicle', value='red bus', text='red bus', ...)]

This is a keyword check, not a parser: it finds the phrasings SynthDrive's captions use and common variants
(number words and digits, plural and synonym nouns, a few adjectives between a number, a colour and a vehicle:
"two parked red cars", "a yellow school bus"; "no traffic", "nobody on the crosswalk"; weather and time words
beyond the captions': "showers", "cloudless", "midnight", "dawn"); anything it cannot tie to the vocabulary is
left unjudged rather than reported. SynthDrive has three times of day, so dawn and sunrise count as ``dusk``
(the same low-sun sky). The text-to-image faithfulness check (:mod:`shusheng.generation.pipelines.faithfulness`) reads
prompts with the same finder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Evidence", "Mention", "find_mentions", "unsupported_mentions"]

_COLORS = {"red": "red", "blue": "blue", "green": "green", "yellow": "yellow", "white": "white", "black": "black",
           "silver": "silver", "grey": "silver", "gray": "silver", "orange": "orange"}
_LIGHT_STATES = {"red": "red", "yellow": "yellow", "amber": "yellow", "orange": "yellow", "green": "green"}
_VEHICLES = {"car": "car", "cars": "car", "automobile": "car", "automobiles": "car", "sedan": "car", "sedans": "car",
             "truck": "truck", "trucks": "truck", "lorry": "truck", "lorries": "truck",
             "bus": "bus", "buses": "bus", "busses": "bus", "coach": "bus", "coaches": "bus",
             "vehicle": None, "vehicles": None, "traffic": None}
_NUMBERS = {"zero": 0, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, **{str(i): i for i in range(11)}}
# words that may stand between a number, a colour and a vehicle noun ("two parked red cars", "a red delivery truck")
_VEHICLE_ADJ = ("parked", "moving", "passing", "waiting", "stopped", "oncoming", "small", "large", "big", "little",
                "long", "old", "new", "shiny", "lone", "city", "delivery", "school", "tour", "pickup", "passenger")
# "traffic" names vehicles ("no traffic", "heavy traffic"), except in these compounds
_TRAFFIC_COMPOUND = re.compile(r"\s+(?:lights?|signals?|signs?|lamps?|lanes?|cones?|islands?|police|rules?|laws?)\b")
_PEOPLE = ("pedestrians", "pedestrian", "people", "persons", "person", "walkers", "walker", "men", "man", "women",
           "woman", "children", "child", "someone", "somebody")


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_NUM = rf"(?:(?P<num>{_alt(_NUMBERS)})\s+)?"
_ADJS = rf"(?:(?:{_alt(_VEHICLE_ADJ)})\s+)*"
_VEHICLE_RE = re.compile(rf"\b{_NUM}{_ADJS}(?:(?P<color>{_alt(_COLORS)})\s+)?{_ADJS}(?P<noun>{_alt(_VEHICLES)})\b")
_LIGHT_NOUN = r"(?:traffic\s+lights?|traffic\s+signals?|stop\s?lights?|signals?|lights?)"
_LIGHT_BEFORE = re.compile(rf"\b(?P<state>{_alt(_LIGHT_STATES)})\s+{_LIGHT_NOUN}\b")
_LIGHT_AFTER = re.compile(rf"\b{_LIGHT_NOUN}\s+(?:(?:that|which)\s+)?(?:is\s+|are\s+|shows\s+|showing\s+|turned\s+|"
                          rf"turning\s+|displaying\s+|on\s+|at\s+)?(?:now\s+)?(?P<state>{_alt(_LIGHT_STATES)})\b")
_LIGHT_ANY = re.compile(r"\b(?:traffic\s+lights?|traffic\s+signals?|stop\s?lights?)\b")
_SIGNS = [
    (re.compile(r"\bstop\s+signs?\b"), "stop"),
    (re.compile(r"\b(?:yield|give[\s-]way)\s+signs?\b"), "yield"),
    (re.compile(r"\bspeed[\s-]limit(?:\s+signs?)?(?:\s+(?:of|showing|is|reads|at|to))?\s+(?P<n>\d+)"), "speed"),
    (re.compile(r"\bsigns?\s+limiting\s+(?:the\s+)?speed\s+to\s+(?P<n>\d+)"), "speed"),
    (re.compile(r"\b(?P<n>\d+)\s*(?:km/h|kmh|kph|mph)(?:\s+(?:speed\s+)?(?:limit\s+)?signs?)?"), "speed"),
    (re.compile(r"\bspeed[\s-]limit(?:\s+signs?)?\b"), "speed"),
    (re.compile(r"\b(?:road\s+|traffic\s+|street\s+)?signs?\b(?!\s+of\b)"), None),  # not "no sign of rain"
]
# "pedestrian crossing" is the crosswalk, "a man crossing the road" a pedestrian
_PEDESTRIAN_RE = re.compile(rf"\b{_NUM}(?P<noun>{_alt(_PEOPLE)})\b(?!\s+crossings?\b(?!\s+(?:the|a|an)\b))")
_NOBODY_RE = re.compile(r"\b(?:nobody|no[\s-]one)\b")  # a pedestrian mention that is its own negation
_AT_CROSSWALK = re.compile(r"\b(?:on|at|in|across|crossing|using)\s+(?:the\s+|a\s+)?(?:marked\s+)?"
                           r"(?:crosswalk|zebra\s+crossing|pedestrian\s+crossing)\b"
                           r"|\bcrossing\s+the\s+(?:street|road)\b")
_AT_SIDEWALK = re.compile(r"\b(?:on|along|at)\s+(?:the\s+|a\s+)?(?:sidewalk|pavement)\b")
_CROSSWALK_RE = re.compile(r"\b(?:crosswalks?|zebra\s+crossings?|pedestrian\s+crossings?)\b")
_WEATHER = [
    (re.compile(r"\b(?:rain|rainy|raining|rain-soaked|rainfall|rainstorm|wet|drizzle|drizzling|downpour|pouring|"
                r"showers?|showery|storm|stormy|thunderstorm)\b"), "rain"),
    (re.compile(r"\b(?:fog|foggy|fog-bound|fogbound|mist|misty|haze|hazy)\b"), "fog"),
    (re.compile(r"\b(?:sunny|sunshine|sunlit|cloudless|dry|fine\s+weather|"
                r"clear\s+(?:weather|sky|skies|conditions|day|night|morning|afternoon|evening)|"
                r"(?:sky|skies|weather)\s+(?:is\s+|are\s+)?clear)\b"), "clear"),
]
_TIME = [
    (re.compile(r"\b(?:daytime|daylight|day-time|day|morning|afternoon|noon|midday|mid-day)\b"), "day"),
    (re.compile(r"\b(?:dusk|evening|twilight|sunset|sundown|dawn|sunrise|daybreak)\b"), "dusk"),
    (re.compile(rf"\b(?:night-time|nighttime|night|midnight|after\s+dark|"
                rf"dark\b(?!\s+(?:{_alt(_COLORS)}|{_alt(_VEHICLES)})))"), "night"),
]
_CLAUSE_CUT = re.compile(r"[.,;:!?]|\b(?:and|but|while|whereas|with|although|though)\b")
_NEGATION = re.compile(r"\b(?:no|not|without|never|none|nor|isn't|aren't|isn’t|aren’t|there's\s+no)\b|n't\b")
# a preposition after the negation ends its reach: "no cars at the red light", "no pedestrians on the crosswalk"
_PLACE_WORD = re.compile(r"\b(?:at|on|in|near|by|under|beside|behind|next|along|across|past|before|after)\b")


@dataclass(frozen=True)
class Mention:
    """One thing a text names.

    Attributes:
        kind: ``"vehicle"``, ``"light"``, ``"sign"``, ``"pedestrian"``, ``"crosswalk"``, ``"weather"`` or
            ``"time"``.
        value: the normalised claim: ``"red bus"``, ``"bus"``, ``"red vehicle"``, ``"vehicle"``; a light state
            (``"red"``) or ``"any"``; ``"stop"`` / ``"yield"`` / ``"speed_50"`` / ``"speed"`` / ``"any"``;
            ``"on crosswalk"`` / ``"on sidewalk"`` / ``"any"``; ``"crosswalk"``; ``"rain"``; ``"night"``.
        text: the words as written.
        start, end: their span in the text.
        negated: the text says it is absent ("no crosswalk", "not raining", "zero buses").
        count: a number the text gives ("two buses" → 2), else None.
    """

    kind: str
    value: str
    text: str
    start: int
    end: int
    negated: bool = False
    count: int | None = None

    def __str__(self) -> str:
        return self.text


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - 60):start]
    cuts = list(_CLAUSE_CUT.finditer(before))
    clause = before[cuts[-1].end():] if cuts else before
    words = " ".join(clause.split()[-4:])
    negations = list(_NEGATION.finditer(words))
    return bool(negations) and not _PLACE_WORD.search(words, negations[-1].end())


def find_mentions(text: str) -> list[Mention]:
    """Every vocabulary mention in ``text``, in order of appearance (see the module docstring)."""
    low = text.lower()
    found: list[Mention] = []
    taken: list[tuple[int, int, str]] = []

    def add(kind: str, value: str, m: re.Match, count: int | None = None, span: tuple[int, int] | None = None):
        s, e = span or m.span()
        if any(k == kind and s < te and ts < e for ts, te, k in taken):
            return  # a more specific mention of the same kind covers these words
        taken.append((s, e, kind))
        neg = _negated(low, s) or count == 0
        found.append(Mention(kind, value, text[s:e], s, e, neg, None if count == 0 else count))

    for m in _VEHICLE_RE.finditer(low):
        if m["noun"] == "traffic" and _TRAFFIC_COMPOUND.match(low, m.end()):
            continue  # "traffic light", "traffic sign": not vehicles
        vtype, color = _VEHICLES[m["noun"]], _COLORS.get(m["color"] or "")
        value = f"{color} {vtype or 'vehicle'}" if color else (vtype or "vehicle")
        add("vehicle", value, m, _NUMBERS.get(m["num"] or ""))
    for rx in (_LIGHT_BEFORE, _LIGHT_AFTER):
        for m in rx.finditer(low):
            add("light", _LIGHT_STATES[m["state"]], m)
    for m in _LIGHT_ANY.finditer(low):
        add("light", "any", m)
    for rx, kind in _SIGNS:
        for m in rx.finditer(low):
            if kind == "speed":
                n = m.groupdict().get("n")
                add("sign", f"speed_{int(n)}" if n else "speed", m)
            else:
                add("sign", kind or "any", m)
    def place(end: int) -> str:
        rest = low[end:end + 60]
        cut = re.search(r"[.;:!?]|,\s|\b(?:and|but|while)\b", rest)
        rest = rest[:cut.start()] if cut else rest
        return "on crosswalk" if _AT_CROSSWALK.search(rest) else ("on sidewalk" if _AT_SIDEWALK.search(rest)
                                                                   else "any")

    for m in _PEDESTRIAN_RE.finditer(low):
        add("pedestrian", place(m.end()), m, _NUMBERS.get(m["num"] or ""))
    for m in _NOBODY_RE.finditer(low):
        add("pedestrian", place(m.end()), m, 0)  # "nobody": a count of zero, i.e. negated
    for m in _CROSSWALK_RE.finditer(low):
        add("crosswalk", "crosswalk", m)
    for table, kind in ((_WEATHER, "weather"), (_TIME, "time")):
        for rx, value in table:
            for m in rx.finditer(low):
                add(kind, value, m)
    return sorted(found, key=lambda x: (x.start, x.kind))


@dataclass
class Evidence:
    """What is known about an image; None = not known (mentions of it are not judged).

    Attributes:
        vehicles: ``(type, colour)`` of every vehicle.
        pedestrians: per pedestrian whether it is on the crosswalk.
        lights: the states of the visible traffic lights (empty: no light).
        signs: the visible signs (``"stop"``, ``"yield"``, ``"speed_30"``, ...; empty: none).
        crosswalk: whether there is a crosswalk.
        weather, time: the scene's weather and time of day.
        exact_counts: whether the object lists are complete counts (true attributes) or may merge objects
            (detections).
    """

    vehicles: list[tuple[str, str]] | None = None
    pedestrians: list[bool] | None = None
    lights: set[str] | None = None
    signs: set[str] | None = None
    crosswalk: bool | None = None
    weather: str | None = None
    time: str | None = None
    exact_counts: bool = False

    @classmethod
    def from_attributes(cls, a: Mapping[str, Any]) -> Evidence:
        """From a SynthDrive ``attributes`` dict (``time``, ``weather``, ``light``, ``sign``, ``crosswalk``,
        ``vehicles``, ``pedestrians``)."""
        light, sign = a.get("light", "none"), a.get("sign", "none")
        return cls(vehicles=[(v["type"], v["color"]) for v in a.get("vehicles", [])],
                   pedestrians=[bool(p.get("on_crosswalk")) for p in a.get("pedestrians", [])],
                   lights=set() if light in (None, "none") else {light},
                   signs=set() if sign in (None, "none") else {sign},
                   crosswalk=bool(a.get("crosswalk")), weather=a.get("weather"), time=a.get("time"),
                   exact_counts=True)

    @classmethod
    def from_detections(cls, detections: Sequence[Mapping[str, Any]]) -> Evidence:
        """From ``[{"label": ...}]`` with SynthDrive dense labels (``"red car"``, ``"person on crosswalk"``,
        ``"light red"``, ``"sign speed_50"``, ``"crosswalk"``): weather and time stay unknown."""
        ev = cls(vehicles=[], pedestrians=[], lights=set(), signs=set(), crosswalk=False)
        for d in detections:
            label = str(d["label"])
            head, _, tail = label.partition(" ")
            if label == "crosswalk":
                ev.crosswalk = True
            elif head == "person":
                ev.pedestrians.append(tail == "on crosswalk")
            elif head == "light":
                ev.lights.add(tail)
            elif head == "sign":
                ev.signs.add(tail)
            elif head in _COLORS and tail in ("car", "truck", "bus"):
                ev.vehicles.append((tail, head))
        return ev

    def supports(self, m: Mention) -> bool | None:
        """True / False when the evidence decides the mention, None when it cannot."""
        if m.kind == "vehicle":
            if self.vehicles is None:
                return None
            *color, vtype = m.value.split()
            color = color[0] if color else None
            vtype = None if vtype == "vehicle" else vtype
            n = sum(1 for t, c in self.vehicles if (vtype is None or t == vtype) and (color is None or c == color))
            return self._judge(n, m)
        if m.kind == "pedestrian":
            if self.pedestrians is None:
                return None
            want = {"on crosswalk": True, "on sidewalk": False}.get(m.value)
            return self._judge(sum(1 for p in self.pedestrians if want is None or p == want), m)
        if m.kind == "light":
            if self.lights is None:
                return None
            return self._judge(len(self.lights) if m.value == "any" else int(m.value in self.lights), m)
        if m.kind == "sign":
            if self.signs is None:
                return None
            if m.value == "any":
                n = len(self.signs)
            elif m.value == "speed":
                n = sum(1 for s in self.signs if s.startswith("speed_"))
            else:
                n = int(m.value in self.signs)
            return self._judge(n, m)
        if m.kind == "crosswalk":
            return None if self.crosswalk is None else self._judge(int(self.crosswalk), m)
        if m.kind in ("weather", "time"):
            truth = getattr(self, m.kind)
            return None if truth is None else (truth != m.value if m.negated else truth == m.value)
        return None

    def _judge(self, n: int, m: Mention) -> bool:
        if m.negated:
            return n == 0
        if m.count is not None and self.exact_counts:
            return n == m.count
        return n > 0


def _evidence(evidence: Any) -> Evidence:
    if isinstance(evidence, Evidence):
        return evidence
    if hasattr(evidence, "attributes") and isinstance(evidence.attributes, Mapping):  # an Annotation
        return Evidence.from_attributes(evidence.attributes)
    if isinstance(evidence, Mapping):
        return Evidence.from_attributes(evidence)
    if isinstance(evidence, Sequence) and not isinstance(evidence, (str, bytes)):
        return Evidence.from_detections(evidence)
    raise TypeError(f"evidence must be scene attributes (a dict), detections (a list of dicts with 'label') or an "
                    f"Evidence, got {type(evidence).__name__}")


def unsupported_mentions(text: str, evidence: Any) -> list[Mention]:
    """The mentions of ``text`` that the evidence contradicts.

    Args:
        text: e.g. a chat answer or a caption.
        evidence: the scene's ``attributes`` dict (or an annotation with ``.attributes``), a list of detections
            ``[{"label": ...}]`` from :class:`shusheng.detection.DenseObjectDetector`, or an :class:`Evidence`.

    Returns:
        The unsupported :class:`Mention` s, in order of appearance (``str(m)`` is the phrase as written).
    """
    ev = _evidence(evidence)
    return [m for m in find_mentions(text) if ev.supports(m) is False]
