"""Benchmark the DCNv3 core backends at the four InternImage-T level shapes.

Forward and forward+backward, batch 1 and 8, for ``cpu`` (fused C++ kernel), ``reference`` (pure PyTorch)
and ``torch.compile(reference)``; median time and peak extra memory per call; ratios against the reference
measured in the same run. Run it alone on the machine (other CPU load skews it 10-50x):

    python bench/dcnv3.py [--batches 1 8] [--out bench/results]

Writes ``dcnv3.json`` and ``dcnv3.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    machine_info,
    median_time,
    peak_extra_memory,
    reexec_with_bench_env,
    run_memory_subprocess,
    write_results,
)

# (H, W, C, G) of the four InternImage-T levels at 224x224
SHAPES = [(56, 56, 64, 4), (28, 28, 128, 8), (14, 14, 256, 16), (7, 7, 512, 32)]


def make_inputs(N, H, W, C, G, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    P = 9
    x = torch.randn(N, H, W, C, generator=g)
    off = torch.randn(N, H, W, G * P * 2, generator=g)  # ~1 px offsets, like a trained model
    mask = torch.softmax(torch.randn(N, H, W, G, P, generator=g), -1).reshape(N, H, W, G * P)
    return x, off, mask, (3, 3, 1, 1, 1, 1, 1, 1, G, C // G, 1.0, False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["reference", "compiled", "cpu"],
                        choices=["reference", "compiled", "cpu"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per measurement")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--memory-only", action="store_true",
                        help="internal: measure peak memory only and print it as JSON (run in a subprocess)")
    args = parser.parse_args(argv)
    reexec_with_bench_env(memory=args.memory_only)

    import torch

    from shusheng.ops import available_backends, dcnv3_core, dcnv3_core_pytorch

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO)
    if "cpu" in args.variants and "cpu" not in available_backends("cpu"):
        print("the cpu backend is not available here (no compiler?); dropping it", file=sys.stderr)
        args.variants.remove("cpu")
    compiled_core = torch.compile(dcnv3_core_pytorch, dynamic=False)

    def runner(variant, x, off, mask, params, backward):
        if variant == "compiled":
            def core(*t):
                return compiled_core(*t, *params)
        else:
            def core(*t):
                return dcnv3_core(*t, *params, backend=variant)

        if not backward:
            def fwd():
                with torch.no_grad():
                    return core(x, off, mask)
            return fwd
        ts = [t.detach().requires_grad_() for t in (x, off, mask)]
        grad = torch.ones(x.shape[0], off.shape[1], off.shape[2], x.shape[-1])

        def fwd_bwd():
            for t in ts:
                t.grad = None
            core(*ts).backward(grad)
        return fwd_bwd

    if args.memory_only:  # peak extra memory per call, in this allocator-instrumented process
        mem = {}
        for N in args.batches:
            for H, W, C, G in SHAPES:
                x, off, mask, params = make_inputs(N, H, W, C, G)
                for mode in ("forward", "forward+backward"):
                    for v in args.variants:
                        fn = runner(v, x, off, mask, params, mode != "forward")
                        fn()  # warm-up (compilation, first-touch)
                        mem[f"{N}x{H}x{W}x{C} G{G}|{mode}|{v}"] = peak_extra_memory(fn) / 2**20
        print(json.dumps(mem))
        return 0

    mem = run_memory_subprocess(["--batches", *map(str, args.batches), "--variants", *args.variants])
    rows = []
    for N in args.batches:
        for H, W, C, G in SHAPES:
            x, off, mask, params = make_inputs(N, H, W, C, G)
            for mode in ("forward", "forward+backward"):
                row = {"shape": f"{N}x{H}x{W}x{C} G{G}", "mode": mode}
                for v in args.variants:
                    fn = runner(v, x, off, mask, params, mode != "forward")
                    row[f"{v}_ms"] = median_time(fn, budget_s=args.budget) * 1000
                    row[f"{v}_mem_mb"] = mem[f"{row['shape']}|{mode}|{v}"]
                for v in args.variants:
                    if v != "reference" and "reference" in args.variants:
                        row[f"{v}_speedup"] = row["reference_ms"] / row[f"{v}_ms"]
                        row[f"{v}_mem_ratio"] = row[f"{v}_mem_mb"] / max(row["reference_mem_mb"], 1e-9)
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    columns = [("shape", "N×H×W×C G"), ("mode", "mode")]
    for v in args.variants:
        columns += [(f"{v}_ms", f"{v} ms"), (f"{v}_mem_mb", f"{v} peak MB")]
    for v in args.variants:
        if v != "reference" and "reference" in args.variants:
            columns += [(f"{v}_speedup", f"{v} speed-up ×"), (f"{v}_mem_ratio", f"{v} mem / ref")]
    md = write_results("dcnv3", rows, columns, args.out, machine_info())
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
