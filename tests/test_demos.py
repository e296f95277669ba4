"""The scripts in ``demos/`` run as a user runs them (``python demos/x.py ...``, a subprocess) with the bundled
models, on a few SynthDrive scenes rendered here; chat and segmentation, whose models are not bundled yet, run on
tiny random ones saved here, and generation on the bundled model with two steps. The assertions check what each
demo is for (the right hit first, one JSON line per file in order, answers of the asked kind, boxes inside the
image, the pipeline's own answers and class maps, PNGs that carry their seeds) without leaning on the exact
quality of the models; a missing or unusable input must end with a clear message and a non-zero status."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEMOS = Path(__file__).resolve().parents[1] / "demos"
N_SCENES = 6

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """``scene_<i>.png`` of the validation split (128 px) and their ground-truth attributes."""
    from shusheng.data import VAL_SEED, sample

    folder = tmp_path_factory.mktemp("scenes")
    attributes = {}
    for i in range(N_SCENES):
        image, ann = sample(VAL_SEED, i)
        image.save(folder / f"scene_{i}.png")
        attributes[f"scene_{i}.png"] = ann.attributes
    return folder, attributes


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """A fresh ``SHUSHENG_CACHE_DIR`` for the demos, offline. Its ``torch_extensions`` points at the DCNv3 CPU
    kernel already compiled in the real cache (when there is one), so the demos do not spend a minute building it."""
    from shusheng._cache import cache_dir

    cache = tmp_path_factory.mktemp("cache")
    built = cache_dir() / "torch_extensions"
    if built.is_dir():
        (cache / "torch_extensions").symlink_to(built, target_is_directory=True)
    env = {**os.environ, "SHUSHENG_CACHE_DIR": os.fspath(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the triton tests; a user's shell has none
    return env


def run_demo(name: str, *args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.fspath(DEMOS / name), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_search_photos_ranks_the_scene_with_the_asked_attributes_first_and_reuses_the_index(scenes, env,
                                                                                             tmp_path):
    folder, attributes = scenes
    # the one scene whose weather no other scene has; the query names its weather and time of day
    weather = {"fog": "in thick fog", "rain": "in the rain", "clear": "in clear weather"}
    time_of_day = {"day": "in the daytime", "dusk": "at dusk", "night": "at night"}
    counts = {w: sum(a["weather"] == w for a in attributes.values()) for w in weather}
    target = next(name for name, a in attributes.items() if counts[a["weather"]] == 1)
    query = f"a street {weather[attributes[target]['weather']]} {time_of_day[attributes[target]['time']]}"
    index = tmp_path / "index"

    proc = run_demo("search_photos.py", folder, query, "--k", 3, "--index", index, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{N_SCENES} added" in proc.stdout
    hits = re.findall(r"^(\d+)\. (-?\d+\.\d{4})  (\S+)$", proc.stdout, re.M)
    assert [int(r) for r, _, _ in hits] == [1, 2, 3]
    scores = [float(s) for _, s, _ in hits]
    assert scores == sorted(scores, reverse=True)
    assert Path(hits[0][2]) == folder / target, (query, proc.stdout)
    assert (index / "meta.sqlite").is_file() and not (folder / ".shusheng-index").exists()

    # a second search reuses the index: nothing is embedded again
    proc = run_demo("search_photos.py", folder, "a red traffic light", "--index", index, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"0 added, 0 updated, {N_SCENES} unchanged" in proc.stdout
    assert len(re.findall(r"^\d+\. ", proc.stdout, re.M)) == 5  # --k defaults to 5


def test_caption_folder_writes_one_line_per_image_and_goes_on_past_a_corrupt_file(scenes, env, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(scenes[0] / "scene_2.png", folder / "a.png")
    shutil.copy(scenes[0] / "scene_3.png", folder / "b.png")
    (folder / "broken.png").write_bytes(b"this is not an image")
    shutil.copy(scenes[0] / "scene_2.png", folder / "sub" / "c.png")  # the same picture as a.png
    out = tmp_path / "captions.jsonl"

    # batches of 2: [a, b], [broken, sub/c]; the corrupt file fails alone, in the middle of the run
    proc = run_demo("caption_folder.py", folder, "--out", out, "--batch-size", 2, env=env)
    assert proc.returncode == 1, proc.stderr  # some file failed
    assert "Traceback" not in proc.stderr
    assert "4 images: 3 captioned, 1 failed" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == ["a.png", "b.png", "broken.png", "sub/c.png"]
    by_file = {r["file"]: r for r in rows}
    assert "cannot load image" in by_file["broken.png"]["error"] and "caption" not in by_file["broken.png"]
    assert "broken.png" in proc.stderr
    for name in ("a.png", "b.png", "sub/c.png"):
        r = by_file[name]
        assert isinstance(r["caption"], str) and len(r["caption"].split()) >= 3
        assert 0.0 < r["score"] <= 1.0 and isinstance(r["in_domain"], bool)
        assert f"{name}: {r['caption']}" in proc.stdout
    # each caption belongs to its own file: the same picture twice gets the same caption, another one another
    assert by_file["a.png"]["caption"] == by_file["sub/c.png"]["caption"] != by_file["b.png"]["caption"]


def test_ask_image_answers_each_question_in_its_kind(scenes, env):
    questions = ["Are there any pedestrians?", "How many vehicles are there?", "What is the weather?"]
    args = [a for q in questions for a in ("-q", q)]
    proc = run_demo("ask_image.py", scenes[0] / "scene_3.png", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    asked = re.findall(r"^Q: (.+)$", proc.stdout, re.M)
    answers = re.findall(r"^A: (.+?)  \(score (\d\.\d\d)(?:; also [^)]*)?\)  in_domain=(True|False)$", proc.stdout,
                         re.M)
    assert asked == questions and len(answers) == 3, proc.stdout
    assert answers[0][0] in ("yes", "no")
    assert answers[1][0].isdigit()
    assert answers[2][0] in ("clear", "rain", "fog")
    assert all(0.0 <= float(score) <= 1.0 for _, score, _ in answers)


def test_detect_objects_prints_labelled_boxes_inside_the_image_and_draws_them(scenes, env, tmp_path):
    from PIL import Image

    from shusheng.data import DENSE_LABELS

    drawn = tmp_path / "boxes.png"
    proc = run_demo("detect_objects.py", scenes[0] / "scene_0.png", "--draw", drawn, env=env)
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"^(.+?) +(\d\.\d\d)  \[(\d+), (\d+), (\d+), (\d+)\]$", proc.stdout, re.M)
    assert found, proc.stdout  # four vehicles and a lit traffic light: the head finds something
    assert f"{len(found)} objects (threshold 0.5)" in proc.stdout
    scores = [float(s) for _, s, *_ in found]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    for label, _, *box in found:
        x, y, w, h = map(int, box)
        assert label in DENSE_LABELS and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
    with Image.open(drawn) as im:
        assert im.size == (512, 512)  # the 128-pixel scene, enlarged for legible labels


@pytest.mark.parametrize(("demo", "args", "message"), [
    ("search_photos.py", ["{missing}", "a red car"], "does not exist"),
    ("search_photos.py", ["{empty}", "a red car"], "no images found"),
    ("caption_folder.py", ["{missing}"], "does not exist"),
    ("caption_folder.py", ["{empty}"], "no images found"),
    ("ask_image.py", ["{missing}.png", "-q", "Is there a car?"], "does not exist"),
    ("ask_image.py", ["{scene}", "-q", "  "], "question is empty"),
    ("detect_objects.py", ["{missing}.png"], "does not exist"),
    ("detect_objects.py", ["{broken}"], "cannot load image"),
    ("generate_image.py", ["  "], "prompt is empty"),
    ("generate_image.py", ["a red car", "--model", "{missing}"], "does not exist"),
    ("chat_image.py", ["{scene}", "-q", "Is it raining?"], "--model is required: no LLM bridge is bundled"),
    ("chat_image.py", ["{scene}", "--model", "{missing}"], "does not exist"),
    ("segment_scene.py", ["{missing}.png", "--out", "{empty}"], "does not exist"),
    ("segment_scene.py", ["{scene}", "--out", "{empty}", "--model", "{missing}"], "does not exist"),
])
def test_demos_fail_clearly_on_bad_input(demo, args, message, scenes, env, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "broken": tmp_path / "broken.png",
             "scene": scenes[0] / "scene_0.png"}
    proc = run_demo(demo, *[a.format(**paths) for a in args], env=env)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_generate_image_writes_pngs_that_carry_their_seeds_and_prints_one_json_line_each(env, tmp_path):
    from PIL import Image

    from shusheng.generation import read_parameters

    out = tmp_path / "gen"
    proc = run_demo("generate_image.py", "a red car on a wet street at night", "--n", 2, "--seed", 7, "--steps", 2,
                    "--out", out, env=env)  # the bundled shusheng-mini-t2i, two denoising steps
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seed"] for r in rows] == [7, 8]
    assert sorted(p.name for p in out.iterdir()) == ["a-red-car-on-a-wet-street-at-night-7.png",
                                                     "a-red-car-on-a-wet-street-at-night-8.png"]
    for r in rows:
        assert r["prompt"] == "a red car on a wet street at night" and r["steps"] == 2 and r["size"] == [64, 64]
        assert r["model"] == "shusheng-mini-t2i" and r["sampler"] == "ddim" and r["guidance"] > 0
        params = read_parameters(r["file"])  # what `shusheng generate --from-png` makes the image again from
        assert (params.prompt, params.seed, params.steps, params.cfg_scale) == (r["prompt"], r["seed"], 2,
                                                                                 r["guidance"])
        with Image.open(r["file"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Path:
    """A saved random bridge over a tiny random Llama (no bridge is bundled)."""
    from test_bench_llm_bridge import tiny_bridge

    return tiny_bridge(tmp_path_factory.mktemp("bridge"))[0]


def test_chat_image_streams_the_pipelines_answer_to_each_turn_of_one_conversation(scenes, env, bridge):
    from shusheng.llm import ChatPipeline

    image = scenes[0] / "scene_1.png"
    questions = ["Is it raining?", "And the time of day?"]
    proc = run_demo("chat_image.py", image, "--model", bridge, "-q", questions[0], "-q", questions[1],
                    "--max-tokens", 8, env=env)
    assert proc.returncode == 0, proc.stderr
    turns = re.findall(r"Q: (.*?)\nA: (.*?)\n(?=Q: |\Z)", proc.stdout, re.S)
    assert [q for q, _ in turns] == questions, proc.stdout
    # each answer is the pipeline's own, asked with the earlier turns before it
    chat, conversation = ChatPipeline.from_pretrained(bridge), []
    for question, shown in turns:
        conversation.append({"role": "user", "content": question})
        answer = chat([[os.fspath(image)]], [conversation], max_new_tokens=8).answers[0]
        assert shown == answer
        conversation.append({"role": "assistant", "content": answer})
    # without -q the questions come from the terminal, one per line: the same chat
    typed = subprocess.run([sys.executable, os.fspath(DEMOS / "chat_image.py"), os.fspath(image), "--model",
                            os.fspath(bridge), "--max-tokens", "8"], input="\n".join(questions) + "\n",
                           capture_output=True, text=True, env=env, timeout=300)
    assert typed.returncode == 0 and typed.stdout == proc.stdout, typed.stderr


def test_segment_scene_writes_class_maps_and_overlays_and_prints_the_shares(scenes, env, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from shusheng.detection import InternImageSegmenter, SegmentationPipeline, SegmenterConfig

    torch.manual_seed(0)  # the bundled shusheng-mini-seg is not trained yet: a tiny random segmenter
    model = tmp_path / "seg"
    InternImageSegmenter(SegmenterConfig(backbone="internimage_test", backbone_args={"channels": 8}, channels=16,
                                         image_size=64)).save_pretrained(model)
    (tmp_path / "other").mkdir()
    first, twin, broken = tmp_path / "scene.png", tmp_path / "other" / "scene.png", tmp_path / "broken.png"
    shutil.copy(scenes[0] / "scene_0.png", first)
    Image.open(scenes[0] / "scene_4.png").resize((96, 64)).save(twin)  # same stem, another size
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"

    proc = run_demo("segment_scene.py", first, broken, twin, "--out", out, "--model", model, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # the broken file failed
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(first), str(broken), str(twin)]
    assert "cannot load image" in rows[1]["error"] and "broken.png" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["scene_2_classes.png", "scene_2_overlay.png",
                                                     "scene_classes.png", "scene_overlay.png"]
    expected = SegmentationPipeline.from_pretrained(model)([str(first), str(twin)])
    for r, ids, size in zip((rows[0], rows[2]), expected.class_ids, ((128, 128), (96, 64))):
        with Image.open(r["classes"]) as c:
            assert c.mode == "L" and c.size == size and np.array_equal(np.asarray(c), ids)
        with Image.open(r["overlay"]) as o:
            assert o.mode == "RGB" and o.size == size
        counts = np.bincount(ids.reshape(-1), minlength=len(expected.labels)) / ids.size
        order = np.argsort(-counts, kind="stable")  # largest share first; ties in class order
        assert r["shares"] == {expected.labels[k]: round(float(counts[k]), 4) for k in order if counts[k] > 0}
        assert list(r["shares"].values()) == sorted(r["shares"].values(), reverse=True)
        assert isinstance(r["in_domain"], bool)
