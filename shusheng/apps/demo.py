"""``shusheng demo``: the Gradio app (:mod:`shusheng.apps.gradio_app`) over a sample collection, in one command
(registered in :mod:`shusheng.cli`).

Examples::

    shusheng demo                                  # http://127.0.0.1:7860, 300 SynthDrive scenes, bundled embedder
    shusheng demo --n 60 --port 7861 --no-browser
    shusheng demo --collection ~/Pictures          # search your own folder instead
    shusheng demo --checkpoint runs/clip/final     # another save_pretrained folder of shusheng-mini-clip
    shusheng demo --bridge runs/bridge/final       # the Chat tab with a bridge trained by shusheng train bridge
    shusheng demo --t2i runs/t2i/final             # the Generate tab with a model trained by shusheng train t2i
    shusheng demo --detector runs/det/maskrcnn/final   # the Detect tab with a detector of shusheng train detect

First run: renders ``--n`` SynthDrive scenes (train split, seed 0, 128 px, the embedder's training resolution)
into the cache folder ``$SHUSHENG_CACHE_DIR/demo/`` (default ``~/.cache/shusheng/demo/``) and indexes them with the
bundled ``shusheng-mini-clip`` embedder (with ``--regions``, also the larger vehicles of each scene, from the
scenes' ground-truth boxes, as region entries of their own, so that a query like "a red car" can return the
car's box). Later runs find the scenes and the index as they were (indexing is
incremental: nothing is embedded again) and start in seconds. If the embedder's weights changed since the index
was built (a retrained model), the demo notices and re-indexes its sample collection.

The app is served on 127.0.0.1 only, unless ``--host`` says otherwise; serving beyond loopback needs a password
(``--auth USER:PASSWORD``, ``--auth-file FILE`` or ``$SHUSHENG_DEMO_AUTH``) or an explicit ``--insecure-no-auth``.
The app indexes and searches only the collection and the ``--allow-dir`` folders; indexes of folders it did not
generate go under ``--index-root`` (the user's cache) unless the folder already holds one or ``--index-in-folder``
asks for it. Uploads, request times and the queue are bounded (:mod:`shusheng.apps.safety`); Gradio's analytics
are off.

    shusheng demo --host 0.0.0.0 --auth-file ~/.config/shusheng-auth --allow-dir /data/photos
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from shusheng.apps.safety import AUTH_ENV, AppLimits, cache_root

logger = logging.getLogger(__name__)

__all__ = ["EXAMPLE_QUERIES", "add_arguments", "cache_root", "object_regions", "run", "sample_collection"]

#: Example text queries shown in the demo (words of SynthDrive captions).
EXAMPLE_QUERIES = (
    "a red car",
    "a rainy street at night",
    "people crossing the road at a zebra crossing",
    "a bus in the fog",
    "a stop sign",
    "a green traffic light",
)
SAMPLE_SIZE = 128  # px: the resolution shusheng-mini-clip is trained at
_MARKER = ".complete.json"  # written once a sample collection is fully generated
_PROBE_FILE = ".shusheng-demo.json"  # the embedder fingerprint the collection's index was built with
_PROBE_TOL = 1e-4
#: Objects of the sample scenes indexed as regions (boxes) of their own, when at least this many pixels wide/high.
REGION_CATEGORIES = ("car", "truck", "bus")
REGION_MIN_SIDE = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Launch the Shusheng app (image-text search) on a sample collection: SynthDrive scenes "
                          "generated and indexed on first run, instant on later runs.")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--collection", metavar="DIR",
                        help="folder of images to search instead of the sample collection (generated into DIR "
                             "when DIR is missing or empty)")
    parser.add_argument("--n", type=int, default=300, help="number of sample scenes (default 300)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    parser.add_argument("--embedder", default="shusheng-mini-clip",
                        help="embedder name (default: the bundled shusheng-mini-clip)")
    parser.add_argument("--checkpoint", metavar="PATH", help="local weights for the embedder (a save_pretrained "
                                                            "folder for shusheng-mini-clip, a file for open_clip)")
    parser.add_argument("--device", help="torch device (default CUDA when available, else CPU)")
    parser.add_argument("--regions", action=argparse.BooleanOptionalAction, default=False,
                        help="also index the larger vehicles of the sample scenes (their ground-truth boxes) as "
                             "regions of their own, so that a hit can be a box inside a picture (default: off)")
    parser.add_argument("--bridge", metavar="DIR",
                        help="a trained LLM bridge folder for the Chat tab (shusheng train bridge writes "
                             "<output>/final; default: the bundled shusheng-mini-bridge, not bundled yet)")
    parser.add_argument("--t2i", metavar="DIR",
                        help="a trained text-to-image pipeline folder for the Generate tab (shusheng train t2i "
                             "writes <output>/final; default: the bundled shusheng-mini-t2i, not bundled yet)")
    parser.add_argument("--detector", metavar="DIR",
                        help="a trained detector folder for the Detect tab (shusheng train detect writes "
                             "<output>/final; default: the bundled shusheng-mini-det)")
    parser.add_argument("--segmenter", metavar="DIR",
                        help="a trained segmenter folder for the Detect tab's overlay (shusheng train segment writes "
                             "<output>/final; default: the bundled shusheng-mini-seg)")
    access = parser.add_argument_group("access (serving beyond 127.0.0.1 needs a password)")
    access.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                        help="an account of the login page (repeatable; visible to other users of this machine in "
                             f"the process list: prefer --auth-file or ${AUTH_ENV})")
    access.add_argument("--auth-file", metavar="FILE", help="accounts, one USER:PASSWORD per line (chmod 600)")
    access.add_argument("--insecure-no-auth", action="store_true",
                        help="serve beyond loopback without a password (only on a network you trust)")
    folders = parser.add_argument_group("folders")
    folders.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                         help="a folder the app may index and search (repeatable; the collection always is; nothing "
                              "else is, and '..' or symbolic links that lead out are refused)")
    folders.add_argument("--index-root", metavar="DIR",
                         help="where indexes of folders the app did not generate go (default "
                              "$SHUSHENG_CACHE_DIR/indexes)")
    folders.add_argument("--index-in-folder", action="store_true",
                         help="index your own writable folders into FOLDER/.shusheng-index instead")
    lim = parser.add_argument_group("limits")
    defaults = AppLimits()
    lim.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                     help=f"largest upload in MB (default {defaults.max_upload_bytes / 2**20:g})")
    lim.add_argument("--max-upload-megapixels", type=float, default=defaults.max_upload_pixels / 1e6,
                     help=f"largest uploaded image, checked before decoding (default "
                          f"{defaults.max_upload_pixels / 1e6:g})")
    lim.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                     help=f"seconds a search, caption or answer may take (default {defaults.request_timeout:g})")
    lim.add_argument("--index-timeout", type=float, default=defaults.index_timeout,
                     help=f"seconds one Index folder run may take; the next run continues (default "
                          f"{defaults.index_timeout:g})")
    lim.add_argument("--concurrency", type=int, default=defaults.concurrency,
                     help=f"requests running at once (default {defaults.concurrency})")
    lim.add_argument("--queue-size", type=int, default=defaults.queue_size,
                     help=f"requests waiting at most; more are turned away (default {defaults.queue_size})")


def _has_images(folder: Path) -> bool:
    from shusheng.data.images import IMAGE_EXTENSIONS

    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files if not f.startswith(".")):
            return True
    return False


def sample_collection(n: int, folder: str | os.PathLike | None = None, seed: int | None = None,
                      size: int = SAMPLE_SIZE) -> Path:
    """The folder of ``n`` SynthDrive scenes (train split by default), generated once.

    Args:
        n: number of scenes.
        folder: where to put them (default ``cache_root()/demo/synthdrive-train-n{n}-{size}px``).
        seed: split seed (default the train split's).
        size: image side in pixels.

    Returns:
        The folder; its scenes are in ``images/`` (with ``annotations.jsonl`` and ``coco.json`` beside).
    """
    from shusheng.data import synthdrive as sd

    seed = sd.TRAIN_SEED if seed is None else seed
    split = {sd.TRAIN_SEED: "train", sd.VAL_SEED: "val", sd.TEST_SEED: "test"}.get(seed, f"seed{seed}")
    out = Path(folder).expanduser() if folder else cache_root() / "demo" / f"synthdrive-{split}-n{n}-{size}px"
    want = {"n": n, "seed": seed, "size": size}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        logger.info("sample collection: %d SynthDrive scenes in %s", n, out)
        return out
    logger.info("generating %d SynthDrive scenes (%s split, seed %d, %d px) into %s", n, split, seed, size, out)
    workers = max(1, min(2, os.cpu_count() or 1))
    sd.generate(out, n, seed, size, workers=workers if n >= 64 else 1, masks=False, progress=True)
    marker.write_text(json.dumps(want))
    return out


def object_regions(folder: str | os.PathLike, categories: tuple[str, ...] = REGION_CATEGORIES,
                   min_side: int = REGION_MIN_SIDE) -> dict[str, list[list[int]]]:
    """Region boxes for :func:`~shusheng.retrieval_index.index_folder` from a generated collection's
    ``coco.json``: ``{relative image path: [[x, y, w, h], ...]}`` for the objects of ``categories`` whose box is
    at least ``min_side`` pixels wide and high. Empty when the folder has no ``coco.json``."""
    coco_file = Path(folder) / "coco.json"
    if not coco_file.is_file():
        return {}
    coco = json.loads(coco_file.read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    wanted = {c["id"] for c in coco["categories"] if c["name"] in categories}
    regions: dict[str, list[list[int]]] = {}
    for ann in coco["annotations"]:
        x, y, w, h = (int(v) for v in ann["bbox"])
        if ann["category_id"] in wanted and min(w, h) >= min_side and ann["image_id"] in files:
            regions.setdefault(files[ann["image_id"]], []).append([x, y, w, h])
    return regions


def _fingerprint(embedder) -> list[float]:
    """A few numbers that change whenever the embedder's weights do: the embeddings of a fixed text and image."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    vec = np.concatenate([embedder.embed_texts(["a red car on a rainy night"])[0], embedder.embed_images([img])[0]])
    return [round(float(v), 6) for v in vec[::8]]


def _probe_file(index_path: Path) -> Path:
    """Where the demo records the embedder fingerprint of an index: beside it (``FOLDER/.shusheng-demo.json`` for
    an index inside its folder, ``<index>.demo.json`` under the index root), never elsewhere in the folder."""
    if index_path.name == ".shusheng-index":
        return index_path.parent / _PROBE_FILE
    return index_path.with_name(index_path.name + ".demo.json")


def _check_fingerprint(folder: Path, index_path: Path, embedder, probe: list[float], generated: bool) -> bool:
    """False when the collection's index was built by this demo with other weights of the same embedder. A
    generated sample collection is then re-indexed (its index is removed); a user's folder is left alone."""
    probe_file = _probe_file(index_path)
    if not probe_file.is_file() or not index_path.is_dir():
        return True
    saved = json.loads(probe_file.read_text())
    if saved.get("embedder") != embedder.name:
        return True  # another embedder: the index itself refuses it with a clear message
    old = saved.get("probe", [])
    if len(old) == len(probe) and max((abs(a - b) for a, b in zip(old, probe)), default=0.0) <= _PROBE_TOL:
        return True
    if generated:
        logger.warning("the weights of %s changed since %s was indexed: re-indexing the sample collection",
                       embedder.name, folder)
        shutil.rmtree(index_path)
        return True
    logger.error("%s was indexed by this demo with other weights of %s; delete %s to re-index it", folder,
                 embedder.name, index_path)
    return False


def _serve_until_stopped(demo) -> None:
    """Blocks while the server runs; Ctrl+C or SIGTERM stop it."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("stopping the demo")


def _limits(args: argparse.Namespace) -> AppLimits:
    return AppLimits(max_upload_bytes=int(args.max_upload_mb * 2**20),
                     max_upload_pixels=int(args.max_upload_megapixels * 1e6), request_timeout=args.request_timeout,
                     index_timeout=args.index_timeout, concurrency=args.concurrency, queue_size=args.queue_size)


def run(args: argparse.Namespace) -> int:
    from shusheng.apps.gradio_app import build_demo, launch_demo
    from shusheng.apps.safety import FolderPolicy, InsecureLaunchError, check_exposure, resolve_auth
    from shusheng.apps.tabs import import_gradio

    t_start = time.perf_counter()
    if args.n < 1:
        logger.error("--n must be at least 1")
        return 2
    # access and limits first: a refusal costs nothing and writes nothing
    try:
        auth = resolve_auth(args.auth, args.auth_file)
        limits = _limits(args)
        if not args.insecure_no_auth:
            check_exposure(args.host, auth)
    except InsecureLaunchError as e:
        logger.error("%s", e)
        return 2
    except ValueError as e:
        logger.error("%s", e)
        return 2
    for d in args.allow_dir:
        if not Path(d).expanduser().is_dir():
            logger.error("--allow-dir %s is not a folder", d)
            return 2
    bridge = getattr(args, "bridge", None)
    if bridge and not (Path(bridge).expanduser() / "config.json").is_file():
        logger.error("--bridge %s is not an LLM bridge folder (no config.json); shusheng train bridge writes "
                     "<output>/final", bridge)
        return 2
    t2i = getattr(args, "t2i", None)
    if t2i and not (Path(t2i).expanduser() / "model_index.json").is_file():
        logger.error("--t2i %s is not a text-to-image pipeline folder (no model_index.json); shusheng train t2i "
                     "writes <output>/final", t2i)
        return 2
    detector, segmenter = getattr(args, "detector", None), getattr(args, "segmenter", None)
    for flag, given, command in (("--detector", detector, "detect"), ("--segmenter", segmenter, "segment")):
        if given and not (Path(given).expanduser() / "config.json").is_file():
            logger.error("%s %s is not a %s folder (no config.json); shusheng train %s writes <output>/final", flag,
                         given, flag[2:], command)
            return 2
    import_gradio()  # fail early (with the pip hint) when the apps extra is missing
    for noisy in ("httpx", "faiss.loader"):  # one line per HTTP request / per FAISS build tried
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from shusheng.retrieval_index import RetrievalIndexError, create_embedder, index_folder

    if args.checkpoint:
        args.checkpoint = os.fspath(Path(args.checkpoint).expanduser().absolute())
    t0 = time.perf_counter()
    try:
        embedder = create_embedder(args.embedder, checkpoint=args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError, ImportError) as e:
        logger.error("cannot load the embedder %r: %s", args.embedder, e)
        if args.embedder == "shusheng-mini-clip" and args.checkpoint is None:
            logger.error("the demo needs the bundled shusheng-mini-clip weights (or --checkpoint DIR of a trained "
                         "one, or --embedder open_clip:ARCH --checkpoint FILE)")
        return 1
    logger.info("embedder %s (dim %d) loaded in %.1f s", embedder.name, embedder.dim, time.perf_counter() - t0)

    generated = True
    if args.collection:
        folder = Path(args.collection).expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            logger.error("--collection %s is not a folder", folder)
            return 2
        if folder.is_dir() and _has_images(folder):
            generated = (folder / _MARKER).is_file()
        else:
            folder = sample_collection(args.n, folder)
    else:
        folder = sample_collection(args.n)
    folder = Path(os.path.realpath(folder))
    policy = FolderPolicy([folder, *args.allow_dir], args.index_root, owned=[folder] if generated else [],
                          index_in_folder=args.index_in_folder)
    index_path = policy.index_path_for(folder)
    logger.info("the app may index and search %s; indexes of other folders go under %s", policy.describe(),
                policy.index_root)
    probe = _fingerprint(embedder)
    if not _check_fingerprint(folder, index_path, embedder, probe, generated):
        return 1
    try:
        regions = object_regions(folder) if generated else None
        if regions and not args.regions:  # no boxes (drops region entries an earlier --regions run indexed)
            regions = {path: [] for path in regions}
        index_path.parent.mkdir(parents=True, exist_ok=True)
        report = index_folder(folder, index_path, embedder=embedder, checkpoint=args.checkpoint, regions=regions,
                              progress=True, within=policy.allowed)
    except (RetrievalIndexError, OSError) as e:
        logger.error("cannot index %s: %s", folder, e)
        return 1
    _probe_file(index_path).write_text(json.dumps({"embedder": embedder.name, "probe": probe}))
    if report.added + report.unchanged + report.updated == 0:
        logger.error("no image could be indexed in %s", folder)
        return 1

    tabs = None
    if bridge or t2i or detector or segmenter:  # the Chat / Generate / Detect tab over those folders
        from shusheng.apps.tabs import load_tabs
        from shusheng.apps.tabs.chat import ChatTab
        from shusheng.apps.tabs.detect import DetectTab
        from shusheng.apps.tabs.generate import GenerateTab

        def folder(path: str) -> str:
            return os.fspath(Path(path).expanduser().absolute())

        tabs = []
        for t in load_tabs():
            if bridge and isinstance(t, ChatTab):
                t = ChatTab(folder(bridge))
            elif t2i and isinstance(t, GenerateTab):
                t = GenerateTab(folder(t2i))
            elif (detector or segmenter) and isinstance(t, DetectTab):
                t = DetectTab(detector and folder(detector), segmenter and folder(segmenter))
            tabs.append(t)
    demo = build_demo(index_path, embedder, folder=folder, examples=EXAMPLE_QUERIES if generated else (),
                      title="Shusheng demo", device=args.device, policy=policy, limits=limits, tabs=tabs)
    try:
        url = launch_demo(demo, host=args.host, port=args.port, auth=auth, insecure_no_auth=args.insecure_no_auth,
                          limits=limits, inbrowser=not args.no_browser)
    except OSError as e:
        logger.error("cannot serve on %s:%d (%s); choose another --port", args.host, args.port, e)
        return 1
    logger.info("Shusheng demo ready in %.1f s at %s (searching %s%s); press Ctrl+C to stop",
                time.perf_counter() - t_start, url, folder,
                f"; sign-in required, {len(auth)} account(s)" if auth else "")
    try:
        _serve_until_stopped(demo)
    finally:
        demo.close()
        demo.search_app.close()
    return 0
