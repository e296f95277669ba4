"""The Generate tab (shusheng/apps/tabs/generate.py) over a tiny random text-to-image pipeline and the bundled
decoder as judge: without a model the tab says why and adds no API; a generation streams its steps and previews,
then images whose PNG files carry their parameters (also after Gradio copies them into its cache, as downloads
are served) and the checks of each image; Stop returns fewer steps (and only in its own session); bad inputs get
a message; ``shusheng demo --t2i``."""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from app_helpers import component, fn, session  # noqa: E402
from PIL import Image  # noqa: E402
from test_generation import TINY_UNET, ddim, tiny_text_encoder  # noqa: E402

from shusheng.apps.gradio_app import build_demo  # noqa: E402
from shusheng.apps.tabs import AppContext, UserInputError, generate, load_tabs  # noqa: E402
from shusheng.generation.config import make_unet  # noqa: E402
from shusheng.generation.pipeline import Text2ImagePipeline  # noqa: E402
from shusheng.generation.png import read_parameters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

PROMPT = "two red cars at night in the fog"
SKIP = gr.skip()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Text2ImagePipeline:
    text_dir = tiny_text_encoder(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)
    p = Text2ImagePipeline(make_unet(TINY_UNET), ddim(), text_encoder_ref=str(text_dir), model_name="tiny-t2i")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t2i") / "final"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checker():
    from shusheng.generation.pipelines.faithfulness import FaithfulnessChecker

    return FaithfulnessChecker.from_pretrained()


@pytest.fixture
def slow(pipe):
    """Each UNet call of ``pipe`` takes at least 30 ms (so that Stop lands mid-run)."""
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    yield pipe
    handle.remove()


def build(pipe, checker=None, **kwargs):
    with gr.Blocks() as demo:
        tab = generate.generate_tab(pipe, ctx=AppContext(), checker=checker, **kwargs)
    return demo, tab


def test_without_a_model_the_tab_says_why_and_adds_no_api(monkeypatch, tmp_path):
    from shusheng import weights

    monkeypatch.setattr(weights, "_ROOT", tmp_path)  # an installation without shusheng-mini-t2i
    assert [t.title for t in load_tabs()][-1] == "Generate"
    reason = generate.TAB.available()
    assert reason is not None and "shusheng-mini-t2i" in reason and "shusheng train t2i" in reason
    assert "shusheng demo --t2i" in reason
    other = generate.GenerateTab(os.fspath(tmp_path / "nothing")).available()
    assert "not a text-to-image pipeline folder" in other and "shusheng train t2i" in other

    demo = build_demo(None, None, tabs=[generate.TAB])
    texts = "\n".join(b.value or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown))
    assert "**Generate is not available here.**" in texts and "shusheng train t2i" in texts
    assert not [f for f in demo.fns.values() if f.api_visibility == "public"]
    # a folder that is there but does not load: found while building, shown the same way
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text('{"_class_name": "Text2ImagePipeline", '
                                                          '"unet": ["diffusers", "UNet2DConditionModel"]}')
    tab = generate.GenerateTab(os.fspath(tmp_path / "broken"))
    assert tab.available() is None
    demo = build_demo(None, None, tabs=[tab])
    texts = "\n".join(b.value or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown))
    assert "**Generate is not available here.**" in texts and "cannot be loaded" in texts and "unet/" in texts


def test_a_bundled_model_makes_the_tab(monkeypatch, tmp_path, saved):
    from shusheng import weights

    shutil.copytree(saved, tmp_path / "shusheng-mini-t2i")
    monkeypatch.setattr(weights, "_ROOT", tmp_path)
    assert generate.TAB.available() is None
    demo = build_demo(None, None, tabs=[generate.GenerateTab()])
    assert {f.api_name for f in demo.fns.values() if f.api_visibility == "public"} == {"generate", "stop_generate"}
    steps = component(demo, "generate-steps")
    assert (steps.minimum, steps.maximum) == (1, generate.MAX_STEPS)
    assert component(demo, "generate-n").maximum == generate.MAX_IMAGES


def test_a_generation_streams_progress_then_images_with_parameters(pipe, checker):
    demo, tab = build(pipe, checker, preview_every=2)
    outs = list(fn(demo, "generate")(PROMPT, "rain", "7", 4, 5.0, 2))
    assert outs[0] == ("Waiting for the model…", None, [], "", None)  # the last results are cleared
    statuses = [o[0] for o in outs[1:-1]]
    assert statuses == ["Step 0 of 4: encoding the prompt", "Step 1 of 4", "Step 2 of 4", "Step 3 of 4",
                        "Step 4 of 4"]
    previews = [o[1] for o in outs[1:-1]]
    assert [p == SKIP for p in previews] == [True, True, False, True, True]  # a preview every 2 steps
    assert isinstance(previews[2], Image.Image) and previews[2].size == (2 * 16, 16)  # both images side by side
    assert all(o[2:] == (SKIP, SKIP, SKIP) for o in outs[1:-1])

    status, _, gallery, checks_md, files = outs[-1]
    assert status == "Done: 2 images (seeds 7, 8), 4 steps."
    direct = pipe(PROMPT, negative_prompt="rain", num_images_per_prompt=2, num_inference_steps=4, seed=7,
                  progress=False)
    verdicts = checker(direct.images, direct.prompts)
    assert [Path(f).parent.parent.parent for f in files] == [tab.output_root] * 2  # <root>/<session>/<run>/
    for k, (file, (shown, caption)) in enumerate(zip(files, gallery)):
        assert shown == file and Path(file).name == f"two-red-cars-at-night-in-the-fog-{7 + k}.png"
        params = read_parameters(file)
        assert (params.prompt, params.negative_prompt, params.seed, params.steps, params.model) == (
            PROMPT, "rain", 7 + k, 4, "tiny-t2i")
        np.testing.assert_array_equal(np.asarray(Image.open(file)), np.asarray(direct.images[k]))
        # under each image: which facts hold (the checker's verdicts on that image)
        assert caption == f"seed {7 + k} · " + generate.check_caption(verdicts[k])
        assert [c.expected for c in verdicts[k].checks] == ["red car", "2 red cars", "night", "fog"]
        assert all(f"{c.kind}: {c.expected}" in caption for c in verdicts[k].checks)
        assert f"**Image {k + 1}** (seed {7 + k}): {sum(c.holds for c in verdicts[k].checks)} of 4 facts hold" \
            in checks_md
    # what the page downloads: Gradio's copies in its cache keep the parameters chunk
    for name, value in (("generate-gallery", gallery), ("generate-files", files)):
        block = component(demo, name)
        data = gr.processing_utils.move_files_to_cache(block.postprocess(value), block, postprocess=True)
        cached = [d["image"]["path"] for d in data] if name == "generate-gallery" else [d["path"] for d in data]
        assert [Path(c) != Path(f) for c, f in zip(cached, files)] == [True, True]
        assert [read_parameters(c).seed for c in cached] == [7, 8]


def test_random_seeds_and_no_checker(pipe):
    demo, _ = build(pipe, checker=None, checker_reason="the decoder is missing")
    for seed in ("random", "", -1, "-1", None):
        status, _, gallery, checks_md, files = list(fn(demo, "generate")("a bus at dusk", "", seed, 2, 1.0, 1))[-1]
        used = read_parameters(files[0]).seed
        assert 0 <= used < generate.SEED_LIMIT - generate.MAX_IMAGES  # short enough to type in again
        assert status == f"Done: 1 image (seed {used}), 2 steps." and gallery == [(files[0], f"seed {used}")]
        assert checks_md == "*No faithfulness check here: the decoder is missing*"


def test_stop_returns_what_was_made_so_far(slow, checker):
    demo, _ = build(slow, checker, preview_every=100)
    me = session("me")
    run = fn(demo, "generate")(PROMPT, "", 3, 40, 5.0, 2, me)
    while next(run)[0] != "Step 2 of 40":
        pass
    t0 = time.perf_counter()
    fn(demo, "stop_generate")(me)
    outs = list(run)
    assert time.perf_counter() - t0 < 2.0
    status, _, gallery, checks_md, files = outs[-1]
    done = read_parameters(files[0]).extra["Stopped at"]
    assert 2 <= int(done) < 40 and status.startswith(f"Stopped after {done} of 40 steps: 2 images (seeds 3, 4)")
    assert len(gallery) == 2 and "**Image 2** (seed 4)" in checks_md  # the partial images are checked too
    assert read_parameters(files[1]).steps == 40 and read_parameters(files[1]).extra == {"Stopped at": done}


def test_stop_from_another_session_does_not_stop(slow):
    demo, _ = build(slow)
    run = fn(demo, "generate")("a bus at dusk", "", 3, 6, 5.0, 1, session("me"))
    while next(run)[0] != "Step 1 of 6":
        pass
    fn(demo, "stop_generate")(session("other"))
    status, _, _, _, files = list(run)[-1]
    assert status == "Done: 1 image (seed 3), 6 steps." and "Stopped at" not in read_parameters(files[0]).extra


@pytest.mark.parametrize("args, message", [
    (("", "", 1, 4, 5.0, 1), "Type a prompt first"),
    (("   ", "", 1, 4, 5.0, 1), "Type a prompt first"),
    ((None, "", 1, 4, 5.0, 1), "Type a prompt first"),
    ((PROMPT, "", 1, 4, 5.0, 9), "The number of images must be a whole number from 1 to 8, not 9"),
    ((PROMPT, "", 1, 4, 5.0, 0), "The number of images must be a whole number from 1 to 8"),
    ((PROMPT, "", 1, 4, 5.0, 2.5), "The number of images must be a whole number"),
    ((PROMPT, "", 1, 0, 5.0, 1), "Steps must be a whole number from 1 to 100, not 0"),
    ((PROMPT, "", 1, 101, 5.0, 1), "Steps must be a whole number from 1 to 100, not 101"),
    ((PROMPT, "", 1, "many", 5.0, 1), "Steps must be a whole number"),
    ((PROMPT, "", 1, 4, -1.0, 1), "Guidance must be a number from 0 to 20"),
    ((PROMPT, "", 1, 4, math.nan, 1), "Guidance must be a number from 0 to 20"),
    ((PROMPT, "", 1, 4, 1e9, 1), "Guidance must be a number from 0 to 20"),
    ((PROMPT, "", 1, 4, "strong", 1), "Guidance must be a number from 0 to 20, not 'strong'."),
    ((PROMPT, "", "9" * 100_000, 4, 5.0, 1), "(or -1), not '" + "9" * 36 + "...."),  # not echoed whole
    ((PROMPT, "", "lucky", 4, 5.0, 1), "The seed must be a whole number from 0 to 4294967295, or 'random'"),
    ((PROMPT, "", 2**32, 4, 5.0, 1), "The seed must be a whole number"),
    ((PROMPT, "", -5, 4, 5.0, 1), "The seed must be a whole number"),
    (("car " * 300, "", 1, 4, 5.0, 1), "at most 1000 are allowed"),
    ((PROMPT, "fog " * 300, 1, 4, 5.0, 1), "The negative prompt is 1200 characters long"),
])
def test_bad_inputs_get_a_message_and_never_reach_the_model(pipe, args, message):
    demo, tab = build(pipe)
    outs = list(fn(demo, "generate")(*args))
    assert len(outs) == 1 and outs[0][0].startswith("⚠️ ") and message in outs[0][0], outs
    assert outs[0][1:] == (SKIP,) * 4  # the last results stay
    assert not list(tab.output_root.rglob("*.png"))


def test_prompts_past_the_text_encoders_limit_are_a_message(pipe):
    demo, tab = build(pipe)
    for args, name in ((("car " * 80, "", 1, 2, 5.0, 1), "prompt"), (("a car", "fog " * 70, 1, 2, 5.0, 1),
                                                                     "negative prompt")):
        outs = list(fn(demo, "generate")(*args))
        assert len(outs) == 1 and outs[0][0].startswith(f"⚠️ The {name} has ")
        assert outs[0][0].endswith("tokens; the model's text encoder reads at most 64. Shorten it.")
    assert not list(tab.output_root.rglob("*.png"))


def test_parse_request_accepts_what_the_page_and_api_send():
    r = generate.parse_request("  a car ", None, "42", 20.0, 7, 3)
    assert r == generate.GenerateRequest("a car", "", 42, 20, 7.0, 3)
    assert generate.parse_request("a car", "", 1.0, "5", "2.5", "1").seed == 1
    with pytest.raises(UserInputError, match="from 1 to 4"):
        generate.parse_request("a car", "", 1, 5, 5.0, 5, max_images=4)
    with pytest.raises(ValueError, match="max_images"):
        build(None, max_images=9)


def test_demo_t2i_option_puts_that_folder_in_the_generate_tab(tmp_path, monkeypatch, caplog, saved):
    from test_app_chat import MeanColourEmbedder

    from shusheng.apps import gradio_app
    from shusheng.cli import main
    from shusheng.retrieval_index import embedders as emb_mod

    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path / "cache"))
    assert main(["demo", "--no-browser", "--t2i", os.fspath(tmp_path / "none")]) == 2
    assert "not a text-to-image pipeline folder" in caplog.text
    assert not (tmp_path / "cache" / "demo").exists()  # refused before generating anything
    built = {}

    class Built(Exception):
        pass

    def fake_build_demo(*args, tabs=None, **kwargs):
        built["tabs"] = tabs
        raise Built

    monkeypatch.setattr(gradio_app, "build_demo", fake_build_demo)
    monkeypatch.setitem(emb_mod._EMBEDDERS, "test-mean-colour",
                        lambda checkpoint=None, device=None: MeanColourEmbedder())
    with pytest.raises(Built):
        main(["demo", "--no-browser", "--n", "2", "--embedder", "test-mean-colour", "--t2i", os.fspath(saved)])
    titles = [t.title for t in built["tabs"]]
    assert titles == [t.title for t in load_tabs()]
    tab = built["tabs"][titles.index("Generate")]
    assert isinstance(tab, generate.GenerateTab) and tab.model == os.fspath(saved) and tab.available() is None
    assert built["tabs"][titles.index("Chat")] is load_tabs()[titles.index("Chat")]  # the others as they were
