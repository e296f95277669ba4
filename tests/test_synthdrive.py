"""SynthDrive: determinism, split disjointness, boxes vs masks, QA and captions vs attributes, COCO, DataLoader."""

from __future__ import annotations

import functools
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shusheng.data import synthdrive as sd
from shusheng.data.synthdrive_render import CLASSES, COLORS, LIGHTS, SIGNS, TIMES, VEHICLE_TYPES, WEATHERS
from shusheng.data.synthdrive_text import QA_TYPES, question_pool_size

N_CHECK = 48  # rendered samples checked in detail (about half a second)


@functools.cache
def _samples(seed: int = 11, n: int = N_CHECK, size: int = 128):
    return [sd.sample(seed, i, size) for i in range(n)]


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- determinism and splits
def test_same_seed_same_bytes():
    a_img, a_ann = sd.sample(5, 3, 96)
    b_img, b_ann = sd.sample(5, 3, 96)
    assert _png_bytes(a_img) == _png_bytes(b_img)
    assert json.dumps(a_ann.record("x", 3)) == json.dumps(b_ann.record("x", 3))
    assert np.array_equal(a_ann.semantic, b_ann.semantic)
    c_img, _ = sd.sample(5, 4, 96)
    assert _png_bytes(a_img) != _png_bytes(c_img)


def test_generate_identical_bytes_whatever_the_workers(tmp_path):
    sd.generate(tmp_path / "a", 6, seed=9, size=64, workers=1, progress=False)
    sd.generate(tmp_path / "b", 6, seed=9, size=64, workers=2, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 6 * 2 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    lines = (tmp_path / "a" / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rec = json.loads(lines[2])
    assert {"file", "attributes", "captions", "qa"} <= set(rec)
    assert (tmp_path / "a" / rec["file"]).exists() and (tmp_path / "a" / rec["mask"]).exists()


def test_splits_are_disjoint_and_the_test_set_is_fixed():
    seeds = {name: {sd.image_seed(s, i) for i in (0, 1, 2, 10**6, sd.MAX_INDEX - 1)} for name, (s, _) in sd.SPLITS.items()}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) and not (seeds["val"] & seeds["test"])
    # the integer seeds of different splits live in disjoint ranges [s * 2**32, (s + 1) * 2**32)
    assert len({s for s, _ in sd.SPLITS.values()}) == len(sd.SPLITS)
    with pytest.raises(ValueError):
        sd.image_seed(0, sd.MAX_INDEX)
    with pytest.raises(ValueError):
        sd.image_seed(-1, 0)
    specs = {name: sd.sample_spec(sd.image_rng(s, 0)) for name, (s, _) in sd.SPLITS.items()}
    assert len({repr(s) for s in specs.values()}) == 3
    test = sd.synthdrive_split("test")
    assert len(test) == sd.TEST_SIZE == 1000 and test.size == sd.TEST_IMAGE_SIZE == 128
    assert test.split_seed == sd.TEST_SEED
    with pytest.raises(ValueError):
        sd.synthdrive_split("test", n=sd.TEST_SIZE + 1)
    with pytest.raises(ValueError):
        sd.synthdrive_split("test", size=64)
    with pytest.raises(ValueError):
        sd.SynthDrive("nope")
    docs = Path(__file__).resolve().parents[1] / "docs" / "synthdrive.md"
    text = docs.read_text()
    assert str(sd.TEST_SEED) in text and str(sd.TEST_SIZE) in text.replace(",", "")


def test_test_set_fingerprint_is_stable():
    """The first fixed test image must not change silently: bundled-model metrics depend on it."""
    _, ann = sd.sample(sd.TEST_SEED, 0, sd.TEST_IMAGE_SIZE)
    again = sd.SynthDrive("test", n=1)[0]
    assert again["attributes"] == ann.attributes and again["captions"] == ann.captions


# ---------------------------------------------------------------- content
def test_attribute_schema_and_vocabulary():
    for img, ann in _samples():
        a = ann.attributes
        assert img.size == (128, 128) and img.mode == "RGB"
        assert list(a) == ["time", "weather", "light", "sign", "crosswalk", "vehicles", "pedestrians"]
        assert a["time"] in TIMES and a["weather"] in WEATHERS and a["light"] in LIGHTS and a["sign"] in SIGNS
        assert isinstance(a["crosswalk"], bool)
        assert 0 <= len(a["vehicles"]) <= 5 and 0 <= len(a["pedestrians"]) <= 3
        for v in a["vehicles"]:
            assert set(v) == {"type", "color", "lane", "box"}
            assert v["type"] in VEHICLE_TYPES and v["color"] in COLORS and v["lane"] in ("left", "middle", "right")
        for p in a["pedestrians"]:
            assert set(p) == {"box", "on_crosswalk"}
            assert not p["on_crosswalk"] or a["crosswalk"]
        assert len(ann.captions) >= 3 and len(set(ann.captions)) == len(ann.captions)
        assert {q["type"] for q in ann.qa} == set(QA_TYPES)


def test_content_coverage():
    specs = [sd.sample_spec(sd.image_rng(3, i)) for i in range(300)]
    assert {s.time for s in specs} == set(TIMES) and {s.weather for s in specs} == set(WEATHERS)
    assert {s.light.state if s.light else "none" for s in specs} == set(LIGHTS)
    assert {s.sign.kind if s.sign else "none" for s in specs} == set(SIGNS)
    vehicles = [v for s in specs for v in s.vehicles]
    assert {v.type for v in vehicles} == set(VEHICLE_TYPES)
    assert len({v.color for v in vehicles}) >= 6
    assert {len(s.vehicles) for s in specs} == set(range(6))
    assert {len(s.pedestrians) for s in specs} == set(range(4))
    assert {p.on_crosswalk for s in specs for p in s.pedestrians} == {True, False}
    assert {s.crosswalk for s in specs} == {True, False}
    assert all(s.buildings for s in specs) and sum(len(s.trees) for s in specs) > 100
    depths = [v.z for v in vehicles]
    assert min(depths) < 1.6 and max(depths) > 4.5  # several depths, hence perspective scaling
    # whole-picture effects: night is darker than day, fog is lower-contrast than clear
    imgs = {}
    for img, ann in _samples():
        imgs.setdefault((ann.attributes["time"], ann.attributes["weather"]), []).append(np.asarray(img, float))
    day = [x.mean() for (t, _), xs in imgs.items() if t == "day" for x in xs]
    night = [x.mean() for (t, _), xs in imgs.items() if t == "night" for x in xs]
    assert np.mean(night) < 0.6 * np.mean(day)


def test_perspective_scaling():
    """Nearer vehicles (larger z^-1) are drawn larger."""
    pairs = []
    for _, ann in _samples():
        for v in ann.attributes["vehicles"]:
            x, y, w, h = v["box"]
            pairs.append((y + h, w))
    bottoms, widths = np.array(pairs).T
    assert np.corrcoef(bottoms, widths)[0, 1] > 0.5


# ---------------------------------------------------------------- boxes and masks
_CLASS_OF = {1: "vehicle", 2: "vehicle", 3: "vehicle", 4: "person", 5: "traffic_light", 6: "sign"}


def test_boxes_inside_image_and_cover_their_mask_pixels():
    for _, ann in _samples():
        H, W = ann.semantic.shape
        assert ann.semantic.max() < len(CLASSES)
        covered = {name: np.zeros((H, W), bool) for name in set(_CLASS_OF.values())}
        for o in ann.objects:
            x, y, w, h = o["bbox"]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= W and y + h <= H
            m = ann.instance == o["instance_id"]
            ys, xs = np.nonzero(m)
            # tight: the box is exactly the extent of the object's visible pixels
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert o["area"] == int(m.sum()) >= 4
            cls = CLASSES.index(_CLASS_OF[o["category_id"]])
            assert (ann.semantic[m] == cls).all()
            covered[_CLASS_OF[o["category_id"]]][y:y + h, x:x + w] = True
        for name, cov in covered.items():
            pixels = ann.semantic == CLASSES.index(name)
            assert not (pixels & ~cov).any(), f"{name} pixels outside every {name} box"
        boxes = [o["bbox"] for o in ann.objects if o["category_id"] in (1, 2, 3)]
        assert boxes == [v["box"] for v in ann.attributes["vehicles"]]
        assert [o["bbox"] for o in ann.objects if o["category_id"] == 4] == [p["box"] for p in ann.attributes["pedestrians"]]
        assert any(o["category_id"] == 5 for o in ann.objects) == (ann.attributes["light"] != "none")
        assert any(o["category_id"] == 6 for o in ann.objects) == (ann.attributes["sign"] != "none")
        # every class that should be there is there
        present = set(np.unique(ann.semantic))
        for name in ("road", "sidewalk", "sky", "building", "lane_marking"):
            assert CLASSES.index(name) in present
        assert (CLASSES.index("crosswalk") in present) == ann.attributes["crosswalk"]


def test_other_sizes_render_consistently():
    img, ann = sd.sample(4, 1, 64)
    assert img.size == (64, 64) and ann.semantic.shape == (64, 64)
    for o in ann.objects:
        x, y, w, h = o["bbox"]
        assert x + w <= 64 and y + h <= 64


# ---------------------------------------------------------------- QA and captions
def _expected(t: str, a: dict, params: dict) -> str:
    """Independent re-derivation of each answer from the attributes."""
    veh, peds = a["vehicles"], a["pedestrians"]
    if t == "light":
        return a["light"]
    if t == "sign":
        return a["sign"] if a["sign"] in ("stop", "yield", "none") else "speed limit " + a["sign"][-2:]
    if t == "vehicle_count":
        return str(len([v for v in veh if params.get("vehicle_type") in (None, v["type"])]))
    if t == "vehicle_colors":
        return ", ".join(sorted({v["color"] for v in veh})) or "none"
    if t == "has_color":
        return "yes" if params["color"] in [v["color"] for v in veh] else "no"
    if t == "pedestrians":
        return "yes" if len(peds) > 0 else "no"
    if t == "pedestrian_location":
        cw = sum(p["on_crosswalk"] for p in peds)
        sw = len(peds) - cw
        return "both" if cw and sw else "crosswalk" if cw else "sidewalk" if sw else "none"
    if t in ("weather", "time"):
        return a[t]
    if t == "stop":
        red, stop_sign = a["light"] == "red", a["sign"] == "stop"
        return "yes" if red or stop_sign or any(p["on_crosswalk"] for p in peds) else "no"
    raise AssertionError(t)


def test_every_answer_is_rederivable_from_attributes():
    seen = Counter()
    for _, ann in _samples():
        a = ann.attributes
        for q in ann.qa:
            assert q["answer"] == sd.answer(q["type"], a, **q["params"]) == _expected(q["type"], a, q["params"]), q
            assert q["question"].strip() and q["question"][0].isupper()
            seen[(q["type"], q["answer"])] += 1
    assert {ans for (t, ans) in seen if t == "stop"} == {"yes", "no"}
    with pytest.raises(ValueError):
        sd.answer("lane_count", _samples()[0][1].attributes)


def test_question_wordings_vary_and_the_pool_is_large():
    for t in QA_TYPES:
        assert question_pool_size(t) >= 200, t
    wordings = Counter(q["question"] for _, ann in _samples() for q in ann.qa if q["type"] == "stop")
    assert len(wordings) >= 0.8 * N_CHECK


_NUMBER = {"no": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_VEHICLE_NOUN = {"car": "car", "cars": "car", "truck": "truck", "trucks": "truck", "bus": "bus", "buses": "bus",
                 "vehicle": None, "vehicles": None}
_COLOR_RE = "|".join(COLORS)
_TIME_WORDS = {"day": {"day", "daytime", "daylight", "sunny"}, "dusk": {"dusk", "twilight", "sunset", "evening"},
               "night": {"night", "nighttime", "dark"}}
_WEATHER_WORDS = {"clear": {"clear", "dry", "sunny"}, "rain": {"rain", "rainy", "wet", "rain-soaked", "shower"},
                  "fog": {"fog", "foggy", "misty", "hazy", "mist"}}
_CW_LOC = r"on the crosswalk|on the zebra crossing|crossing the street|crossing the road"
_SW_LOC = r"on the sidewalk|on the pavement|walking on the sidewalk"


def _check_caption(c: str, a: dict) -> None:
    """Fails if the caption states anything that the attributes contradict."""
    text = c.lower()
    words = set(re.findall(r"[a-z][a-z-]*", text))
    for key, table in (("time", _TIME_WORDS), ("weather", _WEATHER_WORDS)):
        for value, vocab in table.items():
            if words & vocab:
                assert a[key] == value, (c, key, value)
    veh = a["vehicles"]
    # counted vehicle groups: "two red cars", "a bus", "no vehicles", "three vehicles"
    vehicle_re = rf"\b(no|a|an|one|two|three|four|five)\s+(?:({_COLOR_RE})\s+)?(cars?|trucks?|bus(?:es)?|vehicles?)\b"
    used_colors = set()
    for m in re.finditer(vehicle_re, text):
        n, color, noun = _NUMBER[m.group(1)], m.group(2), _VEHICLE_NOUN[m.group(3)]
        want = sum(1 for v in veh if (noun is None or v["type"] == noun) and (color is None or v["color"] == color))
        assert n == want, (c, m.group(0), want)
        if color:
            used_colors.add((m.start(2), color))
    if "no traffic" in text:
        assert not veh
    # colour words not attached to a vehicle can only describe the traffic light
    for m in re.finditer(rf"\b({_COLOR_RE}|amber)\b", text):
        if (m.start(), m.group(1)) in used_colors:
            continue
        state = "yellow" if m.group(1) == "amber" else m.group(1)
        assert a["light"] == state, (c, m.group(0))
    if re.search(r"traffic light|traffic signal|stoplight", text):
        assert a["light"] != "none", c
    # signs
    if "stop sign" in text:
        assert a["sign"] == "stop", c
    if "yield sign" in text or "give-way sign" in text:
        assert a["sign"] == "yield", c
    for digits in re.findall(r"\d+", text):
        assert a["sign"] == f"speed_{digits}", c
    if re.search(r"\bsign\b", text):
        assert a["sign"] != "none", c
    # crosswalk
    if re.search(r"crosswalk|zebra crossing", text):
        assert a["crosswalk"], c
    # pedestrians: "two people on the sidewalk", "a pedestrian crossing the road", "no pedestrians"
    peds = a["pedestrians"]
    ped_re = rf"\b(no|a|an|one|two|three)\s+(pedestrians?|persons?|people)\b(\s+(?:{_CW_LOC}|{_SW_LOC}))?"
    for m in re.finditer(ped_re, text):
        n, loc = _NUMBER[m.group(1)], (m.group(3) or "").strip()
        if re.fullmatch(_CW_LOC, loc):
            want = sum(p["on_crosswalk"] for p in peds)
        elif re.fullmatch(_SW_LOC, loc):
            want = sum(not p["on_crosswalk"] for p in peds)
        else:
            want = len(peds)
        assert n == want, (c, m.group(0), want)


def test_every_caption_is_consistent_with_attributes():
    for _, ann in _samples():
        for c in ann.captions:
            _check_caption(c, ann.attributes)
    # the first caption mentions everything present
    for _, ann in _samples():
        a, first = ann.attributes, ann.captions[0].lower()
        for v in a["vehicles"]:
            assert v["color"] in first and (v["type"] in first or {"bus": "buses"}.get(v["type"], "") in first)
        if a["sign"] != "none":
            assert "sign" in first


def test_caption_checker_catches_lies():
    a = {"time": "night", "weather": "rain", "light": "green", "sign": "speed_50", "crosswalk": False,
         "vehicles": [{"type": "car", "color": "red", "lane": "left", "box": [0, 0, 1, 1]}],
         "pedestrians": [{"box": [0, 0, 1, 1], "on_crosswalk": False}]}
    _check_caption("A rainy street at night with a red car, a green traffic light and a speed limit 50 sign; "
                   "one person on the sidewalk.", a)
    for lie in ("A sunny street with a red car.", "A rainy street at night with two red cars.",
                "A rainy street at night with a blue car.", "A red traffic light at night.",
                "A speed limit 30 sign in the rain.", "Two pedestrians at night.",
                "A pedestrian on the crosswalk at night.", "A stop sign at night.", "A crosswalk at night."):
        with pytest.raises(AssertionError):
            _check_caption(lie, a)


# ---------------------------------------------------------------- COCO and DataLoader
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2 copy keyword
def test_coco_file_loads_with_pycocotools(tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    mask_api = pytest.importorskip("pycocotools.mask")
    sd.generate(tmp_path, 5, seed=21, size=96, workers=1, progress=False)
    coco = coco_mod.COCO(str(tmp_path / "coco.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5, 6]
    assert sorted(coco.getImgIds()) == list(range(5))
    records = [json.loads(line) for line in (tmp_path / "annotations.jsonl").read_text().splitlines()]
    for rec in records:
        _, ann = sd.sample(21, rec["image_id"], 96)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec["image_id"]))
        assert [x["bbox"] for x in anns] == [o["bbox"] for o in ann.objects]
        for x, o in zip(anns, ann.objects):
            m = coco.annToMask(x).astype(bool)
            assert np.array_equal(m, ann.instance == o["instance_id"])
            assert x["segmentation"]["counts"] == mask_api.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
            assert x["area"] == m.sum() and x["iscrowd"] == 0
        mask_png = np.asarray(Image.open(tmp_path / rec["mask"]))
        assert np.array_equal(mask_png, ann.semantic)


def test_rle_encode_matches_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (32, 48), (1, 1)):
        for p in (0.0, 0.1, 0.5, 1.0):
            m = rng.random(shape) < p
            ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
            ours = sd.rle_encode(m)
            assert ours["counts"] == ref["counts"].decode() and ours["size"] == list(ref["size"])


def test_dataset_in_a_dataloader_with_workers():
    ds = sd.SynthDrive(17, n=6, size=64, return_mask=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=sd.collate)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[1]
    assert b["image"].shape == (3, 3, 64, 64) and b["image"].dtype == torch.uint8
    assert b["mask"].shape == (3, 64, 64) and b["mask"].dtype == torch.int64
    assert b["index"] == [3, 4, 5]
    direct = ds[4]
    assert torch.equal(b["image"][1], direct["image"]) and b["attributes"][1] == direct["attributes"]
    assert torch.equal(b["boxes"][1], direct["boxes"]) and direct["boxes"].shape[1] == 4
    assert len(direct["labels"]) == len(direct["boxes"])
    assert torch.equal(ds[-1]["image"], ds[5]["image"])
    with pytest.raises(IndexError):
        ds[6]
    with_tf = sd.SynthDrive("val", n=2, size=64, transform=lambda im: torch.tensor(im.size))
    assert with_tf[0]["image"].tolist() == [64, 64]


def test_cli_writes_dataset_and_preview(tmp_path):
    from shusheng.cli import main

    out, grid = tmp_path / "ds", tmp_path / "grid.png"
    assert main(["data", "synthdrive", "--out", str(out), "--n", "3", "--seed", "4", "--size", "64", "--quiet",
                 "--no-masks", "--preview", str(grid), "--preview-n", "2"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 3 and not (out / "masks").exists()
    assert (out / "coco.json").exists() and len((out / "annotations.jsonl").read_text().splitlines()) == 3
    with Image.open(grid) as g:
        assert g.size[0] > 2 * 64
    assert main(["data", "synthdrive", "--split", "test", "--n", "5000", "--out", str(tmp_path / "t")]) == 2
    assert main(["data", "synthdrive"]) == 2


def test_object_labels_agree_with_the_dense_label_map():
    """One label per described object, the same labels the dense map paints (crosswalk stripes aside)."""
    for i in range(6):
        _, ann = sd.sample(sd.VAL_SEED, i)
        labels = sd.object_labels(ann.attributes)
        a = ann.attributes
        assert len(labels) == len(a["vehicles"]) + len(a["pedestrians"]) + (a["light"] != "none") + (a["sign"] != "none")
        assert set(labels) <= set(sd.DENSE_LABELS) - {"crosswalk"}
        painted = {sd.DENSE_LABELS[k - 1] for k in np.unique(sd.dense_labels(ann)) if k} - {"crosswalk"}
        assert painted <= set(labels)  # a fully hidden object paints nothing
        assert labels.count("person on crosswalk") == sum(p["on_crosswalk"] for p in a["pedestrians"])
