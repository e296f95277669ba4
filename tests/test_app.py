"""shusheng.apps: the Search tab's backend, its error messages, the app over HTTP (gradio_client), the tabs' protocol
(a tab that cannot be built says why), the Caption & VQA tab's out-of-domain notice and ``shusheng demo``.

Uses a deterministic palette embedder (a test double defined here) and a few tiny generated images.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytest.importorskip("faiss")

from shusheng.apps.gradio_app import build_demo, launch_demo  # noqa: E402
from shusheng.apps.tabs import Tab, TabUnavailable, UserInputError, load_tabs  # noqa: E402
from shusheng.apps.tabs import caption_vqa as caption_tab  # noqa: E402
from shusheng.apps.tabs import search as search_tab  # noqa: E402
from shusheng.apps.tabs.search import BOX_COLOR, SearchApp  # noqa: E402
from shusheng.retrieval_index import Index, index_folder  # noqa: E402

PALETTE = {"red": (230, 20, 20), "green": (20, 170, 40), "blue": (20, 40, 230), "yellow": (240, 220, 30),
           "white": (250, 250, 250), "black": (10, 10, 10), "orange": (250, 140, 10), "purple": (130, 20, 170)}


class PaletteEmbedder:
    """Test double: an image's vector is the fraction of its pixels nearest to each palette colour; a text's
    vector is the indicator of the palette colours it names. Both L2-normalised, so a solid red picture and
    the text "red" have cosine 1."""

    dim = len(PALETTE)

    def __init__(self, name: str = "test-palette"):
        self.name = name
        self._centres = np.array(list(PALETTE.values()), np.float32)

    def embed_images(self, images, batch_size=32, progress=False):
        from shusheng.data import load_image

        out = np.zeros((len(images), self.dim), np.float32)
        for i, im in enumerate(images):
            px = np.asarray(load_image(im), np.float32).reshape(-1, 3)
            nearest = ((px[:, None, :] - self._centres[None]) ** 2).sum(-1).argmin(1)
            out[i] = np.bincount(nearest, minlength=self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_texts(self, texts, batch_size=64):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for j, word in enumerate(PALETTE):
                out[i, j] = float(word in t.lower())
            if not out[i].any():
                out[i] = 1.0  # no colour named: equally close to everything
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def solid(color: str, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, PALETTE[color])


RED_BOX = (8, 6, 20, 16)  # x, y, w, h of the red patch inside blue_with_red.png (64 x 48)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    (root / "sub").mkdir()
    solid("red").save(root / "red.png")
    solid("green").save(root / "green.png")
    solid("yellow").save(root / "sub" / "yellow.png")
    solid("red", (30, 30)).save(root / "sub" / "red_small.png")
    img = solid("blue", (64, 48))
    x, y, w, h = RED_BOX
    img.paste(solid("red", (w, h)), (x, y))
    img.save(root / "blue_with_red.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    report = index_folder(root, embedder=PaletteEmbedder(), regions={"blue_with_red.png": [list(RED_BOX)]},
                          progress=False, workers=1)
    assert report.added == 5 and len(report.skipped) == 1
    return root


@pytest.fixture(scope="module")
def app(collection) -> SearchApp:
    app = SearchApp(collection, PaletteEmbedder())
    yield app
    app.close()


def _fn(demo, api_name: str):
    for block_fn in demo.fns.values():
        if block_fn.api_name == api_name:
            return block_fn.fn
    raise AssertionError(f"no event with api_name {api_name!r}")


def test_build_demo_builds(collection):
    demo = build_demo(collection, PaletteEmbedder(), examples=["red", "a yellow one"], extra_tabs=False)
    assert isinstance(demo, gr.Blocks)
    assert isinstance(demo.search_app, SearchApp)
    assert demo.search_app.folder == os.fspath(collection)
    assert {"search", "index_folder"} <= {f.api_name for f in demo.fns.values()}
    assert "5 images + 1 regions" in demo.search_app.describe()


def test_search_returns_scored_gallery_items(app):
    result = app.search("red", k=3)
    assert len(result.items) == 3 and not result.warnings
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    picture, caption = result.items[0]
    assert isinstance(picture, Image.Image)
    assert caption.startswith("score 1.00 · ") and caption.split(" · ")[1] in {"red.png", "sub/red_small.png"}
    assert "3 results" in result.status and "“red”" in result.status
    # pictures are scaled up for display: the longer side is at least DISPLAY_MIN_SIDE
    assert max(picture.size) >= search_tab.DISPLAY_MIN_SIDE


def test_region_hit_is_drawn_with_its_box(app):
    result = app.search("red", k=5, threshold=0.5)
    region = [(item, hit) for item, hit in zip(result.items, result.hits) if hit.box is not None]
    assert len(region) == 1
    (picture, caption), hit = region[0]
    assert hit.path.endswith("blue_with_red.png") and hit.box == RED_BOX
    assert "region 20×16 at (8, 6)" in caption and 0.5 < hit.score < 1.0
    # the box outline is drawn in BOX_COLOR on the scaled picture, the inside of the patch stays red
    s = picture.width / 64
    px = np.asarray(picture)
    x, y, w, h = RED_BOX
    top_edge = px[round(y * s), round((x + w / 2) * s)]
    assert np.abs(top_edge.astype(int) - BOX_COLOR).max() < 40
    centre = px[round((y + h / 2) * s), round((x + w / 2) * s)]
    assert np.abs(centre.astype(int) - PALETTE["red"]).max() < 40
    # whole-image hits carry no box
    assert all(hit.box is None for hit in result.hits if not hit.path.endswith("blue_with_red.png"))


def test_image_query_threshold_and_folder_glob(app, collection):
    result = app.search(image=os.fspath(collection / "sub" / "yellow.png"), k=2)
    assert result.hits[0].path.endswith("yellow.png") and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert "the query image" in result.status
    both = app.search("green", image=solid("yellow"), k=2)  # text + image: both pictures tie at the top
    assert {Path(h.path).name for h in both.hits} == {"green.png", "yellow.png"}
    only_sub = app.search("red", k=10, folder_glob="*/sub/*")
    assert [Path(h.path).name for h in only_sub.hits] == ["red_small.png", "yellow.png"]
    strict = app.search("red", k=10, threshold=0.99)
    assert {Path(h.path).name for h in strict.hits} == {"red.png", "red_small.png"}
    nothing = app.search("purple", k=5, threshold=0.9)
    assert nothing.items == [] and "lower the score threshold" in nothing.warnings[0]


def test_an_open_index_passed_in_stays_the_callers(collection):
    with Index.open(collection / ".shusheng-index") as index:
        app = SearchApp(index, PaletteEmbedder())
        assert app.folder == os.fspath(collection)
        assert app.search("green", k=1).items[0][1] == "score 1.00 · green.png"
        app.close()
        assert index.stats()["entries"] == 6  # not closed by the app


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="   "), "Type a text query or upload a query image"),
    (dict(text="red", k=0), "between 1 and"),
    (dict(text="red", threshold=3.0), "cosine between -1 and 1"),
    (dict(text="x" * 5000), "too long"),
])
def test_bad_search_input_is_a_clear_message(app, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        app.search(**kwargs)


def test_ui_turns_bad_input_into_gr_error(collection, tmp_path):
    demo = build_demo(collection, PaletteEmbedder(), extra_tabs=False, allow_dirs=[tmp_path],
                      index_root=tmp_path / "indexes")
    search, index = _fn(demo, "search"), _fn(demo, "index_folder")
    with pytest.raises(gr.Error) as err:
        search("", None, 5, 0.0, "")
    assert "Type a text query" in err.value.message
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(gr.Error) as err:
        search("", os.fspath(not_an_image), 5, 0.0, "")
    assert err.value.message.startswith("Cannot use the query image: not a recognised image format")
    with pytest.raises(gr.Error) as err:
        index(os.fspath(tmp_path / "missing"))
    assert "does not exist" in err.value.message
    with pytest.raises(gr.Error) as err:
        index("")
    assert "Enter the folder" in err.value.message
    # a folder indexed by another embedder: refused before anything is embedded
    other = tmp_path / "other"
    other.mkdir()
    solid("red").save(other / "a.png")
    index_folder(other, embedder=PaletteEmbedder("another-embedder"), progress=False, workers=1)
    with pytest.raises(gr.Error) as err:
        index(os.fspath(other))
    assert "was built with embedder 'another-embedder'" in err.value.message
    # a damaged record of the embedder: one message, not a traceback
    damaged = tmp_path / "damaged"
    (damaged / ".shusheng-index").mkdir(parents=True)
    solid("red").save(damaged / "a.png")
    (damaged / ".shusheng-index" / "embedder.json").write_text("{not json")
    with pytest.raises(gr.Error) as err:
        index(os.fspath(damaged))
    assert "unreadable embedder record" in err.value.message and "Delete that index folder" in err.value.message
    # no index yet
    empty = build_demo(None, PaletteEmbedder(), extra_tabs=False)
    with pytest.raises(gr.Error) as err:
        _fn(empty, "search")("red", None, 5, 0.0, "")
    assert "No index yet" in err.value.message


def test_unexpected_failure_is_one_line(collection, monkeypatch):
    demo = build_demo(collection, PaletteEmbedder(), extra_tabs=False)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Index, "search", boom)
    with pytest.raises(gr.Error) as err:
        _fn(demo, "search")("red", None, 5, 0.0, "")
    assert err.value.message == "Search failed: RuntimeError: disk on fire"


def test_index_folder_reports_and_switches_index(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    solid("green").save(root / "g.png")
    solid("orange").save(root / "o.png")
    (root / "empty.jpg").write_bytes(b"")
    demo = build_demo(None, PaletteEmbedder(), extra_tabs=False, allow_dirs=[root], index_root=tmp_path / "indexes")
    index, search = _fn(demo, "index_folder"), _fn(demo, "search")
    report, info = index(os.fspath(root))
    assert "**2 added**" in report and "1 skipped" in report and "`empty.jpg`:" in report
    # the folder is the user's: its index goes under the index root, nothing is written into it
    assert sorted(p.name for p in root.iterdir()) == ["empty.jpg", "g.png", "o.png"]
    assert f"Index: `{tmp_path / 'indexes'}/pics-" in report
    assert "2 images" in info
    gallery, status = search("orange", None, 1, 0.0, "")
    assert gallery[0][1] == "score 1.00 · o.png"
    # incremental: a second run embeds nothing; a new file is picked up and searchable at once
    report, _ = index(os.fspath(root))
    assert "**0 added**" in report and "2 unchanged" in report
    solid("purple").save(root / "p.png")
    report, _ = index(os.fspath(root))
    assert "**1 added**" in report
    gallery, _ = search("purple", None, 1, 0.0, "")
    assert gallery[0][1] == "score 1.00 · p.png"
    demo.search_app.close()


def _tab_labels(demo) -> list[str]:
    return [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]


def _markdown_texts(demo) -> list[str]:
    return [block.value or "" for block in demo.blocks.values() if isinstance(block, gr.Markdown)]


def test_tabs_follow_the_protocol():
    tabs = load_tabs()
    assert [t.title for t in tabs] == ["Search", "Caption & VQA", "Chat", "Detect", "Generate"]
    assert all(isinstance(t, Tab) for t in tabs)
    assert tabs[0].available() is None  # Search: embedders load on first use


class _Unavailable:
    title = "Broken"

    def available(self):
        return "its weights are missing; make them with: `shusheng train broken`"

    def build(self, ctx):
        raise AssertionError("an unavailable tab is not built")


class _FailsWhenBuilt:
    title = "Late failure"

    def available(self):
        return None

    def build(self, ctx):
        raise TabUnavailable("the weights did not load: truncated file")


def test_a_tab_that_cannot_be_built_says_why(collection):
    search = load_tabs()[0]
    demo = build_demo(collection, PaletteEmbedder(), tabs=[search, _Unavailable(), _FailsWhenBuilt()])
    assert _tab_labels(demo) == ["Search", "Broken", "Late failure"]
    texts = "\n".join(_markdown_texts(demo))
    assert "**Broken is not available here.**" in texts and "`shusheng train broken`" in texts
    assert "**Late failure is not available here.**" in texts and "truncated file" in texts
    assert isinstance(demo.search_app, SearchApp)
    # the Search tab itself still works
    assert demo.search_app.search("red", k=1).items[0][1].startswith("score 1.00")
    # extra_tabs=False keeps the first (main) tab only
    assert _tab_labels(build_demo(collection, PaletteEmbedder(), extra_tabs=False,
                                  tabs=[search, _Unavailable()])) == ["Search"]


class FakeCaptioner:
    """Test double of the caption / VQA pipelines: fixed outputs, optionally with the domain check fields."""

    model = None

    def __init__(self, model=None, in_domain=None, domain_score=None):
        self.model, self.in_domain, self.domain_score = model, in_domain, domain_score

    def _extra(self):
        if self.in_domain is None:
            return {}  # an output from before the domain check: no such fields at all
        return {"in_domain": [self.in_domain], "domain_score": [self.domain_score]}

    def __call__(self, images, *args, **kwargs):
        from types import SimpleNamespace

        if args:  # VQA: (images, question)
            return SimpleNamespace(answers=["yes"], scores=[0.9], top_k=[[("yes", 0.9), ("no", 0.1)]], mode="match",
                                   **self._extra())
        return SimpleNamespace(captions=["a red car on a wet road"], scores=[0.75], **self._extra())


def test_caption_vqa_tab_shows_the_reason_when_its_model_is_missing(collection, monkeypatch, tmp_path):
    pipelines = pytest.importorskip("shusheng.uniperceiver.pipelines")
    from shusheng import weights

    # no bundled folder: the tab is there and says what is missing and how to make it
    monkeypatch.setattr(pipelines, "bundled_model_path", lambda name=pipelines.BUNDLED_MODEL: tmp_path / "none")
    reason = caption_tab.TAB.available()
    assert reason is not None and "shusheng-mini-uniperceiver" in reason and "has no config.json" in reason
    assert "shusheng train uniperceiver" in reason
    monkeypatch.setitem(weights.TRAIN_COMMANDS, pipelines.BUNDLED_MODEL, "shusheng train uniperceiver --x y")
    assert "Make its weights with: `shusheng train uniperceiver --x y`" in caption_tab.TAB.available()
    demo = build_demo(collection, PaletteEmbedder())
    assert _tab_labels(demo) == ["Search", "Caption & VQA", "Chat", "Detect", "Generate"]  # Chat: no bridge is bundled
    assert any("Caption & VQA is not available here" in t and "shusheng train uniperceiver --x y" in t
               for t in _markdown_texts(demo))
    # a BundledWeightsNotFound that names the command already is shown as it is, without a second hint
    def not_found(name=pipelines.BUNDLED_MODEL):
        raise weights.BundledWeightsNotFound("the bundled weights are missing; train them with: "
                                             "shusheng train uniperceiver --x y")

    monkeypatch.setattr(pipelines, "bundled_model_path", not_found)
    reason = caption_tab.TAB.available()
    assert reason.count("shusheng train uniperceiver --x y") == 1

    # the folder is there but the weights do not load: found while building, shown the same way
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(pipelines, "bundled_model_path", lambda name=pipelines.BUNDLED_MODEL: tmp_path / "model")
    assert caption_tab.TAB.available() is None

    def no_weights(cls, path=None, device="cpu"):
        raise FileNotFoundError("no model.safetensors in the bundled folder")

    monkeypatch.setattr(pipelines.CaptionPipeline, "from_pretrained", classmethod(no_weights))
    demo = build_demo(collection, PaletteEmbedder())
    assert _tab_labels(demo) == ["Search", "Caption & VQA", "Chat", "Detect", "Generate"]
    assert any("no model.safetensors" in t for t in _markdown_texts(demo))

    # weights that load: the real tab (Caption / Answer boxes), and Search only with extra_tabs=False
    monkeypatch.setattr(pipelines.CaptionPipeline, "from_pretrained", classmethod(lambda cls, **kw: FakeCaptioner()))
    monkeypatch.setattr(pipelines, "VQAPipeline", FakeCaptioner)
    demo = build_demo(collection, PaletteEmbedder())
    assert _tab_labels(demo) == ["Search", "Caption & VQA", "Chat", "Detect", "Generate"]
    labels = {block.label for block in demo.blocks.values() if isinstance(block, gr.Textbox)}
    assert {"Caption", "Question", "Answer"} <= labels
    assert not any("Caption & VQA is not available here" in t for t in _markdown_texts(demo))
    assert _tab_labels(build_demo(collection, PaletteEmbedder(), extra_tabs=False)) == ["Search"]


def test_domain_notice():
    from types import SimpleNamespace

    out = SimpleNamespace(in_domain=[True, False, None], domain_score=[0.91, 0.123, 0.5])
    assert caption_tab.domain_notice(out, 0) == ""
    notice = caption_tab.domain_notice(out, 1)
    assert "does not look like the driving scenes the bundled model was trained on" in notice
    assert "(domain score 0.12)" in notice and notice.endswith("the answer is unreliable.")
    assert caption_tab.domain_notice(out, 1, "caption").endswith("the caption is unreliable.")
    assert caption_tab.domain_notice(out, 2) == ""  # unknown: no notice
    assert caption_tab.domain_notice(SimpleNamespace(captions=["x"], scores=[0.5]), 0) == ""  # no domain check
    no_score = caption_tab.domain_notice(SimpleNamespace(in_domain=[np.bool_(False)]), 0)
    assert "does not look like" in no_score and "domain score" not in no_score
    assert caption_tab.domain_notice(SimpleNamespace(in_domain=[np.bool_(True)], domain_score=[0.9]), 0) == ""
    nan = caption_tab.domain_notice(SimpleNamespace(in_domain=[False], domain_score=[float("nan")]), 0)
    assert "does not look like" in nan and "domain score" not in nan
    tiny = caption_tab.domain_notice(SimpleNamespace(in_domain=[False], domain_score=[0.0000123]), 0)
    assert "(domain score 1.2e-05)" in tiny


def test_caption_vqa_tab_shows_the_out_of_domain_notice_next_to_the_answer():
    picture = solid("red")
    outside = FakeCaptioner(in_domain=False, domain_score=0.07)
    text, notice = caption_tab.caption_with_notice(outside, picture)
    assert text == "a red car on a wet road  (score 0.75)" and "(domain score 0.07)" in notice
    assert "caption is unreliable" in notice
    line, table, notice = caption_tab.answer_with_notice(outside, picture, "is it red?")
    assert line == "yes  (score 0.90)" and table == [["yes", 0.9], ["no", 0.1]] and "answer is unreliable" in notice
    inside = FakeCaptioner(in_domain=True, domain_score=0.8)
    assert caption_tab.caption_with_notice(inside, picture)[1] == ""
    assert caption_tab.answer_with_notice(inside, picture, "is it red?")[2] == ""
    before = FakeCaptioner()  # outputs without in_domain: no notice, same text
    assert caption_tab.caption_with_notice(before, picture) == ("a red car on a wet road  (score 0.75)", "")
    assert caption_tab.caption_image(outside, picture) == "a red car on a wet road  (score 0.75)"
    assert caption_tab.answer_question(outside, picture, "is it red?") == ("yes  (score 0.90)",
                                                                           [["yes", 0.9], ["no", 0.1]])
    assert caption_tab.answer_with_notice(outside, None, "is it red?") == ("Upload or pick an image first.", [], "")
    assert caption_tab.answer_with_notice(outside, picture, " ")[0].startswith("Type a question")

    # the tab's events fill the notice boxes (Markdown next to the caption and the answer)
    with gr.Blocks() as demo:
        caption_tab.caption_and_vqa_tab(outside, outside, samples=[picture])
    caption_fn, ask_fn = _fn(demo, "caption"), _fn(demo, "ask")
    assert "caption is unreliable" in caption_fn(picture, 1)[1]
    assert "answer is unreliable" in ask_fn(picture, "is it red?", "match")[2]
    notices = {block.elem_id for block in demo.blocks.values() if isinstance(block, gr.Markdown)}
    assert {"caption-notice", "answer-notice"} <= notices
    for block_fn in demo.fns.values():
        if block_fn.api_name in ("caption", "ask"):
            assert any(getattr(o, "elem_id", None) in notices for o in block_fn.outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations
def test_gradio_client_against_launched_app(collection):
    gradio_client = pytest.importorskip("gradio_client")
    demo = build_demo(collection, PaletteEmbedder(), extra_tabs=False)
    launch_demo(demo, port=_free_port())
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        client = gradio_client.Client(demo.local_url, verbose=False)
        gallery, status = client.predict("a yellow thing", None, 3, 0.2, "", api_name="/search")
        assert gallery and gallery[0]["caption"] == "score 1.00 · sub/yellow.png"
        assert Path(gallery[0]["image"]).is_file()  # the picture was downloaded from the app
        assert "result" in status
        with pytest.raises(gradio_client.exceptions.AppError, match="Type a text query"):
            client.predict("", None, 3, 0.2, "", api_name="/search")
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------- shusheng demo
def test_demo_command_generates_indexes_launches_and_is_incremental(tmp_path, monkeypatch, caplog):
    from shusheng.apps import demo as demo_cmd
    from shusheng.cli import main
    from shusheng.retrieval_index import embedders as emb_mod

    class Retrained(PaletteEmbedder):  # same name, other weights: the vectors of another colour order
        def embed_images(self, images, batch_size=32, progress=False):
            return super().embed_images(images)[:, ::-1].copy()

    launched = []
    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path / "cache"))
    monkeypatch.setattr(demo_cmd, "_serve_until_stopped", lambda demo: launched.append(demo.local_url))
    monkeypatch.setitem(emb_mod._EMBEDDERS, "test-palette", lambda checkpoint=None, device=None: PaletteEmbedder())
    argv = ["demo", "--n", "4", "--port", str(_free_port()), "--no-browser", "--embedder", "test-palette"]
    caplog.set_level("INFO")

    assert main(argv) == 0
    folder = tmp_path / "cache" / "demo" / "synthdrive-train-n4-128px"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert launched[-1].startswith("http://127.0.0.1:")
    assert "4 added" in caplog.text and "Shusheng demo ready" in caplog.text

    caplog.clear()
    assert main(argv) == 0  # second start: nothing generated, nothing embedded
    assert "generating" not in caplog.text and "0 added, 0 updated, 4 unchanged" in caplog.text

    caplog.clear()
    monkeypatch.setitem(emb_mod._EMBEDDERS, "test-palette", lambda checkpoint=None, device=None: Retrained())
    assert main(argv) == 0  # retrained weights: the sample collection is re-indexed
    assert "changed since" in caplog.text and "4 added" in caplog.text
    # the region boxes a --regions run would index: vehicles at least 12 px wide and high
    regions = demo_cmd.object_regions(folder)
    assert regions and all(min(b[2:]) >= demo_cmd.REGION_MIN_SIDE for boxes in regions.values() for b in boxes)


def test_demo_command_without_an_embedder_fails_clearly(tmp_path, monkeypatch, caplog):
    from shusheng.cli import main

    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path))
    assert main(["demo", "--no-browser", "--embedder", "no-such-embedder"]) == 1
    assert "cannot load the embedder 'no-such-embedder'" in caplog.text
    assert not (tmp_path / "demo").exists()  # failed before generating anything


def test_caption_vqa_tab_with_the_bundled_model_warns_on_a_photograph():
    """The real bundled decoder and its fitted check: a SynthDrive scene gets no notice, a photograph does, and an
    image the pipeline cannot use gets a message instead of a crash."""
    skimage_data = pytest.importorskip("skimage.data")
    from shusheng.data import TEST_SEED, load_image, sample
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline
    from shusheng.weights import BundledWeightsNotFound

    try:
        cap = CaptionPipeline.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    if cap.domain_check is None:
        pytest.skip("the bundled model has no domain check")
    vqa = VQAPipeline(cap.model, cap.domain_check)
    scene = sample(TEST_SEED, 0, 128)[0]
    photo = load_image(os.path.join(os.path.dirname(skimage_data.__file__), "astronaut.png"))
    assert caption_tab.caption_with_notice(cap, scene)[1] == ""
    assert "caption is unreliable" in caption_tab.caption_with_notice(cap, photo)[1]
    assert "answer is unreliable" in caption_tab.answer_with_notice(vqa, photo, "Is it raining?")[2]
    text, notice = caption_tab.caption_with_notice(cap, b"not an image")
    assert text.startswith("This image cannot be used") and notice == ""


def test_driving_checklist_button_shows_answers_with_their_boxes():
    """The real bundled decoder: six frame questions answered in their own answer sets, evidence boxes inside the
    image, a notice for a photograph, a message for an image the pipeline cannot use."""
    skimage_data = pytest.importorskip("skimage.data")
    from shusheng.data import TEST_SEED, load_image, sample
    from shusheng.uniperceiver.pipelines import VQAPipeline
    from shusheng.uniperceiver.pipelines.driving import DrivingChecklist
    from shusheng.weights import BundledWeightsNotFound

    try:
        vqa = VQAPipeline.from_pretrained()
    except BundledWeightsNotFound:
        pytest.skip("bundled shusheng-mini-uniperceiver not present")
    check = DrivingChecklist(vqa)
    scene = sample(TEST_SEED, 3, 128)[0]
    rows, annotated, notice = caption_tab.checklist_with_notice(check, scene)
    assert [r[0] for r in rows] == [q.question for q in check.frame_questions] and notice == ""
    for (_, answer, score, _), q in zip(rows, check.frame_questions):
        assert answer in q.answers and 0.0 <= score <= 1.0
    img, boxes = annotated
    assert img is scene and boxes
    for (x0, y0, x1, y1), label in boxes:
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and ": " in label
    photo = load_image(os.path.join(os.path.dirname(skimage_data.__file__), "astronaut.png"))
    assert "checklist is unreliable" in caption_tab.checklist_with_notice(check, photo)[2]
    rows, annotated, notice = caption_tab.checklist_with_notice(check, b"not an image")
    assert rows[0][0].startswith("This image cannot be used") and annotated is None
