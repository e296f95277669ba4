"""SynthDrive drives: short rendered driving sequences with per-frame annotations and temporal facts.

A drive starts from one sampled scene (drive ``i`` of a split starts from the scene of image ``i``,
``sample_spec(image_rng(split_seed, i))``) and lets it evolve for ``frames`` frames at ``fps`` frames per
second. Every frame is a :class:`SceneSpec` derived from the world state with ``dataclasses.replace`` and
drawn by :func:`shusheng.data.synthdrive.render`, so each frame's annotation has exactly the per-image schema
(``attributes``, ``captions``, ``qa``, ``objects``, masks). A drive is a pure function of
``(split_seed, index, frames, fps, size)``: the scenes do not depend on ``size``, and a shorter drive is a
prefix of a longer one at the same fps. The first frame is the sampled scene with its people set in motion
(below) and its facades cut into one-column pieces (same geometry, lit windows drawn afresh).

The world (scene units: 1 = the image width at distance 1; a lane is about 0.3):

* **Ego car** (the camera) drives down the road at its own cruising speed (0.2-0.4 units/s), so the distance
  ``z`` of everything static decreases by the distance travelled: road markings, crosswalk, sign, light,
  trees, buildings and standing people approach, and leave the picture when passed. It brakes (0.5 units/s²)
  to stay 1.3 units behind a vehicle in its path, and stops with the stop line at the bottom of the picture
  (further back when needed to keep the light in view) while the crossing is *closed* (below).
* **Vehicles** drive in their lanes at their own speeds (lane 0 of two-way roads towards the camera), never
  closer than 0.6 units to the vehicle ahead in their lane (``sample_spec``'s rule). While the crossing is
  closed they wait before the crosswalk zone (the band ``sample_spec`` keeps free of vehicles); they drive
  across it only while it is open and never stop on it, so **no vehicle is on the crosswalk while a pedestrian
  is**. New vehicles enter from far away at random times; vehicles that pass the camera or drive out of sight
  leave. At most 5 vehicles and 4 pedestrians are about at once.
* **Traffic light** cycles ``green -> yellow -> red -> green`` (:data:`LIGHT_CYCLE`) with per-drive durations
  (green 2.5-4.5 s, yellow 1.2-2 s, red 3-5 s), starting in the sampled state at a random point of it. It
  regulates the crosswalk (without one, a stop line 0.3 units before the light) in both directions.
* **The crossing is closed** to vehicles and the ego while the light is yellow or red, a pedestrian is on the
  crosswalk, or (without a light) a pedestrian waits at the curb. Waiting pedestrians step onto the crosswalk
  after a reaction time of 0.2-1 s, only while the light is red with at least 1 s of red left (without a
  light: any time) and no vehicle, nor the ego past its stop point, is in the crosswalk zone.
* **Pedestrians** walk with swinging legs and arms. People on the crosswalk finish crossing and stand on the
  far sidewalk; with a crosswalk, most sidewalk pedestrians start near it, some people on it start back at its
  curb, and people are added until two or three want to cross: they walk to the curb, wait, cross and stand on
  the other side. The others stand or stroll along the sidewalk. ``on_crosswalk`` follows the position.
* **Sign** stays put (it approaches with the road). Rain streaks, sensor noise and caption wording are drawn
  afresh every frame.

Objects that render removes in a frame (too small, hidden, out of the picture) are absent from that frame's
annotation. Identity across frames: ``facts["vehicle_ids"][k]`` / ``facts["pedestrian_ids"][k]`` is the track
id of ``attributes["vehicles"][k]`` / ``attributes["pedestrians"][k]`` (ids are never reused within a drive).

Temporal facts of frame ``t`` (:func:`drive_facts`), over the window of the ``W = round(fps)`` frames before
``t`` (frames ``t - W .. t - 1``: one second; fewer at the start), computed from the annotations only:

* ``light_changed``: ``"yes"`` when a traffic light is annotated at ``t`` and its state differs from the
  annotated state at some frame of the window (frames without an annotated light are ignored), else ``"no"``
  (so ``"no"`` when there is no light at ``t``).
* ``pedestrian_entering``: ``"yes"`` when some pedestrian is annotated on the crosswalk at ``t`` and the same
  pedestrian (track id) is annotated off the crosswalk at some frame of the window, else ``"no"``.

Each frame's facts also hold ``index``, ``time_s`` (``index / fps``), ``ego_speed`` (units/s over the last
step), ``vehicle_ids`` and ``pedestrian_ids``. :func:`write_drive` writes ``<name>.mp4`` (H.264) and
``<name>.jsonl``; :func:`generate_drives` writes many, with a ``drives.json`` index.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shusheng.data.synthdrive import (
    _BUILDINGS,
    _CANOPIES,
    _COLOR_NAMES,
    _PANTS,
    _SKINS,
    MAX_INDEX,
    MIN_VISIBLE_PX,
    Annotation,
    _failing,
    image_rng,
    image_seed,
    render,
    sample_spec,
)
from shusheng.data.synthdrive_render import (
    COLORS,
    VEHICLE_TYPES,
    BuildingSpec,
    Camera,
    PedestrianSpec,
    SceneSpec,
    TreeSpec,
    VehicleSpec,
    light_head_rect,
    pedestrian_rect,
    rasterise,
    rects_overlap,
    sign_head_rect,
    tree_rect,
    vehicle_rect,
)
from shusheng.data.video import write_video

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_FRAMES",
    "LIGHT_CYCLE",
    "MAX_PEDESTRIANS",
    "MAX_VEHICLES",
    "Drive",
    "drive_facts",
    "drive_rng",
    "generate_drives",
    "sample_drive",
    "write_drive",
]

DEFAULT_FRAMES = 48
DEFAULT_FPS = 8
#: order of the traffic-light states in a drive (then back to the first)
LIGHT_CYCLE = ("green", "yellow", "red")
_LIGHT_S = {"green": (2.5, 4.5), "yellow": (1.2, 2.0), "red": (3.0, 5.0)}  # duration ranges in seconds
_DRIVE_TAG = 0x64726976  # "driv": the drive's own random stream, independent of the scene's
#: most vehicles and pedestrians about at once (captions count up to five)
MAX_VEHICLES, MAX_PEDESTRIANS = 5, 4
_EGO_SPEED = (0.2, 0.4)  # cruising speed of the ego car, units/s
_ACCEL, _BRAKE = 0.25, 0.5  # units/s^2 (a hard stop at the limit is allowed: nothing overshoots)
_EGO_HALF_W = 0.1  # half width of the ego car's path around the camera column
_EGO_GAP = 1.3  # distance kept to a vehicle ahead in the ego's path (camera z)
_GAP = 0.6  # minimum distance between vehicles in one lane (sample_spec's rule)
_WALK = (0.1, 0.18)  # walking speed, units/s
_REACTION = (0.2, 1.0)  # seconds between the crossing opening and a waiting pedestrian stepping on
_MIN_RED_LEFT = 1.0  # pedestrians do not step on with less red than this left
_FAR = 9.0  # vehicles further than this (camera z) have driven out of sight
_GONE = 0.3  # objects nearer than this (camera z) have passed the camera


# ---------------------------------------------------------------- the drive
@dataclass
class Drive:
    """A rendered drive: one picture, annotation and facts dict per frame.

    Attributes:
        frames: RGB ``PIL.Image`` per frame.
        annotations: per-frame :class:`Annotation` exactly as ``render`` returns them.
        facts: per-frame ``{index, time_s, light_changed, pedestrian_entering, ego_speed, vehicle_ids,
            pedestrian_ids}`` (see the module docstring).
        specs: the scene of each frame as given to ``render`` (before it removes what cannot be seen).
        spec_ids: per frame ``{"vehicles": [...], "pedestrians": [...]}``, the track ids of ``specs[t]``'s
            vehicles and pedestrians.
        split_seed, index: the drive's identity; fps: frames per second; size: image side in pixels.
        window: frames in the window of the temporal facts (``round(fps)``).
    """

    frames: list[Image.Image]
    annotations: list[Annotation]
    facts: list[dict[str, Any]]
    specs: list[SceneSpec]
    spec_ids: list[dict[str, list[int]]]
    split_seed: int
    index: int
    fps: float
    size: int
    window: int

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps

    def records(self) -> list[dict[str, Any]]:
        """The ``<name>.jsonl`` lines: ``{frame, time_s, attributes, captions, qa, facts, objects}`` per
        frame; objects keep their boxes but not the RLE segmentation."""
        out = []
        for t, (ann, facts) in enumerate(zip(self.annotations, self.facts)):
            objects = [{k: v for k, v in o.items() if k != "segmentation"} for o in ann.objects]
            out.append({"frame": t, "time_s": facts["time_s"], "attributes": ann.attributes,
                        "captions": ann.captions, "qa": ann.qa, "facts": facts, "objects": objects})
        return out


def _window(fps: float) -> int:
    return max(1, int(round(fps)))


def drive_facts(attributes: list[dict[str, Any]], pedestrian_ids: list[list[int]], window: int
                ) -> list[dict[str, str]]:
    """The temporal facts ``light_changed`` and ``pedestrian_entering`` of each frame (module docstring).

    Args:
        attributes: per-frame ``attributes`` dicts.
        pedestrian_ids: per-frame track ids of ``attributes[t]["pedestrians"]``.
        window: frames before ``t`` that the facts of ``t`` look at.
    """
    out = []
    for t, a in enumerate(attributes):
        past = range(max(0, t - window), t)
        light = a["light"]
        changed = light != "none" and any(attributes[s]["light"] not in ("none", light) for s in past)
        on_now = {pid for pid, p in zip(pedestrian_ids[t], a["pedestrians"]) if p["on_crosswalk"]}
        entering = any(pid in on_now and not p["on_crosswalk"]
                       for s in past for pid, p in zip(pedestrian_ids[s], attributes[s]["pedestrians"]))
        out.append({"light_changed": "yes" if changed else "no",
                    "pedestrian_entering": "yes" if entering else "no"})
    return out


# ---------------------------------------------------------------- simulation state (world coordinates)
@dataclass
class _Car:
    id: int
    spec: VehicleSpec  # z is the world distance (camera z at the start of the drive)
    speed: float  # cruising speed, units/s
    v: float = 0.0  # current speed

    @property
    def oncoming(self) -> bool:
        return self.spec.facing == "front"


@dataclass
class _Walker:
    id: int
    spec: PedestrianSpec  # world u, z
    speed: float
    route: list[tuple[float, float, bool]] = field(default_factory=list)  # (u, z, gated): gated legs step on
    delay: float = 0.5
    waited: float = 0.0
    waiting: bool = False  # stands at a gate (the curb) until the crossing opens
    gait: float = 0.0
    stride: float = 0.0  # standing stride and arm swing (from the spec)
    arm: float = 0.0


def _advance(pos: float, v: float, v_max: float, limit: float, dt: float) -> tuple[float, float]:
    """One step of a 1-D mover: accelerate towards ``v_max``, brake to stop at ``limit``, never pass it."""
    room = max(0.0, limit - pos)
    v_new = max(0.0, min(v + _ACCEL * dt, v_max, math.sqrt(2.0 * _BRAKE * room)))
    step = min(v_new * dt, room)
    return pos + step, step / dt


def _inside_fraction(r: tuple[float, float, float, float]) -> float:
    w, h = r[2] - r[0], r[3] - r[1]
    if w <= 0 or h <= 0:
        return 0.0
    iw = max(0.0, min(r[2], 1.0) - max(r[0], 0.0))
    ih = max(0.0, min(r[3], 1.0) - max(r[1], 0.0))
    return iw * ih / (w * h)


def _shown(r: tuple[float, float, float, float], fill: float) -> bool:
    """Some of rectangle ``r`` is in the picture and, filled to ``fill``, it is not far below render's minimum
    visible area (``MIN_VISIBLE_PX`` at 128 px, as a fraction of the picture)."""
    if _inside_fraction(r) <= 0:
        return False
    return (r[2] - r[0]) * (r[3] - r[1]) * fill >= 0.7 * MIN_VISIBLE_PX / 128**2


class _World:
    """The evolving scene of one drive. World ``z`` = camera ``z`` at time 0; the camera is at ``z = s``."""

    def __init__(self, spec: SceneSpec, rng: np.random.Generator, fps: float):
        self.base, self.rng, self.dt = spec, rng, 1.0 / fps
        self.t, self.s = 0.0, 0.0
        self.cam = Camera.of(spec)
        self.R = spec.road_half
        self.u_cam = spec.vp_x - spec.road_cx
        self.next_id = 0
        U = self.U
        self.ego_max = U(*_EGO_SPEED)
        # the traffic light's cycle
        self.light = spec.light
        self.light_gone = False
        self.sign = spec.sign
        self.durations = {k: U(*_LIGHT_S[k]) for k in LIGHT_CYCLE}
        self.cycle_s = sum(self.durations.values())
        if self.light is not None:
            start = sum(self.durations[k] for k in LIGHT_CYCLE[:LIGHT_CYCLE.index(self.light.state)])
            self.phase = start + U(0.0, self.durations[self.light.state])
        else:
            self.phase = 0.0
        # the regulated zone: the crosswalk (sample_spec's vehicle-free band) or a stop line before the light
        self.crosswalk = spec.crosswalk
        cw0, cw1 = spec.crosswalk_z - spec.crosswalk_dz, spec.crosswalk_z + spec.crosswalk_dz
        if spec.crosswalk:
            self.zone = (cw0 - 0.35, cw1 + 0.12)
            stop_line = cw0 - 0.14
        elif self.light is not None:
            self.zone = (self.light.z - 0.5, self.light.z + 0.3)
            stop_line = self.light.z - 0.3
        else:
            self.zone, stop_line = None, None
        self.s_stop = None
        if stop_line is not None:
            z_stop = 1.0
            if self.light is not None:  # stop further back if the light would leave the picture
                while z_stop < stop_line and not self._head_inside(self.light.z - stop_line + z_stop):
                    z_stop += 0.02
            self.s_stop = max(0.0, stop_line - z_stop)
        # scene elements
        self.cars = [_Car(self._id(), v, self._car_speed(v.facing == "front")) for v in spec.vehicles]
        self.walkers: list[_Walker] = []
        self._init_walkers(spec)
        self.trees = list(spec.trees)
        self.patches = list(spec.patches)
        self.buildings: list[BuildingSpec] = []
        self.frontier = {-1: 0.4, 1: 0.4}
        for b in spec.buildings:
            self._add_building(b)
        self._extend_buildings()
        for c in self.cars:
            c.v = self._car_step(c, closed=self.closed(), dry_run=True)
        self.ego_v = self._ego_step(self.closed(), dry_run=True)

    # ---------------------------------------------------------------- helpers
    def U(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _car_speed(self, oncoming: bool) -> float:
        return self.U(0.2, 0.45) if oncoming else self.U(0.08, 0.4)

    def _head_inside(self, z_cam: float) -> bool:
        r = light_head_rect(self.cam, replace(self.light, z=z_cam))
        return r[0] >= 0.01 and r[1] >= 0.01 and r[2] <= 0.99 and r[3] <= 0.99

    def light_state(self, t: float | None = None) -> tuple[str, float]:
        """The light's state at time ``t`` and the seconds left in it."""
        p = (self.phase + (self.t if t is None else t)) % self.cycle_s
        for k in LIGHT_CYCLE:
            if p < self.durations[k]:
                return k, self.durations[k] - p
            p -= self.durations[k]
        return LIGHT_CYCLE[-1], 0.0

    def cw_on(self) -> bool:
        """The crosswalk is still in front of the camera (drawn)."""
        cw = self.base
        return self.crosswalk and cw.crosswalk_z - cw.crosswalk_dz - self.s > 0.05 \
            and cw.crosswalk_z + cw.crosswalk_dz - self.s > 0.5

    def on_crosswalk(self, u: float, z: float) -> bool:
        cw = self.base
        return self.cw_on() and abs(u) < self.R and abs(z - cw.crosswalk_z) <= cw.crosswalk_dz + 0.02

    def in_zone(self, c: _Car) -> bool:
        return self.zone is not None and self.zone[0] < c.spec.z < self.zone[1]

    def ego_in_zone(self) -> bool:
        return self.s_stop is not None and self.s > self.s_stop + 1e-9 and self.cw_on()

    def closed(self) -> bool:
        """Vehicles and the ego may not enter the zone."""
        if self.zone is None:
            return False
        if self.light is not None and self.light_state()[0] != "green":
            return True
        if any(self.on_crosswalk(w.spec.u, w.spec.z) for w in self.walkers):
            return True
        return self.light is None and any(w.waiting for w in self.walkers)

    def pedestrians_go(self) -> bool:
        """Pedestrians waiting at the curb may step onto the crosswalk."""
        if not self.cw_on() or self.ego_in_zone() or any(self.in_zone(c) for c in self.cars):
            return False
        if self.light is None:
            return True
        state, left = self.light_state()
        return state == "red" and left >= _MIN_RED_LEFT

    # ---------------------------------------------------------------- set-up
    def _init_walkers(self, spec: SceneSpec) -> None:
        """Gives the sampled pedestrians something to do; with a crosswalk, brings people to it.

        With a crosswalk, most sidewalk pedestrians are moved next to it (walking to the curb to cross), some
        people on it are moved back to its curb (waiting to cross), and people are added until two or three
        want to cross. Every moved or added person obeys ``sample_spec``'s placement rules at the first frame.
        """
        heads = []
        if spec.light is not None:
            heads.append((spec.light.z, light_head_rect(self.cam, spec.light)))
        if spec.sign is not None:
            heads.append((spec.sign.z, sign_head_rect(self.cam, spec.sign)))
        poles = [(o.u, o.z) for o in (spec.light, spec.sign) if o is not None]
        people = list(spec.pedestrians)

        def fits(j: int, p: PedestrianSpec) -> bool:  # sample_spec's placement rules
            rect = pedestrian_rect(self.cam, p)
            if not (rect[0] >= 0 and rect[1] >= 0 and rect[2] <= 1 and rect[3] <= 1):
                return False
            if any(k != j and rects_overlap(rect, pedestrian_rect(self.cam, o))
                   for k, o in enumerate(people)):
                return False
            if any(hz > p.z and rects_overlap(rect, hr, 0.005) for hz, hr in heads):
                return False
            if any(abs(pu - p.u) < 0.08 and abs(pz - p.z) < 0.2 for pu, pz in poles):
                return False
            return not any(t.z < p.z and rects_overlap(tree_rect(self.cam, t), rect, 0.01)
                           for t in spec.trees)

        def to_cross(j: int, p: PedestrianSpec, at_curb: bool) -> _Walker | None:
            """``p`` moved next to the crosswalk (on the sidewalk or at the curb) with a route across it."""
            side = 1 if p.u > 0 else -1
            if at_curb and self.rng.random() < 0.5:
                side = -side
            for _ in range(8):
                zc = spec.crosswalk_z + self.U(-0.5, 0.5) * spec.crosswalk_dz
                if at_curb:
                    cand = replace(p, u=side * (self.R + 0.04), z=zc, on_crosswalk=False)
                else:
                    u = p.u if p.u * side > self.R else side * (self.R + spec.sidewalk_w * self.U(0.2, 0.75))
                    cand = replace(p, u=u, z=zc + self.U(0.1, 0.45) * (1 if self.rng.random() < 0.5 else -1),
                                   on_crosswalk=False)
                if fits(j, cand):
                    people[j] = cand
                    w = self._walker(cand)
                    w.route = self._crossing_route(side, zc)
                    return w
            return None

        for j, p in enumerate(spec.pedestrians):
            w = None
            if spec.crosswalk and self.rng.random() < (0.4 if p.on_crosswalk else 0.85):
                w = to_cross(j, p, at_curb=p.on_crosswalk)
            if w is None:
                w = self._walker(p)
                if p.on_crosswalk:  # finish crossing, then stand on the sidewalk
                    to = 1 if self.rng.random() < 0.5 else -1
                    far = to * (self.R + spec.sidewalk_w * self.U(0.25, 0.6))
                    w.route = [(to * (self.R + 0.04), p.z, False), (far, p.z + self.U(-0.15, 0.15), False)]
                elif self.rng.random() < 0.6:  # stroll along the sidewalk
                    w.route = [(p.u, max(0.2, p.z + self.U(-1.5, 1.5)), False)]
                    w.speed *= 0.7
            self.walkers.append(w)
        if spec.crosswalk:
            want = int(self.rng.integers(2, 4))
            for _ in range(6):
                if sum(any(g for _, _, g in w.route) for w in self.walkers) >= want \
                        or len(self.walkers) >= MAX_PEDESTRIANS:
                    break
                side = 1 if self.rng.random() < 0.5 else -1
                people.append(self._new_pedestrian(side * (self.R + spec.sidewalk_w * 0.5), spec.crosswalk_z))
                w = to_cross(len(people) - 1, people[-1], at_curb=self.rng.random() < 0.3)
                if w is None:
                    people.pop()
                else:
                    self.walkers.append(w)

    def _new_pedestrian(self, u: float, z: float) -> PedestrianSpec:
        """A new person at ``(u, z)`` on a sidewalk, drawn like ``sample_spec``'s."""
        rng, U = self.rng, self.U
        skin = _SKINS[int(rng.integers(0, len(_SKINS)))]
        shirt = tuple(int(rng.integers(20, 236)) for _ in range(3))
        pants = _PANTS[int(rng.integers(0, len(_PANTS)))]
        pants = tuple(min(255, max(0, c + int(e))) for c, e in zip(pants, rng.integers(-8, 9, 3)))
        return PedestrianSpec(u, z, False, U(0.19, 0.24), skin, shirt, pants, U(0.05, 0.26), U(0.0, 0.16),
                              U(0.26, 0.34))

    def _walker(self, p: PedestrianSpec) -> _Walker:
        return _Walker(self._id(), p, self.U(*_WALK), delay=self.U(*_REACTION), stride=p.stride, arm=p.arm)

    def _crossing_route(self, side: int, zc: float) -> list[tuple[float, float, bool]]:
        """From the sidewalk on ``side`` to its curb at ``zc``, across (gated), then a little way in."""
        far = -side * (self.R + self.base.sidewalk_w * self.U(0.25, 0.6))
        return [(side * (self.R + 0.04), zc, False), (-side * (self.R + 0.04), zc, True),
                (far, zc + self.U(-0.15, 0.15), False)]

    def _add_building(self, b: BuildingSpec) -> None:
        """Adds a facade as one-column facades (the same windows), so each can be passed on its own."""
        dz = (b.z1 - b.z0) / b.cols
        for c in range(b.cols):
            self.buildings.append(replace(b, z0=b.z0 + c * dz, z1=b.z0 + (c + 1) * dz, cols=1,
                                          window_seed=int(self.rng.integers(0, 2**31 - 1))))
        self.frontier[b.side] = max(self.frontier[b.side], b.z1)

    def _extend_buildings(self) -> None:
        for side in (-1, 1):
            while self.frontier[side] - self.s < 14.0:
                z = self.frontier[side]
                length = self.U(0.8, 2.4) * 1.3
                height = self.U(0.45, 1.4)
                rgb = _BUILDINGS[int(self.rng.integers(0, len(_BUILDINGS)))]
                rgb = tuple(min(255, max(0, c + int(e))) for c, e in zip(rgb, self.rng.integers(-12, 13, 3)))
                floors = max(1, int(height / self.U(0.2, 0.28)))
                cols = min(6, max(1, int(length / self.U(0.3, 0.5))))
                self._add_building(BuildingSpec(side, z, z + length, height, rgb, floors, cols, 0))

    # ---------------------------------------------------------------- one step
    def _car_step(self, c: _Car, closed: bool, dry_run: bool = False) -> float:
        """Moves ``c`` one step (or only returns the speed it would start with)."""
        sign = -1.0 if c.oncoming else 1.0
        pos = sign * c.spec.z
        limit = math.inf
        for o in self.cars:
            if o is not c and o.spec.lane == c.spec.lane and sign * o.spec.z > pos:
                limit = min(limit, sign * o.spec.z - _GAP)
        if closed and self.zone is not None:
            entry = sign * (self.zone[1] if c.oncoming else self.zone[0])
            if pos <= entry + 1e-9:
                limit = min(limit, entry)
        limit = max(limit, pos)
        if dry_run:
            return min(c.speed, math.sqrt(2.0 * _BRAKE * max(0.0, limit - pos)))
        new, c.v = _advance(pos, c.v, c.speed, limit, self.dt)
        c.spec = replace(c.spec, z=sign * new)
        return c.v

    def _ego_step(self, closed: bool, dry_run: bool = False) -> float:
        limit = math.inf
        for c in self.cars:
            if not c.oncoming and abs(c.spec.u - self.u_cam) < c.spec.width / 2 + _EGO_HALF_W \
                    and c.spec.z - self.s > _GONE:
                limit = min(limit, c.spec.z - _EGO_GAP)
        if closed and self.s_stop is not None and self.s <= self.s_stop + 1e-9:
            limit = min(limit, self.s_stop)
        limit = max(limit, self.s)
        if dry_run:
            return min(self.ego_max, math.sqrt(2.0 * _BRAKE * max(0.0, limit - self.s)))
        self.s, self.ego_v = _advance(self.s, self.ego_v, self.ego_max, limit, self.dt)
        return self.ego_v

    def _walk(self, w: _Walker, go: bool) -> None:
        budget = w.speed * self.dt
        p = w.spec
        u, z = p.u, p.z
        moved = 0.0
        w.waiting = False
        while budget > 1e-12 and w.route:
            tu, tz, gated = w.route[0]
            if gated:
                if not go:
                    w.waited, w.waiting = 0.0, True
                    break
                if w.waited < w.delay:  # counted from earlier steps: nobody steps on the moment it arrives
                    w.waited, w.waiting = w.waited + self.dt, True
                    break
                w.route[0] = (tu, tz, False)  # under way: no more waiting on this leg
            d = math.hypot(tu - u, tz - z)
            if d <= budget:
                u, z, budget, moved = tu, tz, budget - d, moved + d
                w.route.pop(0)
            else:
                u, z, moved = u + (tu - u) * budget / d, z + (tz - z) * budget / d, moved + budget
                budget = 0.0
        if moved > 0:  # legs and arms swing with the distance walked
            w.gait += math.pi * moved / (0.4 * p.height)
            swing = abs(math.sin(w.gait))
            w.spec = replace(p, u=u, z=z, stride=max(0.05, 0.26 * swing), arm=0.16 * abs(math.cos(w.gait)))
        else:
            w.spec = replace(p, u=u, z=z, stride=w.stride, arm=w.arm)
        w.spec = replace(w.spec, on_crosswalk=self.on_crosswalk(u, z))

    def step(self) -> None:
        """Advances the world by one frame."""
        go = self.pedestrians_go()
        for w in self.walkers:
            self._walk(w, go)
        closed = self.closed()
        self._ego_step(closed)
        for c in sorted(self.cars, key=lambda c: -c.spec.z if not c.oncoming else c.spec.z):
            self._car_step(c, closed)
        self.t += self.dt
        self._leave_and_enter()

    def _leave_and_enter(self) -> None:
        s, cam = self.s, self.cam
        self.cars = [c for c in self.cars if _GONE < c.spec.z - s < _FAR]
        if not self.cw_on():  # people on a crosswalk that has passed under the camera have left the picture
            self.walkers = [w for w in self.walkers if abs(w.spec.u) >= self.R]
            for w in self.walkers:
                if w.route and any(g for _, _, g in w.route):
                    w.route = []
        self.walkers = [w for w in self.walkers if _GONE + 0.05 < w.spec.z - s < 9.0]
        self.trees = [t for t in self.trees if t.z - s > _GONE
                      and _inside_fraction(tree_rect(cam, replace(t, z=t.z - s))) > 0]
        self.patches = [p for p in self.patches if p[3] - s > 0.55]
        self.buildings = [b for b in self.buildings if b.z1 - s > _GONE and self._facade_visible(b)]
        self._extend_buildings()
        if self.light is not None and not self.light_gone:
            z = self.light.z - s
            if z < _GONE or _inside_fraction(light_head_rect(cam, replace(self.light, z=z))) < 0.85:
                self.light_gone = True
        if self.sign is not None:
            z = self.sign.z - s
            if z < _GONE or _inside_fraction(sign_head_rect(cam, replace(self.sign, z=z))) < 0.85:
                self.sign = None
        # entering from far away: vehicles at random times, trees and road repairs by distance travelled
        dt, ds = self.dt, self.ego_v * self.dt
        if len(self.cars) < MAX_VEHICLES and self.rng.random() < 0.3 * dt:
            self._spawn_car()
        for side in (-1, 1):
            if self.rng.random() < 0.25 * ds:
                self._spawn_tree(side)
        if self.rng.random() < 0.2 * ds:
            u0 = self.U(-self.R, self.R - 0.1)
            z0 = s + self.U(6.0, 7.0)
            self.patches.append((u0, min(self.R, u0 + self.U(0.05, 0.2)), z0, z0 + self.U(0.2, 0.8)))
        if len(self.walkers) < MAX_PEDESTRIANS and self.rng.random() < 0.1 * dt:
            self._spawn_walker()

    def _facade_visible(self, b: BuildingSpec) -> bool:
        """Some of the facade is in the picture (its far end is the nearest to the image centre)."""
        x = self.cam.x(b.side * (self.R + self.base.sidewalk_w), b.z1 - self.s)
        return x < 1.0 if b.side > 0 else x > 0.0

    def _spawn_car(self) -> None:
        spec, rng, U = self.base, self.rng, self.U
        lane = int(rng.integers(0, spec.n_lanes))
        z = self.s + U(5.5, 7.0)
        vtype = VEHICLE_TYPES[int(rng.choice(3, p=(0.6, 0.2, 0.2)))]
        color = _COLOR_NAMES[int(rng.integers(0, len(_COLOR_NAMES)))]
        width = spec.lane_w * {"car": U(0.66, 0.76), "truck": U(0.78, 0.86), "bus": U(0.82, 0.9)}[vtype]
        height = width * {"car": U(0.68, 0.8), "truck": U(1.05, 1.25), "bus": U(0.98, 1.12)}[vtype]
        base = np.array(COLORS[color]) * U(0.9, 1.08) + rng.integers(-14, 15, 3)
        oncoming = spec.two_way and lane == 0
        u = -self.R + (lane + 0.5) * spec.lane_w + U(-0.3, 0.3) * (spec.lane_w - width)
        v = VehicleSpec(vtype, color, tuple(int(c) for c in np.clip(base, 0, 255)), lane, u, z, width, height,
                        "front" if oncoming else "rear", U(0.06, 0.2), U(0.08, 0.2), U(0.14, 0.2),
                        U(0.12, 0.2))
        speed = U(0.2, 0.45) if oncoming else U(0.05, 0.25)  # slower ones come into view
        if any(o.spec.lane == lane and abs(o.spec.z - z) < _GAP + 0.3 for o in self.cars):
            return
        if self.zone is not None and self.zone[0] - 0.1 < z < self.zone[1] + 0.1:
            return
        r = vehicle_rect(self.cam, replace(v, z=z - self.s))
        if r[0] < 0.0 or r[2] > 1.0:
            return
        self.cars.append(_Car(self._id(), v, speed, speed))

    def _spawn_tree(self, side: int) -> None:
        spec, rng, U = self.base, self.rng, self.U
        n_blobs = int(rng.integers(2, 5))
        blobs = ((0.0, 0.0, 1.0),) + tuple((U(-0.5, 0.5), U(-0.3, 0.4), U(0.6, 0.9))
                                           for _ in range(n_blobs - 1))
        canopy = _CANOPIES[int(rng.integers(0, len(_CANOPIES)))]
        canopy = tuple(min(255, max(0, c + int(e))) for c, e in zip(canopy, rng.integers(-14, 15, 3)))
        self.trees.append(TreeSpec(side * (self.R + spec.sidewalk_w * U(0.6, 0.92)), self.s + U(8.5, 9.5),
                                   U(0.22, 0.36), U(0.1, 0.17), canopy, blobs))

    def _spawn_walker(self) -> None:
        side = 1 if self.rng.random() < 0.5 else -1
        u, z = side * (self.R + self.base.sidewalk_w * self.U(0.2, 0.75)), self.s + self.U(3.0, 3.6)
        w = self._walker(self._new_pedestrian(u, z))
        w.route = [(u, max(self.s + 0.2, z - self.U(1.0, 3.0)), False)]  # walking towards the camera
        self.walkers.append(w)

    # ---------------------------------------------------------------- the frame's scene
    def frame(self) -> tuple[SceneSpec, list[int], list[int]]:
        """The scene as the camera sees it now, with the track ids of its vehicles and pedestrians."""
        s, spec, rng, cam = self.s, self.base, self.rng, self.cam
        # what is wholly out of the picture (passed below it, beside the camera) or far too small to be kept
        # by render is left out of this frame (saves render a second pass)
        cars = [c for c in sorted(self.cars, key=lambda c: c.id)
                if _shown(vehicle_rect(cam, replace(c.spec, z=c.spec.z - s)), 1.0)]
        walkers = [w for w in sorted(self.walkers, key=lambda w: w.id)
                   if _shown(pedestrian_rect(cam, replace(w.spec, z=w.spec.z - s)), 0.5)]
        light = None
        if self.light is not None and not self.light_gone:
            light = replace(self.light, state=self.light_state()[0], z=self.light.z - s)
        scene = replace(
            spec,
            crosswalk=self.cw_on(),
            crosswalk_z=spec.crosswalk_z - s,
            dash_phase=(spec.dash_phase - s) % spec.dash_period,
            rain_seed=int(rng.integers(0, 2**31 - 1)),
            noise_seed=int(rng.integers(0, 2**31 - 1)),
            text_seed=int(rng.integers(0, 2**31 - 1)),
            vehicles=tuple(replace(c.spec, z=c.spec.z - s) for c in cars),
            pedestrians=tuple(replace(w.spec, z=w.spec.z - s) for w in walkers),
            light=light,
            sign=replace(self.sign, z=self.sign.z - s) if self.sign is not None else None,
            trees=tuple(replace(t, z=t.z - s) for t in self.trees),
            buildings=tuple(replace(b, z0=max(b.z0 - s, 0.05), z1=b.z1 - s) for b in self.buildings),
            patches=tuple((u0, u1, max(z0 - s, 0.3), z1 - s) for u0, u1, z0, z1 in self.patches),
        )
        return scene, [c.id for c in cars], [w.id for w in walkers]


# ---------------------------------------------------------------- rendering
def _render_tracked(spec: SceneSpec, size: int, vids: list[int], pids: list[int]
                    ) -> tuple[Image.Image, Annotation, list[int], list[int]]:
    """``render(spec, size)`` and the track ids of the vehicles and pedestrians it kept."""
    img, ann = render(spec, size)
    a = ann.attributes
    if len(a["vehicles"]) == len(vids) and len(a["pedestrians"]) == len(pids):
        return img, ann, vids, pids
    n_v, n_p = len(a["vehicles"]), len(a["pedestrians"])
    vids, pids = list(vids), list(pids)
    while len(vids) != n_v or len(pids) != n_p:  # render removed some: replay its rounds to learn which
        bad = _failing(spec, rasterise(spec, size), size)
        if not (bad["vehicles"] or bad["pedestrians"] or bad["light"] or bad["sign"]):
            raise RuntimeError("render's removals could not be replayed")  # cannot happen: both are pure
        vids = [k for i, k in enumerate(vids) if i not in bad["vehicles"]]
        pids = [k for j, k in enumerate(pids) if j not in bad["pedestrians"]]
        spec = spec.without(bad["vehicles"], bad["pedestrians"], bad["light"], bad["sign"])
    return img, ann, vids, pids


def drive_rng(split_seed: int, index: int) -> np.random.Generator:
    """The random stream of a drive's evolution (independent of the scene's, which is ``image_rng``)."""
    return np.random.default_rng([image_seed(split_seed, index), _DRIVE_TAG])


def sample_drive(split_seed: int, index: int, frames: int = DEFAULT_FRAMES, fps: float = DEFAULT_FPS,
                 size: int = 128) -> Drive:
    """Drive ``index`` of the split seeded ``split_seed``: ``frames`` rendered frames at ``fps``.

    Args:
        split_seed: split seed (``TRAIN_SEED``, ``VAL_SEED``, ... as for images).
        index: drive index; the drive starts from the scene of image ``index`` of the split.
        frames: number of frames (>= 1).
        fps: frames per second (> 0); the facts' window is ``round(fps)`` frames.
        size: image side in pixels.

    Returns:
        A :class:`Drive`.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    world = _World(sample_spec(image_rng(split_seed, index)), drive_rng(split_seed, index), fps)
    images, annotations, specs, spec_ids, vid_list, pid_list, speeds = [], [], [], [], [], [], []
    for t in range(frames):
        if t:
            world.step()
        spec, vids, pids = world.frame()
        specs.append(spec)
        spec_ids.append({"vehicles": vids, "pedestrians": pids})
        img, ann, vids, pids = _render_tracked(spec, size, vids, pids)
        images.append(img)
        annotations.append(ann)
        vid_list.append(vids)
        pid_list.append(pids)
        speeds.append(world.ego_v)
    window = _window(fps)
    temporal = drive_facts([a.attributes for a in annotations], pid_list, window)
    facts = [{"index": t, "time_s": round(t / fps, 6), **temporal[t], "ego_speed": round(speeds[t], 4),
              "vehicle_ids": vid_list[t], "pedestrian_ids": pid_list[t]} for t in range(frames)]
    return Drive(images, annotations, facts, specs, spec_ids, split_seed, index, fps, size, window)


# ---------------------------------------------------------------- writing drives to disk
def _update_index(out_dir: Path, entries: list[dict[str, Any]]) -> None:
    path = out_dir / "drives.json"
    drives = {}
    if path.is_file():
        drives = {d["name"]: d for d in json.loads(path.read_text(encoding="utf-8")).get("drives", [])}
    drives.update({e["name"]: e for e in entries})
    index = {"format": 1, "description": "SynthDrive drives: H.264 videos with per-frame annotations (jsonl)",
             "drives": [drives[k] for k in sorted(drives)]}
    path.write_text(json.dumps(index, indent=1), encoding="utf-8")


def write_drive(drive: Drive, out_dir: str | Path, name: str, *, crf: int = 18, pix_fmt: str = "yuv420p",
                index: bool = True) -> dict[str, Any]:
    """Writes ``<name>.mp4`` and ``<name>.jsonl`` (one line per frame: :meth:`Drive.records`) to ``out_dir``.

    Args:
        drive: a drive from :func:`sample_drive`.
        out_dir: folder (created).
        name: file stem.
        crf: H.264 constant-rate factor (18: visually lossless, small objects keep their colours).
        pix_fmt: ``"yuv420p"`` (plays everywhere) or ``"yuv444p"`` (full colour resolution), see
            :func:`shusheng.data.video.write_video`.
        index: also add the drive to ``out_dir/drives.json`` (:func:`generate_drives` writes it once instead).

    Returns:
        The drive's ``drives.json`` entry.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_video(drive.frames, out / f"{name}.mp4", drive.fps, crf=crf, pix_fmt=pix_fmt)
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for rec in drive.records():
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
    entry = {"name": name, "video": f"{name}.mp4", "annotations": f"{name}.jsonl",
             "split_seed": drive.split_seed, "index": drive.index, "frames": len(drive), "fps": drive.fps,
             "size": drive.size, "duration_s": round(drive.duration_s, 6), "window": drive.window}
    if index:
        _update_index(out, [entry])
    return entry


def _write_one(out: str, seed: int, frames: int, fps: float, size: int, width: int,
               index: int) -> dict[str, Any]:
    drive = sample_drive(seed, index, frames, fps, size)
    return write_drive(drive, out, f"drive_{index:0{width}d}", index=False)


def generate_drives(out: str | Path, n: int, seed: int, frames: int = DEFAULT_FRAMES,
                    fps: float = DEFAULT_FPS, size: int = 128, *, workers: int = 1, start: int = 0,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Writes drives ``start .. start+n-1`` of the split seeded ``seed`` to ``out``.

    Layout: ``drive_NNNNNN.mp4`` and ``drive_NNNNNN.jsonl`` per drive (:func:`write_drive`) and
    ``drives.json`` (the list of drives, written last). The same arguments give the same files, whatever
    ``workers`` is.

    Args:
        out: output folder (created); a folder that already holds files is refused unless ``overwrite``.
        n: number of drives.
        seed: split seed.
        frames, fps, size: of every drive.
        workers: processes rendering in parallel (1 = in this process).
        start: index of the first drive.
        overwrite: write into a non-empty folder (files of the same names are replaced).
        progress: show a tqdm progress bar.

    Returns:
        ``{"n", "frames", "seconds", "drives_per_second", "out"}``.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    from tqdm import tqdm

    from shusheng._deps import require

    require("av", extra="video")  # fail before rendering anything
    if size % 2:
        raise ValueError(f"H.264 in yuv420p needs an even size, got {size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} is not an empty folder; pass overwrite=True (--overwrite) to write "
                              "into it")
    out.mkdir(parents=True, exist_ok=True)
    image_seed(seed, start)  # validates
    if n > 0:
        image_seed(seed, start + n - 1)
    if start + n > MAX_INDEX:
        raise ValueError(f"invalid range start={start}, n={n}")
    width = max(6, len(str(start + n - 1)))
    job = functools.partial(_write_one, str(out), seed, frames, fps, size, width)
    t0 = time.perf_counter()
    entries = []
    pool = None
    try:
        if workers > 1 and n > 1:
            pool = multiprocessing.get_context().Pool(workers)
            results = pool.imap(job, range(start, start + n))
        else:
            results = map(job, range(start, start + n))
        for entry in tqdm(results, total=n, desc="synthdrive drives", unit="drive", disable=not progress):
            entries.append(entry)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _update_index(out, entries)
    dt = time.perf_counter() - t0
    stats = {"n": n, "frames": frames, "seconds": round(dt, 3),
             "drives_per_second": round(n / dt, 2) if dt > 0 else math.inf, "out": str(out)}
    logger.info("wrote %d SynthDrive drives (%d frames at %s fps, %d px, seed %d) to %s in %.1f s", n, frames,
                fps, size, seed, out, dt)
    return stats
