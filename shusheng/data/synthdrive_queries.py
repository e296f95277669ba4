"""What is asked of a SynthDrive scene, with its exact answer: attribute classes, training targets, query-style
phrases and the retrieval queries with their ground truth.

Everything here reads only a scene's ``attributes`` dict (see :mod:`shusheng.data.synthdrive`), never the picture,
and names values with the vocabulary of :mod:`shusheng.data.synthdrive_render` (``TIMES``, ``COLORS``, ...):

* :data:`ATTRIBUTE_CLASSES` (+ :func:`attribute_labels`): the single-label attribute groups (time, weather,
  traffic light, sign) and the class-name text of each value, for zero-shot classification by matching texts;
* :func:`synthdrive_answers`: the closed set of canonical VQA answers;
* :func:`attribute_targets` (61 binary targets) and :data:`TAG_GROUPS` / :func:`attribute_tags` (class index per
  tag group): multi-label ground truth for auxiliary or pre-training losses;
* :func:`attribute_phrases` / :func:`training_texts`: short query-style phrases stating only facts of a scene,
  and the per-image training texts (captions + phrases) of ``shusheng train clip``;
* :class:`Query`, :data:`PLAIN_QUERIES`, :data:`PARAPHRASE_QUERIES`, :func:`relevance_matrix`: 100 text queries
  whose ground truth is a predicate over ``attributes`` (used by ``bench/retrieval_quality.py`` and by the
  evaluations of ``shusheng train clip``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shusheng.data.synthdrive_render import COLORS, LIGHTS, SIGNS, TIMES, VEHICLE_TYPES, WEATHERS
from shusheng.data.synthdrive_text import _LIGHT_WORD, _NUM, _PLURAL, _SIGN_ANSWER, _a

__all__ = [
    "ATTRIBUTE_CLASSES", "PARAPHRASE_QUERIES", "PLAIN_QUERIES", "TAG_GROUPS", "Query", "attribute_labels",
    "attribute_phrases", "attribute_tags", "attribute_targets", "relevance_matrix", "synthdrive_answers",
    "training_texts",
]

# --------------------------------------------------------------------------------------------------------
# Attribute classes, answers and multi-label targets
# --------------------------------------------------------------------------------------------------------

#: attribute group -> attribute value -> class name (the text an image is matched against)
ATTRIBUTE_CLASSES: dict[str, dict[str, str]] = {
    "time": dict(zip(TIMES, ("daytime", "dusk", "night"), strict=True)),
    "weather": dict(zip(WEATHERS, ("clear weather", "rain", "fog"), strict=True)),
    "light": dict(zip(LIGHTS, ("red traffic light", "yellow traffic light", "green traffic light",
                               "no traffic light"), strict=True)),
    "sign": dict(zip(SIGNS, ("stop sign", "yield sign", "speed limit 30 sign", "speed limit 50 sign",
                             "speed limit 80 sign", "no sign"), strict=True)),
}


def attribute_labels(attributes: dict[str, Any]) -> dict[str, int]:
    """Class index per attribute group of :data:`ATTRIBUTE_CLASSES`."""
    return {g: list(names).index(attributes[g]) for g, names in ATTRIBUTE_CLASSES.items()}


def synthdrive_answers() -> list[str]:
    """Every canonical SynthDrive answer (the closed answer vocabulary of VQA by matching)."""
    colors = sorted(COLORS)
    out = [*LIGHTS, *(_SIGN_ANSWER[s] for s in SIGNS if s != "none")]
    out += [str(i) for i in range(6)] + ["yes", "no", "crosswalk", "sidewalk", "both", *WEATHERS, *TIMES]
    for k in range(1, 6):
        out += [", ".join(c) for c in itertools.combinations(colors, k)]
    from shusheng.data.synthdrive_qa import (
        grid_answers,  # the question grid's answers come after the older ones
    )

    return list(dict.fromkeys(out + grid_answers()))


def attribute_targets(a: dict[str, Any]) -> list[float]:
    """Multi-label ground truth of a scene (61 binary targets): time, weather, light, sign, crosswalk,
    colour x type / type / colour presence, vehicle count, pedestrian places."""
    veh, peds = a["vehicles"], a["pedestrians"]
    t = [a["time"] == x for x in TIMES]
    t += [a["weather"] == x for x in WEATHERS]
    t += [a["light"] == x for x in LIGHTS]
    t += [a["sign"] == x for x in SIGNS]
    t += [bool(a["crosswalk"])]
    t += [any(v["color"] == c and v["type"] == vt for v in veh) for c in COLORS for vt in VEHICLE_TYPES]
    t += [any(v["type"] == vt for v in veh) for vt in VEHICLE_TYPES]
    t += [any(v["color"] == c for v in veh) for c in COLORS]
    t += [len(veh) == n for n in range(6)]
    t += [any(p["on_crosswalk"] for p in peds), any(not p["on_crosswalk"] for p in peds), not peds]
    return [float(x) for x in t]


#: (tag group, number of classes) of :func:`attribute_tags`: the attribute groups, the crosswalk, capped counts
#: per vehicle type and colour, colour x type presence and capped pedestrian counts per place
TAG_GROUPS: tuple[tuple[str, int], ...] = (
    *((g, len(ATTRIBUTE_CLASSES[g])) for g in ("time", "weather", "light", "sign")),
    ("crosswalk", 2),
    *((f"n_{t}", 6) for t in VEHICLE_TYPES),
    *((f"n_{c}", 4) for c in sorted(COLORS)),
    *((f"{c}_{t}", 2) for c in sorted(COLORS) for t in VEHICLE_TYPES),
    ("peds_crosswalk", 4), ("peds_sidewalk", 4),
)


def attribute_tags(attributes: dict[str, Any]) -> dict[str, int]:
    """Class index of every group of :data:`TAG_GROUPS` (what VQA and captions talk about)."""
    a = attributes
    tags = {g: list(ATTRIBUTE_CLASSES[g]).index(a[g]) for g in ("time", "weather", "light", "sign")}
    tags["crosswalk"] = int(bool(a["crosswalk"]))
    vs = a["vehicles"]
    for t in VEHICLE_TYPES:
        tags[f"n_{t}"] = min(5, sum(v["type"] == t for v in vs))
    for c in sorted(COLORS):
        tags[f"n_{c}"] = min(3, sum(v["color"] == c for v in vs))
        for t in VEHICLE_TYPES:
            tags[f"{c}_{t}"] = int(any(v["color"] == c and v["type"] == t for v in vs))
    tags["peds_crosswalk"] = min(3, sum(p["on_crosswalk"] for p in a["pedestrians"]))
    tags["peds_sidewalk"] = min(3, sum(not p["on_crosswalk"] for p in a["pedestrians"]))
    return tags


# --------------------------------------------------------------------------------------------------------
# Query-style phrases generated from the attributes (only true facts)
# --------------------------------------------------------------------------------------------------------

_TIME = {"day": ("during the day", "in daylight", "in the daytime", "by day"),
         "dusk": ("at dusk", "at sunset", "at twilight", "in the evening"),
         "night": ("at night", "after dark", "at nighttime", "in the dark")}
_WEATHER = {"clear": ("in clear weather", "under a clear sky"),
            "rain": ("in the rain", "in rainy weather", "in heavy rain", "on a wet road"),
            "fog": ("in the fog", "in fog", "in foggy weather", "in thick fog")}
_WEATHER_ADJ = {"clear": ("clear", "dry"), "rain": ("rainy", "wet"), "fog": ("foggy", "misty")}
_TIME_NOUN = {"day": ("day",), "dusk": ("evening", "dusk"), "night": ("night",)}
_PLACE = ("street", "road", "city street", "intersection approach")


def _subjects(a: dict, rng: np.random.Generator) -> list[str]:
    """Noun phrases, each true of the scene with attributes ``a``."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out: list[str] = []
    veh = a["vehicles"]
    by_ct: dict[tuple[str, str], int] = {}
    by_t: dict[str, int] = {}
    for v in veh:
        by_ct[(v["color"], v["type"])] = by_ct.get((v["color"], v["type"]), 0) + 1
        by_t[v["type"]] = by_t.get(v["type"], 0) + 1
    for (color, vtype), n in by_ct.items():
        out.append(f"{_a(color)} {color} {vtype}" if n == 1 else f"{pick((_NUM[n] + ' ', ''))}{color} {_PLURAL[vtype]}")
        out.append(f"{_a(color)} {color} vehicle" if n == 1 else f"{color} vehicles")
    for vtype, n in by_t.items():
        out.append(f"{_a(vtype)} {vtype}" if n == 1 else f"{_NUM[n]} {_PLURAL[vtype]}")
    if not veh:
        out += ["an empty road", "no cars", "a road with no traffic", "no vehicles", "an empty street"]
    elif len(veh) >= 4:
        out += ["heavy traffic", "a busy road", "lots of vehicles", f"{_NUM[len(veh)]} vehicles"]
    elif len(veh) >= 2:
        out.append(f"{_NUM[len(veh)]} vehicles")
    n_cross = sum(1 for p in a["pedestrians"] if p["on_crosswalk"])
    n_walk = len(a["pedestrians"]) - n_cross
    if n_cross == 1:
        out += [pick(("a pedestrian crossing the street", "a person on the crosswalk", "someone crossing the road",
                      "a pedestrian crossing"))]
    elif n_cross > 1:
        out += [pick(("people crossing the street", "pedestrians on the crosswalk", "people crossing the road",
                      "pedestrians crossing", f"{_NUM[n_cross]} people crossing"))]
    if n_walk == 1:
        out += [pick(("a person on the sidewalk", "a pedestrian on the sidewalk", "someone walking on the sidewalk"))]
    elif n_walk > 1:
        out += [pick(("people on the sidewalk", "pedestrians walking on the sidewalk", "people walking on the sidewalk"))]
    if a["pedestrians"]:
        out.append(pick(("a pedestrian", "people on foot", "a person")) if len(a["pedestrians"]) == 1 else
                   pick(("pedestrians", "people on foot", "people")))
    else:
        out.append(pick(("no pedestrians", "nobody on foot")))
    if a["light"] != "none":
        w = pick(_LIGHT_WORD[a["light"]])
        out.append(pick((f"{_a(w)} {w} traffic light", f"{_a(w)} {w} light", f"a traffic light showing {w}",
                         f"{_a(w)} {w} signal")))
    sign = a["sign"]
    if sign == "stop":
        out.append("a stop sign")
    elif sign == "yield":
        out.append(pick(("a yield sign", "a give-way sign")))
    elif sign != "none":
        n = sign.split("_")[1]
        out.append(pick((f"a speed limit {n} sign", f"{_a(n)} {n} km/h sign", f"a speed limit of {n}")))
    if a["crosswalk"]:
        out.append(pick(("a crosswalk", "a zebra crossing")))
    return out


def _context(a: dict, rng: np.random.Generator) -> str:
    """``at night``, ``in the rain``, ``at night in the rain``, ... (true of the scene)."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    t, w = pick(_TIME[a["time"]]), pick(_WEATHER[a["weather"]])
    return pick((t, t, w, f"{t} {w}", f"{w} {t}"))


def _scene(a: dict, rng: np.random.Generator) -> str:
    """A scene-level phrase: ``a rainy street at night``, ``a foggy evening``, ``a sunny day``."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    adj = pick(_WEATHER_ADJ[a["weather"]])
    if a["time"] == "day" and a["weather"] == "clear" and rng.random() < 0.3:
        adj = "sunny"
    shape = int(rng.integers(3))
    if shape == 0:
        return f"{_a(adj)} {adj} {pick(_PLACE)} {pick(_TIME[a['time']])}"
    if shape == 1:
        return f"{_a(adj)} {adj} {pick(_TIME_NOUN[a['time']])}"
    return f"{_a(pick(_PLACE))} {pick(_PLACE)} {_context(a, rng)}".replace("an street", "a street")


def attribute_phrases(attributes: dict, rng: np.random.Generator, n: int = 6) -> list[str]:
    """``n`` distinct short query-style phrases about a scene, each stating only facts of ``attributes``.

    Shapes: ``<subject> <context>`` ("a red car at night"), ``<subject> and <subject>`` ("a bus and a stop
    sign"), ``<scene>`` ("a rainy street at night", "a foggy evening"), ``a <place> with <subject> <context>``
    and a bare ``<subject>``. Subjects cover vehicles (colour, type, counts, empty roads, heavy traffic),
    pedestrians (crossing, on the sidewalk, none), the traffic light, the sign and the crosswalk; contexts the
    time of day and the weather.
    """
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    subjects = _subjects(attributes, rng)
    out: list[str] = []
    for _ in range(8 * n):
        if len(out) >= n:
            break
        r = rng.random()
        s = pick(subjects)
        if r < 0.4:
            text = f"{s} {_context(attributes, rng)}"
        elif r < 0.6:
            others = [x for x in subjects if x != s]
            text = f"{s} and {pick(others)}" if others else s
            if rng.random() < 0.5:
                text += " " + _context(attributes, rng)
        elif r < 0.75:
            text = _scene(attributes, rng)
        elif r < 0.9:
            place = pick(_PLACE)
            text = f"{_a(place)} {place} with {s}" + (f" {_context(attributes, rng)}" if rng.random() < 0.6 else "")
        else:
            text = s
        if text not in out:
            out.append(text)
    return out


def training_texts(attributes: Sequence[dict], captions: Sequence[Sequence[str]], seed: int = 0, start: int = 0,
                   captions_per_image: int = 2, phrases_per_image: int = 6,
                   ) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """The distinct training texts of a run of scenes and, per scene, the ids of its captions and phrases.

    Per scene (index ``start + i``): its first caption (which states every fact) plus
    ``captions_per_image - 1`` others drawn at random, and ``phrases_per_image`` :func:`attribute_phrases`.
    Deterministic in ``(seed, scene index)``; the defaults are those of ``shusheng train clip``.

    Returns:
        ``(texts, caption_ids, phrase_ids)``: ``texts[j]`` is text id ``j``, in order of first use.
    """
    vocab: dict[str, int] = {}

    def tid(text: str) -> int:
        return vocab.setdefault(text, len(vocab))

    caption_ids, phrase_ids = [], []
    for i, (attrs, caps) in enumerate(zip(attributes, captions)):
        rng = np.random.default_rng([seed, 7, start + i])
        chosen = list(caps[:1]) + [caps[j] for j in sorted(rng.permutation(np.arange(1, len(caps)))[
            :max(0, captions_per_image - 1)])]
        caption_ids.append([tid(c) for c in chosen[:captions_per_image]])
        phrase_ids.append([tid(p) for p in attribute_phrases(attrs, rng, phrases_per_image)])
    return list(vocab), caption_ids, phrase_ids


# --------------------------------------------------------------------------------------------------------
# Retrieval queries with their ground truth
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    """A text query and the ground truth: ``relevant(attributes)`` says whether a scene satisfies it."""

    text: str
    relevant: Callable[[dict], bool]


def _veh(a: dict, color: str | None = None, vtype: str | None = None) -> bool:
    return any((color is None or v["color"] == color) and (vtype is None or v["type"] == vtype)
               for v in a["vehicles"])


def _cross(a: dict) -> bool:
    return any(p["on_crosswalk"] for p in a["pedestrians"])


def _walk(a: dict) -> bool:
    return any(not p["on_crosswalk"] for p in a["pedestrians"])


def _is(a: dict, **kv: Any) -> bool:
    return all(a[k] == v for k, v in kv.items())


#: 50 attribute queries written as sentences, each with its ground truth over SynthDrive ``attributes``
PLAIN_QUERIES: tuple[Query, ...] = (
    Query("a red car at night", lambda a: _is(a, time="night") and _veh(a, "red", "car")),
    Query("people crossing in the rain", lambda a: _is(a, weather="rain") and _cross(a)),
    Query("a white car during the day", lambda a: _is(a, time="day") and _veh(a, "white", "car")),
    Query("a blue car", lambda a: _veh(a, "blue", "car")),
    Query("a black car in the fog", lambda a: _is(a, weather="fog") and _veh(a, "black", "car")),
    Query("a yellow bus", lambda a: _veh(a, "yellow", "bus")),
    Query("a truck at night", lambda a: _is(a, time="night") and _veh(a, vtype="truck")),
    Query("a bus in the rain", lambda a: _is(a, weather="rain") and _veh(a, vtype="bus")),
    Query("a green traffic light", lambda a: _is(a, light="green")),
    Query("a red traffic light", lambda a: _is(a, light="red")),
    Query("a yellow traffic light", lambda a: _is(a, light="yellow")),
    Query("a red traffic light at night", lambda a: _is(a, light="red", time="night")),
    Query("a green light in the fog", lambda a: _is(a, light="green", weather="fog")),
    Query("a stop sign", lambda a: _is(a, sign="stop")),
    Query("a yield sign", lambda a: _is(a, sign="yield")),
    Query("a speed limit 30 sign", lambda a: _is(a, sign="speed_30")),
    Query("a speed limit 50 sign", lambda a: _is(a, sign="speed_50")),
    Query("a speed limit 80 sign", lambda a: _is(a, sign="speed_80")),
    Query("a stop sign at night", lambda a: _is(a, sign="stop", time="night")),
    Query("a crosswalk at dusk", lambda a: _is(a, crosswalk=True, time="dusk")),
    Query("a zebra crossing in the rain", lambda a: _is(a, crosswalk=True, weather="rain")),
    Query("pedestrians on the sidewalk", _walk),
    Query("people crossing the street", _cross),
    Query("a pedestrian at night", lambda a: _is(a, time="night") and bool(a["pedestrians"])),
    Query("an empty road with no vehicles", lambda a: not a["vehicles"]),
    Query("an empty street at night", lambda a: _is(a, time="night") and not a["vehicles"]),
    Query("a rainy street at night", lambda a: _is(a, weather="rain", time="night")),
    Query("a foggy road during the day", lambda a: _is(a, weather="fog", time="day")),
    Query("a street on a clear day", lambda a: _is(a, weather="clear", time="day")),
    Query("a street at dusk", lambda a: _is(a, time="dusk")),
    Query("a foggy evening", lambda a: _is(a, weather="fog", time="dusk")),
    Query("a silver car in the rain", lambda a: _is(a, weather="rain") and _veh(a, "silver", "car")),
    Query("a green car", lambda a: _veh(a, "green", "car")),
    Query("an orange car", lambda a: _veh(a, "orange", "car")),
    Query("a red truck", lambda a: _veh(a, "red", "truck")),
    Query("a white truck", lambda a: _veh(a, "white", "truck")),
    Query("a blue bus", lambda a: _veh(a, "blue", "bus")),
    Query("a car and a bus", lambda a: _veh(a, vtype="car") and _veh(a, vtype="bus")),
    Query("a truck and a pedestrian", lambda a: _veh(a, vtype="truck") and bool(a["pedestrians"])),
    Query("heavy traffic with many vehicles", lambda a: len(a["vehicles"]) >= 4),
    Query("a red car and a green traffic light", lambda a: _is(a, light="green") and _veh(a, "red", "car")),
    Query("a bus at a red light", lambda a: _is(a, light="red") and _veh(a, vtype="bus")),
    Query("people crossing at a crosswalk at night", lambda a: _is(a, time="night") and _cross(a)),
    Query("a yellow car during the day", lambda a: _is(a, time="day") and _veh(a, "yellow", "car")),
    Query("a white car at night", lambda a: _is(a, time="night") and _veh(a, "white", "car")),
    Query("a black car", lambda a: _veh(a, "black", "car")),
    Query("a stop sign and a crosswalk", lambda a: _is(a, sign="stop", crosswalk=True)),
    Query("a yield sign in the fog", lambda a: _is(a, sign="yield", weather="fog")),
    Query("a car in the fog at night", lambda a: _is(a, weather="fog", time="night") and _veh(a, vtype="car")),
    Query("a pedestrian on the sidewalk during the day", lambda a: _is(a, time="day") and _walk(a)),
)

#: 50 queries asking for the same kinds of scenes in other words (synonyms, other sentence shapes)
PARAPHRASE_QUERIES: tuple[Query, ...] = (
    Query("a crimson automobile after dark", PLAIN_QUERIES[0].relevant),
    Query("pedestrians walking across the road during a downpour", PLAIN_QUERIES[1].relevant),
    Query("a snow-white sedan in broad daylight", PLAIN_QUERIES[2].relevant),
    Query("a navy blue automobile", PLAIN_QUERIES[3].relevant),
    Query("a jet-black sedan in the mist", PLAIN_QUERIES[4].relevant),
    Query("a yellow coach carrying passengers", PLAIN_QUERIES[5].relevant),
    Query("a lorry driving after nightfall", PLAIN_QUERIES[6].relevant),
    Query("a city bus during a rainstorm", PLAIN_QUERIES[7].relevant),
    Query("the traffic signal shows go", PLAIN_QUERIES[8].relevant),
    Query("a traffic signal telling drivers to halt", PLAIN_QUERIES[9].relevant),
    Query("a traffic signal glowing amber", PLAIN_QUERIES[10].relevant),
    Query("a signal showing stop in the middle of the night", PLAIN_QUERIES[11].relevant),
    Query("a go signal in misty conditions", PLAIN_QUERIES[12].relevant),
    Query("an octagonal halt sign by the road", PLAIN_QUERIES[13].relevant),
    Query("a sign telling drivers to give way", PLAIN_QUERIES[14].relevant),
    Query("a sign restricting speed to thirty", PLAIN_QUERIES[15].relevant),
    Query("a fifty kilometres per hour limit", PLAIN_QUERIES[16].relevant),
    Query("a sign capping the speed at eighty", PLAIN_QUERIES[17].relevant),
    Query("a halt sign in the darkness", PLAIN_QUERIES[18].relevant),
    Query("a striped pedestrian crossing at sundown", PLAIN_QUERIES[19].relevant),
    Query("a pedestrian crossing on a wet, drizzly street", PLAIN_QUERIES[20].relevant),
    Query("people strolling along the footpath", PLAIN_QUERIES[21].relevant),
    Query("walkers going over the road", PLAIN_QUERIES[22].relevant),
    Query("someone on foot after nightfall", PLAIN_QUERIES[23].relevant),
    Query("a deserted road without any traffic", PLAIN_QUERIES[24].relevant),
    Query("a deserted street in the dark of night", PLAIN_QUERIES[25].relevant),
    Query("a street during a nighttime downpour", PLAIN_QUERIES[26].relevant),
    Query("a misty road in daylight", PLAIN_QUERIES[27].relevant),
    Query("a road under a bright cloudless sky", PLAIN_QUERIES[28].relevant),
    Query("a street at sundown", PLAIN_QUERIES[29].relevant),
    Query("a hazy evening with poor visibility", PLAIN_QUERIES[30].relevant),
    Query("a metallic grey automobile in a rainstorm", PLAIN_QUERIES[31].relevant),
    Query("an emerald-coloured automobile", PLAIN_QUERIES[32].relevant),
    Query("a tangerine-coloured sedan", PLAIN_QUERIES[33].relevant),
    Query("a scarlet lorry", PLAIN_QUERIES[34].relevant),
    Query("a white delivery lorry", PLAIN_QUERIES[35].relevant),
    Query("a blue coach", PLAIN_QUERIES[36].relevant),
    Query("an automobile together with a coach", PLAIN_QUERIES[37].relevant),
    Query("a lorry and someone walking", PLAIN_QUERIES[38].relevant),
    Query("a congested road full of traffic", PLAIN_QUERIES[39].relevant),
    Query("a scarlet sedan while the signal shows go", PLAIN_QUERIES[40].relevant),
    Query("a coach waiting at a stop signal", PLAIN_QUERIES[41].relevant),
    Query("walkers on the zebra stripes after nightfall", PLAIN_QUERIES[42].relevant),
    Query("a golden sedan in the daytime", PLAIN_QUERIES[43].relevant),
    Query("a snow-white automobile in the darkness", PLAIN_QUERIES[44].relevant),
    Query("a jet-black automobile", PLAIN_QUERIES[45].relevant),
    Query("a halt sign next to a pedestrian crossing", PLAIN_QUERIES[46].relevant),
    Query("a give-way sign in the haze", PLAIN_QUERIES[47].relevant),
    Query("an automobile in the mist after nightfall", PLAIN_QUERIES[48].relevant),
    Query("someone walking on the pavement in daylight", PLAIN_QUERIES[49].relevant),
)


def relevance_matrix(queries: Sequence[Query], attributes: Sequence[dict]) -> np.ndarray:
    """``(n_queries, n_items)`` booleans: does item ``j``'s scene satisfy query ``i``?"""
    return np.array([[bool(q.relevant(a)) for a in attributes] for q in queries], dtype=bool)
