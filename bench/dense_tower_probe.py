"""What the mini-clip image tower's dense head sees, read with fixed rules (no training): an upper-bound probe of
what a decoder on top of the frozen tower can answer.

    python bench/dense_tower_probe.py                                  # the bundled shusheng-mini-clip tower
    python bench/dense_tower_probe.py --tower runs/miniclip/tower/tower.safetensors --split val --n 500

The tower's 35 per-cell probabilities (``shusheng.data.synthdrive.DENSE_LABELS``, stride-8 cells) of each scene are
read with these rules and compared with the scene's attributes:

* traffic light / sign: the label with the highest image-level probability, ``none`` when it is below 0.5;
* vehicle colours: the colours with any vehicle label at probability >= 0.5 (exact set);
* vehicle count: the sum over the 24 colour x type labels of their 4-connected components at >= 0.5
  (``count_components``, the grouping of ``DenseObjectDetector`` and of the decoder's summary channels);
  ``exact colour x type counts``: every colour x type count right;
* pedestrians: ``yes`` when either person label reaches 0.5; crosswalk likewise.

Scenes are rendered in memory (``--split val``: seed 1, the split used to choose; ``test``: the fixed seed-2023
set). Writes ``dense_tower_probe.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, write_results  # noqa: E402

RULES = ("traffic light", "sign", "vehicle colour set", "vehicle count", "exact colour x type counts",
         "pedestrians", "crosswalk")


def read_scene(prob, counts, labels: list[str]) -> dict:
    """Answers of the fixed rules from one scene's ``(L, H, W)`` probabilities and ``(L,)`` component counts."""
    peak = {lab: float(prob[k].max()) for k, lab in enumerate(labels)}

    def pick(prefix: str) -> str:
        names = [lab for lab in labels if lab.startswith(prefix)]
        best = max(names, key=peak.get)
        return best[len(prefix):] if peak[best] >= 0.5 else "none"

    vehicles = [lab for lab in labels if lab.split()[-1] in ("car", "truck", "bus")]
    return {
        "traffic light": pick("light "),
        "sign": pick("sign "),
        "vehicle colour set": sorted({lab.split()[0] for lab in vehicles if peak[lab] >= 0.5}),
        "vehicle count": int(sum(int(counts[labels.index(lab)]) for lab in vehicles)),
        "exact colour x type counts": {lab: int(counts[labels.index(lab)]) for lab in vehicles
                                       if counts[labels.index(lab)]},
        "pedestrians": any(peak[lab] >= 0.5 for lab in labels if lab.startswith("person")),
        "crosswalk": peak["crosswalk"] >= 0.5,
    }


def truth(attributes: dict) -> dict:
    by_ct: dict[str, int] = {}
    for v in attributes["vehicles"]:
        key = f"{v['color']} {v['type']}"
        by_ct[key] = by_ct.get(key, 0) + 1
    return {
        "traffic light": attributes["light"],
        "sign": attributes["sign"],
        "vehicle colour set": sorted({v["color"] for v in attributes["vehicles"]}),
        "vehicle count": len(attributes["vehicles"]),
        "exact colour x type counts": by_ct,
        "pedestrians": bool(attributes["pedestrians"]),
        "crosswalk": bool(attributes["crosswalk"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a mini-clip folder (default: the bundled shusheng-mini-clip)")
    p.add_argument("--tower", default=None,
                   help="replace its image tower by this one (a stage-1 tower.safetensors or a mini-clip folder)")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--n", type=int, default=500, help="scenes (default 500)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from shusheng.backbone import count_components
    from shusheng.data import synthdrive as sd
    from shusheng.miniclip import MiniClip, load_bundled
    from shusheng.miniclip.evaluation import load_tower_init

    torch.set_grad_enabled(False)
    model = MiniClip.from_pretrained(args.model) if args.model else load_bundled()
    if args.tower:
        model.visual.load_state_dict(load_tower_init(args.tower))
    tower = model.visual.eval()
    seed = sd.VAL_SEED if args.split == "val" else sd.TEST_SEED
    labels = list(sd.DENSE_LABELS)
    hits = {r: 0 for r in RULES}
    t0 = time.time()
    for s in tqdm(range(0, args.n, args.batch_size), desc="probe"):
        scenes = [sd.sample(seed, i, 128) for i in range(s, min(s + args.batch_size, args.n))]
        pixels = torch.stack([torch.from_numpy(np.array(img, dtype=np.uint8)) for img, _ in scenes])
        prob = torch.sigmoid(tower.features_and_dense(model.normalize_uint8(pixels.permute(0, 3, 1, 2)))[1])
        counts = count_components(prob >= 0.5)
        for (_, ann), pr, cn in zip(scenes, prob.numpy(), counts.numpy()):
            got, want = read_scene(pr, cn, labels), truth(ann.attributes)
            for r in RULES:
                hits[r] += got[r] == want[r]
    rows = [{"rule": r, "accuracy": round(hits[r] / args.n, 4)} for r in RULES]
    meta = {"model": args.model or "bundled shusheng-mini-clip", "tower": args.tower, "split": args.split,
            "seed": seed, "n": args.n, "seconds": round(time.time() - t0, 1), "machine": machine_info()}
    md = write_results("dense_tower_probe", rows, [("rule", "rule"), ("accuracy", "accuracy")], args.out, meta)
    print(f"{meta['model']} (tower: {args.tower or 'its own'}), {args.split} split, {args.n} scenes")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
