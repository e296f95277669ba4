"""The Search tab driven in a real headless Chromium (Playwright + Debian's /usr/bin/chromium).

Opt-in: ``python -m pytest -q -m browser``. Skipped unless ``playwright`` is installed and ``/usr/bin/chromium``
exists (``apt-get install chromium``; never ``playwright install``, which downloads a browser). The app runs
in-process on 127.0.0.1 over a few generated SynthDrive scenes, with the bundled ``shusheng-mini-clip``
embedder when its weights are in the tree, else a deterministic colour embedder (a test double). A second app,
with a password, is signed in to through its login page.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # gradio's own pandas deprecations
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
pytest.importorskip("gradio")
pytest.importorskip("faiss")


class MeanColourEmbedder:
    """Test double: an image's vector is its mean RGB plus a constant (so every cosine is positive); a text's
    vector favours red, green or blue when it names them."""

    name = "test-mean-colour"
    dim = 4
    _WORDS = {"red": 0, "green": 1, "blue": 2}

    def embed_images(self, images, batch_size=32, progress=False):
        from shusheng.data import load_image

        rows = [np.append(np.asarray(load_image(im), np.float32).mean((0, 1)) / 255, 0.5) for im in images]
        out = np.stack(rows).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_texts(self, texts, batch_size=64):
        out = np.full((len(texts), self.dim), 0.2, np.float32)
        for i, text in enumerate(texts):
            for word, j in self._WORDS.items():
                if word in text.lower():
                    out[i, j] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _embedder():
    """The bundled embedder when its weights exist, else the test double."""
    from shusheng.retrieval_index import create_embedder

    try:
        return create_embedder("shusheng-mini-clip")
    except (FileNotFoundError, ImportError):  # BundledWeightsNotFound: not trained into this tree yet
        return MeanColourEmbedder()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from shusheng.apps.gradio_app import build_demo, launch_demo
    from shusheng.data import synthdrive as sd
    from shusheng.retrieval_index import index_folder

    folder = tmp_path_factory.mktemp("scenes")
    sd.generate(folder, 12, sd.TRAIN_SEED, 128, masks=False, progress=False)
    embedder = _embedder()
    report = index_folder(folder, embedder=embedder, progress=False, workers=1)
    assert report.added == 12
    demo = build_demo(folder, embedder, examples=["a red car"], threshold=-1.0,
                      allow_dirs=[tmp_path_factory.getbasetemp()], index_root=tmp_path_factory.mktemp("indexes"))
    launch_demo(demo, port=_free_port())
    assert demo.local_url.startswith("http://127.0.0.1:")
    yield demo.local_url
    demo.close()
    demo.search_app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(app_url, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)  # generous: CI machines share their cores with other jobs
    sync_api.expect.set_options(timeout=60_000)
    page.goto(app_url)
    yield page
    page.close()


def test_text_query_fills_the_gallery_with_scored_results(page, tmp_path):
    query = page.locator("#query-text textarea")
    query.wait_for()
    query.fill("a red car on a rainy street")
    page.locator("#search-button").click()

    items = page.locator("#results-gallery .thumbnail-item")
    items.first.wait_for()
    sync_api.expect(page.locator("#status")).to_contain_text("results for “a red car on a rainy street”")
    assert items.count() >= 1
    captions = page.locator("#results-gallery .caption-label").all_inner_texts()
    assert captions and all(re.fullmatch(r"score -?\d\.\d\d · images/\d{6}\.png.*", c) for c in captions), captions
    scores = [float(c.split(" ")[1]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    # the thumbnails are real pictures served by the app
    first = page.locator("#results-gallery img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
    page.screenshot(path=tmp_path / "app_search.png", full_page=True)
    assert (tmp_path / "app_search.png").stat().st_size > 10_000


def test_empty_query_shows_an_error_not_a_traceback(page):
    page.locator("#query-text textarea").fill("")
    page.locator("#search-button").click()
    toast = page.get_by_text("Type a text query or upload a query image")
    toast.first.wait_for()
    assert "Traceback" not in page.content()


def test_index_folder_button_reports_and_switches_index(page, tmp_path):
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 30), (30, 30, 220)).save(folder / "blue.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    page.locator("#folder textarea").fill(os.fspath(folder))
    page.locator("#index-button").click()
    report = page.locator("#index-report")
    sync_api.expect(report).to_contain_text("2 added")
    sync_api.expect(report).to_contain_text("broken.png")
    sync_api.expect(page.locator("#index-info")).to_contain_text("2 images")

    page.locator("#query-text textarea").fill("something red")
    page.locator("#query-text textarea").press("Enter")  # Enter searches too
    sync_api.expect(page.locator("#status")).to_contain_text("results for “something red”")
    captions = page.locator("#results-gallery .caption-label").all_inner_texts()
    assert len(captions) == 2 and all(c.split(" · ")[1] in {"red.png", "blue.jpg"} for c in captions), captions


def test_an_uploaded_file_that_is_not_an_image_gets_a_message(page, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    page.locator("#query-text textarea").fill("")
    page.locator("#query-image input[type=file]").set_input_files(os.fspath(notes))
    page.locator("#search-button").click()
    page.get_by_text("Cannot use the query image: not a recognised image format").first.wait_for()
    assert "Traceback" not in page.content()


@pytest.fixture(scope="module")
def signed_in_app(tmp_path_factory):
    """The app with a password on 127.0.0.1: ``(url, user, password)``."""
    from PIL import Image

    from shusheng.apps.gradio_app import build_demo, launch_demo
    from shusheng.retrieval_index import index_folder

    folder = tmp_path_factory.mktemp("private")
    Image.new("RGB", (40, 30), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 30), (30, 30, 220)).save(folder / "blue.png")
    embedder = MeanColourEmbedder()
    index_folder(folder, embedder=embedder, progress=False, workers=1)
    demo = build_demo(folder, embedder, extra_tabs=False, threshold=-1.0)
    user, password = "alice", "a long passphrase"
    url = launch_demo(demo, port=_free_port(), auth=[(user, password)])
    yield url, user, password
    demo.close()
    demo.search_app.close()


def test_login_page_keeps_out_a_wrong_password_and_lets_the_right_one_in(signed_in_app, browser):
    url, user, password = signed_in_app
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # its own cookies
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_text("sign in with the account the operator gave you").wait_for()
        assert page.locator("#query-text").count() == 0  # nothing of the app before signing in
        page.locator("input[type=text]").fill(user)
        page.locator("input[type=password]").fill("wrong password")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for()
        assert page.locator("#query-text").count() == 0

        page.locator("input[type=text]").fill(user)
        page.locator("input[type=password]").fill(password)
        page.get_by_role("button", name="Login").click()
        query = page.locator("#query-text textarea")
        query.wait_for()
        query.fill("something red")
        page.locator("#search-button").click()
        sync_api.expect(page.locator("#status")).to_contain_text("2 results for “something red”")
        captions = page.locator("#results-gallery .caption-label").all_inner_texts()
        assert captions[0].endswith("· red.png"), captions
    finally:
        context.close()


def test_caption_tab_captions_a_picked_sample(page):
    page.locator("#query-text textarea").wait_for()  # the page has loaded
    if page.get_by_role("tab", name="Caption & VQA").count() == 0:
        pytest.skip("no Caption & VQA tab")
    page.get_by_role("tab", name="Caption & VQA").click()
    if page.get_by_text("Caption & VQA is not available here").count():
        pytest.skip("the bundled captioning model is not in this tree")
    page.locator("#cv-samples .thumbnail-item").first.click()  # a sample scene into the image box
    page.locator("#cv-image img").first.wait_for()
    page.locator("#caption-button").click()
    sync_api.expect(page.locator("#caption textarea")).to_have_value(re.compile(r".+\(score \d\.\d\d\)$"))
    page.get_by_role("tab", name="Search").click()
