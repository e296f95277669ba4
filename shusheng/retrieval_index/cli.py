"""``shusheng index`` and ``shusheng search``: build, inspect and query an image-text index from the shell.

Examples::

    shusheng index ~/Pictures                              # index (incrementally) into ~/Pictures/.shusheng-index
    shusheng index ~/Pictures --embedder open_clip:ViT-B-32 --checkpoint vit_b32.safetensors --index /data/idx
    shusheng index ~/Pictures --regions boxes.json         # {"a.jpg": [[x, y, w, h], ...]}
    shusheng index ~/Videos --video-fps 2 --collapse 0.95  # videos: 2 frames/s, near-identical frames collapsed
    shusheng index ~/Pictures --engine ray --workers 8     # decode + embed on Ray actors (local, or --address)
    shusheng index /data/photos --on-disk                  # IVF lists memory-mapped: indexes bigger than RAM
    shusheng index --stats ~/Pictures
    shusheng index --duplicates ~/Pictures --near 0.97
    shusheng search "a red car at night" --index ~/Pictures -k 5 --threshold 0.2 --from 2023-01-01 --json
    shusheng search --image query.jpg --glob "holidays/*"

``index`` is ``add_arguments``/``run``, ``search`` is ``add_search_arguments``/``run_search``. Heavy imports
(numpy, torch, FAISS) happen inside ``run``/``run_search`` only; :func:`resolve_index_path` (re-exported here for
older callers) lives in :mod:`shusheng.retrieval_index.layout`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from shusheng.retrieval_index.layout import resolve_index_path

__all__ = ["add_arguments", "add_search_arguments", "resolve_index_path", "run", "run_search"]

logger = logging.getLogger(__name__)


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------------------------------- index
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Index the images and videos below FOLDER for text and image search. Re-running only "
                          "embeds new or changed files and drops deleted ones; a killed run resumes where it "
                          "stopped. Videos are sampled at --video-fps; each kept frame is an entry with its time.")
    parser.add_argument("folder", nargs="?",
                        help="folder of images and videos to index (recursively), or one image or video file")
    parser.add_argument("--index", metavar="PATH", help="index folder (default FOLDER/.shusheng-index)")
    parser.add_argument("--embedder", metavar="NAME",
                        help="shusheng-mini-clip (default for a new index), open_clip:<arch>, or a registered name; "
                             "default for an existing index: the one it was built with")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="local weights (required for open_clip models: nothing is downloaded)")
    parser.add_argument("--device", help="torch device for the embedder (default cuda if available, else cpu)")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime", "tensorrt", "auto"), default="torch",
                        help="what runs the image tower of shusheng-mini-clip: torch (default), onnxruntime, "
                             "tensorrt, or auto (the fastest here, measured once and cached)")
    parser.add_argument("--regions", metavar="FILE.json",
                        help="boxes to index as regions: {\"path\": [[x, y, w, h], ...]} (paths relative to FOLDER)")
    parser.add_argument("--detect", action="store_true",
                        help="also index the objects a detector finds (vehicles, people, traffic lights, signs) as "
                             "region entries: the bundled shusheng-mini-det when present, else the dense head of "
                             "shusheng-mini-clip")
    parser.add_argument("--detector", metavar="DIR",
                        help="the detector of --detect (implies it): a folder saved by "
                             "InternImageDetector.save_pretrained (shusheng train detect writes <output>/final)")
    parser.add_argument("--detect-threshold", type=float, default=0.5, metavar="P",
                        help="lowest detector score (or dense-head cell probability) for --detect (0.5)")
    videos = parser.add_argument_group("videos (.mp4, .mov, .avi, .mkv, .webm; needs pip install 'shusheng[video]')")
    videos.add_argument("--video-fps", type=float, default=None, metavar="F",
                        help="frames sampled per second of video (default: the rate recorded in the index, else 1); "
                             "videos indexed at another rate are sampled again")
    videos.add_argument("--collapse", type=float, default=None, metavar="T",
                        help="collapse consecutive sampled frames whose embeddings have a cosine >= T with the first "
                             "frame of their run into one entry spanning their times (default: the index's, "
                             "else 0.98)")
    videos.add_argument("--no-collapse", dest="collapse", action="store_false", default=None,
                        help="keep every sampled frame as an entry")
    videos.add_argument("--no-videos", action="store_true", help="index images only (skip video files)")
    scale = parser.add_argument_group("scale-out (needs pip install 'shusheng[scale]'; docs/scaling.md)")
    scale.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local (default): decode and embed in this process; ray: on a pool of Ray actors "
                            "(one model each), written and resumable shard by shard. Images only: videos and "
                            "region changes of unchanged files stay in this process; no --detect")
    scale.add_argument("--address", metavar="ADDR",
                       help="with --engine ray: the Ray cluster to join (auto, HOST:6379, ray://HOST:10001); "
                            "default RAY_ADDRESS, else a local Ray on this machine's cores")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --engine ray: actors (default: one per CPU of the cluster; per GPU with "
                            "--device cuda)")
    scale.add_argument("--shard-size", type=int, default=None, metavar="N",
                       help="with --engine ray: files per shard, the unit written, committed and resumed (1024)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per embedder call (32)")
    parser.add_argument("--commit-every", type=int, default=256, metavar="N",
                        help="commit after N changed files (256): the most a crash can lose")
    parser.add_argument("--on-disk", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the IVF lists of the index in a memory-mapped file, for indexes bigger than RAM "
                             "(recorded: later runs keep it; --no-on-disk moves them back into memory)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="skip images larger than N pixels (default 64 million)")
    parser.add_argument("--include-hidden", action="store_true", help="also index dot-files and dot-folders")
    parser.add_argument("--stats", metavar="PATH", help="print the statistics of an index and exit")
    parser.add_argument("--duplicates", metavar="PATH", help="list duplicate images of an index and exit")
    parser.add_argument("--near", type=float, default=None, metavar="T",
                        help="with --duplicates: also near-duplicates with cosine >= T (e.g. 0.97)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_stats(args: argparse.Namespace) -> int:
    from shusheng.retrieval_index.index import Index

    with Index.open(resolve_index_path(args.stats)) as index:
        stats = index.stats()
    if args.json:
        _print_json(stats)
        return 0
    frames = f"{stats['frame_entries']} video frames, " if stats["videos"] else ""
    rows = [
        ("index", stats["path"]),
        ("files", f"{stats['files']}" + (f" ({stats['videos']} videos)" if stats["videos"] else "")),
        ("entries", f"{stats['entries']} ({stats['image_entries']} images, {frames}{stats['region_entries']} regions)"),
        ("embedder", f"{stats['embedder']} (dim {stats['dim']})"),
        ("index type", stats["index_type"] + (f", nprobe {stats['nprobe']}" if stats["nprobe"] else " (exact)")
         + (", lists on disk" if stats["storage"] == "on-disk" else "")),
        ("size on disk", _fmt_bytes(stats["size_on_disk_bytes"])),
        ("last commit", f"{stats['last_commit'] or 'never'} (generation {stats['generation']})"),
        ("folders", ", ".join(stats["roots"]) or "-"),
    ]
    sampling = stats["video_sampling"]
    if stats["videos"] and sampling:
        collapse = (f"near-identical frames collapsed at cosine >= {sampling['collapse']}"
                    if sampling["collapse"] is not None else "no collapsing")
        unit = "frame/s" if sampling["fps"] == 1 else "frames/s"
        rows.insert(3, ("video sampling", f"{sampling['fps']:g} {unit}, {collapse}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _run_duplicates(args: argparse.Namespace) -> int:
    from shusheng.retrieval_index.index import Index

    with Index.open(resolve_index_path(args.duplicates)) as index:
        groups = index.duplicates(near=args.near)
    if args.json:
        _print_json([g.to_dict() for g in groups])
        return 0
    if not groups:
        print("no duplicates")
    for g in groups:
        label = "exact" if g.kind == "exact" else f"near (cosine >= {g.score:.3f})"
        print(f"{label}:")
        for p in g.paths:
            print(f"  {p}")
    return 0


def run(args: argparse.Namespace) -> int:
    from shusheng.retrieval_index.errors import RetrievalIndexError

    try:
        if args.stats:
            return _run_stats(args)
        if args.duplicates:
            return _run_duplicates(args)
        if not args.folder:
            logger.error("nothing to do: give FOLDER to index, or --stats PATH / --duplicates PATH")
            return 2
        return _run_index(args)
    except (RetrievalIndexError, FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        logger.error("%s", e)
        return 1


def _region_detector(folder: str | None = None, threshold: float = 0.5, checkpoint: str | None = None,
                    embedder: str | None = None, device: str | None = None):
    """The detector of ``--detect``: the detector saved in ``folder``; else the bundled ``shusheng-mini-det``
    (a :class:`~shusheng.detection.pipelines.PipelineDetector`) when present; else the dense head of
    ``shusheng-mini-clip`` (:class:`~shusheng.detection.DenseObjectDetector`; of ``checkpoint`` when that is a
    mini-clip folder)."""
    from shusheng.detection.pipelines import DetectionPipeline, PipelineDetector
    from shusheng.weights import BundledWeightsNotFound

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--detect-threshold must be in (0, 1), got {threshold}")
    try:
        import torch

        pipe = DetectionPipeline.from_pretrained(folder, device=device or ("cuda" if torch.cuda.is_available()
                                                                           else "cpu"))
    except BundledWeightsNotFound:
        if folder is not None:
            raise
    else:
        logger.info("--detect: the detector of %s", folder or pipe.bundled_model)
        return PipelineDetector(pipe, threshold=threshold)
    from shusheng.detection import DenseObjectDetector
    from shusheng.miniclip import MODEL_NAME, MiniClip, load_bundled

    own = checkpoint and (embedder or MODEL_NAME) == MODEL_NAME and Path(checkpoint).is_dir()
    model = MiniClip.from_pretrained(checkpoint, device=device) if own else load_bundled(device)
    logger.info("--detect: the dense head of %s (no shusheng-mini-det here)", model.name)
    return DenseObjectDetector(model, threshold=threshold)


def _run_index(args: argparse.Namespace) -> int:
    from shusheng.data.images import DEFAULT_MAX_PIXELS
    from shusheng.retrieval_index.ingest import index_folder

    engine = None
    if args.engine == "ray":
        from shusheng.retrieval_index.ray_ingest import DEFAULT_SHARD_SIZE, RayEngine

        if args.detect or args.detector:
            logger.error("--detect runs only in the in-process engine: index without --engine ray")
            return 2
        engine = RayEngine(address=args.address, workers=args.workers,
                           shard_size=args.shard_size or DEFAULT_SHARD_SIZE)
    elif args.address or args.workers or args.shard_size:
        logger.error("--address, --workers and --shard-size need --engine ray")
        return 2
    detector = None
    if args.detect or args.detector:
        try:
            detector = _region_detector(args.detector, args.detect_threshold, args.checkpoint, args.embedder,
                                       args.device)
        except (FileNotFoundError, ValueError) as e:
            logger.error("cannot load the detector: %s", e)
            return 2
    try:
        report = index_folder(
            args.folder, args.index, args.embedder, checkpoint=args.checkpoint, device=args.device,
            regions=args.regions, detector=detector, batch_size=args.batch_size, commit_every=args.commit_every,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, include_hidden=args.include_hidden,
            progress=not args.quiet and not args.json, runtime=args.runtime, videos=not args.no_videos,
            video_fps=args.video_fps, collapse=args.collapse, engine=engine, on_disk=args.on_disk)
    finally:
        if engine is not None:
            engine.shutdown()
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"{report.index_path}: {report.summary()}")
    return 0


# ---------------------------------------------------------------------------------------------------- search
def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Search an index by text, by image, or both; prints the best matches with their cosine "
                          "scores (region matches with their box, video frames as 'VIDEO @ 12.0 s').")
    parser.add_argument("text", nargs="?", help="query text")
    parser.add_argument("--image", metavar="FILE", help="query image (with TEXT too: the sum of both queries)")
    parser.add_argument("-k", type=int, default=10, help="number of results (10)")
    parser.add_argument("--index", metavar="PATH",
                        help="index folder, or a folder holding .shusheng-index (default: the current directory)")
    parser.add_argument("--threshold", type=float, default=None, metavar="T", help="drop results scoring below T")
    parser.add_argument("--glob", metavar="PAT", help="keep paths matching PAT (e.g. '*/2023/*' or 'holidays/*')")
    parser.add_argument("--from", dest="date_from", metavar="DATE", help="taken on or after DATE (YYYY-MM-DD)")
    parser.add_argument("--to", dest="date_to", metavar="DATE", help="taken on or before DATE (YYYY-MM-DD)")
    parser.add_argument("--no-regions", action="store_true", help="match whole images only")
    parser.add_argument("--every-region", action="store_true",
                        help="list each matching region separately (default: one result per image)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (approximate indexes)")
    parser.add_argument("--checkpoint", metavar="FILE", help="embedder weights, if moved since indexing")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of {path, score, box, entry_id, width, height, date, video, time, "
                             "time_end, frame} (the last four null for images)")


def run_search(args: argparse.Namespace) -> int:
    from shusheng.retrieval_index.errors import RetrievalIndexError
    from shusheng.retrieval_index.index import Index

    if args.text is None and args.image is None:
        logger.error("give a query TEXT, --image FILE, or both")
        return 2
    try:
        with Index.open(resolve_index_path(args.index)) as index:
            embedder = None
            if args.checkpoint:
                from shusheng.retrieval_index.embedders import create_embedder

                embedder = create_embedder(index.embedder_name, checkpoint=args.checkpoint)
            hits = index.search(args.text, args.image, k=args.k, threshold=args.threshold, folder_glob=args.glob,
                                date_from=args.date_from, date_to=args.date_to, regions=not args.no_regions,
                                group_by_image=not args.every_region, nprobe=args.nprobe, embedder=embedder)
    except (RetrievalIndexError, FileNotFoundError, ValueError, ImportError) as e:
        logger.error("%s", e)
        return 1
    if args.json:
        _print_json([h.to_dict() for h in hits])
        return 0
    if not hits:
        print("no results" + (f" scoring >= {args.threshold}" if args.threshold is not None else ""))
    for h in hits:
        box = f"  box={list(h.box)}" if h.box is not None else ""
        at = f" @ {h.when}" if h.is_video else ""
        print(f"{h.score:.4f}  {h.path}{at}{box}  {h.date[:10]}")
    return 0
