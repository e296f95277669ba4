"""SynthDrive drives: determinism, world consistency (ego motion, tracks, light cycle, crosswalk rules), temporal
facts against an independent recomputation, MP4 round trip through the video reader, errors, CLI."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shusheng.data.synthdrive_drive import _LIGHT_S, LIGHT_CYCLE, drive_facts, sample_drive, write_drive
from shusheng.data.synthdrive_render import LIGHT_ID, Camera, pedestrian_rect, vehicle_rect
from shusheng.data.video import VIDEO_EXTENSIONS, VideoLoadError, iter_video_frames

pytest.importorskip("av")

SEED, N_DRIVES, FRAMES, FPS, SIZE = 3, 12, 48, 8, 64  # about 2 s of rendering, shared by the tests below


@functools.cache
def _drives():
    return [sample_drive(SEED, i, FRAMES, FPS, SIZE) for i in range(N_DRIVES)]


def _png(img) -> bytes:
    return np.asarray(img).tobytes()


def _touches_border(r, m: float = 0.02) -> bool:
    return r[0] <= m or r[1] <= m or r[2] >= 1 - m or r[3] >= 1 - m


# ---------------------------------------------------------------- determinism
def test_same_arguments_same_drive():
    a, b = sample_drive(5, 2, 16, FPS, SIZE), sample_drive(5, 2, 16, FPS, SIZE)
    assert [_png(f) for f in a.frames] == [_png(f) for f in b.frames]
    for x, y in zip(a.annotations, b.annotations):
        assert (x.attributes, x.captions, x.qa, x.objects) == (y.attributes, y.captions, y.qa, y.objects)
    assert a.facts == b.facts and a.specs == b.specs
    # a shorter drive is a prefix; the scenes do not depend on the picture size; other indices differ
    short = sample_drive(5, 2, 6, FPS, SIZE)
    assert [_png(f) for f in short.frames] == [_png(f) for f in a.frames[:6]] and short.facts == a.facts[:6]
    assert sample_drive(5, 2, 16, FPS, 96).specs == a.specs
    assert _png(sample_drive(5, 3, 1, FPS, SIZE).frames[0]) != _png(a.frames[0])
    assert len(a) == 16 and a.duration_s == 2.0 and a.window == FPS and a.frames[0].size == (SIZE, SIZE)
    with pytest.raises(ValueError):
        sample_drive(5, 2, 0)
    with pytest.raises(ValueError):
        sample_drive(5, 2, 4, fps=0)


# ---------------------------------------------------------------- the world
def test_ego_motion_brings_static_objects_closer():
    checked = grown = 0
    for d in _drives():
        dt = 1.0 / d.fps
        for t in range(1, len(d)):
            ds = d.facts[t]["ego_speed"] * dt
            assert ds >= 0
            prev, cur = d.specs[t - 1], d.specs[t]
            # everything static moves towards the camera by exactly the distance the ego drove
            if prev.crosswalk and cur.crosswalk:
                assert prev.crosswalk_z - cur.crosswalk_z == pytest.approx(ds, abs=1e-4)
            if prev.sign is not None and cur.sign is not None:
                assert prev.sign.z - cur.sign.z == pytest.approx(ds, abs=1e-4)
            if prev.light is not None and cur.light is not None:
                assert prev.light.z - cur.light.z == pytest.approx(ds, abs=1e-4)
        # the sign's box grows and moves down while the ego drives towards it
        boxes = [(t, next((o["bbox"] for o in a.objects if o["category"] == "sign"), None))
                 for t, a in enumerate(d.annotations)]
        boxes = [(t, b) for t, b in boxes if b is not None]
        inner = [(t, b) for t, b in boxes if b[0] > 0 and b[1] > 0 and b[0] + b[2] < SIZE and b[1] + b[3] < SIZE]
        for (t0, b0), (t1, b1) in zip(inner, inner[1:]):  # not clipped by the picture's edge
            if t1 == t0 + 1:
                checked += 1
                assert b1[3] >= b0[3] - 1 and b1[1] + b1[3] >= b0[1] + b0[3] - 1  # height, bottom (1 px rounding)
        if len(boxes) > 8 and sum(f["ego_speed"] for f in d.facts[boxes[0][0]:boxes[-1][0] + 1]) / d.fps > 0.3:
            (_, first), (_, last) = boxes[0], boxes[-1]
            assert last[3] > first[3] and last[1] + last[3] > first[1] + first[3]
            grown += 1
    assert checked > 50 and grown >= 2


def test_tracks_keep_their_identity_and_enter_or_leave_at_the_edges():
    entered = left = 0
    for d in _drives():
        cam = Camera.of(d.specs[0])
        for kind, rect, far in (("vehicles", vehicle_rect, 5.0), ("pedestrians", pedestrian_rect, 2.9)):
            for t in range(1, len(d)):
                before = dict(zip(d.spec_ids[t - 1][kind], getattr(d.specs[t - 1], kind)))
                now = dict(zip(d.spec_ids[t][kind], getattr(d.specs[t], kind)))
                for k in now.keys() - before.keys():  # enters: from far away or from the edge of the picture
                    assert now[k].z >= far or _touches_border(rect(cam, now[k])), (d.index, t, kind, k)
                    entered += 1
                for k in before.keys() - now.keys():  # leaves: out of sight far ahead or past the camera
                    assert before[k].z > 7.0 or _touches_border(rect(cam, before[k])), (d.index, t, kind, k)
                    left += 1
                for k in now.keys() & before.keys():
                    a, b = before[k], now[k]
                    if kind == "vehicles":  # same vehicle, same lane, moving at most ego + own speed
                        assert (a.type, a.color, a.rgb, a.lane, a.u) == (b.type, b.color, b.rgb, b.lane, b.u)
                        assert abs(a.z - b.z) <= (0.45 + 0.4) / d.fps + 1e-9
                    else:  # a person walks (and the ego drives): small steps
                        assert (a.skin, a.shirt, a.pants, a.height) == (b.skin, b.shirt, b.pants, b.height)
                        assert abs(a.u - b.u) <= 0.18 / d.fps + 1e-9 and abs(a.z - b.z) <= 0.6 / d.fps
            # annotated tracks are a subset of the scene's, in the same order, and agree with the attributes
            for t in range(len(d)):
                ids = d.facts[t][kind[:-1] + "_ids"]
                assert len(ids) == len(d.annotations[t].attributes[kind])
                assert set(ids) <= set(d.spec_ids[t][kind]) and ids == sorted(ids)
        for t in range(len(d)):  # lanes hold vehicles apart, as sample_spec places them
            vs = d.specs[t].vehicles
            for i in range(len(vs)):
                for j in range(i):
                    if vs[i].lane == vs[j].lane:
                        assert abs(vs[i].z - vs[j].z) >= 0.6 - 1e-9
            assert len(vs) <= 5 and len(d.specs[t].pedestrians) <= 4
    assert entered > 5 and left > 5


def test_annotated_vehicles_keep_type_colour_and_lane():
    for d in _drives():
        seen: dict[int, tuple] = {}
        for a, f in zip(d.annotations, d.facts):
            for k, v in zip(f["vehicle_ids"], a.attributes["vehicles"]):
                assert seen.setdefault(k, (v["type"], v["color"], v["lane"])) == (v["type"], v["color"], v["lane"])


def test_light_follows_its_cycle():
    after = {"green": "yellow", "yellow": "red", "red": "green"}
    assert LIGHT_CYCLE == ("green", "yellow", "red")
    changes = 0
    for d in _drives():
        states = [s.light.state for s in d.specs if s.light is not None]
        runs = [[states[0], 1]] if states else []
        for s in states[1:]:
            if s == runs[-1][0]:
                runs[-1][1] += 1
            else:
                assert s == after[runs[-1][0]], (d.index, runs, s)
                runs.append([s, 1])
                changes += 1
        for k, (state, n) in enumerate(runs):  # durations within the documented ranges (whole runs only)
            lo, hi = _LIGHT_S[state]
            assert n <= hi * d.fps + 1
            if 0 < k < len(runs) - 1:
                assert n >= lo * d.fps - 1
        # the annotated state is the scene's whenever the light is annotated
        for s, a in zip(d.specs, d.annotations):
            assert a.attributes["light"] in ("none", s.light.state if s.light is not None else "none")
    assert changes >= 5


def test_crosswalk_rules():
    """No vehicle in the crosswalk zone while someone is on the crosswalk; vehicles never stop in the zone."""
    occupied = 0
    for d in _drives():
        for t, s in enumerate(d.specs):
            if not s.crosswalk:
                assert not any(p.on_crosswalk for p in s.pedestrians)
                continue
            zone = (s.crosswalk_z - s.crosswalk_dz - 0.35, s.crosswalk_z + s.crosswalk_dz + 0.12)
            for p in s.pedestrians:  # on_crosswalk follows the position
                on = abs(p.u) < s.road_half and abs(p.z - s.crosswalk_z) <= s.crosswalk_dz + 0.02
                assert p.on_crosswalk == on
            in_zone = {k for k, v in zip(d.spec_ids[t]["vehicles"], s.vehicles)  # 1e-6: stopped at its edge
                       if zone[0] + 1e-6 < v.z < zone[1] - 1e-6}
            if any(p.on_crosswalk for p in s.pedestrians):
                occupied += 1
                assert not in_zone, (d.index, t)
            if t + 1 < len(d) and in_zone:
                nxt = dict(zip(d.spec_ids[t + 1]["vehicles"], d.specs[t + 1].vehicles))
                ds = d.facts[t + 1]["ego_speed"] / d.fps
                for k, v in zip(d.spec_ids[t]["vehicles"], s.vehicles):
                    if k in in_zone and k in nxt:
                        assert abs(nxt[k].z - (v.z - ds)) > 1e-3  # it moved in the world
    assert occupied > 10


# ---------------------------------------------------------------- temporal facts
def _facts_by_definition(d) -> list[tuple[str, str]]:
    """The documented definitions, written out independently of the library."""
    w = d.window
    out = []
    for t in range(len(d)):
        window = range(max(0, t - w), t)
        light = d.annotations[t].attributes["light"]
        changed = light != "none" and any(
            d.annotations[s].attributes["light"] != "none" and d.annotations[s].attributes["light"] != light
            for s in window)
        on_now = [k for k, p in zip(d.facts[t]["pedestrian_ids"], d.annotations[t].attributes["pedestrians"])
                  if p["on_crosswalk"]]
        entering = False
        for k in on_now:
            for s in window:
                ids = d.facts[s]["pedestrian_ids"]
                if k in ids and not d.annotations[s].attributes["pedestrians"][ids.index(k)]["on_crosswalk"]:
                    entering = True
        out.append(("yes" if changed else "no", "yes" if entering else "no"))
    return out


def test_temporal_facts_agree_with_the_annotations():
    counts = {"light_changed": {"yes": 0, "no": 0}, "pedestrian_entering": {"yes": 0, "no": 0}}
    for d in _drives():
        assert d.window == round(d.fps)
        expected = _facts_by_definition(d)
        for t, f in enumerate(d.facts):
            assert (f["light_changed"], f["pedestrian_entering"]) == expected[t], (d.index, t)
            assert f["index"] == t and f["time_s"] == pytest.approx(t / d.fps)
            counts["light_changed"][f["light_changed"]] += 1
            counts["pedestrian_entering"][f["pedestrian_entering"]] += 1
    total = N_DRIVES * FRAMES
    for fact, c in counts.items():  # both values occur, neither is rare
        assert 0.03 * total < c["yes"] < 0.5 * total, (fact, c)


def test_drive_facts_definitions():
    def attrs(light, peds=()):
        return {"light": light, "pedestrians": [{"on_crosswalk": on} for on in peds]}

    lights = ["green", "green", "yellow", "yellow", "yellow", "none", "red", "red", "red"]
    got = [f["light_changed"] for f in drive_facts([attrs(s) for s in lights], [[]] * len(lights), window=2)]
    assert got == ["no", "no", "yes", "yes", "no", "no", "yes", "no", "no"]
    # pedestrian 7 steps on at frame 2; pedestrian 9 is only ever seen on the crosswalk; 8 steps off
    frames = [attrs("none", (False, True, True)), attrs("none", (False, True)), attrs("none", (True, True, False)),
              attrs("none", (True,)), attrs("none", (True,)), attrs("none", (True,))]
    ids = [[7, 9, 8], [7, 9], [7, 9, 8], [7], [7], [7]]
    got = [f["pedestrian_entering"] for f in drive_facts(frames, ids, window=2)]
    assert got == ["no", "no", "yes", "yes", "no", "no"]


# ---------------------------------------------------------------- files
def test_mp4_round_trip_and_jsonl(tmp_path):
    d = _drives()[1]
    entry = write_drive(d, tmp_path, "one")
    assert entry["frames"] == FRAMES and entry["fps"] == FPS and entry["window"] == FPS
    frames = list(iter_video_frames(tmp_path / "one.mp4"))
    assert [i for i, _, _ in frames] == list(range(FRAMES))
    assert [t for _, t, _ in frames] == pytest.approx([i / FPS for i in range(FRAMES)])
    errors = []
    for i, _, img in frames:
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        errors.append(np.abs(np.asarray(img, float) - np.asarray(d.frames[i], float)).mean())
    # yuv420p keeps colour at half resolution (about 5 of the error at 64 px); crf 18 loses mostly sensor noise
    assert max(errors) < 8.0, errors
    heads = []  # the traffic light's head (about 3 x 8 pixels) keeps its colour
    for i, _, img in frames:
        mask = d.annotations[i].instance == LIGHT_ID
        if mask.any():
            diff = np.asarray(img, float)[mask].mean(0) - np.asarray(d.frames[i], float)[mask].mean(0)
            heads.append(np.abs(diff).max())
    assert len(heads) > 10 and np.median(heads) < 8 and max(heads) < 30, heads
    # each decoded frame is closest to its own rendered frame (the order survives)
    far = np.abs(np.asarray(frames[0][2], float) - np.asarray(d.frames[-1], float)).mean()
    assert errors[0] < far
    sub = list(iter_video_frames(tmp_path / "one.mp4", every=5))
    assert [i for i, _, _ in sub] == list(range(0, FRAMES, 5))
    assert all(_png(img) == _png(frames[i][2]) for i, _, img in sub)
    with pytest.raises(ValueError):
        iter_video_frames(tmp_path / "one.mp4", every=0)
    write_drive(d, tmp_path, "full", pix_fmt="yuv444p", index=False)  # full colour resolution: closer
    full = [np.abs(np.asarray(img, float) - np.asarray(d.frames[i], float)).mean()
            for i, _, img in iter_video_frames(tmp_path / "full.mp4")]
    assert len(full) == FRAMES and max(full) < 5.0 and np.mean(full) < np.mean(errors) - 1

    lines = (tmp_path / "one.jsonl").read_text().splitlines()
    assert len(lines) == FRAMES
    for t, line in enumerate(lines):
        rec = json.loads(line)
        assert set(rec) == {"frame", "time_s", "attributes", "captions", "qa", "facts", "objects"}
        ann = d.annotations[t]
        assert rec["frame"] == t and rec["attributes"] == ann.attributes and rec["qa"] == ann.qa
        assert rec["facts"] == d.facts[t] and rec["captions"] == ann.captions
        assert [o["bbox"] for o in rec["objects"]] == [o["bbox"] for o in ann.objects]
        assert all("segmentation" not in o for o in rec["objects"])
    index = json.loads((tmp_path / "drives.json").read_text())
    assert [e["name"] for e in index["drives"]] == ["one"] and index["drives"][0] == entry
    write_drive(d, tmp_path, "two")  # the index collects drives written one by one
    assert [e["name"] for e in json.loads((tmp_path / "drives.json").read_text())["drives"]] == ["one", "two"]


def test_bad_videos_raise_clear_errors(tmp_path):
    assert ".mp4" in VIDEO_EXTENSIONS and ".webm" in VIDEO_EXTENSIONS
    with pytest.raises(VideoLoadError, match="not found"):
        iter_video_frames(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoLoadError, match="empty"):
        iter_video_frames(tmp_path / "empty.mp4")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot load video"):
        list(iter_video_frames(tmp_path / "noise.mp4"))
    write_drive(sample_drive(SEED, 0, 8, FPS, SIZE), tmp_path, "ok", index=False)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: lost
    with pytest.raises(VideoLoadError):
        list(iter_video_frames(tmp_path / "cut.mp4"))
    with pytest.raises(ValueError, match="even"):
        write_drive(sample_drive(SEED, 0, 2, FPS, 65), tmp_path, "odd")


def test_cli_writes_drives(tmp_path):
    from shusheng.cli import main

    out = tmp_path / "drives"
    args = ["data", "synthdrive", "--sequence", "--n", "2", "--frames", "6", "--fps", "4", "--size", "64",
            "--seed", "5", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["drive_000000.jsonl", "drive_000000.mp4", "drive_000001.jsonl",
                                                     "drive_000001.mp4", "drives.json"]
    index = json.loads((out / "drives.json").read_text())["drives"]
    assert [(e["index"], e["frames"], e["fps"], e["window"]) for e in index] == [(0, 6, 4, 4), (1, 6, 4, 4)]
    assert len((out / "drive_000001.jsonl").read_text().splitlines()) == 6
    assert len(list(iter_video_frames(out / "drive_000001.mp4"))) == 6
    lines = [json.loads(line) for line in (out / "drive_000001.jsonl").read_text().splitlines()]
    assert [r["facts"] for r in lines] == sample_drive(5, 1, 6, 4, 64).facts
    assert main(args) == 2  # a non-empty folder is refused ...
    assert main([*args, "--overwrite"]) == 0  # ... unless asked
    assert main([*args[:-3], "--size", "63", "--out", str(tmp_path / "odd"), "--quiet"]) == 2


def test_import_shusheng_data_does_not_import_pyav():
    code = ("import sys, shusheng.data as d; d.VIDEO_EXTENSIONS; d.iter_video_frames; "
            "print('av' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
