"""SynthDrive language side: question answering from attributes, question wordings, and captions.

Everything here reads only the ``attributes`` dict of an annotation, never the picture, so each answer and each
caption can be re-derived and checked. Canonical answers are short lower-case strings:

==========================  ================================================================================
question type               answer
==========================  ================================================================================
``light``                   ``red`` | ``yellow`` | ``green`` | ``none``
``sign``                    ``stop`` | ``yield`` | ``speed limit 30`` | ``speed limit 50`` | ``speed limit 80``
                            | ``none``
``vehicle_count``           a digit string, ``"0"`` .. ``"5"`` (param ``vehicle_type``: ``car``/``truck``/``bus``
                            or absent for all vehicles)
``vehicle_colors``          the distinct colours in alphabetical order joined by ``", "``, or ``none``
``has_color``               ``yes`` | ``no`` (param ``color``)
``pedestrians``             ``yes`` | ``no``
``pedestrian_location``     ``crosswalk`` | ``sidewalk`` | ``both`` | ``none``
``weather``                 ``clear`` | ``rain`` | ``fog``
``time``                    ``day`` | ``dusk`` | ``night``
``stop``                    ``yes`` when the light is red, the sign is a stop sign or a pedestrian is on the
                            crosswalk, else ``no`` (a yellow light alone does not require a stop)
==========================  ================================================================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from shusheng.data.synthdrive_render import COLORS, VEHICLE_TYPES

__all__ = ["QA_TYPES", "answer", "make_captions", "make_qa", "question_pool_size"]

QA_TYPES = (
    "light", "sign", "vehicle_count", "vehicle_colors", "has_color", "pedestrians", "pedestrian_location",
    "weather", "time", "stop",
)
_SIGN_ANSWER = {"stop": "stop", "yield": "yield", "speed_30": "speed limit 30", "speed_50": "speed limit 50",
                "speed_80": "speed limit 80", "none": "none"}


def answer(question_type: str, attributes: dict[str, Any], **params: Any) -> str:
    """The canonical answer to a question of ``question_type`` about a scene with ``attributes``.

    Args:
        question_type: one of ``QA_TYPES``.
        attributes: the ``attributes`` dict of an annotation.
        **params: ``vehicle_type`` for ``vehicle_count`` (optional), ``color`` for ``has_color``.

    Returns:
        The answer string (see the module docstring for the vocabulary).
    """
    a = attributes
    if question_type == "light":
        return a["light"]
    if question_type == "sign":
        return _SIGN_ANSWER[a["sign"]]
    if question_type == "vehicle_count":
        vt = params.get("vehicle_type")
        return str(sum(1 for v in a["vehicles"] if vt is None or v["type"] == vt))
    if question_type == "vehicle_colors":
        colors = sorted({v["color"] for v in a["vehicles"]})
        return ", ".join(colors) if colors else "none"
    if question_type == "has_color":
        return "yes" if any(v["color"] == params["color"] for v in a["vehicles"]) else "no"
    if question_type == "pedestrians":
        return "yes" if a["pedestrians"] else "no"
    if question_type == "pedestrian_location":
        where = {p["on_crosswalk"] for p in a["pedestrians"]}
        return {frozenset(): "none", frozenset({True}): "crosswalk", frozenset({False}): "sidewalk"}.get(
            frozenset(where), "both")
    if question_type == "weather":
        return a["weather"]
    if question_type == "time":
        return a["time"]
    if question_type == "stop":
        stop = a["light"] == "red" or a["sign"] == "stop" or any(p["on_crosswalk"] for p in a["pedestrians"])
        return "yes" if stop else "no"
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QA_TYPES}")


# ---------------------------------------------------------------- question wordings
# Slots filled at random: {light} {image} {vehicles} {vehicle} {vtypes} {peds} {ego} {color}
_SLOTS: dict[str, tuple[str, ...]] = {
    "light": ("traffic light", "traffic signal", "stoplight", "signal", "light", "traffic lamp"),
    "image": ("image", "picture", "photo", "scene", "frame", "view", "shot"),
    "vehicles": ("vehicles", "motor vehicles", "road vehicles"),
    "vehicle": ("vehicle", "motor vehicle"),
    "peds": ("pedestrians", "people", "people on foot", "walkers", "persons"),
    "ego": ("the car", "the ego vehicle", "our car", "the self-driving car", "my car", "the driver",
            "the vehicle with the camera"),
}
_TYPE_PLURAL = {"car": ("cars", "automobiles", "passenger cars"), "truck": ("trucks", "lorries"),
                "bus": ("buses", "coaches")}
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "light": (
        "What color is the {light}?", "What colour is the {light}?", "Which color is the {light} showing?",
        "What is the {light} showing?", "What state is the {light} in?", "Is the {light} red, yellow or green?",
        "What does the {light} show right now?", "Which lamp of the {light} is lit?",
        "What's the current color of the {light}?", "Tell me the {light} color.",
        "What color is lit on the {light} ahead?", "Which signal state can you see on the {light}?",
    ),
    "sign": (
        "What sign is visible?", "Which road sign can you see?", "What kind of traffic sign is in the {image}?",
        "What does the road sign say?", "Which sign is posted by the road?", "Identify the road sign.",
        "What type of sign is there?", "Which traffic sign appears in the {image}?",
        "What road sign is on the roadside?", "Name the sign next to the road.",
        "What does the sign by the street indicate?",
    ),
    "vehicle_count": (
        "How many {vehicles} are there?", "How many {vehicles} can you see?", "Count the {vehicles}.",
        "What is the number of {vehicles} on the road?", "How many {vehicles} are on the street?",
        "How many {vehicles} are visible in the {image}?", "Number of {vehicles}?",
        "How many {vehicles} do you count?", "Give the count of {vehicles} in the {image}.",
        "How many {vehicles} are in front of {ego}?",
    ),
    "vehicle_colors": (
        "What colors are the {vehicles}?", "Which colours do the {vehicles} have?", "List the colors of the {vehicles}.",
        "What paint colors do the {vehicles} have?", "Name the colours of the {vehicles} you see.",
        "Which colors of {vehicles} appear in the {image}?", "What are the colours of the {vehicles} on the road?",
        "Tell me the colors of all {vehicles}.",
    ),
    "has_color": (
        "Is there a {color} {vehicle}?", "Do you see a {color} {vehicle}?", "Is any {vehicle} {color}?",
        "Can you spot a {color} {vehicle} in the {image}?", "Is there any {color} {vehicle} on the road?",
        "Does the {image} contain a {color} {vehicle}?", "Is one of the {vehicles} {color}?",
    ),
    "pedestrians": (
        "Are there any {peds}?", "Is anyone walking?", "Do you see any {peds}?", "Are there {peds} in the {image}?",
        "Is there a pedestrian?", "Is anybody on foot?", "Can you see {peds} near the road?",
        "Are {peds} present?", "Does the {image} show any {peds}?", "Is somebody walking nearby?",
    ),
    "pedestrian_location": (
        "Where are the {peds}?", "Where are the {peds} walking?", "Are the {peds} on the crosswalk or the sidewalk?",
        "Where can you see {peds}?", "Where is the pedestrian?", "Where are people standing?",
        "On which part of the street are the {peds}?", "Where in the {image} are the {peds}?",
    ),
    "weather": (
        "What is the weather like?", "How is the weather?", "What are the weather conditions?",
        "Is it raining, foggy or clear?", "Describe the weather.", "What's the weather in the {image}?",
        "Which weather condition is shown?", "What kind of weather is it?", "How's the weather on the road?",
    ),
    "time": (
        "What time of day is it?", "Is it day, dusk or night?", "When was this {image} taken?",
        "What part of the day is shown?", "What is the time of day?", "Which time of day does the {image} show?",
        "Roughly what time of day is it?", "At what time of day is {ego} driving?",
    ),
    "stop": (
        "Should {ego} stop?", "Does {ego} need to stop?", "Must {ego} stop here?", "Do we have to stop?",
        "Should I stop the car?", "Is stopping required?", "Does the driver have to stop now?",
        "Is {ego} required to come to a stop?", "Should the driver brake to a stop?",
        "Is a full stop needed right now?", "Must we stop at this point?", "Should {ego} halt?",
    ),
}
_PREFIXES = ("", "", "", "", "Question: ", "Look at the {image}. ", "In this {image}, ", "From the dashcam view, ",
             "Based on the {image}, ", "Looking at the road, ", "Quick check: ", "Tell me: ",
             "Driving assistant query: ", "Hey, ")
_SUFFIXES = ("", "", "", " Answer briefly.", " Please answer in a word or two.")


def question_pool_size(question_type: str) -> int:
    """Approximate number of distinct wordings of ``question_type`` (templates x slots x prefixes x suffixes)."""
    total = 0
    for t in _TEMPLATES[question_type]:
        n = 1
        for slot, words in _SLOTS.items():
            if "{" + slot + "}" in t:
                n *= len(words)
        total += n
    return total * len(_PREFIXES) * len(_SUFFIXES)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _word_question(rng: np.random.Generator, question_type: str, **params: Any) -> str:
    core = _pick(rng, _TEMPLATES[question_type])
    prefix = _pick(rng, _PREFIXES)
    suffix = _pick(rng, _SUFFIXES)
    fill = {k: _pick(rng, v) for k, v in _SLOTS.items()}
    vt = params.get("vehicle_type")
    if vt is not None:
        fill["vehicles"] = _pick(rng, _TYPE_PLURAL[vt])
    if "color" in params:
        fill["color"] = params["color"]
    text = (prefix + core).format(**fill)
    if prefix.endswith(", ") and not core.startswith("I "):
        text = prefix.format(**fill) + core[0].lower() + core[1:].format(**fill)
    return text + suffix


def make_qa(attributes: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Question-answer pairs about a scene: one of each type, plus a per-type vehicle count.

    Each item is ``{"type", "question", "answer", "params"}``; ``answer(type, attributes, **params)`` re-derives
    the answer.
    """
    colors = sorted(COLORS)
    present = sorted({v["color"] for v in attributes["vehicles"]})
    asks: list[tuple[str, dict[str, Any]]] = []
    for t in QA_TYPES:
        if t == "has_color":
            c = _pick(rng, present) if present and rng.random() < 0.5 else _pick(rng, colors)
            asks.append((t, {"color": c}))
        elif t == "vehicle_count":
            asks.append((t, {}))
            asks.append((t, {"vehicle_type": _pick(rng, VEHICLE_TYPES)}))
        else:
            asks.append((t, {}))
    return [{"type": t, "question": _word_question(rng, t, **params), "answer": answer(t, attributes, **params),
             "params": params} for t, params in asks]


# ---------------------------------------------------------------- captions
_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_PLURAL = {"car": "cars", "truck": "trucks", "bus": "buses", "vehicle": "vehicles"}
_TIME_PHRASE = {"day": ("during the day", "in daylight", "in the daytime", "in broad daylight"),
                "dusk": ("at dusk", "at twilight", "at sunset", "in the evening"),
                "night": ("at night", "at nighttime", "after dark", "in the night")}
_TIME_ADJ = {"day": ("daytime",), "dusk": ("twilight", "evening"), "night": ("nighttime", "night")}
_WEATHER_ADJ = {"clear": ("", "dry"), "rain": ("rainy", "wet", "rain-soaked"), "fog": ("foggy", "misty", "hazy")}
_WEATHER_PHRASE = {"clear": ("in clear weather", "in dry weather"), "rain": ("in the rain", "in heavy rain",
                   "during a rain shower"), "fog": ("in thick fog", "in the fog", "in misty conditions")}
_NOUNS = ("street", "road", "city street", "urban road", "town street", "roadway", "street scene")
_LIGHT_WORD = {"red": ("red",), "yellow": ("yellow", "amber"), "green": ("green",)}
_LIGHT_NOUN = ("traffic light", "traffic signal", "stoplight")
_CROSSWALK = ("a crosswalk", "a zebra crossing", "a marked crosswalk")
_LOC = {True: ("on the crosswalk", "on the zebra crossing", "crossing the street", "crossing the road"),
        False: ("on the sidewalk", "on the pavement", "walking on the sidewalk")}


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou8" else "a"


def _count(n: int, noun_sing: str, noun_plural: str, rng: np.random.Generator, adj: str = "") -> str:
    words = f"{adj} " if adj else ""
    if n == 1:
        first = (words or noun_sing)
        det = _a(first) if rng.random() < 0.6 else "one"
        return f"{det} {words}{noun_sing}"
    return f"{_NUM[n]} {words}{noun_plural}"


def _join(parts: list[str]) -> str:
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _vehicles_phrase(vehicles: list[dict], rng: np.random.Generator, style: str) -> str:
    if not vehicles:
        return _pick(rng, ("no vehicles", "no traffic"))
    if style == "total":
        return _count(len(vehicles), "vehicle", "vehicles", rng)
    if style == "types":
        by = Counter(v["type"] for v in vehicles)
        return _join([_count(by[t], t, _PLURAL[t], rng) for t in VEHICLE_TYPES if by[t]])
    by = Counter((v["color"], v["type"]) for v in vehicles)
    groups = sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))
    return _join([_count(n, t, _PLURAL[t], rng, adj=c) for (c, t), n in groups])


def _light_phrase(state: str, rng: np.random.Generator) -> str:
    if state == "none":
        return ""
    w, noun = _pick(rng, _LIGHT_WORD[state]), _pick(rng, _LIGHT_NOUN)
    return _pick(rng, (f"{_a(w)} {w} {noun}", f"{_a(noun)} {noun} showing {w}", f"{_a(noun)} {noun} that is {w}"))


def _sign_phrase(sign: str, rng: np.random.Generator) -> str:
    if sign == "none":
        return ""
    if sign == "stop":
        return "a stop sign"
    if sign == "yield":
        return _pick(rng, ("a yield sign", "a give-way sign"))
    n = sign.split("_")[1]
    return _pick(rng, (f"a speed limit {n} sign", f"{_a(n)} {n} km/h speed limit sign", f"a sign limiting speed to {n}"))


def _peds_phrase(peds: list[dict], rng: np.random.Generator) -> str:
    if not peds:
        return _pick(rng, ("no pedestrians", "no people on foot"))
    if rng.random() < 0.3:
        return _count(len(peds), _pick(rng, ("pedestrian", "person")), _pick(rng, ("pedestrians", "people")), rng)
    parts = []
    for where in (True, False):
        n = sum(1 for p in peds if p["on_crosswalk"] == where)
        if n:
            noun = _count(n, _pick(rng, ("pedestrian", "person")), _pick(rng, ("pedestrians", "people")), rng)
            parts.append(f"{noun} {_pick(rng, _LOC[where])}")
    return _join(parts)


def _scene_phrase(a: dict, rng: np.random.Generator) -> str:
    """``a rainy city street at night`` and variants (with an article)."""
    noun = _pick(rng, _NOUNS)
    t, w = a["time"], a["weather"]
    if t == "day" and w == "clear" and rng.random() < 0.4:
        return f"a sunny {noun}"
    if rng.random() < 0.5:
        adj = _pick(rng, _WEATHER_ADJ[w])
        head = f"{adj} {noun}" if adj else noun
        return f"{_a(head)} {head} {_pick(rng, _TIME_PHRASE[t])}"
    tadj = _pick(rng, _TIME_ADJ[t])
    return f"{_a(tadj)} {tadj} {noun} {_pick(rng, _WEATHER_PHRASE[w])}"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def make_captions(attributes: dict[str, Any], rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct paraphrased captions that state only true facts of ``attributes``.

    The first caption mentions everything (time, weather, vehicles with colours, light, sign, crosswalk,
    pedestrians); the others pick subsets in different sentence shapes and words.
    """
    a = attributes
    veh, peds = a["vehicles"], a["pedestrians"]

    def full() -> str:
        facts = [_vehicles_phrase(veh, rng, "detailed"), _light_phrase(a["light"], rng), _sign_phrase(a["sign"], rng)]
        if a["crosswalk"]:
            facts.append(_pick(rng, _CROSSWALK))
        return f"{_cap(_scene_phrase(a, rng))} with {_join(facts)}; {_peds_phrase(peds, rng)}."

    def vehicles_first() -> str:
        style = _pick(rng, ("detailed", "types", "total"))
        if veh:
            phrase = _vehicles_phrase(veh, rng, style)
            verb = "is" if phrase.split()[0] in ("a", "an", "one") else "are"  # agrees with the first item
            return f"There {verb} {phrase} on {_scene_phrase(a, rng)}."
        return f"{_cap(_scene_phrase(a, rng))} with {_vehicles_phrase(veh, rng, style)}."

    def signals() -> str:
        facts = [_light_phrase(a["light"], rng), _sign_phrase(a["sign"], rng)]
        if not any(facts):
            facts = [_vehicles_phrase(veh, rng, "types")]
        view = _pick(rng, ("A dashcam view of", "A driver's view of", "Looking down", "A camera view of"))
        return f"{view} {_scene_phrase(a, rng)}: {_join(facts)}."

    def people() -> str:
        extra = _pick(rng, _CROSSWALK) if a["crosswalk"] else _vehicles_phrase(veh, rng, "total")
        return f"{_cap(_peds_phrase(peds, rng))} and {extra}, {_pick(rng, _TIME_PHRASE[a['time']])}."

    def short() -> str:
        return f"{_cap(_scene_phrase(a, rng))} with {_vehicles_phrase(veh, rng, _pick(rng, ('types', 'total')))}."

    out = [full()]
    makers = (vehicles_first, signals, people, short, full)
    tries = 0
    while len(out) < n and tries < 50:
        c = makers[int(rng.integers(len(makers)))]()
        tries += 1
        if c not in out:
            out.append(c)
    return out
