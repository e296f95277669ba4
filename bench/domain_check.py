"""How well the bundled models' in-domain check separates SynthDrive scenes from everything else.

    python bench/domain_check.py                    # both bundled models
    python bench/domain_check.py --model DIR        # any model folder with a domain_check.safetensors
    python bench/domain_check.py --model shusheng/weights/shusheng-mini-det    # a detector (scenes at its size)
    python bench/domain_check.py --model shusheng/weights/shusheng-mini-seg    # a segmenter (scenes at its size)

In-domain: the fixed SynthDrive test set (seed 2023, 1,000 images, 128 px), which neither the fit (train scenes)
nor the calibration (val scenes) of the check saw; target: at least 99 % in-domain. A detector's or segmenter's
check is fitted at the model's own input size (``min_size``, ``image_size``), so for them the same test scenes are
rendered at that size. Out-of-domain: the real photographs bundled with scikit-image (``skimage/data``) and
matplotlib (``mpl-data/sample_data``), and 40 synthetic non-scenes (``shusheng.data.nonscenes``); target: at least
95 % flagged. Images go through the
pipelines' own loading and transform (``Pipeline.check_domain``), exactly as ``shusheng caption`` sees them.
Writes ``domain_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, reexec_with_bench_env, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def photographs() -> list:
    """The real photographs that ship inside scikit-image and matplotlib (those ``load_image`` opens)."""
    import matplotlib
    import skimage.data

    from shusheng.data import ImageLoadError, load_image

    folders = [Path(skimage.data.__file__).parent, Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"]
    out = []
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                try:
                    out.append((f.name, load_image(f)))
                except ImageLoadError:
                    continue
    return out


def rate(pipe, images, batch_size: int = 64) -> tuple[float, list[float]]:
    import torch

    flags, scores = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = torch.stack([pipe.transform(im) for im in images[s:s + batch_size]])
            f, sc = pipe.check_domain(x)
            flags += f
            scores += sc
    return sum(flags) / len(flags), scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="model folder(s) (default: both bundled)")
    p.add_argument("--n", type=int, default=1000, help="test images (1000 = the whole fixed test set)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    reexec_with_bench_env()
    from shusheng.data import TEST_IMAGE_SIZE, TEST_SEED, sample
    from shusheng.data.nonscenes import nonscene_images
    from shusheng.detection.pipelines import DetectionPipeline, SegmentationPipeline
    from shusheng.miniclip.pipelines import EmbeddingPipeline
    from shusheng.modeling import model_class_for
    from shusheng.uniperceiver.pipelines import CaptionPipeline
    from shusheng.weights import bundled_path

    t0 = time.time()
    test = [sample(TEST_SEED, i, TEST_IMAGE_SIZE)[0] for i in range(args.n)]
    photos = photographs()
    synth = nonscene_images(40)
    models = args.model or [str(bundled_path("shusheng-mini-uniperceiver")), str(bundled_path("shusheng-mini-clip"))]
    pipelines = {p.model_class: p
                 for p in (CaptionPipeline, EmbeddingPipeline, DetectionPipeline, SegmentationPipeline)}
    rows = []
    for folder in models:
        pipe = pipelines.get(model_class_for(folder), EmbeddingPipeline).from_pretrained(folder)
        if pipe.domain_check is None:
            print(f"{folder}: no domain_check.safetensors (run: shusheng train domain-check --model {folder})")
            continue
        # a detector's or segmenter's check is fitted at its own input size: its test scenes are rendered there
        dense = isinstance(pipe, (DetectionPipeline, SegmentationPipeline))
        size = pipe.model.preprocess_config().size if dense else TEST_IMAGE_SIZE
        r_test, _ = rate(pipe, test if size == TEST_IMAGE_SIZE else
                         [sample(TEST_SEED, i, size)[0] for i in range(args.n)])
        r_photo, s_photo = rate(pipe, [im for _, im in photos])
        r_synth, _ = rate(pipe, synth)
        missed = [name for (name, _), s in zip(photos, s_photo) if s >= pipe.domain_check.alpha]
        n_ood = len(photos) + len(synth)
        rows.append({"model": Path(folder).name, "test_in_domain": r_test, "n_test": len(test),
                     "photos_flagged": 1 - r_photo, "n_photos": len(photos), "nonscenes_flagged": 1 - r_synth,
                     "n_nonscenes": len(synth),
                     "ood_flagged": ((1 - r_photo) * len(photos) + (1 - r_synth) * len(synth)) / n_ood,
                     "alpha": pipe.domain_check.alpha, "photos_missed": ", ".join(missed) or "-"})
    cols = [("model", "model"), ("test_in_domain", "SynthDrive test in-domain"), ("photos_flagged", "photos flagged"),
            ("nonscenes_flagged", "non-scenes flagged"), ("ood_flagged", "all out-of-domain flagged"),
            ("alpha", "alpha"), ("photos_missed", "photos taken as in-domain")]
    meta = {**machine_info(), "seconds": round(time.time() - t0, 1), "n_test": args.n}
    print(write_results("domain_check", rows, cols, args.out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
