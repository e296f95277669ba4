"""The app is safe to share on a network: every refusal of issue 20, tried through ``gradio_client`` (and raw HTTP
where the client itself would refuse first) against apps served on 127.0.0.1.

* access: ``shusheng demo --host 0.0.0.0`` without a password refuses to start; the login page keeps out
  clients without (or with wrong) credentials;
* folders: only the allowed folders are indexed (outside, ``..``, symbolic links that lead out are refused and
  nothing is written); indexes of folders the app does not own go under the index root;
* uploads: decompression bombs, too many pixels, truncated files, non-images, too large files, server paths and
  URLs are refused with a message in every tab (search, caption, ask), and never reach a model;
* API names, queue limits, per-request time limit; a failing request does not affect the others;
* checkpoints are never unpickled as arbitrary objects.

Test doubles: a mean-colour embedder (slow on request) and a recording captioner; a few tiny generated images.
"""

from __future__ import annotations

import ast
import base64
import io
import os
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("faiss")

from shusheng.apps import safety  # noqa: E402
from shusheng.apps.gradio_app import build_demo, launch_demo  # noqa: E402
from shusheng.apps.safety import AppLimits, FolderPolicy, InsecureLaunchError, UserInputError  # noqa: E402
from shusheng.apps.tabs import caption_vqa, load_tabs  # noqa: E402
from shusheng.retrieval_index import index_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations

USER, PASSWORD = "alice", "correct horse battery"
LIMITS = AppLimits(max_upload_bytes=300_000, max_upload_pixels=1_000_000, request_timeout=30.0)


# ---------------------------------------------------------------------------------------------------- doubles
class MeanColourEmbedder:
    """Test double: an image's vector is its mean colour (+ a constant); a text's favours the colours it names.
    A text containing "slow" takes ``delay`` seconds."""

    name = "test-mean-colour"
    dim = 4
    _WORDS = {"red": 0, "green": 1, "blue": 2}

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def embed_images(self, images, batch_size=32, progress=False):
        from shusheng.data import load_image

        rows = [np.append(np.asarray(load_image(im), np.float32).mean((0, 1)) / 255, 0.3) for im in images]
        out = np.stack(rows).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_texts(self, texts, batch_size=64):
        if any("slow" in t for t in texts):
            time.sleep(self.delay)
        out = np.full((len(texts), self.dim), 0.1, np.float32)
        for i, text in enumerate(texts):
            for word, j in self._WORDS.items():
                out[i, j] += float(word in text.lower())
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class RecordingCaptioner:
    """Test double of the caption and VQA pipelines: records the images it is given (all must be decoded)."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images, *args, **kwargs):
        assert all(isinstance(im, Image.Image) for im in images)
        self.seen += [im.size for im in images]
        if args:
            return SimpleNamespace(answers=["yes"], scores=[0.9], top_k=[[("yes", 0.9), ("no", 0.1)]])
        return SimpleNamespace(captions=["a red car"], scores=[0.8])


class FakeCaptionTab:
    title = "Caption & VQA"

    def __init__(self, captioner):
        self.captioner = captioner

    def available(self):
        return None

    def build(self, ctx):
        caption_vqa.caption_and_vqa_tab(self.captioner, self.captioner, samples=[Image.new("RGB", (8, 8))], ctx=ctx)


# ---------------------------------------------------------------------------------------------------- hostile files
def png_bytes(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of zeros: tiny on disk, ``width * height`` pixels when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body + z.flush()) + chunk(b"IEND", b""))


def hostile_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"bomb": folder / "bomb.png", "pixels": folder / "pixels.png", "truncated": folder / "truncated.jpg",
             "text": folder / "notes.png", "good": folder / "good.png"}
    files["bomb"].write_bytes(png_bytes(30000, 30000))  # 900 Mpx in ~110 kB: Pillow's own bomb limit
    files["pixels"].write_bytes(png_bytes(2000, 1000))  # 2 Mpx: above LIMITS, below Pillow's limit
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])  # header intact, data cut
    files["text"].write_text("these are my notes, not a picture\n")
    Image.new("RGB", (40, 30), (220, 30, 30)).save(files["good"])
    return files


# ---------------------------------------------------------------------------------------------------- the app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """An app with a password, one allowed folder (holding symbolic links that lead out) and small upload limits,
    served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("site")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(allowed / "red.png")
    Image.new("RGB", (40, 30), (30, 200, 30)).save(allowed / "green.png")
    Image.new("RGB", (40, 30), (30, 30, 220)).save(outside / "secret.png")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    (allowed / "leak.png").symlink_to(outside / "secret.png")
    captioner = RecordingCaptioner()
    demo = build_demo(None, MeanColourEmbedder(), allow_dirs=[allowed], index_root=root / "indexes",
                      tabs=[load_tabs()[0], FakeCaptionTab(captioner)], limits=LIMITS)
    url = launch_demo(demo, port=_free_port(), auth=[(USER, PASSWORD)])
    client = gradio_client.Client(url, auth=(USER, PASSWORD), verbose=False)
    yield SimpleNamespace(url=url, demo=demo, client=client, root=root, allowed=allowed, outside=outside,
                          index_root=root / "indexes", captioner=captioner,
                          files=hostile_files(tmp_path_factory.mktemp("uploads")))
    demo.close()
    demo.search_app.close()


def _tree(folder: Path) -> list[str]:
    return sorted(os.fspath(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _raw_session(url: str) -> httpx.Client:
    """An HTTP session logged in as USER (the way the browser's login page does it)."""
    session = httpx.Client(base_url=url, timeout=30)
    assert session.post("login", data={"username": USER, "password": PASSWORD}).status_code == 200
    return session


def _raw_call(session: httpx.Client, api_name: str, data: list) -> str:
    """Calls an event over the plain HTTP API; returns the server-sent events as text."""
    event_id = session.post(f"gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
    return session.get(f"gradio_api/call/{api_name}/{event_id}").text


# ---------------------------------------------------------------------------------------------------- access
def test_demo_refuses_to_serve_beyond_loopback_without_a_password(tmp_path, monkeypatch, caplog):
    from shusheng.cli import main

    monkeypatch.setenv("SHUSHENG_CACHE_DIR", os.fspath(tmp_path / "cache"))
    monkeypatch.delenv(safety.AUTH_ENV, raising=False)
    assert main(["demo", "--host", "0.0.0.0", "--no-browser"]) == 2
    assert "refusing to serve on 0.0.0.0 without a password" in caplog.text
    assert "--auth USER:PASSWORD, --auth-file FILE" in caplog.text and "--insecure-no-auth" in caplog.text
    assert not (tmp_path / "cache").exists()  # refused before anything was generated or indexed
    caplog.clear()
    assert main(["demo", "--host", "0.0.0.0", "--auth", "alice", "--no-browser"]) == 2
    assert "--auth must be USER:PASSWORD" in caplog.text
    caplog.clear()
    monkeypatch.setenv(safety.AUTH_ENV, "alice:")
    assert main(["demo", "--host", "0.0.0.0", "--no-browser"]) == 2
    assert f"${safety.AUTH_ENV} must be USER:PASSWORD" in caplog.text


def test_exposure_rules_and_credentials(tmp_path, caplog):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", None):
        safety.check_exposure(host, [])  # loopback: no password needed
    for host in ("0.0.0.0", "::", "192.168.1.5", "my-laptop.local", ""):
        with pytest.raises(InsecureLaunchError, match="refusing to serve"):
            safety.check_exposure(host, [])
        safety.check_exposure(host, [("a", "b")])
    caplog.set_level("WARNING")
    safety.check_exposure("0.0.0.0", [], insecure_no_auth=True)
    assert "WITHOUT a password (--insecure-no-auth)" in caplog.text

    auth_file = tmp_path / "auth"
    auth_file.write_text("# accounts\nalice:pa:ss:word\n\nbob:hunter2\n")
    auth_file.chmod(0o600)
    assert safety.resolve_auth(["carol:x"], auth_file, environ={}) == [("carol", "x"), ("alice", "pa:ss:word"),
                                                                       ("bob", "hunter2")]
    assert safety.resolve_auth(environ={safety.AUTH_ENV: "dave:y"}) == [("dave", "y")]
    assert safety.resolve_auth(["carol:x"], environ={safety.AUTH_ENV: "dave:y"}) == [("carol", "x")]
    assert safety.resolve_auth(environ={}) == []
    auth_file.write_text("no colon here\n")
    with pytest.raises(ValueError, match="line 1 of --auth-file"):
        safety.read_auth_file(auth_file)
    with pytest.raises(ValueError, match="cannot read --auth-file"):
        safety.read_auth_file(tmp_path / "missing")


def test_login_is_required(site):
    with pytest.raises(gradio_client.exceptions.AuthenticationError, match="credentials were not provided"):
        gradio_client.Client(site.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        gradio_client.Client(site.url, auth=(USER, "wrong password"), verbose=False)
    anonymous = httpx.Client(base_url=site.url, timeout=30)
    assert anonymous.get("config").status_code == 401
    assert anonymous.post("gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
    assert anonymous.post("gradio_api/call/search", json={"data": ["red", None, 3, 0, ""]}).status_code == 401
    assert anonymous.post("login", data={"username": USER, "password": "nope"}).status_code == 400
    # the right account gets in
    good = gradio_client.handle_file(os.fspath(site.files["good"]))
    assert site.client.predict(good, 1, api_name="/caption")[0] == "a red car  (score 0.80)"


def test_api_names_are_meaningful(site):
    public = {f.api_name for f in site.demo.fns.values() if f.api_visibility == "public"}
    assert public == {"search", "index_folder", "caption", "ask"}
    endpoints = site.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/search", "/index_folder", "/caption", "/ask"}


# ---------------------------------------------------------------------------------------------------- folders
def test_index_folder_refuses_everything_outside_the_allowed_folders(site):
    allowed, outside = site.allowed, site.outside
    before = (_tree(outside), _tree(allowed))
    refusals = {
        "/etc": "it is outside the folders this app may index",
        os.fspath(outside): "it is outside the folders this app may index",
        f"{allowed}/../outside": "'..' leads outside the folders this app may index",
        f"{allowed}/../..": "'..' leads outside the folders this app may index",
        os.fspath(allowed / "escape"): "a symbolic link leads outside the folders this app may index",
        os.fspath(allowed / "escape" / "deeper"): "a symbolic link leads outside the folders this app may index",
        "allowed": "Give the folder as an absolute path",
        "": "Enter the folder of images to index",
    }
    for folder, message in refusals.items():
        with pytest.raises(gradio_client.exceptions.AppError, match=message) as err:
            site.client.predict(folder, api_name="/index_folder")
        if folder.startswith("/"):
            assert f"Refused {folder}:" in str(err.value) and "Nothing was indexed" in str(err.value)
    # a refusal says nothing about what exists outside: a missing path out there gets the same answer
    with pytest.raises(gradio_client.exceptions.AppError, match="outside the folders this app may index"):
        site.client.predict("/no/such/folder", api_name="/index_folder")
    assert (_tree(outside), _tree(allowed)) == before  # nothing written anywhere
    assert not Path("/etc/.shusheng-index").exists() and _tree(site.index_root) == []

    # the allowed folder itself: indexed into the index root; the links that lead out are skipped, not followed
    report, info = site.client.predict(os.fspath(allowed), api_name="/index_folder")
    assert "**2 added**" in report and "2 images" in info
    assert "`escape`: symbolic link leads outside the allowed folders" in report
    assert "`leak.png`: symbolic link leads outside the allowed folders" in report
    assert (_tree(outside), _tree(allowed)) == before
    assert len(list(site.index_root.iterdir())) == 1 and f"Index: `{site.index_root}/allowed-" in report
    gallery, _ = site.client.predict("blue", None, 10, -1.0, "", api_name="/search")
    assert sorted(item["caption"].split(" · ")[1] for item in gallery) == ["green.png", "red.png"]


def test_where_indexes_go(tmp_path):
    mine, generated, indexed, other = (tmp_path / n for n in ("mine", "generated", "indexed", "other"))
    for d in (mine, generated, indexed, other):
        d.mkdir()
        Image.new("RGB", (20, 20), (200, 30, 30)).save(d / "a.png")
    index_folder(indexed, embedder=MeanColourEmbedder(), progress=False, workers=1)  # made by `shusheng index`
    if os.getuid() == 0:
        os.chown(other, 4321, 4321)  # a folder of another user
    else:
        other.chmod(0o555)  # a read-only folder
    policy = FolderPolicy([tmp_path], tmp_path / "indexes", owned=[generated])
    assert policy.index_path_for(generated) == generated / ".shusheng-index"  # the app made it
    assert policy.index_path_for(indexed) == indexed / ".shusheng-index"  # already holds one
    for folder in (mine, other):
        path = policy.index_path_for(folder)
        assert path.parent == tmp_path / "indexes" and path.name.startswith(f"{folder.name}-")
    assert policy.index_path_for(mine) != FolderPolicy([tmp_path], tmp_path / "indexes").index_path_for(other)
    asked = FolderPolicy([tmp_path], tmp_path / "indexes", index_in_folder=True)
    assert asked.index_path_for(mine) == mine / ".shusheng-index"
    assert asked.index_path_for(other).parent == tmp_path / "indexes"  # never into a foreign/read-only folder

    demo = build_demo(None, MeanColourEmbedder(), extra_tabs=False, policy=policy, limits=LIMITS)
    report, _ = demo.search_app.index_folder(os.fspath(other))
    assert "**1 added**" in report and _tree(other) == ["a.png"]
    demo.search_app.close()


# ---------------------------------------------------------------------------------------------------- uploads
UPLOAD_REFUSALS = {
    "bomb": "decompression bomb refused by Pillow",
    "pixels": "2000x1000 = 2,000,000 pixels exceeds the app's upload limit of 1,000,000 (possible decompression "
              "bomb)",
    "truncated": "truncated image data",
    "text": "not a recognised image format (corrupt or not an image)",
}


def test_hostile_uploads_get_a_message_in_every_tab(site):
    client, files = site.client, site.files
    seen_before = len(site.captioner.seen)
    for kind, reason in UPLOAD_REFUSALS.items():
        upload = gradio_client.handle_file(os.fspath(files[kind]))
        with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(f"Cannot use the query image: {reason}")):
            client.predict("", upload, 3, 0.0, "", api_name="/search")
        caption, notice = client.predict(upload, 1, api_name="/caption")
        assert caption.startswith(f"Cannot use the image: {reason}") and notice == ""
        answer, _, notice = client.predict(upload, "is it red?", "match", api_name="/ask")
        assert answer.startswith(f"Cannot use the image: {reason}") and notice == ""
    assert len(site.captioner.seen) == seen_before  # no bad file reached the model
    # the same tabs still work on a good picture
    good = gradio_client.handle_file(os.fspath(files["good"]))
    assert client.predict(good, 1, api_name="/caption")[0] == "a red car  (score 0.80)"
    assert client.predict(good, "is it red?", "match", api_name="/ask")[0] == "yes  (score 0.90)"
    assert site.captioner.seen[-2:] == [(40, 30), (40, 30)]


def test_oversized_uploads_are_refused_before_reading(site, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(LIMITS.max_upload_bytes + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {LIMITS.max_upload_bytes} bytes"):
        site.client.predict("", gradio_client.handle_file(os.fspath(big)), 3, 0.0, "", api_name="/search")
    session = _raw_session(site.url)  # past the client's own check: Gradio's upload route refuses it too
    response = session.post("gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert response.status_code == 413 and "File size exceeded" in response.text
    # and the app checks the size again before reading a file (defence in depth)
    with pytest.raises(UserInputError, match="Cannot use the image: the file is 0.3 MB; uploads are limited to"):
        safety.load_upload(big, LIMITS)


def test_server_paths_urls_and_data_urls_are_not_taken_as_uploads(site):
    session = _raw_session(site.url)
    meta = {"_type": "gradio.FileData"}
    events = _raw_call(session, "search", ["", {"path": "/etc/hostname", "meta": meta}, 3, 0.0, ""])
    assert "event: error" in events and "hostname" not in events  # Gradio: not uploaded by a user
    url = "http://example.com/picture.png"
    events = _raw_call(session, "caption", [{"path": url, "url": url, "meta": meta}, 1])
    assert "event: error" in events and "this app does not fetch URLs" in events
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(30000, 30000)).decode()
    events = _raw_call(session, "search", ["", {"path": None, "url": data_url, "meta": meta}, 3, 0.0, ""])
    assert "Cannot use the query image: decompression bomb refused by Pillow" in events


# ---------------------------------------------------------------------------------------------------- load
def test_a_failing_request_does_not_affect_the_others(site):
    client, bomb = site.client, gradio_client.handle_file(os.fspath(site.files["bomb"]))
    client.predict(os.fspath(site.allowed), api_name="/index_folder")  # an index to search (no-op if it exists)
    with ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(client.predict, "", bomb, 3, -1.0, "", api_name="/search") for _ in range(3)]
        good = [pool.submit(client.predict, "green", None, 3, -1.0, "", api_name="/search") for _ in range(3)]
        for future in bad:
            with pytest.raises(gradio_client.exceptions.AppError, match="decompression bomb"):
                future.result(timeout=60)
        for future in good:
            gallery, status = future.result(timeout=60)
            assert "result" in status


def test_queue_is_bounded_and_requests_time_out(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(folder / "red.png")
    embedder = MeanColourEmbedder(delay=1.2)
    index_folder(folder, embedder=embedder, progress=False, workers=1)
    limits = AppLimits(request_timeout=0.6, concurrency=1, queue_size=1)
    demo = build_demo(folder, embedder, extra_tabs=False, limits=limits)
    url = launch_demo(demo, port=_free_port())
    try:
        client = gradio_client.Client(url, verbose=False)
        t0 = time.perf_counter()
        with pytest.raises(gradio_client.exceptions.AppError, match="Search took longer than 0.6 s and was given up"):
            client.predict("slow red", None, 3, -1.0, "", api_name="/search")
        assert time.perf_counter() - t0 < 1.2  # the user is answered at the limit, not when the work ends
        # one running, one waiting: the rest are turned away at once
        jobs = [client.submit("slow red", None, 3, -1.0, "", api_name="/search") for _ in range(4)]
        errors = []
        for job in jobs:
            try:
                job.result(timeout=30)
            except Exception as e:  # noqa: BLE001 - collected and checked below
                errors.append(str(e))
        assert sum("Queue is full" in e for e in errors) >= 2, errors
        assert all("Queue is full" in e or "took longer than" in e for e in errors), errors
        time.sleep(embedder.delay)  # the abandoned work finishes in the background
        gallery, status = client.predict("red", None, 3, -1.0, "", api_name="/search")  # the app still answers
        assert gallery and "1 result" in status
    finally:
        demo.close()
        demo.search_app.close()


def test_indexing_stops_at_its_time_limit_and_continues(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 30, 30)).save(folder / f"{i}.png")
    demo = build_demo(None, MeanColourEmbedder(), extra_tabs=False, allow_dirs=[folder],
                      index_root=tmp_path / "indexes")
    app = demo.search_app
    report, _ = app.index_folder(os.fspath(folder), deadline=time.monotonic())  # already due: nothing started
    assert "**0 added**" in report and "**Not finished:** stopped at the time limit: 6 of 6 files" in report
    report, _ = app.index_folder(os.fspath(folder))
    assert "**6 added**" in report and "Not finished" not in report
    app.close()


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_no_checkpoint_is_unpickled_as_arbitrary_objects():
    """Every ``torch.load`` in shusheng passes ``weights_only`` (True, or a caller's choice that defaults to True),
    and nothing registers objects with accelerate (which unpickles them with ``weights_only=False``)."""
    root = Path(__file__).resolve().parents[1] / "shusheng"
    offenders = []
    for file in root.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("register_for_checkpointing"):
                offenders.append(f"{file.relative_to(root)}:{node.lineno} {name}")
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("weights_only")
                if value is None or (isinstance(value, ast.Constant) and value.value is not True):
                    offenders.append(f"{file.relative_to(root)}:{node.lineno} torch.load without weights_only=True")
    assert offenders == []


def test_ema_checkpoint_round_trip_and_pickles_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from shusheng.train.classify import EMA_FILE, load_ema, save_ema

    ema = torch.nn.Linear(3, 2)
    save_ema(ema, tmp_path)
    assert (tmp_path / EMA_FILE).is_file()
    restored = torch.nn.Linear(3, 2)
    load_ema(restored, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), restored.state_dict().values()))

    class Payload:  # what a hostile checkpoint holds: an object whose unpickling runs code
        def __reduce__(self):
            return (threading.Event, ())

    old = tmp_path / "old"
    old.mkdir()
    torch.save({"weight": Payload()}, old / "custom_checkpoint_0.pkl")  # the file accelerate used to write
    with pytest.raises(Exception, match="Weights only load failed"):
        load_ema(restored, old)
    with pytest.raises(FileNotFoundError, match="has no EMA weights"):
        load_ema(restored, tmp_path / "missing")
