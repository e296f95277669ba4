"""demos/drive_qa.py and demos/score_drive_qa.py end to end on a short rendered drive (seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demos"))

from score_drive_qa import score  # noqa: E402


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _run(*args, env, check=True):
    return subprocess.run([sys.executable, str(ROOT / "demos" / "drive_qa.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    from shusheng.data import synthdrive as sd
    from shusheng.data.synthdrive_drive import generate_drives
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        bundled_path("shusheng-mini-uniperceiver")
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    root = tmp_path_factory.mktemp("drives")
    generate_drives(root / "drives", 1, sd.VAL_SEED, frames=12, fps=4, size=128, progress=False)
    img, _ = sd.sample(sd.VAL_SEED, 5, 128)
    (root / "images").mkdir()
    img.save(root / "images" / "scene.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    env = _env(root)
    full = root / "full.jsonl"
    _run(root / "drives", "--out", full, "--every", 2, "--threads", 1, env=env)
    return root, full, env


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_one_valid_line_per_frame_and_question(drive):
    from shusheng.uniperceiver.pipelines.driving import load_checklist, validate_record

    _, full, _ = drive
    qs = load_checklist()
    lines = _lines(full)
    assert len(lines) == 6 * len(qs)  # frames 0, 2, ..., 10
    assert [r["frame"]["index"] for r in lines[::len(qs)]] == [0, 2, 4, 6, 8, 10]
    assert [r["frame"]["time_s"] for r in lines[::len(qs)]] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    for r in lines:
        assert validate_record(r, qs) == [], r
        assert r["in_domain"] is True


def test_resume_after_a_crash_finishes_the_same_file(drive, tmp_path):
    root, full, env = drive
    lines = full.read_text().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines[:19]) + lines[19][:25])  # killed while writing line 20
    out = _run(root / "drives", "--out", torn, "--every", 2, "--threads", 1, env=env, check=False)
    assert out.returncode != 0 and "--resume" in out.stderr  # never appends to an old file by accident
    _run(root / "drives", "--out", torn, "--every", 2, "--threads", 1, "--resume", env=env)
    assert torn.read_text() == full.read_text()  # the window of recent answers was restored too
    _run(root / "drives", "--out", torn, "--every", 2, "--threads", 1, "--resume", env=env)
    assert torn.read_text() == full.read_text()  # nothing left to do


def test_worker_processes_write_what_one_process_writes(drive, tmp_path):
    root, full, env = drive
    out = tmp_path / "workers.jsonl"
    run = _run(root / "drives", root / "images", "--out", out, "--every", 2, "--threads", 2, "--workers", 2,
               "--batch-size", 4, env=env)  # 2-frame chunks: several in flight, finished out of order
    assert "frames/s" in run.stderr
    one = tmp_path / "one.jsonl"
    _run(root / "drives", root / "images", "--out", one, "--every", 2, "--threads", 1, env=env)
    got, want = _lines(out), _lines(one)
    assert len(got) == len(want) > len(_lines(full))
    for g, w in zip(got, want):  # same order, same answers (temporal ones included), same evidence boxes
        assert (g["source"], g["frame"], g["question_id"], g["answer"]) == (
            w["source"], w["frame"], w["question_id"], w["answer"])
        assert [b["label"] for b in g["evidence"]] == [b["label"] for b in w["evidence"]]
        assert (g["score"] is None) == (w["score"] is None)
        if g["score"] is not None:
            assert abs(g["score"] - w["score"]) < 1e-3


def test_images_and_unreadable_files_get_lines_not_a_crash(drive, tmp_path):
    root, _, env = drive
    out = tmp_path / "images.jsonl"
    _run(root / "images", "--out", out, env=env)
    lines = _lines(out)
    broken = [r for r in lines if r["source"].endswith("broken.png")]
    scene = [r for r in lines if r["source"].endswith("scene.png")]
    assert len(scene) == 6 and {r["question_id"] for r in scene} == {
        "light", "stop", "crosswalk_pedestrians", "speed_limit", "vehicle_count", "nearest_vehicle"}
    assert broken and all(r["answer"] is None and r["error"] for r in broken)
    missing = _run(tmp_path / "nowhere", "--out", tmp_path / "x.jsonl", env=env, check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_scores_count_missing_and_invalid_lines_and_do_not_change(drive, tmp_path):
    root, full, _ = drive
    s = score(full, root / "drives", every=2)
    assert s == score(full, root / "drives", every=2)
    assert s["invalid_lines"] == 0 and s["valid_share"] == 1.0 and s["overall"]["missing"] == 0
    rows = {r["question"]: r for r in s["rows"]}
    assert set(rows) == {"light", "stop", "crosswalk_pedestrians", "speed_limit", "vehicle_count",
                         "nearest_vehicle", "light_changed", "pedestrian_entering"}
    assert all(r["n"] == 6 for r in rows.values())
    for r in rows.values():  # frame questions: the true facts are always right
        assert 0.0 <= r["question_only"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert all(rows[q]["upper_bound"] == 1.0 for q in ("light", "stop", "vehicle_count"))
    # answering with the truth scores 1 on frame questions; a broken and a missing line count as wrong
    lines = _lines(full)
    from score_drive_qa import load_truth, true_answer

    from shusheng.uniperceiver.pipelines.driving import load_checklist

    qs = {q.id: q for q in load_checklist()}
    t = load_truth(root / "drives", 2)
    for r in lines:
        r["answer"] = true_answer(qs[r["question_id"]], t[("drive_000000", r["frame"]["index"])])
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = {r["question"]: r for r in score(perfect, root / "drives", every=2)["rows"]}
    assert all(r["accuracy"] == 1.0 for r in rows.values())
    light = [i for i, r in enumerate(lines) if r["question_id"] == "light"]
    bad = list(lines)
    bad[light[0]] = {**lines[light[0]], "answer": "purple"}
    del bad[light[1]]
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("".join(json.dumps(r) + "\n" for r in bad) + "{torn")
    s = score(damaged, root / "drives", every=2)
    rows = {r["question"]: r for r in s["rows"]}
    assert s["invalid_lines"] == 2 and rows["light"]["missing"] == 2
    assert rows["light"]["accuracy"] == pytest.approx(4 / 6)
