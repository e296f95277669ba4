"""CPU inference speed of InternImage-T on each DCNv3 backend, against timm's convnext_tiny in the same run.

    python bench/backbone.py [--batches 1 8] [--size 224] [--out bench/results]

Eval mode, ``torch.inference_mode``, float32, 2 threads; each model is timed in interleaved trials (median of
the per-trial medians) so that a burst of load elsewhere hits every model alike. Run it alone on the machine.
Writes ``backbone.json`` / ``backbone.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, median_time, reexec_with_bench_env, write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per trial")
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--baseline", default="convnext_tiny", help="timm model timed in the same run")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    reexec_with_bench_env()

    import timm
    import torch

    from shusheng.backbone import create_model
    from shusheng.ops import available_backends

    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {}
    for backend in available_backends("cpu"):
        models[f"{args.model} [{backend}]"] = create_model(args.model, backend=backend).eval()
    models[args.baseline] = timm.create_model(args.baseline, pretrained=False).eval()
    models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}

    rows = []
    for N in args.batches:
        x = torch.randn(N, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        per_model: dict[str, list[float]] = {k: [] for k in models}
        with torch.inference_mode():
            for _ in range(args.trials):
                for name, m in models.items():
                    per_model[name].append(median_time(lambda m=m, x=x: m(x), warmup=1, min_runs=3,
                                                       budget_s=args.budget))
        base = statistics.median(per_model[args.baseline])
        ref_name = f"{args.model} [reference]"
        ref = statistics.median(per_model[ref_name]) if ref_name in per_model else None
        for name, ts in per_model.items():
            t = statistics.median(ts)
            row = {"model": name, "batch": N, "s_per_batch": t, "s_per_image": t / N, "images_per_s": N / t,
                   f"time_vs_{args.baseline}": t / base}
            if ref is not None:
                row["speedup_vs_reference"] = ref / t
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    columns = [("model", "model"), ("batch", "batch"), ("s_per_image", "s / image"), ("images_per_s", "images/s"),
               ("speedup_vs_reference", "× vs reference core"), (f"time_vs_{args.baseline}", f"time / {args.baseline}")]
    md = write_results("backbone", rows, columns, args.out, {**machine_info(), "size": args.size})
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
