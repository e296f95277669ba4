"""SynthDrive: deterministic procedural street scenes with exact ground truth.

Each image is a function of ``(split_seed, index, size)`` only: :func:`image_rng` seeds a NumPy generator from
the pair, :func:`sample_spec` draws a :class:`SceneSpec` (time of day, weather, road with lanes, crosswalk,
sidewalks, 0-5 vehicles, a traffic light, a sign, 0-3 pedestrians, buildings, trees and every jitter), and
:func:`render` draws it and derives the annotation from the spec and the drawn geometry: ``attributes``,
paraphrased ``captions``, ``qa`` pairs, COCO objects (boxes and RLE masks) and a semantic mask.

Conventions:

* Boxes are ``[x, y, w, h]`` in pixels and tightly enclose the object's *visible* pixels (the instance map),
  so a box covers exactly the mask pixels of its object. Vehicles and pedestrians with fewer than
  ``MIN_VISIBLE_PX`` visible pixels (at 128 x 128, scaled with the area) or less than 30 % of their silhouette
  visible are removed from the scene and it is drawn again, so annotations never mention what cannot be seen.
* Splits are disjoint by construction: image ``i`` of a split with seed ``s`` uses the integer seed
  ``s * 2**32 + i`` (``0 <= i < 2**32``), so two different (seed, index) pairs never share a seed.
  Named splits: ``train`` (seed ``TRAIN_SEED``), ``val`` (``VAL_SEED``) and the fixed ``test`` set
  (``TEST_SEED``, ``TEST_SIZE`` images at ``TEST_IMAGE_SIZE`` pixels) that every bundled-model metric uses.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from shusheng.data.synthdrive_render import (
    CLASSES,
    COCO_CATEGORIES,
    COLORS,
    LIGHT_ID,
    LIGHTS,
    SIGN_ID,
    SIGNS,
    TIMES,
    VEHICLE_TYPES,
    WEATHERS,
    BuildingSpec,
    Camera,
    PedestrianSpec,
    Raster,
    SceneSpec,
    SignSpec,
    TrafficLightSpec,
    TreeSpec,
    VehicleSpec,
    lane_names,
    light_head_rect,
    pedestrian_id,
    pedestrian_rect,
    rasterise,
    rects_overlap,
    sign_head_rect,
    tree_rect,
    vehicle_id,
    vehicle_rect,
)
from shusheng.data.synthdrive_text import answer, make_captions, make_qa

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_VISIBLE_PX",
    "SPLITS",
    "TEST_IMAGE_SIZE",
    "TEST_SEED",
    "TEST_SIZE",
    "TRAIN_SEED",
    "VAL_SEED",
    "DENSE_LABELS",
    "object_labels",
    "Annotation",
    "SynthDrive",
    "answer",
    "collate",
    "generate",
    "image_rng",
    "image_seed",
    "preview_grid",
    "render",
    "rle_encode",
    "sample",
    "sample_spec",
    "synthdrive_split",
]

TRAIN_SEED = 0
VAL_SEED = 1
#: the fixed test set: seed, number of images and image size used by every bundled-model metric
TEST_SEED = 2023
TEST_SIZE = 1000
TEST_IMAGE_SIZE = 128
#: split name -> (split seed, default number of images)
SPLITS: dict[str, tuple[int, int]] = {"train": (TRAIN_SEED, 10_000), "val": (VAL_SEED, 1_000),
                                      "test": (TEST_SEED, TEST_SIZE)}
MAX_INDEX = 2**32
#: minimum visible pixels of a vehicle or pedestrian at 128 x 128 (scaled by area for other sizes)
MIN_VISIBLE_PX = 12
MIN_VISIBLE_FRACTION = 0.3
_HEAD_VISIBLE_FRACTION = 0.9  # traffic light and sign heads are kept only when (almost) fully visible


# ---------------------------------------------------------------- seeds
def image_seed(split_seed: int, index: int) -> int:
    """The integer seed of image ``index`` of the split seeded ``split_seed`` (disjoint across splits)."""
    if split_seed < 0:
        raise ValueError(f"split seed must be >= 0, got {split_seed}")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"index must be in [0, 2**32), got {index}")
    return int(split_seed) * MAX_INDEX + int(index)


def image_rng(split_seed: int, index: int) -> np.random.Generator:
    """A NumPy generator for one image, independent of worker count and generation order."""
    return np.random.default_rng(image_seed(split_seed, index))


# ---------------------------------------------------------------- scene sampling
_SKY = {  # (time, weather) -> (top, bottom)
    ("day", "clear"): ((72, 132, 212), (172, 206, 236)), ("day", "rain"): ((108, 112, 122), (158, 162, 170)),
    ("day", "fog"): ((180, 182, 188), (200, 202, 206)), ("dusk", "clear"): ((58, 58, 118), (244, 150, 88)),
    ("dusk", "rain"): ((70, 66, 86), (150, 120, 110)), ("dusk", "fog"): ((140, 125, 130), (175, 150, 140)),
    ("night", "clear"): ((6, 8, 24), (26, 32, 62)), ("night", "rain"): ((16, 18, 26), (40, 42, 52)),
    ("night", "fog"): ((40, 42, 50), (60, 62, 70)),
}
_SIDEWALKS = ((160, 160, 156), (172, 164, 150), (150, 146, 140), (178, 172, 160), (140, 136, 128))
_BUILDINGS = ((150, 80, 60), (200, 185, 150), (140, 140, 145), (215, 212, 205), (110, 125, 140), (120, 95, 75),
              (185, 110, 80), (170, 160, 130))
_CANOPIES = ((52, 120, 48), (34, 90, 40), (90, 120, 50), (60, 140, 70), (120, 110, 40))
_SKINS = ((241, 194, 167), (224, 172, 135), (198, 134, 94), (161, 102, 70), (112, 72, 48), (255, 219, 190))
_PANTS = ((30, 40, 80), (40, 40, 45), (90, 80, 60), (60, 70, 90), (150, 140, 110), (20, 20, 22))
_HOUSINGS = ((32, 32, 34), (40, 44, 40), (178, 150, 40))
_COLOR_NAMES = tuple(COLORS)


def _inside(r: tuple[float, float, float, float], margin: float = 0.01) -> bool:
    return r[0] >= margin and r[1] >= margin and r[2] <= 1 - margin and r[3] <= 1 - margin


def sample_spec(rng: np.random.Generator) -> SceneSpec:
    """Draws a random scene specification.

    Placement rules keep the ground truth readable: vehicles stand in lanes, never on the crosswalk and not
    bumper to bumper; the traffic light and sign heads lie fully inside the image and nothing nearer covers
    them; trees never cover a vehicle, pedestrian, light or sign; pedestrians do not overlap each other.

    Args:
        rng: a NumPy generator; the spec is a deterministic function of its state.

    Returns:
        A :class:`SceneSpec`.
    """

    def U(a: float, b: float) -> float:
        return float(rng.uniform(a, b))

    def ri(a: int, b: int) -> int:  # integer in [a, b)
        return int(rng.integers(a, b))

    def jitter(rgb, amount: int = 10) -> tuple[int, int, int]:
        d = rng.integers(-amount, amount + 1, 3)
        return tuple(min(255, max(0, c + int(e))) for c, e in zip(rgb, d))

    def seed() -> int:
        return ri(0, 2**31 - 1)

    t = TIMES[int(rng.choice(3, p=(0.45, 0.25, 0.30)))]
    w = WEATHERS[int(rng.choice(3, p=(0.5, 0.25, 0.25)))]
    horizon, vp_x = U(0.36, 0.46), U(0.4, 0.6)
    road_cx = vp_x + U(-0.12, 0.12)
    n_lanes = 2 if rng.random() < 0.4 else 3
    lane_w = U(0.27, 0.33)
    R = lane_w * n_lanes / 2
    two_way = bool(rng.random() < 0.5)
    sidewalk_w = U(0.3, 0.5)
    crosswalk = bool(rng.random() < 0.5)
    cw_z, cw_dz = U(1.7, 2.8), U(0.16, 0.24)
    cam = Camera(horizon, vp_x, road_cx)
    grey = ri(62, 96)
    sky_top, sky_bottom = _SKY[(t, w)]
    fog = {"clear": U(0.0, 0.08), "rain": U(0.15, 0.3), "fog": U(0.55, 0.8)}[w]

    light = None
    state = LIGHTS[int(rng.choice(4, p=(0.27, 0.13, 0.27, 0.33)))]
    if state != "none":
        side = 1 if rng.random() < 0.7 else -1
        for attempt in range(12):
            if attempt == 6:
                side = -side
            z = cw_z + cw_dz + U(0.05, 0.4) if crosswalk else U(1.4, 2.8)
            hw = U(0.085, 0.105)
            cand = TrafficLightSpec(state, side, side * (R + sidewalk_w * U(0.12, 0.35)), z, U(0.42, 0.56), hw,
                                    hw * U(2.5, 2.9), jitter(_HOUSINGS[ri(0, len(_HOUSINGS))], 6))
            if _inside(light_head_rect(cam, cand)):
                light = cand
                break
    sign = None
    kind = SIGNS[int(rng.choice(6, p=(0.15, 0.15, 0.15, 0.15, 0.15, 0.25)))]
    if kind != "none":
        side = -light.side if light is not None else (1 if rng.random() < 0.7 else -1)
        for attempt in range(12):
            if attempt == 6:
                side = -side
            cand = SignSpec(kind, side, side * (R + sidewalk_w * U(0.15, 0.4)), U(1.3, 2.6), U(0.3, 0.4),
                            U(0.17, 0.21))
            rect = sign_head_rect(cam, cand)
            if not _inside(rect):
                continue
            if light is not None and (rects_overlap(rect, light_head_rect(cam, light), 0.02)
                                      or (light.side == side and abs(light.z - cand.z) < 0.5)):
                continue
            sign = cand
            break
    heads = [(light.z, light_head_rect(cam, light))] if light is not None else []
    if sign is not None:
        heads.append((sign.z, sign_head_rect(cam, sign)))
    poles = [(o.u, o.z) for o in (light, sign) if o is not None]

    vehicles: list[VehicleSpec] = []
    for _ in range(ri(0, 6)):
        for _attempt in range(25):
            vtype = VEHICLE_TYPES[int(rng.choice(3, p=(0.6, 0.2, 0.2)))]
            color = _COLOR_NAMES[ri(0, len(_COLOR_NAMES))]
            lane = ri(0, n_lanes)
            width = lane_w * {"car": U(0.66, 0.76), "truck": U(0.78, 0.86), "bus": U(0.82, 0.9)}[vtype]
            height = width * {"car": U(0.68, 0.8), "truck": U(1.05, 1.25), "bus": U(0.98, 1.12)}[vtype]
            base = np.array(COLORS[color]) * U(0.9, 1.08) + rng.integers(-14, 15, 3)
            v = VehicleSpec(
                vtype, color, tuple(int(c) for c in np.clip(base, 0, 255)), lane,
                -R + (lane + 0.5) * lane_w + U(-0.3, 0.3) * (lane_w - width), 1.0 / U(0.14, 0.82), width, height,
                "front" if two_way and lane == 0 else "rear", U(0.06, 0.2), U(0.08, 0.2), U(0.14, 0.2),
                U(0.12, 0.2),
            )
            rect = vehicle_rect(cam, v)
            if rect[0] < 0.0 or rect[2] > 1.0:
                continue
            if crosswalk and cw_z - cw_dz - 0.35 < v.z < cw_z + cw_dz + 0.12:
                continue
            if any(o.lane == lane and abs(o.z - v.z) < 0.6 for o in vehicles):
                continue
            if any(hz > v.z and rects_overlap(rect, hr, 0.005) for hz, hr in heads):
                continue
            vehicles.append(v)
            break

    pedestrians: list[PedestrianSpec] = []
    for _ in range(ri(0, 4)):
        for _attempt in range(25):
            on_cw = crosswalk and bool(rng.random() < 0.55)
            if on_cw:
                u, z = U(-R + 0.05, R - 0.05), cw_z + U(-0.6, 0.6) * cw_dz
            else:
                side = 1 if rng.random() < 0.5 else -1
                u, z = side * (R + sidewalk_w * U(0.2, 0.75)), 1.0 / U(0.3, 0.8)
            ped = PedestrianSpec(u, z, on_cw, U(0.19, 0.24), _SKINS[ri(0, len(_SKINS))],
                                 tuple(ri(20, 236) for _ in range(3)), jitter(_PANTS[ri(0, len(_PANTS))], 8),
                                 U(0.05, 0.26), U(0.0, 0.16), U(0.26, 0.34))
            rect = pedestrian_rect(cam, ped)
            if not _inside(rect, 0.0):
                continue
            if any(rects_overlap(rect, pedestrian_rect(cam, o)) for o in pedestrians):
                continue
            if any(hz > z and rects_overlap(rect, hr, 0.005) for hz, hr in heads):
                continue
            if any(abs(pu - u) < 0.08 and abs(pz - z) < 0.2 for pu, pz in poles):
                continue
            pedestrians.append(ped)
            break

    annotated = [(v.z, vehicle_rect(cam, v)) for v in vehicles] + [
        (p.z, pedestrian_rect(cam, p)) for p in pedestrians] + heads
    trees: list[TreeSpec] = []
    for side in (-1, 1):
        for _ in range(ri(0, 4)):
            n_blobs = ri(2, 5)
            blobs = ((0.0, 0.0, 1.0),) + tuple((U(-0.5, 0.5), U(-0.3, 0.4), U(0.6, 0.9)) for _ in range(n_blobs - 1))
            tree = TreeSpec(side * (R + sidewalk_w * U(0.6, 0.92)), 1.0 / U(0.12, 0.75), U(0.22, 0.36),
                            U(0.1, 0.17), jitter(_CANOPIES[ri(0, len(_CANOPIES))], 14), blobs)
            rect = tree_rect(cam, tree)
            if any(oz > tree.z and rects_overlap(rect, orect, 0.01) for oz, orect in annotated):
                continue
            trees.append(tree)

    buildings: list[BuildingSpec] = []
    for side in (-1, 1):
        z = 0.4
        while z < 14.0:
            length = U(0.8, 2.4) * (1 + 0.15 * z)
            height = U(0.45, 1.4)
            buildings.append(BuildingSpec(side, z, z + length, height, jitter(_BUILDINGS[ri(0, len(_BUILDINGS))], 12),
                                          max(1, int(height / U(0.2, 0.28))), min(6, max(1, int(length / U(0.3, 0.5)))),
                                          seed()))
            z += length

    skyline = tuple((U(-0.05, 1.0), U(0.03, 0.12), U(0.015, 0.1), ri(90, 170)) for _ in range(ri(6, 15)))
    if t == "night" and w == "clear":
        clouds = tuple((U(0, 1), U(0.01, horizon - 0.05), U(0.05, 0.15), 0.0) for _ in range(ri(10, 30)))
    elif w == "rain":
        clouds = tuple((U(0, 1), U(0.0, horizon - 0.1), U(0.1, 0.25), U(0.04, 0.09)) for _ in range(ri(4, 9)))
    elif w == "clear":
        clouds = tuple((U(0, 1), U(0.03, horizon - 0.1), (rx := U(0.05, 0.15)), rx * U(0.3, 0.5))
                       for _ in range(ri(0, 5)))
    else:
        clouds = ()
    patches = []
    for _ in range(ri(0, 3)):
        u0 = U(-R, R - 0.1)
        z0 = U(1.1, 6.0)
        patches.append((u0, min(R, u0 + U(0.05, 0.2)), z0, z0 + U(0.2, 0.8)))
    period = U(0.8, 1.3)
    return SceneSpec(
        time=t, weather=w, horizon=horizon, vp_x=vp_x, road_cx=road_cx, lane_w=lane_w, n_lanes=n_lanes,
        two_way=two_way, sidewalk_w=sidewalk_w, crosswalk=crosswalk, crosswalk_z=cw_z, crosswalk_dz=cw_dz,
        stripe_w=U(0.045, 0.065), dash_period=period, dash_len=period * U(0.35, 0.55), dash_phase=U(0, period),
        road_rgb=tuple(grey + ri(-4, 5) for _ in range(3)), sidewalk_rgb=jitter(_SIDEWALKS[ri(0, len(_SIDEWALKS))], 8),
        sky_top=jitter(sky_top), sky_bottom=jitter(sky_bottom), fog_density=fog, brightness=U(0.9, 1.1),
        white_balance=(U(0.94, 1.06), U(0.94, 1.06), U(0.94, 1.06)), noise_sigma=U(1.0, 3.5),
        rain_seed=seed(), noise_seed=seed(), text_seed=seed(), vehicles=tuple(vehicles),
        pedestrians=tuple(pedestrians), light=light, sign=sign, trees=tuple(trees), buildings=tuple(buildings),
        skyline=skyline, clouds=clouds, patches=tuple(patches),
    )


# ---------------------------------------------------------------- rendering and annotation
@dataclass
class Annotation:
    """Ground truth of one rendered scene.

    Attributes:
        attributes: ``{time, weather, light, sign, crosswalk, vehicles: [{type, color, lane, box}],
            pedestrians: [{box, on_crosswalk}]}``; boxes ``[x, y, w, h]`` in pixels.
        captions: paraphrased captions stating only facts of ``attributes``.
        qa: ``[{type, question, answer, params}]``; ``answer(type, attributes, **params)`` re-derives each answer.
        objects: COCO-style objects ``{category_id, category, bbox, area, segmentation, instance_id}`` for
            vehicles, pedestrians, the traffic-light head and the sign head (``segmentation`` is compressed RLE).
        semantic: ``(H, W)`` uint8 class ids, see ``CLASSES``.
        instance: ``(H, W)`` uint8 instance ids matching ``objects[k]["instance_id"]``.
    """

    attributes: dict[str, Any]
    captions: list[str]
    qa: list[dict[str, Any]]
    objects: list[dict[str, Any]]
    semantic: np.ndarray
    instance: np.ndarray

    def record(self, file: str, image_id: int, mask_file: str | None = None) -> dict[str, Any]:
        """The ``annotations.jsonl`` line of this image (JSON-serialisable)."""
        rec: dict[str, Any] = {"image_id": image_id, "file": file}
        if mask_file is not None:
            rec["mask"] = mask_file
        rec.update(attributes=self.attributes, captions=self.captions, qa=self.qa)
        return rec


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean ``(H, W)`` mask (same output as ``pycocotools.mask.encode``)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [h, w], "counts": "".join(chars)}


def _box(instance: np.ndarray, iid: int) -> tuple[list[int], np.ndarray]:
    m = instance == iid
    ys, xs = np.nonzero(m)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], m


def _failing(spec: SceneSpec, r: Raster, size: int) -> dict[str, Any]:
    min_px = max(4, round(MIN_VISIBLE_PX * (size / 128) ** 2))

    def ok(iid: int, frac: float) -> bool:
        return r.visible.get(iid, 0) >= min_px and r.amodal_fraction.get(iid, 0.0) >= frac

    return {
        "vehicles": {i for i in range(len(spec.vehicles)) if not ok(vehicle_id(i), MIN_VISIBLE_FRACTION)},
        "pedestrians": {j for j in range(len(spec.pedestrians)) if not ok(pedestrian_id(j), MIN_VISIBLE_FRACTION)},
        "light": spec.light is not None and not ok(LIGHT_ID, _HEAD_VISIBLE_FRACTION),
        "sign": spec.sign is not None and not ok(SIGN_ID, _HEAD_VISIBLE_FRACTION),
    }


def render(spec: SceneSpec, size: int = 128) -> tuple[Image.Image, Annotation]:
    """Draws a scene and derives its annotation.

    Objects that end up too small or hidden (see the module docstring) are removed from the scene, which is
    then drawn again, so the picture and the annotation always agree.

    Args:
        spec: a scene from :func:`sample_spec`.
        size: side of the square image in pixels.

    Returns:
        ``(image, annotation)``: an RGB ``PIL.Image`` and its :class:`Annotation`.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    while True:  # each round removes at least one object, so this ends (in practice after one removal round)
        r = rasterise(spec, size)
        bad = _failing(spec, r, size)
        if not (bad["vehicles"] or bad["pedestrians"] or bad["light"] or bad["sign"]):
            break
        spec = spec.without(bad["vehicles"], bad["pedestrians"], bad["light"], bad["sign"])
    lanes = lane_names(spec.n_lanes)
    objects: list[dict[str, Any]] = []
    cat_id = {c["name"]: c["id"] for c in COCO_CATEGORIES}

    def add(iid: int, category: str) -> list[int]:
        box, m = _box(r.instance, iid)
        objects.append({"category_id": cat_id[category], "category": category, "bbox": box,
                        "area": int(m.sum()), "segmentation": rle_encode(m), "instance_id": iid})
        return box

    vehicles = [{"type": v.type, "color": v.color, "lane": lanes[v.lane], "box": add(vehicle_id(i), v.type)}
                for i, v in enumerate(spec.vehicles)]
    pedestrians = [{"box": add(pedestrian_id(j), "person"), "on_crosswalk": p.on_crosswalk}
                   for j, p in enumerate(spec.pedestrians)]
    if spec.light is not None:
        add(LIGHT_ID, "traffic light")
    if spec.sign is not None:
        add(SIGN_ID, "sign")
    attributes = {
        "time": spec.time,
        "weather": spec.weather,
        "light": spec.light.state if spec.light is not None else "none",
        "sign": spec.sign.kind if spec.sign is not None else "none",
        "crosswalk": spec.crosswalk,
        "vehicles": vehicles,
        "pedestrians": pedestrians,
    }
    text_rng = np.random.default_rng(spec.text_seed)
    captions = make_captions(attributes, text_rng)
    qa = make_qa(attributes, text_rng)
    return r.image, Annotation(attributes, captions, qa, objects, r.semantic, r.instance)


#: per-pixel object labels of :func:`dense_labels` (label ``k + 1`` in the map is ``DENSE_LABELS[k]``; 0 = none):
#: a vehicle by colour and type, a pedestrian by place, the traffic-light head by state, the sign head by kind,
#: and crosswalk stripes.
DENSE_LABELS: tuple[str, ...] = (
    *(f"{c} {t}" for c in COLORS for t in VEHICLE_TYPES),
    "person on crosswalk", "person on sidewalk",
    "light red", "light yellow", "light green",
    "sign stop", "sign yield", "sign speed_30", "sign speed_50", "sign speed_80",
    "crosswalk",
)
_DENSE_INDEX = {name: i + 1 for i, name in enumerate(DENSE_LABELS)}


def dense_labels(annotation: Annotation) -> np.ndarray:
    """``(H, W)`` uint8 map of which described object each pixel shows (see :data:`DENSE_LABELS`; 0 = none).

    Built from the instance map, so it agrees exactly with ``attributes``: dense supervision for models that
    must find small objects (a traffic-light head is a few pixels at 128 x 128).
    """
    a, inst = annotation.attributes, annotation.instance
    table = np.zeros(256, dtype=np.uint8)
    for i, v in enumerate(a["vehicles"]):
        table[vehicle_id(i)] = _DENSE_INDEX[f"{v['color']} {v['type']}"]
    for j, p in enumerate(a["pedestrians"]):
        table[pedestrian_id(j)] = _DENSE_INDEX["person on crosswalk" if p["on_crosswalk"] else "person on sidewalk"]
    if a["light"] != "none":
        table[LIGHT_ID] = _DENSE_INDEX[f"light {a['light']}"]
    if a["sign"] != "none":
        table[SIGN_ID] = _DENSE_INDEX[f"sign {a['sign']}"]
    out = table[inst]
    out[(inst == 0) & (annotation.semantic == CLASSES.index("crosswalk"))] = _DENSE_INDEX["crosswalk"]
    return out


def object_labels(attributes: dict[str, Any]) -> list[str]:
    """The :data:`DENSE_LABELS` of a scene's described objects, one per object (crosswalk stripes, which are not an
    object, excluded): what a perfect dense head or detector would report, e.g. to score evidence counts."""
    a = attributes
    out = [f"{v['color']} {v['type']}" for v in a["vehicles"]]
    out += ["person on crosswalk" if p["on_crosswalk"] else "person on sidewalk" for p in a["pedestrians"]]
    out += [f"light {a['light']}"] * (a["light"] != "none") + [f"sign {a['sign']}"] * (a["sign"] != "none")
    return out


def sample(split_seed: int, index: int, size: int = 128) -> tuple[Image.Image, Annotation]:
    """Image ``index`` of the split seeded ``split_seed``: ``render(sample_spec(image_rng(...)), size)``."""
    return render(sample_spec(image_rng(split_seed, index)), size)


# ---------------------------------------------------------------- torch dataset
def _resolve_split(split: str | int, n: int | None, size: int) -> tuple[int, int]:
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)} or an integer seed")
        seed, default_n = SPLITS[split]
        n = default_n if n is None else n
        if split == "test" and (n > TEST_SIZE or size != TEST_IMAGE_SIZE):
            raise ValueError(f"the fixed test set has at most {TEST_SIZE} images of {TEST_IMAGE_SIZE} px "
                             f"(got n={n}, size={size}); use another split seed for other data")
        return seed, n
    if n is None:
        raise ValueError("n is required when the split is given as a seed")
    return int(split), n


class SynthDrive(torch.utils.data.Dataset):
    """SynthDrive images generated on the fly, deterministic per index (safe with any ``num_workers``).

    Each item is a dict:

    * ``image``: ``transform(PIL image)`` if a transform is given, else a ``(3, H, W)`` uint8 tensor;
    * ``boxes``: ``(N, 4)`` float32 ``[x, y, w, h]`` of the COCO objects; ``labels``: ``(N,)`` int64 COCO ids;
    * ``attributes``, ``captions``, ``qa``: as in ``annotations.jsonl``; ``index``: the image index;
    * ``mask``: ``(H, W)`` int64 semantic class ids, only with ``return_mask=True``.

    Use :func:`collate` as the DataLoader's ``collate_fn`` (it stacks tensors and keeps the rest as lists).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or an integer split seed.
        n: number of images (default: the split's size; required for integer seeds).
        size: image side in pixels.
        transform: optional callable applied to the PIL image.
        return_mask: also return the semantic mask.
        start: index of the first image (for sharding a split).
    """

    def __init__(self, split: str | int = "train", n: int | None = None, size: int = 128, *,
                 transform: Callable[[Image.Image], Any] | None = None, return_mask: bool = False, start: int = 0):
        self.split_seed, self.n = _resolve_split(split, n, size)
        if self.n < 0 or start < 0 or start + self.n > MAX_INDEX:
            raise ValueError(f"invalid range start={start}, n={self.n}")
        self.split, self.size, self.start = split, size, start
        self.transform, self.return_mask = transform, return_mask

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        index = self.start + i
        img, ann = sample(self.split_seed, index, self.size)
        if self.transform is not None:
            image = self.transform(img)
        else:
            image = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        item = {
            "image": image,
            "boxes": torch.tensor([o["bbox"] for o in ann.objects], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([o["category_id"] for o in ann.objects], dtype=torch.int64),
            "attributes": ann.attributes,
            "captions": ann.captions,
            "qa": ann.qa,
            "index": index,
        }
        if self.return_mask:
            item["mask"] = torch.from_numpy(ann.semantic.astype(np.int64))
        return item


def synthdrive_split(name: str, n: int | None = None, size: int = 128, **kwargs: Any) -> SynthDrive:
    """The named split (``train``, ``val`` or the fixed ``test``) as a :class:`SynthDrive` dataset."""
    return SynthDrive(name, n=n, size=size, **kwargs)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`SynthDrive`: stacks same-shaped tensors, keeps others as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1 \
                and key not in ("boxes", "labels"):
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    return out


# ---------------------------------------------------------------- writing a dataset to disk
def _write_one(out: str, split_seed: int, size: int, masks: bool, width: int,
               index: int) -> tuple[int, str, list[dict[str, Any]]]:
    img, ann = sample(split_seed, index, size)
    name = f"{index:0{width}d}.png"
    img.save(Path(out) / "images" / name, compress_type=2)  # Huffman only: noise defeats LZ77, this is faster
    mask_file = None
    if masks:
        mask_file = f"masks/{name}"
        Image.fromarray(ann.semantic, "L").save(Path(out) / mask_file, compress_level=6)
    line = json.dumps(ann.record(f"images/{name}", index, mask_file), separators=(",", ":"))
    objs = [{k: v for k, v in o.items() if k != "instance_id"} for o in ann.objects]
    return index, line, objs


def generate(out: str | Path, n: int, seed: int = TRAIN_SEED, size: int = 128, *, workers: int = 1,
             masks: bool = True, start: int = 0, progress: bool = True) -> dict[str, Any]:
    """Writes ``n`` images with their annotations to ``out``.

    Layout: ``images/NNNNNN.png``, ``masks/NNNNNN.png`` (semantic class ids, if ``masks``), ``annotations.jsonl``
    (one object per image: ``image_id``, ``file``, ``mask``, ``attributes``, ``captions``, ``qa``) and
    ``coco.json`` (boxes, RLE masks, categories; image ids are the indices). The same arguments give the same
    bytes, whatever ``workers`` is.

    Args:
        out: output folder (created).
        n: number of images.
        seed: split seed (``TRAIN_SEED``, ``VAL_SEED``, ``TEST_SEED`` or any other non-negative integer).
        size: image side in pixels.
        workers: processes rendering in parallel (1 = in this process).
        masks: also write the semantic masks.
        start: index of the first image.
        progress: show a tqdm progress bar.

    Returns:
        ``{"n", "seconds", "images_per_second", "out"}``.
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    image_seed(seed, start)  # validates
    if n > 0:
        image_seed(seed, start + n - 1)
    width = max(6, len(str(start + n - 1)))
    job = functools.partial(_write_one, str(out), seed, size, masks, width)
    t0 = time.perf_counter()
    images, annotations = [], []
    pool = None
    try:
        if workers > 1 and n > 1:
            pool = multiprocessing.get_context().Pool(workers)
            chunk = max(1, min(64, n // (workers * 8)))
            results = pool.imap(job, range(start, start + n), chunksize=chunk)
        else:
            results = map(job, range(start, start + n))
        with open(out / "annotations.jsonl", "w", encoding="utf-8") as f:
            for index, line, objs in tqdm(results, total=n, desc="synthdrive", unit="img", disable=not progress):
                f.write(line + "\n")
                images.append({"id": index, "file_name": f"images/{index:0{width}d}.png", "width": size,
                               "height": size})
                for o in objs:
                    annotations.append({"id": len(annotations) + 1, "image_id": index, **o, "iscrowd": 0})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    coco = {
        "info": {"description": "SynthDrive procedural driving scenes", "version": "1", "seed": seed,
                 "start": start, "n": n, "size": size},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in COCO_CATEGORIES],
    }
    with open(out / "coco.json", "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    dt = time.perf_counter() - t0
    stats = {"n": n, "seconds": round(dt, 3), "images_per_second": round(n / dt, 1) if dt > 0 else math.inf,
             "out": str(out)}
    logger.info("wrote %d SynthDrive images (%d px, seed %d) to %s in %.1f s (%.1f images/s)", n, size, seed, out,
                dt, stats["images_per_second"])
    return stats


# ---------------------------------------------------------------- preview
_BOX_COLORS = {1: (255, 64, 64), 2: (255, 160, 0), 3: (255, 230, 0), 4: (0, 230, 255), 5: (80, 255, 80),
               6: (255, 80, 255)}


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,;") + "..."
    return lines


def preview_grid(seed: int = TRAIN_SEED, n: int = 16, cols: int = 4, size: int = 128, scale: int = 2,
                 start: int = 0, caption_lines: int = 4) -> Image.Image:
    """A grid of samples with their COCO boxes drawn and the first caption under each.

    Box colours: car red, truck orange, bus yellow, person cyan, traffic light green, sign magenta.

    Args:
        seed: split seed of the samples.
        n: number of samples; cols: samples per row.
        size: rendered image size; scale: upscaling of each tile.
        start: index of the first sample.
        caption_lines: lines of caption text under each tile.

    Returns:
        The grid as an RGB image.
    """
    tile = size * scale
    font_px = max(10, tile // 22)
    font = ImageFont.load_default(size=font_px)
    line_h = font_px + 4
    pad, cap_h = 6, caption_lines * line_h + 6
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + cap_h + pad) + pad), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        img, ann = sample(seed, start + k, size)
        x0 = pad + (k % cols) * (tile + pad)
        y0 = pad + (k // cols) * (tile + cap_h + pad)
        grid.paste(img.resize((tile, tile), Image.Resampling.NEAREST), (x0, y0))  # the true pixels, enlarged
        for o in ann.objects:
            bx, by, bw, bh = (v * scale for v in o["bbox"])
            draw.rectangle((x0 + bx, y0 + by, x0 + bx + bw - 1, y0 + by + bh - 1),
                           outline=_BOX_COLORS[o["category_id"]], width=max(1, scale // 2 + 1))
        for li, line in enumerate(_wrap(draw, ann.captions[0], font, tile, caption_lines)):
            draw.text((x0, y0 + tile + 3 + li * line_h), line, fill=(20, 20, 20), font=font)
    return grid
