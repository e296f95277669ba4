"""Detection and segmentation: COCO AP, mIoU and CPU latency on the fixed SynthDrive test scenes.

    python bench/detection.py                                  # the bundled shusheng-mini-det(-fcos) / -seg
    python bench/detection.py --model runs/det/maskrcnn/final --model runs/det/fcos/final --segmenter runs/seg/final
    python bench/detection.py --n 200                          # fewer test scenes

Measures, on the first ``--n`` scenes of the fixed SynthDrive test seed rendered at 256 px (the training
resolution; ``shusheng.detection.evaluate.synthdrive_scenes("test", n, 256)``):

* for each detector folder (``--model DIR``, repeatable; default the bundled ``shusheng-mini-det`` and
  ``shusheng-mini-det-fcos``, those present): pycocotools' box AP@[.5:.95], AP50, AP75 and per-class AP, and mask
  AP for Mask R-CNN (``evaluate_detector``); the model's CPU latency per image at batch 1 (the mean over the
  first 8 scenes of each scene's median time) and at batch 8 (those 8 scenes in one call; 256 px, ``--threads``
  threads, a warm-up call, then the median of ``--repeats`` calls), and the pipeline's at batch 1 (a PIL image
  in, detections with their mask RLEs out, threshold 0.5);
* for a segmenter folder (``--segmenter DIR``; default the bundled ``shusheng-mini-seg`` when present): mIoU and
  per-class IoU of its ``predict`` against the scenes' semantic masks (``evaluate_segmenter``).

Targets (issue 18): box AP >= 0.55, AP50 >= 0.85, mask AP >= 0.45, mIoU >= 0.80; the one-stage detector (FCOS) at
least 2x faster than Mask R-CNN (batch 1, both measured in turns in this run) at >= 0.9x its box AP. Writes ``detection.json`` /
``.md`` and ``detection_per_class.json`` / ``.md`` (per-class AP and IoU) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import judge_targets, machine_info, median_time, reexec_with_bench_env, write_results  # noqa: E402

SIZE = 256  # px: the test scenes, at the detectors' training resolution
DEFAULT_DETECTORS = ("shusheng-mini-det", "shusheng-mini-det-fcos")
DEFAULT_SEGMENTER = "shusheng-mini-seg"
# (target text, test) per metric key; the test gets the value and the dict of all values
TARGETS = {
    "box_AP": (">= 0.55", lambda v, r: v >= 0.55),
    "box_AP50": (">= 0.85", lambda v, r: v >= 0.85),
    "mask_AP": (">= 0.45", lambda v, r: v >= 0.45),
    "mIoU": (">= 0.80", lambda v, r: v >= 0.80),
    "onestage_speedup": (">= 2x at >= 0.9x box AP", lambda v, r: v >= 2.0 and r["onestage_box_AP_ratio"] >= 0.9),
    "onestage_box_AP_ratio": (">= 0.9", lambda v, r: v >= 0.9),
}
COLUMNS = [("model", "model"), ("metric", "metric"), ("value", "value"), ("unit", "unit"),
           ("target", "target (issue 18)"), ("meets", "meets"), ("n", "n")]
CLASS_COLUMNS = [("model", "model"), ("class", "class"), ("box_AP", "box AP"), ("mask_AP", "mask AP"),
                 ("IoU", "IoU")]


def _row(model: str, key: str, metric: str, value, unit: str, n: int) -> dict:
    return {"model": model, "key": key, "metric": metric, "value": value, "unit": unit, "n": n}


def _bundled(name: str) -> str | None:
    from shusheng.weights import BundledWeightsNotFound, bundled_path

    try:
        return str(bundled_path(name))
    except BundledWeightsNotFound:
        return None


def _model_type(folder: str) -> str | None:
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ sections
def detector_section(folder: str, scenes, args) -> tuple[dict, list[dict], list[dict], dict]:
    """AP (box, mask, per class) and latency of one detector folder."""
    import torch

    from shusheng.detection import DetectionPipeline, InternImageDetector
    from shusheng.detection.evaluate import evaluate_detector

    model = InternImageDetector.from_pretrained(folder).float().eval()
    name, head = Path(folder).name, model.config.head
    t = time.perf_counter()
    r = evaluate_detector(model, scenes, batch_size=8)
    eval_s = time.perf_counter() - t
    print(f"{name} ({head}): evaluated {len(scenes)} scenes in {eval_s:.1f} s", file=sys.stderr, flush=True)
    box, segm = r["bbox"], r["segm"]
    values = {"box_AP": box["AP"], "box_AP50": box["AP50"], "box_AP75": box["AP75"]}
    rows = [_row(name, "box_AP", "box AP@[.5:.95]", box["AP"], "AP", len(scenes)),
            _row(name, "box_AP50", "box AP50", box["AP50"], "AP", len(scenes)),
            _row(name, "box_AP75", "box AP75", box["AP75"], "AP", len(scenes))]
    if segm is not None:
        values["mask_AP"] = segm["AP"]
        rows.append(_row(name, "mask_AP", "mask AP@[.5:.95]", segm["AP"], "AP", len(scenes)))
    per_class = [{"model": name, "class": c, "box_AP": ap, "mask_AP": None if segm is None else segm["per_class"][c],
                  "IoU": None} for c, ap in box["per_class"].items()]

    images = [torch.from_numpy(s.image).permute(2, 0, 1).float().div(255) for s in scenes[:8]]
    images += images[:1] * (8 - len(images))  # fewer than 8 scenes: repeat the first
    with torch.inference_mode():
        # a two-stage detector's time grows with the objects in the scene (RoI and mask heads per proposal and
        # detection), so batch 1 is the mean over the 8 scenes of each scene's median, not one scene's
        t1 = sum(median_time(lambda k=k: model(images[k:k + 1]), warmup=1, min_runs=args.repeats, budget_s=0.0)
                 for k in range(8)) / 8
        t8 = median_time(lambda: model(images), warmup=1, min_runs=args.repeats, budget_s=0.0) / 8
    pipe = DetectionPipeline(model)
    from PIL import Image

    pil = Image.fromarray(scenes[0].image)
    tp = median_time(lambda: pipe([pil], threshold=0.5, batch_size=1), warmup=1, min_runs=args.repeats, budget_s=0.0)
    values.update(latency_b1=t1, latency_b8=t8)
    rows += [_row(name, "latency_b1", f"model latency per image, batch 1, {SIZE} px ({args.threads} threads)",
                  t1 * 1000, "ms", 1),
             _row(name, "latency_b8", f"model latency per image, batch 8, {SIZE} px", t8 * 1000, "ms", 8),
             _row(name, "pipeline_b1", "pipeline latency per image (PIL in, detections + mask RLEs out)",
                  tp * 1000, "ms", 1)]
    info = {"folder": folder, "head": head, "parameters": sum(p.numel() for p in model.parameters()),
            "eval_s": round(eval_s, 1), "bbox": box, "segm": segm}
    return {"head": head, **values}, rows, per_class, info


def segmenter_section(folder: str, scenes) -> tuple[list[dict], list[dict], dict]:
    from shusheng.detection import InternImageSegmenter
    from shusheng.detection.evaluate import evaluate_segmenter

    model = InternImageSegmenter.from_pretrained(folder).float().eval()
    name = Path(folder).name
    t = time.perf_counter()
    r = evaluate_segmenter(model.predict, scenes, model.labels, batch_size=8)
    print(f"{name}: segmented {len(scenes)} scenes in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = [_row(name, "mIoU", "mIoU (classes present in the ground truth)", r["mIoU"], "IoU", len(scenes)),
            _row(name, "pixel_accuracy", "pixel accuracy", r["pixel_accuracy"], "share", len(scenes))]
    per_class = [{"model": name, "class": c, "box_AP": None, "mask_AP": None, "IoU": v}
                 for c, v in r["per_class"].items()]
    return rows, per_class, {"folder": folder, **r}


def paired_latency(folders: tuple[str, str], scenes, repeats: int) -> tuple[float, float]:
    """Batch-1 latency per image of two detectors measured in turns: for each of the first 8 scenes, one call of
    each, ``repeats`` rounds; each model's time is the mean over the scenes of its median. Both see the same
    machine load, so their ratio holds on a machine whose speed drifts (separate runs moved by 20 %)."""
    import statistics

    import torch

    from shusheng.detection import InternImageDetector

    models = [InternImageDetector.from_pretrained(f).float().eval() for f in folders]
    images = [torch.from_numpy(s.image).permute(2, 0, 1).float().div(255) for s in scenes[:8]]
    times = [[[] for _ in images] for _ in models]
    with torch.inference_mode():
        for m in models:  # warm-up
            for x in images:
                m([x])
        for _ in range(repeats):
            for k, x in enumerate(images):
                for j, m in enumerate(models):
                    t = time.perf_counter()
                    m([x])
                    times[j][k].append(time.perf_counter() - t)
    a, b = (sum(statistics.median(v) for v in per) / len(images) for per in times)
    return a, b


def onestage_rows(results: dict[str, dict], folders: dict[str, str], scenes, repeats: int
                  ) -> tuple[dict, list[dict]]:
    """FCOS against Mask R-CNN: the speed-up at batch 1, measured in turns (:func:`paired_latency`), and the
    box-AP ratio."""
    heads = {}
    for name, v in results.items():
        heads.setdefault(v["head"], (name, v))
    if "fcos" not in heads or "maskrcnn" not in heads:
        return {}, []
    (fname, f), (mname, m) = heads["fcos"], heads["maskrcnn"]
    t_m, t_f = paired_latency((folders[mname], folders[fname]), scenes, max(repeats, 7))
    pair = f"{fname} vs {mname}"
    values = {"onestage_speedup": t_m / t_f,
              "onestage_box_AP_ratio": f["box_AP"] / m["box_AP"] if m["box_AP"] > 0 else float("nan")}
    return values, [_row(pair, "paired_b1_maskrcnn", "Mask R-CNN latency per image, batch 1, measured in turns",
                         t_m * 1000, "ms", 1),
                    _row(pair, "paired_b1_fcos", "FCOS latency per image, batch 1, measured in turns", t_f * 1000,
                         "ms", 1),
                    _row(pair, "onestage_speedup", "one-stage speed-up (Mask R-CNN / FCOS latency, batch 1, "
                         "measured in turns)", values["onestage_speedup"], "x", 1),
                    _row(pair, "onestage_box_AP_ratio", "one-stage box AP / Mask R-CNN box AP",
                         values["onestage_box_AP_ratio"], "x", 0)]


def figure(path: str, detectors: list[str], segmenter: str | None, scenes, n: int = 4, scale: int = 1) -> None:
    """A picture for the docs: the first ``n`` scenes (rows), as rendered, then each detector's detections
    (threshold 0.5, instance masks blended) and the segmenter's class map over the scene (columns), ``scale`` x."""
    from PIL import Image, ImageDraw

    from shusheng.detection import DetectionPipeline, InternImageSegmenter
    from shusheng.detection.segment import overlay
    from shusheng.detection.visualize import draw_detections

    n = min(n, len(scenes))
    rows = [[Image.fromarray(s.image) for s in scenes[:n]]]
    titles = ["scene"]
    for folder in detectors:
        pipe = DetectionPipeline.from_pretrained(folder)
        found = pipe(rows[0], threshold=0.5).detections
        rows.append([draw_detections(im, d) for im, d in zip(rows[0], found)])
        titles.append(f"{Path(folder).name} ({pipe.model.config.head})")
    if segmenter:
        model = InternImageSegmenter.from_pretrained(segmenter).float().eval()
        ids = model.predict([s.image for s in scenes[:n]])
        rows.append([Image.fromarray(overlay(s.image, i, 0.6)) for s, i in zip(scenes[:n], ids)])
        titles.append(f"{Path(segmenter).name} (UperNet)")
    side = scenes[0].image.shape[0] * scale
    pad, head = 4, 18
    grid = Image.new("RGB", (len(rows) * (side + pad) + pad, head + n * (side + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (title, col) in enumerate(zip(titles, rows)):
        draw.text((pad + c * (side + pad), 3), title, fill=(0, 0, 0))
        for r, im in enumerate(col):
            grid.paste(im.resize((side, side), Image.Resampling.NEAREST), (pad + c * (side + pad),
                                                                          head + pad + r * (side + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.lower().endswith(".png"):  # 256 colours keep the file small
        grid = grid.quantize(256, dither=Image.Dither.NONE)
    grid.save(path, optimize=True)



# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, metavar="DIR",
                        help="a detector folder (repeatable); default: the bundled shusheng-mini-det and "
                             "shusheng-mini-det-fcos, those present")
    parser.add_argument("--segmenter", default=None, metavar="DIR",
                        help="a segmenter folder; default: the bundled shusheng-mini-seg when present")
    parser.add_argument("--no-segmenter", action="store_true", help="detectors only")
    parser.add_argument("--n", type=int, default=1000, help="test scenes (1000 = the whole fixed test set)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per latency (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the latencies are for 2)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also draw the first test scenes with each model's output (docs/detection_samples.png)")
    args = parser.parse_args(argv)
    for name in ("n", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.threads == 2:
        reexec_with_bench_env()
    else:  # read by torch and the BLAS when they load, below
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    detectors = args.model or [f for f in map(_bundled, DEFAULT_DETECTORS) if f]
    segmenter = None if args.no_segmenter else (args.segmenter or _bundled(DEFAULT_SEGMENTER))
    for folder in detectors:
        if _model_type(folder) != "detector":
            print(f"error: {folder} is not a detector folder (no config.json of an InternImageDetector); "
                  "shusheng train detect writes <output>/final", file=sys.stderr)
            return 2
    if segmenter and _model_type(segmenter) is None:
        print(f"error: {segmenter} is not a segmenter folder (no config.json); shusheng train segment writes "
              "<output>/final", file=sys.stderr)
        return 2
    if not detectors and not segmenter:
        print("error: nothing to measure: no shusheng-mini-det, shusheng-mini-det-fcos or shusheng-mini-seg is "
              "bundled here. Train one with `shusheng train detect --output runs/det/maskrcnn` (or `shusheng train "
              "segment`) and pass --model runs/det/maskrcnn/final (--segmenter DIR).", file=sys.stderr)
        return 2
    if not args.model and len(detectors) < len(DEFAULT_DETECTORS):
        print(f"note: bundled here: {[Path(d).name for d in detectors] or 'no detector'} (of "
              f"{list(DEFAULT_DETECTORS)})", file=sys.stderr)

    import torch

    from shusheng.detection.evaluate import synthdrive_scenes

    torch.set_num_threads(args.threads)
    t_start = time.time()
    scenes = synthdrive_scenes("test", args.n, SIZE)
    meta = {**machine_info(), "threads": args.threads, "n": args.n, "size": SIZE, "detectors": {}}
    values, rows, per_class, results = {}, [], [], {}
    for folder in detectors:
        v, r, pc, info = detector_section(folder, scenes, args)
        name = Path(folder).name
        results[name] = v
        rows += r
        per_class += pc
        meta["detectors"][name] = info
    v, r = onestage_rows(results, {Path(f).name: f for f in detectors}, scenes, args.repeats)
    values.update(v)
    rows += r
    if segmenter:
        r, pc, info = segmenter_section(segmenter, scenes)
        rows += r
        per_class += pc
        meta["segmenter"] = info
    # the targets are judged per row (each detector's AP against the same bars)
    for row in rows:
        judge_targets([row], {**values, **results.get(row["model"], {})}, TARGETS)
    meta["seconds"] = round(time.time() - t_start, 1)
    md = write_results("detection", rows, COLUMNS, args.out, meta)
    per_class = [{k: ("" if v is None else v) for k, v in r.items()} for r in per_class]  # "": not measured
    per_class_md = write_results("detection_per_class", per_class, CLASS_COLUMNS, args.out, {"n": args.n})
    print(md)
    print()
    print(per_class_md)
    print(f"\n{meta['seconds']} s; {args.n} SynthDrive test scenes at {SIZE} px, {args.threads} threads")
    if args.figure:
        figure(args.figure, detectors, segmenter, scenes)
        print(f"figure written to {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
