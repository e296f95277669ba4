"""SynthDrive VQA as a grid: every fact of a scene asked in every question form that fits it.

The older question set (:func:`shusheng.data.synthdrive_text.make_qa`) asks each fact in one form only (weather
and time only with "what", crosswalks only with "where"), and a model trained on it learns "topic word -> topic
answer" instead of reading the question. Here each **cell** is a ``(fact, form)`` pair:

=====================  =============================================================================
form                   the answer
=====================  =============================================================================
``open``               the value itself ("what/which/where ..."): ``"rain"``, ``"red"``, ``"bus, car"``
``yesno``              ``"yes"``/``"no"``, asked about a true or a false value ("Is it raining?")
``either``             one of the options named in the question ("Is it day or night?" -> ``"night"``)
``count``              a number ``"0"`` .. ``"5"`` ("How many ...?")
``exist``              ``"yes"``/``"no"``: is there any ...? ("Is there a crosswalk?")
``negated``            ``"yes"``/``"no"`` to the negated statement ("Is there no crosswalk?" -> ``"yes"``
                       when there is none)
=====================  =============================================================================

Every cell has two disjoint pools of wordings: ``"train"`` (for training) and ``"test"`` (held-out wordings,
never trained on), and prefixes/suffixes are split the same way. :data:`HELDOUT_CELLS` are whole cells that
training never sees, to measure whether a model learned question forms rather than templates.

Like the rest of SynthDrive's language side, everything reads only the ``attributes`` dict of an annotation:
:func:`grid_answer` re-derives every answer from ``(fact, form, params)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shusheng.data.synthdrive_render import COLORS, SIGNS, TIMES, VEHICLE_TYPES, WEATHERS
from shusheng.data.synthdrive_text import _SIGN_ANSWER, _SLOTS, _TEMPLATES, _TYPE_PLURAL, answer

__all__ = [
    "CELLS", "EVAL_SPLITS", "FACTS", "FORMS", "HELDOUT_CELLS", "TRAIN_CELLS", "VEHICLE_DESCRIPTIONS", "Cell",
    "QuestionPrior",
    "answer_matches_form", "form_answers", "grid_answer", "grid_answers", "grid_eval_questions", "grid_question",
    "grid_questions", "nearest_vehicle", "wording_pool",
]

FORMS = ("open", "yesno", "either", "count", "exist", "negated")
FACTS = (
    "time", "weather", "light", "sign", "speed_limit", "crosswalk", "pedestrians", "pedestrian_location",
    "vehicle_count", "vehicle_types", "vehicle_colors", "color_of_type", "nearest_vehicle", "stop",
)
YES_NO_FORMS = ("yesno", "exist", "negated")
_COLORS = tuple(sorted(COLORS))
#: "colour type" descriptions of one vehicle (the open answers about the nearest vehicle, "red car")
VEHICLE_DESCRIPTIONS = tuple(f"{c} {t}" for c in _COLORS for t in VEHICLE_TYPES)
_LIMITS = ("30", "50", "80")
_NUM_WORD = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_SING = {"car": ("car",), "truck": ("truck", "lorry"), "bus": ("bus", "coach")}
_TIME_NOUN = {"day": "day", "dusk": "dusk", "night": "night"}
_WEATHER_NOUN = {"clear": "clear", "rain": "rain", "fog": "fog"}
_LIGHT_WORD = {"red": ("red",), "yellow": ("yellow", "amber"), "green": ("green",)}
_SIGN_PHRASE = {"stop": ("stop sign",), "yield": ("yield sign", "give-way sign"),
                "speed_30": ("speed limit 30 sign", "30 km/h sign"), "speed_50": ("speed limit 50 sign",
                "50 km/h sign"), "speed_80": ("speed limit 80 sign", "80 km/h sign")}
_SIGN_OPTION = {"stop": "stop sign", "yield": "yield sign", "speed_30": "speed limit 30 sign",
                "speed_50": "speed limit 50 sign", "speed_80": "speed limit 80 sign"}

# prefixes and suffixes: the train pool is SynthDrive's original one, the test pool is new
_PREFIX = {
    "train": ("", "", "", "", "Question: ", "Look at the {image}. ", "Based on the {image}, ", "Quick check: ",
              "Tell me: ", "Driving assistant query: ", "Hey, "),
    "test": ("", "", "", "", "Dashcam question: ", "Looking at this {image}: ", "Please tell me, ",
             "Can you check: ", "One question. "),
}
_SUFFIX = {"train": ("", "", "", " Answer briefly.", " Please answer in a word or two."),
           "test": ("", "", "", " Keep it short.", " One word, please.")}


# --------------------------------------------------------------------------------------------------------
# Wordings: fact -> form -> pool -> templates. Slots: the SynthDrive slots ({light} {image} {vehicles} {vehicle}
# {peds} {ego}) and per-cell ones: {v} a value phrase, {opts} the named options ("red or green"), {vt} a vehicle
# type noun, {vts} its plural, {c} a colour, {place} a pedestrian place, {n} a number word.
# --------------------------------------------------------------------------------------------------------

def _w(train: Sequence[str], test: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"train": tuple(train), "test": tuple(test)}


# open-form training wordings are SynthDrive's original templates; their test wordings were written separately
# (the held-out wordings of bench/uniperceiver_quality.py since stop 10)
_WORDINGS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "time": {
        "open": _w(_TEMPLATES["time"], (
            "Is this scene during daytime, dusk or at night?", "What time is it, roughly?",
            "Which part of the day does this look like?", "At what time of day was this captured?")),
        # {v} is a time phrase: "at night", "during the day", "at dusk"
        "yesno": _w(("Is it {v}?", "Is this {image} taken {v}?", "Are we driving {v}?", "Is the {image} set {v}?",
                     "Is {ego} driving {v}?"),
                    ("Was this taken {v}?", "Is this happening {v}?", "Was the {image} captured {v}?")),
        "either": _w(("Is it {opts}?", "Is this {image} taken during the {opts}?", "Which is it: {opts}?",
                      "Is {ego} driving by {opts}?"),
                     ("Day or night or dusk, which applies here: {opts}?", "Was this shot at {opts}?")),
    },
    "weather": {
        "open": _w(_TEMPLATES["weather"], (
            "What are the weather conditions like today?", "How would you describe the weather?",
            "What's the weather doing?", "Which kind of weather do you see?")),
        # {v}: "raining" / "foggy" / "clear"; written per value in _WEATHER_YESNO below
        "yesno": _w(("{v}",), ("{v}",)),
        "either": _w(("Is the weather {opts}?", "Is it {opts} weather?", "Which weather is it: {opts}?"),
                     ("Would you say the weather is {opts}?", "Weather check, {opts}?")),
        "negated": _w(("Is there no {v}?", "Is there no {v} in the {image}?", "Is the {image} free of {v}?"),
                      ("Is there no {v} at all?", "Is it without {v}?")),
    },
    "light": {
        "open": _w(_TEMPLATES["light"], (
            "Which colour does the signal at the junction display?", "What is the traffic light lit as?",
            "Tell me the signal's current colour, please.", "What colour is showing on the signal?")),
        "yesno": _w(("Is the {light} {v}?", "Is the {light} showing {v}?", "Is the {light} {v} right now?",
                     "Is the {light} ahead {v}?"),
                    ("Is the signal at the junction {v}?", "Does the {light} show {v} at the moment?",
                     "Is the lamp on the {light} {v}?")),
        "either": _w(("Is the {light} {opts}?", "Is the {light} showing {opts}?", "Which is lit: {opts}?"),
                     ("Does the signal display {opts}?", "Is the traffic lamp currently {opts}?")),
        "exist": _w(("Is there a {light}?", "Is there a {light} in the {image}?", "Can you see a {light}?",
                     "Is a {light} visible?"),
                    ("Does this road have a traffic signal?", "Is any traffic light in view?")),
        "negated": _w(("Is there no {light}?", "Is there no {light} in the {image}?", "Is the {image} without a {light}?"),
                      ("Is there no traffic signal here?", "Is the road without any signal?")),
    },
    "sign": {
        "open": _w(_TEMPLATES["sign"], (
            "What does the roadside signboard show?", "Which traffic sign is posted here?",
            "Can you read the road sign for me?", "What kind of signage stands next to the street?")),
        "yesno": _w(("Is there a {v}?", "Is the sign a {v}?", "Do you see a {v}?", "Is a {v} posted?"),
                    ("Is the roadside sign a {v}?", "Is a {v} standing by the road?")),
        "either": _w(("Is the sign a {opts}?", "Is there a {opts}?", "Which sign is it: {opts}?"),
                     ("Is the posted sign a {opts}?", "Does the road show a {opts}?")),
        "exist": _w(("Is there a road sign?", "Is there a traffic sign in the {image}?", "Can you see any sign?",
                     "Is a sign posted by the road?"),
                    ("Does the road have any signage?", "Is any traffic sign visible?")),
        "negated": _w(("Is there no road sign?", "Is there no traffic sign in the {image}?",
                       "Is the road without a sign?"),
                      ("Is there no signage at all?", "Are there no traffic signs here?")),
    },
    "speed_limit": {
        "open": _w(("What is the speed limit?", "What speed limit is posted?", "How fast may {ego} drive?",
                    "What is the posted limit?", "Which speed limit applies here?"),
                   ("What's the limit on this road?", "What is the maximum speed allowed here?",
                    "How fast am I allowed to go?")),
        "yesno": _w(("Is the speed limit {v}?", "Is the posted limit {v}?", "Is the limit {v} km/h?"),
                    ("Is the maximum speed {v} here?", "Does the sign say {v}?")),
        "either": _w(("Is the speed limit {opts}?", "Is the posted limit {opts}?"),
                     ("Is the maximum speed {opts}?", "Does the sign allow {opts}?")),
        "exist": _w(("Is there a speed limit sign?", "Is a speed limit posted?", "Can you see a speed limit?"),
                    ("Is any speed limit shown?", "Does a sign give the speed limit?")),
    },
    "crosswalk": {
        "exist": _w(("Is there a crosswalk?", "Is there a zebra crossing?", "Can you see a crosswalk in the {image}?",
                     "Is a pedestrian crossing marked on the road?"),
                    ("Does the road have a crosswalk?", "Is any zebra crossing visible?")),
        "negated": _w(("Is there no crosswalk?", "Is there no zebra crossing?", "Is the road without a crosswalk?"),
                      ("Is there no pedestrian crossing here?", "Is the street missing a crosswalk?")),
    },
    "pedestrians": {
        "exist": _w(_TEMPLATES["pedestrians"], (
            "Are any people walking here?", "Is there a person on foot anywhere?", "Do you notice anyone walking?")),
        "negated": _w(("Are there no {peds}?", "Is nobody walking?", "Is there no pedestrian?",
                       "Are there no {peds} in the {image}?"),
                      ("Is nobody on foot here?", "Are there no people at all?")),
        "count": _w(("How many {peds} are there?", "How many {peds} can you see?", "Count the {peds}.",
                     "How many {peds} are in the {image}?"),
                    ("What's the number of people walking?", "How many persons are visible?")),
    },
    "pedestrian_location": {
        "open": _w(_TEMPLATES["pedestrian_location"], (
            "In what part of the street are people walking?", "Where exactly are the pedestrians located?",
            "Where is everybody walking?")),
        "either": _w(("Are the {peds} on the crosswalk or the sidewalk?", "Is the pedestrian on the sidewalk or the crosswalk?",
                      "Where are the {peds}: crosswalk or sidewalk?"),
                     ("Are the walkers on the zebra crossing or on the pavement?",
                      "Sidewalk or crosswalk, where are the people?")),
        # {place}: "crosswalk" / "sidewalk" phrases
        "exist": _w(("Is anyone on the {place}?", "Are there {peds} on the {place}?", "Is somebody on the {place}?",
                     "Is a pedestrian on the {place}?"),
                    ("Is anybody walking on the {place}?", "Does anyone stand on the {place}?")),
        "negated": _w(("Is nobody on the {place}?", "Are there no {peds} on the {place}?", "Is the {place} empty?"),
                      ("Is the {place} free of people?", "Is no one on the {place}?")),
        "count": _w(("How many {peds} are on the {place}?", "How many {peds} stand on the {place}?",
                     "Count the {peds} on the {place}."),
                    ("How many people are walking on the {place}?", "What's the number of people on the {place}?")),
    },
    "vehicle_count": {
        "count": _w(_TEMPLATES["vehicle_count"], (
            "How many {vehicles} are on the road in total?", "What's the total number of {vehicles} you notice?",
            "Tell me how many {vehicles} there are.")),
        "yesno": _w(("Are there exactly {n} {vehicles}?", "Is the number of {vehicles} {n}?",
                     "Do you count exactly {n} {vehicles}?"),
                    ("Are exactly {n} {vehicles} visible?", "Is it exactly {n} {vehicles} on the road?")),
        "either": _w(("Are there {opts} {vehicles}?", "Do you see {opts} {vehicles}?",
                      "How many {vehicles}: {opts}?"),
                     ("Is the count of {vehicles} {opts}?", "Are {opts} {vehicles} on the road?")),
        "exist": _w(("Are there any {vehicles}?", "Are there {vehicles} on the road?", "Is there any traffic?",
                     "Can you see any {vehicles}?"),
                    ("Is any vehicle on the road?", "Do you notice any traffic?")),
        "negated": _w(("Are there no {vehicles}?", "Is the road empty?", "Is there no traffic?",
                       "Are there no {vehicles} on the road?"),
                      ("Is the street free of traffic?", "Are no vehicles around?")),
    },
    "vehicle_types": {
        "open": _w(("What types of {vehicles} are there?", "Which kinds of {vehicles} can you see?",
                    "What kinds of {vehicles} are on the road?", "Which vehicle types appear in the {image}?"),
                   ("What sorts of vehicles are present?", "Name the vehicle types you see.")),
        "exist": _w(("Is there a {vt}?", "Can you see a {vt}?", "Is there any {vt} on the road?",
                     "Are there {vts} in the {image}?"),
                    ("Is a {vt} driving here?", "Do you notice any {vts}?")),
        "negated": _w(("Is there no {vt}?", "Are there no {vts}?", "Is there no {vt} on the road?"),
                      ("Are no {vts} present?", "Is the road free of {vts}?")),
        "either": _w(("Is the {vehicle} a {opts}?", "Is it a {opts}?", "Which type is the {vehicle}: {opts}?"),
                     ("Is the only vehicle a {opts}?", "Does the vehicle look like a {opts}?")),
    },
    "vehicle_colors": {
        "open": _w(_TEMPLATES["vehicle_colors"], (
            "Which paint colours can you see on the vehicles?", "What colours are the vehicles painted?",
            "Name every colour of vehicle present.")),
        "exist": _w(_TEMPLATES["has_color"], (
            "Do any of the vehicles have {color} paint?", "Is a {color} vehicle anywhere to be seen?",
            "Any {color} vehicles around?")),
        "negated": _w(("Is there no {color} {vehicle}?", "Are there no {color} {vehicles}?",
                       "Is no {vehicle} {color}?"),
                      ("Is none of the vehicles {color}?", "Are {color} vehicles absent?")),
        "count": _w(("How many {color} {vehicles} are there?", "How many {vehicles} are {color}?",
                     "Count the {color} {vehicles}."),
                    ("What's the number of {color} vehicles?", "How many vehicles painted {color} do you see?")),
    },
    "color_of_type": {
        "open": _w(("What color is the {vt}?", "What colour is the {vt}?", "Which color does the {vt} have?",
                    "What colors are the {vts}?"),
                   ("What paint does the {vt} have?", "Which colour are the {vts} painted?")),
        "yesno": _w(("Is the {vt} {color}?", "Is the {vt} painted {color}?", "Does the {vt} look {color}?"),
                    ("Is that {vt} {color}?", "Would you call the {vt} {color}?")),
        "either": _w(("Is the {vt} {opts}?", "Is the {vt} painted {opts}?", "Which color is the {vt}: {opts}?"),
                     ("Does the {vt} look {opts}?", "Is that {vt} {opts}?")),
        "exist": _w(("Is there a {color} {vt}?", "Can you see a {color} {vt}?", "Is any {vt} {color}?"),
                    ("Is a {color} {vt} on the road?", "Do you notice a {color} {vt}?")),
        "negated": _w(("Is there no {color} {vt}?", "Are there no {color} {vts}?"),
                      ("Is no {vt} {color}?", "Are {color} {vts} absent?")),
        "count": _w(("How many {color} {vts} are there?", "How many {vts} are {color}?", "Count the {color} {vts}."),
                    ("What's the number of {color} {vts}?", "How many {color} {vts} do you see?")),
    },
    "nearest_vehicle": {
        "open": _w(("What is the nearest vehicle?", "Which vehicle is closest to {ego}?",
                    "What vehicle is nearest to the camera?", "Describe the closest vehicle."),
                   ("Which vehicle is right in front of us?", "What's the closest vehicle on the road?")),
        "yesno": _w(("Is the nearest vehicle a {vt}?", "Is the closest vehicle a {vt}?"),
                    ("Is the vehicle closest to us a {vt}?",)),
        "either": _w(("Is the nearest vehicle a {opts}?", "Is the closest vehicle a {opts}?"),
                     ("Is the vehicle closest to us a {opts}?",)),
    },
    "stop": {
        # {v} is unused: "yesno" asks "should we stop?" (polarity +) or "can we go?" (polarity -), see below
        "yesno": _w(("{v}",), ("{v}",)),
        "either": _w(("Should {ego} stop or go?", "Stop or go?", "Should I stop or keep going?",
                      "Does {ego} have to stop or can it go?"),
                     ("Go or stop here?", "Must we stop, or may we go on?")),
        "negated": _w(("Is there no need to stop?", "Is there no reason for {ego} to stop?",
                       "Does {ego} not need to stop?"),
                      ("Is stopping unnecessary here?", "Is there nothing that requires a stop?")),
    },
}
# questions written per value (their answer depends on the value asked about)
_TIME_PHRASE = {"day": ("during the day", "in daylight", "in the daytime"),
                "dusk": ("at dusk", "at twilight", "in the evening"),
                "night": ("at night", "after dark", "at nighttime")}
_WEATHER_YESNO = {
    "rain": _w(("Is it rainy?", "Is it raining in the {image}?", "Is the road wet from rain?", "Is rain falling?"),
               ("Is it raining?", "Does it rain here?", "Is there rain?")),
    "fog": _w(("Is it foggy?", "Is there fog on the road?", "Is the {image} foggy?", "Is it misty?"),
              ("Is there any fog?", "Is visibility reduced by fog?", "Is it hazy with fog?")),
    "clear": _w(("Is the weather clear?", "Is it a clear day?", "Is the sky clear?", "Is the weather fine?"),
                ("Is the weather good?", "Are the conditions clear?", "Is it clear out?")),
}
_STOP_YESNO = {
    True: _w(_TEMPLATES["stop"], ("Do I need to brake and stop here?", "Does our vehicle have to halt now?",
                                  "Is it necessary to stop the car?")),
    False: _w(("Can {ego} keep driving?", "Is it safe to go?", "May {ego} proceed?", "Can we continue driving?",
               "Is {ego} allowed to drive on?"),
              ("Can I go ahead?", "Is it okay to keep going?", "Are we clear to drive on?")),
}


def _add_training_wordings() -> None:
    """Append :mod:`synthdrive_qa_extra`'s wordings (stop 29, written blind to the test pool) to the train pools."""
    from shusheng.data.synthdrive_qa_extra import EXTRA_CELLS, EXTRA_STOP_YESNO, EXTRA_WEATHER_YESNO

    for key, more in EXTRA_CELLS.items():
        fact, form = key.split("/")
        _WORDINGS[fact][form] = {**_WORDINGS[fact][form], "train": _WORDINGS[fact][form]["train"] + tuple(more)}
    for value, more in EXTRA_WEATHER_YESNO.items():
        _WEATHER_YESNO[value] = {**_WEATHER_YESNO[value], "train": _WEATHER_YESNO[value]["train"] + tuple(more)}
    for polarity, more in EXTRA_STOP_YESNO.items():
        _STOP_YESNO[polarity] = {**_STOP_YESNO[polarity], "train": _STOP_YESNO[polarity]["train"] + tuple(more)}


_add_training_wordings()
_WEATHER_NEG = {"rain": "rain", "fog": "fog"}  # "Is there no rain?"; clear weather has no negated wording
_PLACE_WORDS = {"crosswalk": ("crosswalk", "zebra crossing"), "sidewalk": ("sidewalk", "pavement")}


@dataclass(frozen=True)
class Cell:
    """One ``(fact, form)`` cell of the grid."""

    fact: str
    form: str

    @property
    def name(self) -> str:
        return f"{self.fact}/{self.form}"


CELLS: tuple[Cell, ...] = tuple(Cell(f, m) for f in FACTS for m in FORMS if m in _WORDINGS[f])
#: whole cells kept out of training: each form is still trained on other facts and each fact in other forms
HELDOUT_CELLS: tuple[Cell, ...] = (
    Cell("weather", "yesno"), Cell("time", "either"), Cell("sign", "negated"),
    Cell("pedestrian_location", "count"), Cell("vehicle_types", "exist"), Cell("color_of_type", "either"),
)
TRAIN_CELLS: tuple[Cell, ...] = tuple(c for c in CELLS if c not in HELDOUT_CELLS)


# --------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------

def nearest_vehicle(attributes: dict[str, Any]) -> dict[str, Any] | None:
    """The vehicle nearest to the camera: the lowest bottom edge of its box in the image (ties: the larger box)."""
    vs = attributes["vehicles"]
    if not vs:
        return None
    return max(vs, key=lambda v: (v["box"][1] + v["box"][3], v["box"][2] * v["box"][3]))


def _is_stop(a: dict[str, Any]) -> bool:
    return answer("stop", a) == "yes"


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _colors(vs: list[dict[str, Any]]) -> str:
    cs = sorted({v["color"] for v in vs})
    return ", ".join(cs) if cs else "none"


def _value(fact: str, a: dict[str, Any], p: dict[str, Any]) -> str:
    """The open value of ``fact`` (the answer of the ``open`` form, and what ``either`` and ``yesno`` compare)."""
    vs = a["vehicles"]
    if fact in ("time", "weather", "light", "sign", "pedestrian_location", "vehicle_colors"):
        return answer(fact, a)  # the facts SynthDrive's own questions already answer
    if fact == "vehicle_count":
        return answer(fact, a, vehicle_type=p.get("vehicle_type"))
    if fact == "speed_limit":
        return a["sign"].split("_")[1] if a["sign"].startswith("speed_") else "none"
    if fact == "vehicle_types":
        ts = sorted({v["type"] for v in vs})
        return ", ".join(ts) if ts else "none"
    if fact == "color_of_type":
        return _colors([v for v in vs if v["type"] == p["vehicle_type"]])
    if fact == "nearest_vehicle":
        v = nearest_vehicle(a)
        return "none" if v is None else (f"{v['color']} {v['type']}" if p.get("part") != "type" else v["type"])
    if fact == "stop":
        return "stop" if _is_stop(a) else "go"
    raise ValueError(f"fact {fact!r} has no open value")


def grid_answer(fact: str, form: str, attributes: dict[str, Any], **params: Any) -> str:
    """The canonical answer to the ``(fact, form)`` question with ``params`` about a scene with ``attributes``.

    ``params`` (as drawn by :func:`grid_question`): ``value`` (the value a yes/no or negated question asks about),
    ``options`` (either/or), ``vehicle_type``, ``color``, ``place``, ``polarity`` (stop yes/no: ``True`` asks
    "should we stop?", ``False`` asks "can we go?").
    """
    if Cell(fact, form) not in CELLS:
        raise ValueError(f"no cell {fact}/{form}; cells: {[c.name for c in CELLS]}")
    a, p = attributes, params
    vs, peds = a["vehicles"], a["pedestrians"]
    if form == "open":
        return _value(fact, a, p)
    if form == "either":
        return _value(fact, a, p)  # the true value, which is always one of the named options
    if form == "count":
        if fact == "pedestrians":
            return str(len(peds))
        if fact == "pedestrian_location":
            return str(sum(1 for q in peds if q["on_crosswalk"] == (p["place"] == "crosswalk")))
        if fact == "vehicle_count":
            return _value(fact, a, p)
        if fact == "vehicle_colors":
            return str(sum(1 for v in vs if v["color"] == p["color"]))
        if fact == "color_of_type":
            return str(sum(1 for v in vs if v["color"] == p["color"] and v["type"] == p["vehicle_type"]))
    # yes/no forms: first the statement the question asks about, then its polarity
    if fact == "stop":
        truth = _is_stop(a)
        if form == "yesno":
            return _yn(truth if p["polarity"] else not truth)
        return _yn(not truth)  # negated: "Is there no need to stop?"
    if (form == "yesno" and fact in ("time", "weather", "light", "speed_limit")) or (fact, form) == ("weather", "negated"):
        truth = _value(fact, a, p) == p["value"]
    elif fact == "sign" and form == "yesno":
        truth = a["sign"] == p["value"]
    elif fact == "light" or fact == "sign" or fact == "speed_limit":  # exist / negated: is there any?
        truth = a[fact if fact != "speed_limit" else "sign"] != "none" and (
            fact != "speed_limit" or a["sign"].startswith("speed_"))
    elif fact == "crosswalk":
        truth = bool(a["crosswalk"])
    elif fact == "pedestrians":
        truth = bool(peds)
    elif fact == "pedestrian_location":
        truth = any(q["on_crosswalk"] == (p["place"] == "crosswalk") for q in peds)
    elif fact == "vehicle_count":
        truth = len(vs) > 0 if form != "yesno" else _value(fact, a, p) == str(p["value"])
    elif fact == "vehicle_types":
        truth = any(v["type"] == p["vehicle_type"] for v in vs)
    elif fact == "vehicle_colors":
        truth = any(v["color"] == p["color"] for v in vs)
    elif fact == "color_of_type":
        truth = any(v["color"] == p["color"] and v["type"] == p["vehicle_type"] for v in vs)
    elif fact == "nearest_vehicle":
        v = nearest_vehicle(a)
        truth = v is not None and v["type"] == p["vehicle_type"]
    else:  # pragma: no cover - CELLS guards this
        raise ValueError(f"no yes/no answer for {fact}/{form}")
    return _yn(not truth if form == "negated" else truth)


def grid_answers() -> list[str]:
    """Every answer a grid question can have (beyond the older SynthDrive answers: limits, vehicle types and
    their combinations, ``colour type`` pairs and ``go``)."""
    out = ["yes", "no", "none", *(str(i) for i in range(6)), *TIMES, *WEATHERS, "red", "yellow", "green",
           *(_SIGN_ANSWER[s] for s in SIGNS if s != "none"), *_LIMITS, "crosswalk", "sidewalk", "both",
           *(", ".join(c) for k in range(1, 4) for c in itertools.combinations(sorted(VEHICLE_TYPES), k)),
           *(", ".join(c) for k in range(1, 6) for c in itertools.combinations(_COLORS, k)),
           *VEHICLE_DESCRIPTIONS, "stop", "go"]
    return list(dict.fromkeys(out))


def form_answers(fact: str, form: str, params: dict[str, Any]) -> set[str] | None:
    """The answers whose form fits the question (``None``: any value of the fact, the open form)."""
    if form in YES_NO_FORMS:
        return {"yes", "no"}
    if form == "either":
        return set(params["options"])
    if form == "count":
        return {str(i) for i in range(6)}
    return None


def answer_matches_form(fact: str, form: str, params: dict[str, Any], answer: str) -> bool:
    """Whether ``answer`` has the form the question asks for: yes/no for yes/no questions, one of the named
    options for either/or, a number for counts, and for open questions a value of the asked fact (not yes/no, and
    a number only where the fact is a number)."""
    allowed = form_answers(fact, form, params)
    if allowed is not None:
        return answer in allowed
    if answer in ("yes", "no"):
        return False
    if fact == "speed_limit":
        return answer in (*_LIMITS, "none")
    return not answer.isdigit()


# --------------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _options(rng: np.random.Generator, truth: str, pool: Sequence[str], k: int | None = None) -> list[str]:
    """``k`` (2, or 3 a quarter of the time) options in random order, one of them ``truth``."""
    others = [x for x in pool if x != truth]
    k = k or (3 if len(others) >= 2 and rng.random() < 0.25 else 2)
    chosen = [truth] + [others[int(j)] for j in rng.choice(len(others), size=k - 1, replace=False)]
    return [chosen[int(j)] for j in rng.permutation(len(chosen))]


def _or(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _draw_params(cell: Cell, a: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
    """Random parameters of a question of ``cell`` about scene ``a`` (``None``: the cell does not apply)."""
    f, m = cell.fact, cell.form
    vs, peds = a["vehicles"], a["pedestrians"]
    present_types = sorted({v["type"] for v in vs})
    present_colors = sorted({v["color"] for v in vs})
    half = rng.random() < 0.5  # ask about a true value about half of the time

    def value_of(pool: Sequence[str], truth: str) -> str:
        return truth if half and truth in pool else _pick(rng, [x for x in pool if x != truth] or list(pool))

    if f in ("time", "weather", "light", "sign", "speed_limit") and m in ("open", "exist"):
        return {}
    if f == "time":
        return {"value": value_of(TIMES, a["time"])} if m == "yesno" else {"options": _options(rng, a["time"], TIMES)}
    if f == "weather":
        if m == "yesno":
            return {"value": value_of(WEATHERS, a["weather"])}
        if m == "negated":
            return {"value": value_of(("rain", "fog"), a["weather"])}
        return {"options": _options(rng, a["weather"], WEATHERS)}
    if f == "light":
        if m == "negated":
            return {}
        if a["light"] == "none" and m == "either":
            return None
        states = ("red", "yellow", "green")
        return {"value": value_of(states, a["light"])} if m == "yesno" else {"options": _options(rng, a["light"], states)}
    if f == "sign":
        kinds = tuple(s for s in SIGNS if s != "none")
        if m == "negated":
            return {}
        if m == "yesno":
            return {"value": value_of(kinds, a["sign"])}
        if a["sign"] == "none":
            return None
        return {"options": [_SIGN_ANSWER[s] for s in _options(rng, a["sign"], kinds)]}
    if f == "speed_limit":
        truth = _value(f, a, {})
        if m == "yesno":
            return {"value": value_of(_LIMITS, truth)}
        return None if truth == "none" else {"options": _options(rng, truth, _LIMITS)}
    if f in ("crosswalk", "pedestrians"):
        return {}
    if f == "pedestrian_location":
        if m == "open":
            return {}
        if m == "either":
            where = _value(f, a, {})
            return {"options": ["crosswalk", "sidewalk"]} if where in ("crosswalk", "sidewalk") else None
        on = sorted({"crosswalk" if q["on_crosswalk"] else "sidewalk" for q in peds})
        return {"place": _pick(rng, on) if on and half else _pick(rng, ("crosswalk", "sidewalk"))}
    if f == "vehicle_count":
        vt = _pick(rng, VEHICLE_TYPES) if m in ("count", "yesno", "either") and rng.random() < 0.4 else None
        n = int(_value(f, a, {"vehicle_type": vt}))
        if m == "yesno":
            other = [k for k in range(6) if k != n]
            return {"vehicle_type": vt, "value": str(n if half else _pick(rng, other[:4] if n < 2 else other))}
        if m == "either":
            return {"vehicle_type": vt, "options": _options(rng, str(n), [str(k) for k in range(6)], k=2)}
        return {"vehicle_type": vt} if m == "count" else {}
    if f == "vehicle_types":
        if m == "open":
            return {}
        if m == "either":
            return {"options": _options(rng, vs[0]["type"], VEHICLE_TYPES)} if len(vs) == 1 else None
        return {"vehicle_type": _pick(rng, present_types) if present_types and half else _pick(rng, VEHICLE_TYPES)}
    if f == "vehicle_colors":
        if m == "open":
            return {}
        return {"color": _pick(rng, present_colors) if present_colors and half else _pick(rng, _COLORS)}
    if f == "color_of_type":
        if not present_types:
            return None
        vt = _pick(rng, present_types)
        of_type = [v for v in vs if v["type"] == vt]
        if m == "open":
            return {"vehicle_type": vt}
        if m in ("yesno", "either"):
            if len(of_type) != 1:
                return None
            c = of_type[0]["color"]
            if m == "yesno":
                return {"vehicle_type": vt, "color": value_of(_COLORS, c)}
            return {"vehicle_type": vt, "options": _options(rng, c, _COLORS)}
        cs = sorted({v["color"] for v in of_type})
        return {"vehicle_type": vt, "color": _pick(rng, cs) if half else _pick(rng, _COLORS)}
    if f == "nearest_vehicle":
        v = nearest_vehicle(a)
        if m == "open":
            return {}
        if v is None:
            return None
        if m == "yesno":
            return {"vehicle_type": value_of(VEHICLE_TYPES, v["type"]), "part": "type"}
        return {"options": _options(rng, v["type"], VEHICLE_TYPES), "part": "type"}
    if f == "stop":
        if m == "either":
            return {"options": ["stop", "go"]}
        return {"polarity": bool(rng.random() < 0.5)} if m == "yesno" else {}
    raise ValueError(f"no parameters for {cell.name}")  # pragma: no cover


def wording_pool(cell: Cell, pool: str, params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The templates of ``cell`` in ``pool`` (``"train"`` or ``"test"``); some cells word each value separately."""
    if pool not in ("train", "test"):
        raise ValueError(f"pool must be 'train' or 'test', got {pool!r}")
    if cell.fact == "weather" and cell.form == "yesno":
        return _WEATHER_YESNO[(params or {}).get("value", "rain")][pool]
    if cell.fact == "stop" and cell.form == "yesno":
        return _STOP_YESNO[(params or {}).get("polarity", True)][pool]
    return _WORDINGS[cell.fact][cell.form][pool]


def _fill(cell: Cell, params: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
    fill = {k: _pick(rng, v) for k, v in _SLOTS.items()}
    f, p = cell.fact, params
    vt = p.get("vehicle_type")
    if vt is not None:
        fill["vt"], fill["vts"] = _pick(rng, _SING[vt]), _pick(rng, _TYPE_PLURAL[vt])
        if f == "vehicle_count":
            fill["vehicles"] = fill["vts"]
    if "color" in p:
        fill["color"] = fill["c"] = p["color"]
    if "place" in p:
        fill["place"] = _pick(rng, _PLACE_WORDS[p["place"]])
    if "value" in p:
        v = p["value"]
        fill["n"] = _NUM_WORD[int(v)] if f == "vehicle_count" else ""
        fill["v"] = {"time": lambda: _pick(rng, _TIME_PHRASE[v]), "weather": lambda: _WEATHER_NEG.get(v, v),
                     "light": lambda: _pick(rng, _LIGHT_WORD[v]), "sign": lambda: _pick(rng, _SIGN_PHRASE[v]),
                     "speed_limit": lambda: v}.get(f, lambda: str(v))()
    if "options" in p:
        opts = p["options"]
        if f == "sign":
            inv = {ans: s for s, ans in _SIGN_ANSWER.items()}
            words = [_SIGN_OPTION[inv[o]] for o in opts]
        elif f == "light":
            words = [_pick(rng, _LIGHT_WORD[o]) for o in opts]
        elif f == "time":
            words = [_TIME_NOUN[o] for o in opts]
        elif f == "weather":
            words = [_WEATHER_NOUN[o] for o in opts]
        elif f == "vehicle_count":
            words = [_NUM_WORD[int(o)] for o in opts]
        else:
            words = list(opts)
        fill["opts"] = _or(words)
    return fill


def grid_question(cell: Cell, attributes: dict[str, Any], rng: np.random.Generator, pool: str = "train"
                  ) -> dict[str, Any] | None:
    """One question of ``cell`` about a scene, worded from ``pool``: ``{"type", "form", "question", "answer",
    "params"}`` (``type`` is the fact), or ``None`` when the cell does not apply to the scene (e.g. "Is the light
    red or green?" without a traffic light)."""
    params = _draw_params(cell, attributes, rng)
    if params is None:
        return None
    core = _pick(rng, wording_pool(cell, pool, params))
    fill = _fill(cell, params, rng)
    prefix, suffix = _pick(rng, _PREFIX[pool]), _pick(rng, _SUFFIX[pool])
    text = core.format(**fill)
    if prefix.endswith(", "):  # "Based on the image, is it raining?"
        text = text[0].lower() + text[1:]
    return {"type": cell.fact, "form": cell.form, "question": prefix.format(**fill) + text + suffix,
            "answer": grid_answer(cell.fact, cell.form, attributes, **params), "params": params}


def grid_questions(attributes: dict[str, Any], rng: np.random.Generator, pool: str = "train",
                   cells: Sequence[Cell] = TRAIN_CELLS, k: int | None = None) -> list[dict[str, Any]]:
    """Questions about a scene: one per applicable cell of ``cells``, or ``k`` cells drawn at random (uniformly
    among those that apply)."""
    order = list(cells) if k is None else [cells[int(j)] for j in rng.permutation(len(cells))]
    out = []
    for cell in order:
        q = grid_question(cell, attributes, rng, pool)
        if q is not None:
            out.append(q)
            if k is not None and len(out) == k:
                break
    return out


# --------------------------------------------------------------------------------------------------------
# The fixed evaluation set and the question-only prior
# --------------------------------------------------------------------------------------------------------

#: evaluation splits of :func:`grid_eval_questions`
EVAL_SPLITS = ("seen", "heldout_wording", "heldout_cell")


def grid_eval_questions(attributes: dict[str, Any], index: int, seed: int = 2023) -> list[dict[str, Any]]:
    """The fixed grid questions about scene ``index`` of an evaluation split, each with a ``split`` key:

    * ``"seen"``: every training cell, worded from the training pool;
    * ``"heldout_wording"``: every training cell, worded from the test pool;
    * ``"heldout_cell"``: every held-out cell (test wordings).

    Deterministic in ``(seed, index)``: the same scene always gets the same questions.
    """
    out = []
    for split, pool, cells in (("seen", "train", TRAIN_CELLS), ("heldout_wording", "test", TRAIN_CELLS),
                               ("heldout_cell", "test", HELDOUT_CELLS)):
        for cell in cells:
            rng = np.random.default_rng([seed, index, CELLS.index(cell), EVAL_SPLITS.index(split)])
            q = grid_question(cell, attributes, rng, pool)
            if q is not None:
                out.append({**q, "split": split})
    return out


def _prior_key(q: dict[str, Any]) -> tuple:
    p = dict(q["params"])
    if "options" in p:
        p["options"] = tuple(sorted(p["options"]))
    return (q["type"], q["form"], tuple(sorted((k, str(v)) for k, v in p.items())))


class QuestionPrior:
    """The blind (question-only) baseline: the most frequent training answer of the same question.

    "The same question" is the cell with the same parameters (the value, colour, vehicle type or place asked
    about, the named options), so the baseline knows exactly what is asked and only lacks the image. Keys never
    seen in training fall back to the cell's most frequent answer that fits the question's form.
    """

    def __init__(self, train_attributes: Sequence[dict[str, Any]], seed: int = 0, per_scene: int | None = None):
        from collections import Counter, defaultdict

        self.by_key: dict[tuple, Counter] = defaultdict(Counter)
        self.by_cell: dict[tuple, Counter] = defaultdict(Counter)
        rng = np.random.default_rng(seed)
        for a in train_attributes:
            for q in grid_questions(a, rng, "train", CELLS, k=per_scene):
                self.by_key[_prior_key(q)][q["answer"]] += 1
                self.by_cell[(q["type"], q["form"])][q["answer"]] += 1

    def __call__(self, q: dict[str, Any]) -> str:
        c = self.by_key.get(_prior_key(q))
        if c:
            return c.most_common(1)[0][0]
        for ans, _ in self.by_cell[(q["type"], q["form"])].most_common():
            if answer_matches_form(q["type"], q["form"], q["params"], ans):
                return ans
        return "no"
