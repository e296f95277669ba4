"""SynthDrive scene model and rasteriser: vocabulary, the scene specification, camera geometry and drawing.

A scene is a :class:`SceneSpec`: plain data holding every random choice (positions, sizes, shades, shapes), so
rendering is a pure function of the spec and the output size. :func:`rasterise` draws the RGB picture, the
semantic mask and an instance map together, primitive by primitive, from the same geometry, at twice the output
size; the picture is then box-downsampled (anti-aliasing) and the masks subsampled.

World coordinates (a pinhole camera looking down the road, units of "image widths at distance 1"): ``u`` is the
lateral offset from the road centre, ``z`` the distance (``z = 1`` is the bottom row of the image), heights are
above the ground. A point ``(u, z, H)`` lands at ``x = vp_x + (road_cx + u - vp_x) / z`` and
``y = horizon + (1 - horizon - H) / z`` (fractions of the image side), so sizes scale with ``1 / z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASSES",
    "COCO_CATEGORIES",
    "COLORS",
    "LIGHTS",
    "SIGNS",
    "TIMES",
    "VEHICLE_TYPES",
    "WEATHERS",
    "BuildingSpec",
    "Camera",
    "PedestrianSpec",
    "Raster",
    "SceneSpec",
    "SignSpec",
    "TrafficLightSpec",
    "TreeSpec",
    "VehicleSpec",
    "lane_names",
    "rasterise",
]

# ---------------------------------------------------------------- vocabulary (the value names of the annotations)
TIMES = ("day", "dusk", "night")
WEATHERS = ("clear", "rain", "fog")
LIGHTS = ("red", "yellow", "green", "none")
SIGNS = ("stop", "yield", "speed_30", "speed_50", "speed_80", "none")
VEHICLE_TYPES = ("car", "truck", "bus")
#: vehicle colour name -> base RGB (each vehicle's shade is jittered around it)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (196, 28, 32),
    "blue": (28, 70, 196),
    "green": (30, 142, 58),
    "yellow": (236, 204, 30),
    "white": (236, 236, 232),
    "black": (26, 26, 30),
    "silver": (160, 164, 172),
    "orange": (240, 118, 18),
}
#: semantic classes, index = class id in the mask. ``other`` holds poles (the light and sign heads are classes).
CLASSES = (
    "other", "road", "lane_marking", "crosswalk", "sidewalk", "sky", "building", "vegetation", "vehicle",
    "person", "traffic_light", "sign",
)
_C = {name: i for i, name in enumerate(CLASSES)}
#: COCO categories (ids are stable); traffic light and sign boxes cover the head, not the pole.
COCO_CATEGORIES = (
    {"id": 1, "name": "car", "supercategory": "vehicle"},
    {"id": 2, "name": "truck", "supercategory": "vehicle"},
    {"id": 3, "name": "bus", "supercategory": "vehicle"},
    {"id": 4, "name": "person", "supercategory": "person"},
    {"id": 5, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 6, "name": "sign", "supercategory": "outdoor"},
)
SUPERSAMPLE = 2
# instance ids in the instance map (0 = none): vehicles 1.., pedestrians 20.., light 40, sign 41
_PED_BASE, _LIGHT_ID, _SIGN_ID = 20, 40, 41


def lane_names(n_lanes: int) -> tuple[str, ...]:
    """Lane names from left to right: ``("left", "right")`` or ``("left", "middle", "right")``."""
    return ("left", "right") if n_lanes == 2 else ("left", "middle", "right")


# ---------------------------------------------------------------- scene specification
@dataclass(frozen=True)
class VehicleSpec:
    """A vehicle seen from behind (or from the front when oncoming), standing in a lane."""

    type: str
    color: str
    rgb: tuple[int, int, int]
    lane: int
    u: float
    z: float
    width: float
    height: float
    facing: str  # "rear" | "front"
    corner: float  # rounding of the body corners (fraction of width)
    cabin: float  # inset of the cabin / window (fraction of width)
    wheel: float  # wheel width (fraction of width)
    lamp: float  # lamp width (fraction of width)


@dataclass(frozen=True)
class PedestrianSpec:
    """A person standing or walking on the crosswalk or on a sidewalk."""

    u: float
    z: float
    on_crosswalk: bool
    height: float
    skin: tuple[int, int, int]
    shirt: tuple[int, int, int]
    pants: tuple[int, int, int]
    stride: float  # feet apart, fraction of height
    arm: float  # arm swing, fraction of height
    build: float  # shoulder width, fraction of height


@dataclass(frozen=True)
class TrafficLightSpec:
    """A traffic light on a pole at the roadside; ``state`` is the lit lamp."""

    state: str
    side: int  # +1 right, -1 left
    u: float
    z: float
    pole_height: float
    housing_w: float
    housing_h: float
    housing_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class SignSpec:
    """A road sign on a pole at the roadside."""

    kind: str  # one of SIGNS except "none"
    side: int
    u: float
    z: float
    pole_height: float
    diameter: float


@dataclass(frozen=True)
class TreeSpec:
    """A roadside tree (clutter)."""

    u: float
    z: float
    trunk_h: float
    canopy_r: float
    canopy_rgb: tuple[int, int, int]
    blobs: tuple[tuple[float, float, float], ...]  # (dx, dy, r) of canopy blobs, fractions of canopy_r


@dataclass(frozen=True)
class BuildingSpec:
    """A facade along one side of the street, between distances ``z0 < z1`` (clutter)."""

    side: int
    z0: float
    z1: float
    height: float
    rgb: tuple[int, int, int]
    floors: int
    cols: int
    window_seed: int


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one scene; all randomness lives here (see ``sample_spec``)."""

    time: str
    weather: str
    horizon: float
    vp_x: float
    road_cx: float
    lane_w: float
    n_lanes: int
    two_way: bool  # lane 0 carries oncoming traffic (front views) behind a double yellow line
    sidewalk_w: float
    crosswalk: bool
    crosswalk_z: float
    crosswalk_dz: float
    stripe_w: float
    dash_period: float
    dash_len: float
    dash_phase: float
    road_rgb: tuple[int, int, int]
    sidewalk_rgb: tuple[int, int, int]
    sky_top: tuple[int, int, int]
    sky_bottom: tuple[int, int, int]
    fog_density: float
    brightness: float
    white_balance: tuple[float, float, float]
    noise_sigma: float
    rain_seed: int
    noise_seed: int
    text_seed: int
    vehicles: tuple[VehicleSpec, ...] = ()
    pedestrians: tuple[PedestrianSpec, ...] = ()
    light: TrafficLightSpec | None = None
    sign: SignSpec | None = None
    trees: tuple[TreeSpec, ...] = ()
    buildings: tuple[BuildingSpec, ...] = ()
    skyline: tuple[tuple[float, float, float, int], ...] = ()  # (x0, width, height, grey) in screen fractions
    clouds: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, rx, ry) in screen fractions
    patches: tuple[tuple[float, float, float, float], ...] = field(default=())  # (u0, u1, z0, z1) road repairs

    @property
    def road_half(self) -> float:
        return self.lane_w * self.n_lanes / 2

    def lane_center(self, lane: int) -> float:
        return -self.road_half + (lane + 0.5) * self.lane_w

    def without(self, vehicles: set[int] = frozenset(), pedestrians: set[int] = frozenset(),
                light: bool = False, sign: bool = False) -> SceneSpec:
        """A copy with the given vehicles / pedestrians (indices) and optionally the light or sign removed."""
        return replace(
            self,
            vehicles=tuple(v for i, v in enumerate(self.vehicles) if i not in vehicles),
            pedestrians=tuple(p for i, p in enumerate(self.pedestrians) if i not in pedestrians),
            light=None if light else self.light,
            sign=None if sign else self.sign,
        )


# ---------------------------------------------------------------- geometry
class Camera:
    """Projects world points of a scene to pixels of a ``px``-sized canvas (``px=1`` gives fractions)."""

    def __init__(self, horizon: float, vp_x: float, road_cx: float, px: float = 1.0):
        self.h, self.vp, self.cx, self.px = horizon, vp_x, road_cx, px

    @classmethod
    def of(cls, spec: SceneSpec, px: float = 1.0) -> Camera:
        return cls(spec.horizon, spec.vp_x, spec.road_cx, px)

    def x(self, u: float, z: float) -> float:
        return (self.vp + (self.cx + u - self.vp) / z) * self.px

    def y(self, z: float, height: float = 0.0) -> float:
        return (self.h + (1.0 - self.h - height) / z) * self.px

    def z_of_row(self, y: np.ndarray) -> np.ndarray:
        """Distance of the ground seen at canvas rows ``y`` (``inf`` at and above the horizon)."""
        s = (y / self.px - self.h) / (1.0 - self.h)
        with np.errstate(divide="ignore"):
            return np.where(s > 0, 1.0 / np.maximum(s, 1e-9), np.inf)


Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


def vehicle_rect(cam: Camera, v: VehicleSpec) -> Rect:
    return (cam.x(v.u - v.width / 2, v.z), cam.y(v.z, v.height), cam.x(v.u + v.width / 2, v.z), cam.y(v.z))


def pedestrian_rect(cam: Camera, p: PedestrianSpec) -> Rect:
    half = p.height * (max(p.stride / 2 + 0.05, p.build / 2 + 0.05 + p.arm / 2) + 0.04)
    return (cam.x(p.u - half, p.z), cam.y(p.z, p.height), cam.x(p.u + half, p.z), cam.y(p.z))


def light_head_rect(cam: Camera, t: TrafficLightSpec) -> Rect:
    top = t.pole_height + t.housing_h
    return (cam.x(t.u - t.housing_w / 2, t.z), cam.y(t.z, top), cam.x(t.u + t.housing_w / 2, t.z),
            cam.y(t.z, t.pole_height))


def sign_head_rect(cam: Camera, s: SignSpec) -> Rect:
    r = s.diameter / 2
    return (cam.x(s.u - r, s.z), cam.y(s.z, s.pole_height + s.diameter), cam.x(s.u + r, s.z),
            cam.y(s.z, s.pole_height))


def tree_rect(cam: Camera, t: TreeSpec) -> Rect:
    r = t.canopy_r * 1.5
    return (cam.x(t.u - r, t.z), cam.y(t.z, t.trunk_h + 2.4 * t.canopy_r), cam.x(t.u + r, t.z), cam.y(t.z))


def rects_overlap(a: Rect, b: Rect, margin: float = 0.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


# ---------------------------------------------------------------- look: time of day, weather, fog
_TIME_GAIN = {"day": (1.0, 1.0, 1.0), "dusk": (0.84, 0.68, 0.62), "night": (0.30, 0.32, 0.42)}
_TIME_ADD = {"day": (0.0, 0.0, 0.0), "dusk": (24.0, 8.0, 0.0), "night": (0.0, 2.0, 8.0)}
_FOG_RGB = {"day": (196, 198, 204), "dusk": (168, 146, 146), "night": (58, 60, 70)}


class _Look:
    """Colour transform of a scene: lighting of the time of day, weather desaturation, fog by distance."""

    def __init__(self, spec: SceneSpec):
        rain = 0.84 if spec.weather == "rain" else 1.0
        self.gain = tuple(g * wb * spec.brightness * rain for g, wb in zip(_TIME_GAIN[spec.time], spec.white_balance))
        self.add = _TIME_ADD[spec.time]
        self.desat = {"clear": 0.0, "rain": 0.3, "fog": 0.25}[spec.weather]
        self.fog_rgb = np.array(_FOG_RGB[spec.time], dtype=float)
        self._fog_rgb = _FOG_RGB[spec.time]
        self.density = spec.fog_density

    def fog(self, z: float | np.ndarray) -> float | np.ndarray:
        """Fraction of fog colour at distance ``z`` (scalar or array)."""
        if isinstance(z, np.ndarray):
            return self.density * (1.0 - np.exp(-0.3 * np.maximum(z - 0.6, 0.0)))
        return self.density * (1.0 - math.exp(-0.3 * max(z - 0.6, 0.0)))

    def _out(self, c, f: float, alpha: int | None) -> tuple[int, ...]:
        out = tuple(min(255, max(0, int(round(v * (1.0 - f) + fr * f)))) for v, fr in zip(c, self._fog_rgb))
        return out if alpha is None else (*out, alpha)

    def __call__(self, rgb, z: float = 1.0, floor: float = 0.0, alpha: int | None = None) -> tuple[int, ...]:
        """The colour ``rgb`` of a surface at distance ``z``; ``floor`` is a minimum gain (reflective paint)."""
        grey = sum(rgb) / 3.0
        c = [(v + (grey - v) * self.desat) * max(g, floor) + a for v, g, a in zip(rgb, self.gain, self.add)]
        return self._out(c, self.fog(z), alpha)

    def emissive(self, rgb, z: float = 1.0, alpha: int | None = None) -> tuple[int, ...]:
        """A light source: not darkened by the time of day, half as affected by fog."""
        return self._out(rgb, self.fog(z) * 0.5, alpha)


# ---------------------------------------------------------------- painter: RGB, semantic and instance maps at once
class _Painter:
    """Draws each primitive into the picture and, when given a class, into the semantic and instance maps.

    Primitives drawn with a class define the object's silhouette; details (windows, lamps) are drawn into the
    picture only. For annotated instances the silhouette is also drawn alone, to count amodal pixels.
    """

    def __init__(self, base_rgb: Image.Image, base_sem: Image.Image):
        self.rgb, self.sem = base_rgb, base_sem
        self.px = base_rgb.size[0]
        self.inst = Image.new("L", base_rgb.size, 0)
        self.d_rgb = ImageDraw.Draw(self.rgb, "RGBA")
        self.d_sem = ImageDraw.Draw(self.sem)
        self.d_inst = ImageDraw.Draw(self.inst)
        self.amodal: dict[int, Image.Image] = {}
        self._d_amodal: dict[int, ImageDraw.ImageDraw] = {}
        self._inst_dirty = False  # the instance map is all zeros until the first instance is drawn

    def shape(self, kind: str, xy, fill, cls: int | None = None, inst: int = 0, **kw) -> None:
        if fill is not None:
            getattr(self.d_rgb, kind)(xy, fill=fill, **kw)
        if cls is None:
            return
        getattr(self.d_sem, kind)(xy, fill=cls, **kw)
        if inst or self._inst_dirty:
            getattr(self.d_inst, kind)(xy, fill=inst, **kw)
        if inst:
            self._inst_dirty = True
            if inst not in self.amodal:
                self.amodal[inst] = Image.new("L", self.rgb.size, 0)
                self._d_amodal[inst] = ImageDraw.Draw(self.amodal[inst])
            getattr(self._d_amodal[inst], kind)(xy, fill=255, **kw)

    def poly(self, pts, fill, cls=None, inst=0):
        self.shape("polygon", [tuple(p) for p in pts], fill, cls, inst)

    def rect(self, box, fill, cls=None, inst=0, radius: float = 0.0):
        x0, y0, x1, y1 = box
        if x1 - x0 < 0.5 or y1 - y0 < 0.5:
            return
        if radius >= 1.0:
            radius = min(radius, (x1 - x0) / 2, (y1 - y0) / 2)
            self.shape("rounded_rectangle", (x0, y0, x1, y1), fill, cls, inst, radius=int(radius))
        else:
            self.shape("rectangle", (x0, y0, x1, y1), fill, cls, inst)

    def ellipse(self, box, fill, cls=None, inst=0):
        x0, y0, x1, y1 = box
        if x1 - x0 < 0.5 or y1 - y0 < 0.5:
            return
        self.shape("ellipse", (x0, y0, x1, y1), fill, cls, inst)

    def line(self, pts, fill, width: float, cls=None, inst=0):
        self.shape("line", [tuple(p) for p in pts], fill, cls, inst, width=max(1, int(round(width))))


def _ground_quad(cam: Camera, u0: float, u1: float, z0: float, z1: float) -> list[tuple[float, float]]:
    return [(cam.x(u0, z0), cam.y(z0)), (cam.x(u1, z0), cam.y(z0)), (cam.x(u1, z1), cam.y(z1)),
            (cam.x(u0, z1), cam.y(z1))]


# ---------------------------------------------------------------- background: sky, skyline, facades, street
def _base(spec: SceneSpec, look: _Look, px: int) -> tuple[Image.Image, Image.Image]:
    hy = int(round(spec.horizon * px))
    rows = np.arange(px, dtype=float)[:, None]
    t = np.clip(rows / max(hy, 1), 0, 1) ** 1.3
    sky = np.array(spec.sky_top, float) * (1 - t) + np.array(spec.sky_bottom, float) * t
    sky = sky * (1 - spec.fog_density) + look.fog_rgb * spec.fog_density
    img = np.empty((px, px, 3), np.uint8)
    img[:hy] = np.clip(sky[:hy], 0, 255).astype(np.uint8)[:, None, :]
    img[hy:] = look(spec.sidewalk_rgb, 3.0)
    sem = np.full((px, px), _C["sidewalk"], np.uint8)
    sem[:hy] = _C["sky"]
    return Image.fromarray(img, "RGB"), Image.fromarray(sem, "L")


def _draw_sky_details(p: _Painter, spec: SceneSpec, look: _Look) -> None:
    px = p.px
    for x, y, rx, ry in spec.clouds:
        if spec.time == "night" and spec.weather == "clear":  # stars instead of clouds
            r = max(0.8, rx * px * 0.04)
            p.ellipse((x * px - r, y * px - r, x * px + r, y * px + r), (230, 230, 210, 200))
            continue
        c = (238, 238, 242) if spec.weather == "clear" else (120, 122, 130)
        p.ellipse(((x - rx) * px, (y - ry) * px, (x + rx) * px, (y + ry) * px), look(c, 30.0, floor=0.6, alpha=170))
    for x0, w, hgt, grey in spec.skyline:
        c = look((grey, grey, grey + 8), 14.0)
        p.rect((x0 * px, (spec.horizon - hgt) * px, (x0 + w) * px, spec.horizon * px + 1), c, _C["building"])


def _draw_building(p: _Painter, cam: Camera, spec: SceneSpec, b: BuildingSpec, look: _Look) -> None:
    u = b.side * (spec.road_half + spec.sidewalk_w)
    zm = (b.z0 + b.z1) / 2
    face = [(cam.x(u, b.z0), cam.y(b.z0)), (cam.x(u, b.z1), cam.y(b.z1)),
            (cam.x(u, b.z1), cam.y(b.z1, b.height)), (cam.x(u, b.z0), cam.y(b.z0, b.height))]
    p.poly(face, look(b.rgb, zm), _C["building"])
    if abs(face[0][0] - face[1][0]) < 3:  # too far away for windows
        return
    if max(q[0] for q in face) < 0 or min(q[0] for q in face) > p.px:
        return
    rnd = np.random.default_rng(b.window_seed)
    lit_p = {"day": 0.0, "dusk": 0.25, "night": 0.45}[spec.time]
    lit = rnd.random((b.floors, b.cols)) < lit_p
    fh = b.height / (b.floors + 0.4)
    dz = (b.z1 - b.z0) / b.cols
    wall, glass = look(b.rgb, zm), look((92, 110, 130), zm)
    warm = look.emissive((255, 214, 120), zm)

    def quad(za: float, zb: float, h0: float, h1: float) -> list[tuple[float, float]]:
        return [(cam.x(u, za), cam.y(za, h0)), (cam.x(u, zb), cam.y(zb, h0)), (cam.x(u, zb), cam.y(zb, h1)),
                (cam.x(u, za), cam.y(za, h1))]

    # one glass band per floor, cut into windows by wall-coloured mullions, then the lit windows on top
    za, zb = b.z0 + 0.25 * dz, b.z1 - 0.25 * dz
    bottom, top = 0.35 * fh, 0.35 * fh + (b.floors - 1) * fh + 0.55 * fh
    for f in range(b.floors):
        p.poly(quad(za, zb, 0.35 * fh + f * fh, 0.9 * fh + f * fh), glass)
    for c in range(b.cols - 1):
        p.poly(quad(b.z0 + (c + 0.75) * dz, b.z0 + (c + 1.25) * dz, bottom, top), wall)
    for f, c in zip(*np.nonzero(lit)):
        p.poly(quad(b.z0 + (c + 0.25) * dz, b.z0 + (c + 0.75) * dz, 0.35 * fh + f * fh, 0.9 * fh + f * fh), warm)


def _draw_street(p: _Painter, cam: Camera, spec: SceneSpec, look: _Look) -> None:
    R, zn, zf = spec.road_half, 0.55, 80.0
    road = look(spec.road_rgb, 3.0)
    p.poly(_ground_quad(cam, -R, R, zn, zf), road, _C["road"])
    curb = look(tuple(min(255, c + 30) for c in spec.sidewalk_rgb), 3.0)
    for s in (-1, 1):
        p.poly(_ground_quad(cam, s * R, s * (R + 0.025), zn, zf), curb, _C["sidewalk"])
    for u0, u1, z0, z1 in spec.patches:
        p.poly(_ground_quad(cam, u0, u1, z0, z1), look(tuple(c - 14 for c in spec.road_rgb), z0), _C["road"])
    white = look((228, 228, 224), 3.0, floor=0.5)
    yellow = look((232, 190, 40), 3.0, floor=0.5)
    mw = 0.022  # marking width
    cw0, cw1 = spec.crosswalk_z - spec.crosswalk_dz, spec.crosswalk_z + spec.crosswalk_dz
    for s in (-1, 1):  # solid edge lines
        p.poly(_ground_quad(cam, s * (R - 0.04) - mw / 2, s * (R - 0.04) + mw / 2, zn, zf), white, _C["lane_marking"])
    for k in range(1, spec.n_lanes):
        ub = -R + k * spec.lane_w
        if k == 1 and spec.two_way:
            for off in (-0.018, 0.018):
                p.poly(_ground_quad(cam, ub + off - mw / 2.5, ub + off + mw / 2.5, zn, zf), yellow, _C["lane_marking"])
            continue
        za = zn + spec.dash_phase
        while za < 30.0:
            zb = za + spec.dash_len
            if not (spec.crosswalk and zb > cw0 - 0.15 and za < cw1 + 0.05):
                if cam.y(za) - cam.y(zb) >= 0.5:
                    p.poly(_ground_quad(cam, ub - mw / 2, ub + mw / 2, za, zb), white, _C["lane_marking"])
            za += spec.dash_period
    if spec.crosswalk:
        stripe = look((236, 236, 230), spec.crosswalk_z, floor=0.5)
        u = -R + 0.06
        while u + spec.stripe_w <= R - 0.06 + 1e-9:
            p.poly(_ground_quad(cam, u, u + spec.stripe_w, cw0, cw1), stripe, _C["crosswalk"])
            u += 2 * spec.stripe_w
        zs = cw0 - 0.14
        u_stop = -R + spec.lane_w if spec.two_way else -R
        p.poly(_ground_quad(cam, u_stop + 0.02, R - 0.02, zs, zs + 0.04), white, _C["lane_marking"])


# ---------------------------------------------------------------- objects
def _draw_tree(p: _Painter, cam: Camera, t: TreeSpec, look: _Look) -> None:
    tw = 0.028
    p.rect((cam.x(t.u - tw / 2, t.z), cam.y(t.z, t.trunk_h + 0.5 * t.canopy_r), cam.x(t.u + tw / 2, t.z),
            cam.y(t.z)), look((88, 64, 44), t.z), _C["vegetation"])
    cy = t.trunk_h + t.canopy_r
    dark = look(tuple(int(c * 0.72) for c in t.canopy_rgb), t.z)
    base = look(t.canopy_rgb, t.z)
    for i, (dx, dy, r) in enumerate(t.blobs):
        rr = r * t.canopy_r
        ux, hy = t.u + dx * t.canopy_r, cy + dy * t.canopy_r
        box = (cam.x(ux - rr, t.z), cam.y(t.z, hy + rr), cam.x(ux + rr, t.z), cam.y(t.z, hy - rr))
        p.ellipse(box, dark if i == 0 else base, _C["vegetation"])


def _glow(p: _Painter, cx: float, cy: float, r: float, rgb, look: _Look, z: float) -> None:
    for k, a in ((2.6, 40), (1.7, 70)):
        p.ellipse((cx - k * r, cy - k * r, cx + k * r, cy + k * r), look.emissive(rgb, z, alpha=a))


def _draw_vehicle(p: _Painter, cam: Camera, v: VehicleSpec, inst: int, look: _Look, night: bool) -> None:
    x0, y0, x1, y1 = vehicle_rect(cam, v)
    W, H = x1 - x0, y1 - y0

    def box(fx0, fy0, fx1, fy1):
        return (x0 + fx0 * W, y0 + fy0 * H, x0 + fx1 * W, y0 + fy1 * H)

    cls, z = _C["vehicle"], v.z
    body = look(v.rgb, z)
    shade = look(tuple(int(c * 0.78) for c in v.rgb), z)
    tyre = look((22, 22, 24), z)
    glass = look((40, 52, 66) if v.facing == "rear" else (58, 72, 88), z)
    dark = look((34, 34, 36), z)
    plate = look((226, 226, 214), z, floor=0.45)
    rad = v.corner * W
    wh = v.wheel
    front = v.facing == "front"
    lamp_rgb = (255, 246, 214) if front else (236, 30, 28)
    lamp_off = look((238, 236, 220), z) if front else look((176, 24, 26), z)
    lamps = []
    if v.type == "car":
        p.rect(box(0.04, 0.74, 0.04 + wh, 1.0), tyre, cls, inst)
        p.rect(box(0.96 - wh, 0.74, 0.96, 1.0), tyre, cls, inst)
        c = v.cabin
        p.poly([box(c, 0.02, 0, 0)[:2], box(1 - c, 0.02, 0, 0)[:2], box(0.95, 0.44, 0, 0)[:2],
                box(0.05, 0.44, 0, 0)[:2]], shade, cls, inst)
        ci = c + 0.06
        p.poly([box(ci, 0.08, 0, 0)[:2], box(1 - ci, 0.08, 0, 0)[:2], box(0.9, 0.4, 0, 0)[:2],
                box(0.1, 0.4, 0, 0)[:2]], glass)
        p.rect(box(0.0, 0.38, 1.0, 0.88), body, cls, inst, radius=rad)
        p.rect(box(0.02, 0.8, 0.98, 0.9), dark, cls, inst)
        p.rect(box(0.4, 0.62, 0.6, 0.74), plate)
        if front:
            p.rect(box(0.3, 0.5, 0.7, 0.6), dark)
        lamps = [box(0.04, 0.48, 0.04 + v.lamp, 0.6), box(0.96 - v.lamp, 0.48, 0.96, 0.6)]
    elif v.type == "truck":
        p.rect(box(0.05, 0.86, 0.05 + wh * 1.3, 1.0), tyre, cls, inst)
        p.rect(box(0.95 - wh * 1.3, 0.86, 0.95, 1.0), tyre, cls, inst)
        if front:  # cab in front of the cargo box
            p.rect(box(0.02, 0.0, 0.98, 0.42), shade, cls, inst)
            p.rect(box(0.0, 0.36, 1.0, 0.9), body, cls, inst, radius=rad)
            p.rect(box(v.cabin * 0.5 + 0.06, 0.42, 0.94 - v.cabin * 0.5, 0.64), glass)
            p.rect(box(0.3, 0.7, 0.7, 0.84), dark)
            lamps = [box(0.05, 0.72, 0.05 + v.lamp, 0.8), box(0.95 - v.lamp, 0.72, 0.95, 0.8)]
        else:  # cargo box with a door seam and hinges
            p.rect(box(0.0, 0.0, 1.0, 0.88), body, cls, inst, radius=rad * 0.4)
            p.line([box(0.5, 0.04, 0, 0)[:2], box(0.5, 0.82, 0, 0)[:2]], shade, max(1.0, 0.02 * W))
            for fy in (0.2, 0.65):
                p.rect(box(0.08, fy, 0.14, fy + 0.05), shade)
                p.rect(box(0.86, fy, 0.92, fy + 0.05), shade)
            p.rect(box(0.0, 0.86, 1.0, 0.92), dark, cls, inst)
            lamps = [box(0.03, 0.76, 0.03 + v.lamp, 0.84), box(0.97 - v.lamp, 0.76, 0.97, 0.84)]
    else:  # bus
        p.rect(box(0.08, 0.88, 0.08 + wh, 1.0), tyre, cls, inst)
        p.rect(box(0.92 - wh, 0.88, 0.92, 1.0), tyre, cls, inst)
        p.rect(box(0.0, 0.0, 1.0, 0.93), body, cls, inst, radius=rad)
        if front:
            p.rect(box(0.06, 0.14, 0.94, 0.58), glass)
            p.rect(box(0.16, 0.03, 0.84, 0.11), look.emissive((255, 150, 40), z) if night else dark)
        else:
            p.rect(box(0.1, 0.08, 0.9, 0.36 + v.cabin * 0.3), glass)
            p.rect(box(0.1, 0.46, 0.9, 0.5), shade)
        p.rect(box(0.36, 0.72, 0.64, 0.82), plate)
        lamps = [box(0.04, 0.68, 0.04 + v.lamp, 0.84), box(0.96 - v.lamp, 0.68, 0.96, 0.84)]
    for lb in lamps:
        if night:
            p.rect(lb, look.emissive(lamp_rgb, z))
            cx, cy = (lb[0] + lb[2]) / 2, (lb[1] + lb[3]) / 2
            _glow(p, cx, cy, max(1.0, (lb[2] - lb[0]) * 0.6), lamp_rgb, look, z)
        else:
            p.rect(lb, lamp_off)


def _draw_pedestrian(p: _Painter, cam: Camera, ped: PedestrianSpec, inst: int, look: _Look) -> None:
    H, u, z, cls = ped.height, ped.u, ped.z, _C["person"]

    def pt(du: float, h: float) -> tuple[float, float]:
        return cam.x(u + du * H, z), cam.y(z, h * H)

    sc = H / z * p.px  # pixels per unit of height
    leg_w, st = 0.085, ped.stride / 2
    pants, shirt, skin = look(ped.pants, z), look(ped.shirt, z), look(ped.skin, z)
    for sgn in (-1, 1):  # legs from the hip to the feet
        p.poly([pt(sgn * 0.02 - leg_w / 2, 0.5), pt(sgn * 0.02 + leg_w / 2, 0.5), pt(sgn * st + leg_w / 2, 0.0),
                pt(sgn * st - leg_w / 2, 0.0)], pants, cls, inst)
    b = ped.build / 2
    for sgn in (-1, 1):  # arms, swinging opposite to the legs
        p.line([pt(sgn * (b - 0.02), 0.78), pt(sgn * (b + 0.02 + ped.arm / 2), 0.5)], shirt,
               max(1.0, 0.06 * sc), cls, inst)
    p.rect((*pt(-b, 0.82), *pt(b, 0.47)), shirt, cls, inst, radius=0.04 * sc)
    r = 0.075
    p.ellipse((*pt(-r, 0.84 + 2 * r), *pt(r, 0.84)), skin, cls, inst)


def _draw_light(p: _Painter, cam: Camera, t: TrafficLightSpec, look: _Look, night: bool) -> None:
    pw = 0.016
    p.rect((cam.x(t.u - pw / 2, t.z), cam.y(t.z, t.pole_height), cam.x(t.u + pw / 2, t.z), cam.y(t.z)),
           look((70, 72, 76), t.z), _C["other"])
    x0, y0, x1, y1 = light_head_rect(cam, t)
    W, H = x1 - x0, y1 - y0
    p.rect((x0, y0, x1, y1), look(t.housing_rgb, t.z, floor=0.5), _C["traffic_light"], _LIGHT_ID, radius=0.2 * W)
    on = {"red": (255, 36, 28), "yellow": (255, 196, 16), "green": (40, 255, 110)}
    off = {"red": (70, 22, 20), "yellow": (70, 58, 14), "green": (16, 60, 30)}
    r = min(W * 0.34, H * 0.13)
    for k, name in enumerate(("red", "yellow", "green")):
        cx, cy = (x0 + x1) / 2, y0 + H * (0.19 + 0.31 * k)
        lit = name == t.state
        col = look.emissive(on[name], t.z) if lit else look(off[name], t.z)
        p.ellipse((cx - r, cy - r, cx + r, cy + r), col)
        if lit and night:
            _glow(p, cx, cy, r, on[name], look, t.z)


# 7-segment digits for speed limits: segments a b c d e f g
_SEGMENTS = {"0": "abcdef", "3": "abcdg", "5": "acdfg", "8": "abcdefg"}
_SEG_LINES = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 0.5)), "c": ((1, 0.5), (1, 1)), "d": ((0, 1), (1, 1)),
              "e": ((0, 0.5), (0, 1)), "f": ((0, 0), (0, 0.5)), "g": ((0, 0.5), (1, 0.5))}


def _draw_sign(p: _Painter, cam: Camera, s: SignSpec, look: _Look) -> None:
    pw = 0.014
    p.rect((cam.x(s.u - pw / 2, s.z), cam.y(s.z, s.pole_height + s.diameter / 2), cam.x(s.u + pw / 2, s.z),
            cam.y(s.z)), look((120, 122, 128), s.z), _C["other"])
    x0, y0, x1, y1 = sign_head_rect(cam, s)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    red, white, black = look((206, 22, 28), s.z, 0.6), look((240, 240, 236), s.z, 0.6), look((20, 20, 20), s.z)
    cls, inst = _C["sign"], _SIGN_ID

    def ngon(n: int, rad: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + rad * math.cos(phase + 2 * math.pi * k / n), cy + rad * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if s.kind == "stop":
        p.poly(ngon(8, r, math.pi / 8), white, cls, inst)
        p.poly(ngon(8, r * 0.86, math.pi / 8), red)
        p.rect((cx - r * 0.6, cy - r * 0.14, cx + r * 0.6, cy + r * 0.14), white)
    elif s.kind == "yield":
        tri = [(cx - r, cy - r * 0.8), (cx + r, cy - r * 0.8), (cx, cy + r * 0.95)]
        p.poly(tri, red, cls, inst)
        ri = 0.55
        p.poly([(cx - r * ri, cy - r * 0.8 * ri + r * 0.12), (cx + r * ri, cy - r * 0.8 * ri + r * 0.12),
                (cx, cy + r * 0.95 * ri - r * 0.02)], white)
    else:
        p.ellipse((cx - r, cy - r, cx + r, cy + r), red, cls, inst)
        p.ellipse((cx - r * 0.78, cy - r * 0.78, cx + r * 0.78, cy + r * 0.78), white)
        digits = s.kind.split("_")[1]
        dw, dh, gap = r * 0.42, r * 0.9, r * 0.16
        lw = max(1.0, r * 0.13)
        left = cx - dw - gap / 2
        for i, d in enumerate(digits):
            ox = left + i * (dw + gap)
            for seg in _SEGMENTS[d]:
                (a0, b0), (a1, b1) = _SEG_LINES[seg]
                p.line([(ox + a0 * dw, cy - dh / 2 + b0 * dh), (ox + a1 * dw, cy - dh / 2 + b1 * dh)], black, lw)


# ---------------------------------------------------------------- rasterise
@dataclass
class Raster:
    """Output of :func:`rasterise` at the requested size.

    Attributes:
        image: the RGB picture.
        semantic: ``(H, W)`` uint8 class ids (see ``CLASSES``).
        instance: ``(H, W)`` uint8 instance ids (vehicles ``1 + i``, pedestrians ``20 + j``, light 40, sign 41).
        visible: instance id -> visible pixel count in ``instance``.
        amodal_fraction: instance id -> visible / full silhouette pixels (measured at the supersampled size).
    """

    image: Image.Image
    semantic: np.ndarray
    instance: np.ndarray
    visible: dict[int, int]
    amodal_fraction: dict[int, float]


def vehicle_id(i: int) -> int:
    return 1 + i


def pedestrian_id(j: int) -> int:
    return _PED_BASE + j


LIGHT_ID, SIGN_ID = _LIGHT_ID, _SIGN_ID


def rasterise(spec: SceneSpec, size: int) -> Raster:
    """Draws ``spec`` at ``size`` x ``size`` pixels with its semantic and instance maps (pure function)."""
    px = size * SUPERSAMPLE
    cam, look = Camera.of(spec, px), _Look(spec)
    night = spec.time == "night"
    rgb, sem = _base(spec, look, px)
    p = _Painter(rgb, sem)
    _draw_sky_details(p, spec, look)
    for b in sorted(spec.buildings, key=lambda b: -b.z1):
        _draw_building(p, cam, spec, b, look)
    _draw_street(p, cam, spec, look)
    # objects far to near (painter's algorithm gives the occlusion)
    items: list[tuple[float, int, object]] = [(t.z, 0, t) for t in spec.trees]
    items += [(v.z, 1, (i, v)) for i, v in enumerate(spec.vehicles)]
    items += [(q.z, 2, (j, q)) for j, q in enumerate(spec.pedestrians)]
    if spec.light is not None:
        items.append((spec.light.z, 3, spec.light))
    if spec.sign is not None:
        items.append((spec.sign.z, 4, spec.sign))
    for _, kind, obj in sorted(items, key=lambda it: (-it[0], it[1])):
        if kind == 0:
            _draw_tree(p, cam, obj, look)
        elif kind == 1:
            _draw_vehicle(p, cam, obj[1], vehicle_id(obj[0]), look, night)
        elif kind == 2:
            _draw_pedestrian(p, cam, obj[1], pedestrian_id(obj[0]), look)
        elif kind == 3:
            _draw_light(p, cam, obj, look, night)
        else:
            _draw_sign(p, cam, obj, look)
    if spec.weather == "rain":
        rnd = np.random.default_rng(spec.rain_seed)
        n = int(rnd.integers(140, 260) * (px / 256) ** 2)
        xs, ys = rnd.random(n) * px, rnd.random(n) * px
        lens = rnd.uniform(0.025, 0.05, n) * px
        slant = rnd.uniform(-0.25, 0.1)
        alphas = rnd.integers(50, 110, n)
        for x, y, ln, a in zip(xs, ys, lens, alphas):
            p.d_rgb.line([(x, y), (x + slant * ln, y + ln)], fill=(205, 208, 218, int(a)), width=1)

    inst_ss = np.asarray(p.inst)
    amodal = {}
    for iid, im in p.amodal.items():
        full = int(np.count_nonzero(np.asarray(im)))
        amodal[iid] = float(np.count_nonzero(inst_ss == iid)) / full if full else 0.0
    image = p.rgb.reduce(SUPERSAMPLE)
    semantic = np.ascontiguousarray(np.asarray(p.sem)[::SUPERSAMPLE, ::SUPERSAMPLE])
    instance = np.ascontiguousarray(inst_ss[::SUPERSAMPLE, ::SUPERSAMPLE])
    ids, counts = np.unique(instance, return_counts=True)
    visible = {int(i): int(c) for i, c in zip(ids, counts) if i}
    image = _finish(image, semantic, spec, look)
    return Raster(image, semantic, instance, visible, amodal)


_GROUND = np.zeros(256, np.float32)  # lookup: 1 for ground classes, whose fog depends on the row
_GROUND[[_C["road"], _C["lane_marking"], _C["crosswalk"], _C["sidewalk"]]] = 1.0


def _finish(image: Image.Image, semantic: np.ndarray, spec: SceneSpec, look: _Look) -> Image.Image:
    """Fog on the visible ground by distance of each row, then sensor noise."""
    size = image.size[0]
    arr = np.asarray(image, dtype=np.float32)
    if spec.fog_density > 0.005:
        cam = Camera.of(spec, size)
        f = look.fog(cam.z_of_row(np.arange(size, dtype=float) + 0.5))  # (H,)
        f = np.where(np.isfinite(f), f, spec.fog_density).astype(np.float32)[:, None] * _GROUND[semantic]  # (H, W)
        arr += (look.fog_rgb.astype(np.float32) - arr) * f[..., None]
    noise = np.random.default_rng(spec.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    arr += noise * np.float32(spec.noise_sigma) + np.float32(0.5)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")
