"""Peak memory of a caption call as the number of input images grows (the pipelines stream their inputs).

    python bench/pipeline_memory.py                  # 100 and 2000 images, 128 px PNG files, 2 threads

Writes the images once to a temporary folder, then for each count runs ``CaptionPipeline(...)(paths,
max_new_tokens=2, batch_size=32)`` in a fresh subprocess and reports the growth of the resident set at its peak
(Linux ``VmHWM``). A pipeline that decodes every image before batching grows with the count (3 x 128 x 128 float32
= 196 kB per image); a streaming one stays flat. The ratio column is against the smallest count, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, peak_extra_memory, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _child(folder: str, n: int) -> None:
    import torch

    from shusheng.uniperceiver import CaptionPipeline

    torch.set_num_threads(2)
    paths = sorted(str(p) for p in Path(folder).glob("*.png"))[:n]
    pipe = CaptionPipeline.from_pretrained()
    pipe(paths[:4], max_new_tokens=2)  # warm-up: vocabulary features, allocator
    extra = peak_extra_memory(lambda: pipe(paths, max_new_tokens=2, batch_size=32))
    print(json.dumps({"n": n, "peak_extra_mb": round(extra / 2**20, 1)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="100,2000")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    from shusheng.data import sample

    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(max(counts)):
            sample(2023, i % 1000, 128)[0].save(Path(d) / f"{i:05d}.png")
        for n in counts:
            r = subprocess.run([sys.executable, __file__, "--child", d, str(n)], capture_output=True, text=True,
                               check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["ratio"] = r["peak_extra_mb"] / max(rows[0]["peak_extra_mb"], 1e-9)
    md = write_results("pipeline_memory", rows, [("n", "images"), ("peak_extra_mb", "peak extra MB"),
                                                 ("ratio", "vs smallest")], args.out, machine_info())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
