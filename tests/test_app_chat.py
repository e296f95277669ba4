"""The Chat tab (shusheng/apps/tabs/chat.py): it builds, a message streams an answer into the history (multi-turn,
unsupported mentions in bold, the out-of-domain notice), Stop ends a running answer, a bad upload gets a message
and never reaches the model, without a trained bridge the tab says why and adds no API; the same through a
launched app (gradio_client), and once with a real (tiny, random) ChatPipeline.

Test doubles: a scripted chat pipeline (pieces, optionally slow between pieces, honouring the stop event) and a
fixed detector."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytest.importorskip("transformers")

from app_helpers import fn, hostile, session  # noqa: E402

from shusheng.apps.gradio_app import build_demo, launch_demo  # noqa: E402
from shusheng.apps.safety import AppLimits  # noqa: E402
from shusheng.apps.tabs import AppContext, chat, load_tabs  # noqa: E402
from shusheng.llm.pipelines import ChatDelta  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

PIECES = ("The light ", "is red", " and a blue bus ", "waits.")
ANSWER = "".join(PIECES)


class ScriptedChat:
    """Test double of ChatPipeline.stream: yields PIECES, waiting ``delay`` s between them unless stopped."""

    def __init__(self, delay: float = 0.0, in_domain: bool = False):
        self.delay, self.in_domain = delay, in_domain
        self.calls: list[tuple] = []

    def stream(self, images, questions, *, max_new_tokens=128, stop_event=None, **kwargs):
        assert all(isinstance(im, Image.Image) for row in images for im in row)  # decoded by the tab, never paths
        self.calls.append((images, questions))
        for k, piece in enumerate(PIECES):
            if k and stop_event is not None and stop_event.wait(self.delay):
                yield ChatDelta(0, "", "interrupted", None, self.in_domain, 0.03, 0.5, k)
                return
            yield ChatDelta(0, piece)
        yield ChatDelta(0, "", "eos", None, self.in_domain, 0.03, 0.9, len(PIECES) + 1)


class FixedDetector:
    def __init__(self):
        self.seen = 0

    def detect(self, image):
        self.seen += 1
        return [{"label": "red car"}, {"label": "light red"}, {"label": "crosswalk"}]


def scene() -> Image.Image:
    from shusheng.data import synthdrive as sd

    return sd.sample(sd.TEST_SEED, 0, 64)[0]


def build(pipe, limits: AppLimits | None = None, detector=None):
    with gr.Blocks() as demo:
        chat.chat_tab(pipe, samples=[scene()], ctx=AppContext(limits=limits or AppLimits()), detector=detector)
    return demo


def text_of(message) -> str:
    """A history message's text (the tab's plain string, or Gradio's ``[{"text", "type"}]`` through the API)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_a_message_streams_an_answer_into_the_history():
    pipe, detector = ScriptedChat(), FixedDetector()
    demo = build(pipe, detector=detector)
    public = {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}
    assert public == {"chat", "stop_chat"}
    respond = fn(demo, "chat")
    outs = list(respond(scene(), "What colour is the light?", [], []))
    # first the question with an empty answer, then the answer growing piece by piece, then the checked answer
    assert [text_of(m) for m in outs[0][0]] == ["What colour is the light?", ""] and outs[0][3] == ""
    growing = [text_of(o[0][-1]) for o in outs[1:-1]]
    assert growing == ["".join(PIECES[:k]) for k in range(1, len(PIECES) + 1)]
    history, conv, notice, box = outs[-1]
    final = text_of(history[-1])
    assert final.startswith(ANSWER) and "**blue bus**" in final and "Not seen in the image" in final
    assert "**red**" not in final  # the red light is seen
    assert conv == [{"role": "user", "content": "What colour is the light?"},
                    {"role": "assistant", "content": ANSWER}]  # the model reads the plain answer
    assert "does not look like the driving scenes" in notice and "(domain score 0.03)" in notice
    assert box == "" and detector.seen == 1
    # a second turn: the model gets the whole conversation about the same image
    outs2 = list(respond(scene(), "And the bus?", history, conv))
    images, questions = pipe.calls[-1]
    assert len(images) == 1 and len(images[0]) == 1
    assert [m["role"] for m in questions[0]] == ["user", "assistant", "user"] and questions[0][-1]["content"] == \
        "And the bus?"
    assert len(outs2[-1][0]) == 4 and len(outs2[-1][1]) == 4
    # New chat forgets it
    assert fn(demo, "clear_chat")() == ([], [], "")


def test_in_domain_answers_without_unsupported_mentions_have_no_notes():
    pipe = ScriptedChat(in_domain=True)
    history, conv, notice, _ = list(fn(build(pipe), "chat")(scene(), "Describe it.", [], []))[-1]
    assert text_of(history[-1]) == ANSWER and notice == ""  # no detector: nothing judged


def test_stop_ends_a_running_answer():
    pipe = ScriptedChat(delay=5.0)
    demo = build(pipe, detector=FixedDetector())
    gen = fn(demo, "chat")(scene(), "Describe the scene.", [], [])
    next(gen)  # the question
    first = next(gen)  # the first piece
    assert text_of(first[0][-1]) == PIECES[0]
    t0 = time.perf_counter()
    fn(demo, "stop_chat")()
    rest = list(gen)
    assert time.perf_counter() - t0 < 2.0
    history, conv, _, _ = rest[-1]
    assert text_of(history[-1]).startswith(PIECES[0].rstrip() + " *(stopped)*")
    assert conv[-1] == {"role": "assistant", "content": PIECES[0]}  # what was said stays in the conversation
    # the next message is answered in full
    assert text_of(list(fn(build(ScriptedChat()), "chat")(scene(), "Again?", [], []))[-1][0][-1]) == ANSWER


def test_stop_from_another_session_does_not_end_the_answer():
    pipe = ScriptedChat(delay=0.2)
    demo = build(pipe)
    me, other = session("me"), session("other")
    gen = fn(demo, "chat")(scene(), "Describe the scene.", [], [], me)
    next(gen)
    next(gen)
    fn(demo, "stop_chat")(other)
    assert text_of(list(gen)[-1][0][-1]) == ANSWER


def test_a_bad_upload_gets_a_message_and_never_reaches_the_model(tmp_path):
    pipe = ScriptedChat()
    respond = fn(build(pipe, limits=AppLimits(max_upload_pixels=50_000)), "chat")
    for name, path in hostile(tmp_path).items():
        outs = list(respond(os.fspath(path), "Is it raining?", [], []))
        assert len(outs) == 1, name
        history, conv, _, box = outs[0]
        assert text_of(history[-1]).startswith("Cannot use the image"), (name, history)
        assert conv == [] and box == "Is it raining?"  # the message stays in the box, to send again
    outs = list(respond(None, "Is it raining?", [], []))
    assert text_of(outs[-1][0][-1]) == "Upload or pick an image first."
    assert list(respond(scene(), "   ", [], []))[-1][2] == "Type a message first."
    assert pipe.calls == []
    good = tmp_path / "good.png"
    scene().save(good)
    assert text_of(list(respond(os.fspath(good), "Is it raining?", [], []))[-1][0][-1]) == ANSWER


def test_without_a_trained_bridge_the_tab_says_why_and_adds_no_api(monkeypatch, tmp_path):
    from shusheng import weights

    def missing(name):
        raise weights.BundledWeightsNotFound(f"{name} is missing")

    monkeypatch.setattr(weights, "bundled_path", missing)
    assert "Chat" in [t.title for t in load_tabs()]
    reason = chat.TAB.available()
    assert reason is not None and "shusheng train bridge" in reason and "shusheng-mini-bridge" in reason
    assert "shusheng demo --bridge" in reason
    other = chat.ChatTab(os.fspath(tmp_path / "nothing")).available()
    assert "not an LLM bridge folder" in other and "shusheng train bridge" in other

    demo = build_demo(None, None, tabs=[chat.TAB])
    texts = "\n".join(b.value or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown))
    assert "**Chat is not available here.**" in texts and "shusheng train bridge" in texts
    assert not [f for f in demo.fns.values() if f.api_visibility == "public"]
    # a folder that is there but does not load: found while building, shown the same way
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llm-bridge", "config": {"lm": "/nowhere"}}')
    tab = chat.ChatTab(os.fspath(tmp_path / "broken"))
    assert tab.available() is None
    demo = build_demo(None, None, tabs=[tab])
    texts = "\n".join(b.value or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown))
    assert "**Chat is not available here.**" in texts and "cannot be loaded" in texts


class ScriptedChatTab:
    title = "Chat"

    def __init__(self, pipe):
        self.pipe = pipe

    def available(self):
        return None

    def build(self, ctx):
        chat.chat_tab(self.pipe, samples=[scene()], ctx=ctx, detector=FixedDetector())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streaming_and_stop_through_a_launched_app(tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    pipe = ScriptedChat(delay=5.0)
    demo = build_demo(None, None, tabs=[ScriptedChatTab(pipe)], limits=AppLimits(concurrency=1))
    launch_demo(demo, port=_free_port())
    try:
        client = gradio_client.Client(demo.local_url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/chat", "/stop_chat"}
        good = tmp_path / "good.png"
        scene().save(good)
        job = client.submit(gradio_client.handle_file(os.fspath(good)), "Describe the scene.", [],
                            api_name="/chat")
        deadline = time.time() + 20
        while not any(o[0] and text_of(o[0][-1]) for o in job.outputs()) and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        client.predict(api_name="/stop_chat")  # with one worker busy: Stop is not queued behind the answer
        history, notice, box = job.result(timeout=20)
        assert time.perf_counter() - t0 < 4.0
        assert text_of(history[-1]).startswith(PIECES[0].rstrip() + " *(stopped)*")
        assert text_of(history[0]) == "Describe the scene." and box == ""
        assert len(pipe.calls) == 1 and isinstance(pipe.calls[0][0][0][0], Image.Image)
    finally:
        demo.close()


def test_the_tab_over_a_real_tiny_bridge(tmp_path):
    """The real ChatPipeline (random tiny bridge): the streamed answer is the pipeline's answer, over two turns."""
    from test_bench_llm_bridge import tiny_bridge

    from shusheng.llm import ChatPipeline

    bridge, _ = tiny_bridge(tmp_path)
    pipe = ChatPipeline.from_pretrained(bridge)
    with gr.Blocks() as demo:
        chat.chat_tab(pipe, samples=[scene()], max_new_tokens=10)
    respond, img = fn(demo, "chat"), scene()
    history, conv = [], []
    for question in ("Describe the scene.", "Is it raining?"):
        asked = conv + [{"role": "user", "content": question}]
        want = pipe([[img]], [asked], max_new_tokens=10).answers[0]
        history, conv, _, _ = list(respond(img, question, history, conv))[-1]
        shown = text_of(history[-1])
        assert shown == (want.strip() or "*(no answer)*"), (shown, want)
        if want.strip():
            assert conv[-1] == {"role": "assistant", "content": want}


class MeanColourEmbedder:
    name, dim = "test-mean-colour", 3

    def embed_images(self, images, batch_size=32, progress=False):
        from shusheng.data import load_image

        out = np.stack([np.asarray(load_image(im), np.float32).mean((0, 1)) + 1 for im in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_texts(self, texts, batch_size=64):
        return np.full((len(texts), self.dim), 3 ** -0.5, np.float32)


def test_demo_bridge_option_puts_that_folder_in_the_chat_tab(tmp_path, monkeypatch, caplog):
    from shusheng.apps import gradio_app
    from shusheng.cli import main
    from shusheng.retrieval_index import embedders as emb_mod

    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path / "cache"))
    assert main(["demo", "--no-browser", "--bridge", os.fspath(tmp_path / "none")]) == 2
    assert "not an LLM bridge folder" in caplog.text
    assert not (tmp_path / "cache" / "demo").exists()  # refused before generating anything

    bridge = tmp_path / "bridge"
    bridge.mkdir()
    (bridge / "config.json").write_text("{}")
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
        main(["demo", "--no-browser", "--n", "2", "--embedder", "test-mean-colour", "--bridge", os.fspath(bridge)])
    titles = [t.title for t in built["tabs"]]
    assert titles == [t.title for t in load_tabs()]
    tab = built["tabs"][titles.index("Chat")]
    assert isinstance(tab, chat.ChatTab) and tab.bridge == os.fspath(bridge) and tab.available() is None
