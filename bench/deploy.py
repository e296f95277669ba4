"""Deployment runtimes side by side on 2 CPU threads: torch eager, torch.compile, ONNX Runtime fp32 and int8
(static and dynamic quantisation), and what ``runtime="auto"`` picks, with the int8 quality deltas.

    python bench/deploy.py                       # full run, quality on the 1000 test scenes (run alone: ~15 min)
    python bench/deploy.py --quick               # reduced: 1 trial, 100 scenes (~6 min, 1.5 of them compiling)

Models (each exported exactly as ``shusheng export`` writes it):

* ``mini-clip tower``: the bundled shusheng-mini-clip image tower (pixels → embedding + features), 128 px;
* ``decoder image side``: the bundled shusheng-mini-uniperceiver backbone + image tokenizer, 128 px;
* ``internimage_t``: InternImage-T with random weights (seed 0), 224 px, 1000-class head.

Each runtime is timed at batch 1 (latency, ms per batch) and batch 8 (throughput, images/s) in the same process,
one runtime after another, ``--trials`` times interleaved (median of the trials' medians), so the ``x eager``
ratios compare runtimes under the same load. int8 rows carry the task metric measured on the same test scenes
with the same text/answer side: retrieval P@10 (plain and paraphrase queries) for the mini-clip tower, VQA
accuracy by answer matching for the decoder, the relative L2 error of the logits for InternImage-T (random
weights have no task). ``auto`` is measured afresh (``refresh=True``) and reported with the runtime it chose.
Writes ``deploy.json`` / ``deploy.md`` to ``--out``. Other CPU work on the machine distorts every figure: run it
alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, median_time, reexec_with_bench_env, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = ("mini-clip", "decoder", "internimage_t")


def _targets(names, resolve_target):
    import torch

    out = {}
    for name in names:
        if name == "mini-clip":
            out["mini-clip tower"] = resolve_target("shusheng-mini-clip")
        elif name == "decoder":
            out["decoder image side"] = resolve_target("shusheng-mini-uniperceiver")
        else:
            torch.manual_seed(0)
            out[name] = resolve_target(name)
    return out


class _TorchOut:
    """An ONNX Runtime session called like a runner: tensors in, a tuple of tensors out."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x):
        import torch

        return tuple(torch.from_numpy(o) for o in self.session(x.float()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--trials", type=int, default=3, help="interleaved timing trials per runtime")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per trial")
    parser.add_argument("--quality-n", type=int, default=1000, help="test scenes for the int8 quality deltas")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run: 1 trial, 0.3 s budgets, 100 quality scenes, 16 calibration images")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.budget, args.quality_n, args.calibration_images = 1, 0.3, 100, 16
    reexec_with_bench_env()

    import logging
    import warnings

    import torch

    import shusheng.runtimes as runtimes
    from shusheng.deploy import export_model, resolve_target
    from shusheng.deploy.quality import RetrievalTask, VQATask
    from shusheng.runtimes import OnnxRuntimeRunner, TorchRunner
    from shusheng.runtimes.onnx import OnnxRunner

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="shusheng-bench-deploy-"))  # the int8 files of this run
    targets = _targets(args.models, resolve_target)
    rows: list[dict] = []

    for label, target in targets.items():
        module, shape = target.module.eval(), target.input_shape
        print(f"\n== {label}: exporting and quantising ...", flush=True)
        runners: dict[str, object] = {"torch eager": TorchRunner(module)}
        if not args.no_compile:
            compiled = torch.compile(module)
            runners["torch.compile"] = TorchRunner(compiled)
        runners["onnxruntime fp32"] = OnnxRuntimeRunner(module, shape)
        int8_files = {}
        for mode in ("static", "dynamic"):
            res = export_model(target, tmp / f"{label}-{mode}.onnx", "onnx-int8", quantization=mode,
                               calibration_images=args.calibration_images)
            int8_files[mode] = res
            runners[f"onnxruntime int8 {mode}"] = _TorchOut(OnnxRunner(res.path))
        choice = runtimes.select_runtime(module, shape, refresh=True)

        # -- timing: every runtime at every batch, trials interleaved
        xs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)) for b in args.batches}
        compile_s = None
        if "torch.compile" in runners:
            t0 = time.perf_counter()
            for x in xs.values():
                runners["torch.compile"](x)
            compile_s = time.perf_counter() - t0
        per: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.trials):
            for name, run in runners.items():
                for b, x in xs.items():
                    with torch.inference_mode():
                        per.setdefault((name, b), []).append(
                            median_time(lambda r=run, x=x: r(x), warmup=1, min_runs=3, budget_s=args.budget))
        ms = {k: 1000 * statistics.median(v) for k, v in per.items()}

        # -- quality of int8 against fp32 on the same task
        quality: dict[str, dict[str, float | str]] = {}
        print(f"== {label}: quality on {args.quality_n} test scenes ...", flush=True)
        if target.kind == "miniclip":
            from shusheng.miniclip import load_bundled

            task = RetrievalTask(load_bundled(), n=args.quality_n)
            for name in ("torch eager", "onnxruntime fp32", "onnxruntime int8 static", "onnxruntime int8 dynamic"):
                p = task.score(lambda x, r=runners[name]: r(x)[0])
                quality[name] = {"metric": "P@10 plain / paraphrase", "plain": p["plain"],
                                 "paraphrase": p["paraphrase"]}
        elif target.kind == "uniperceiver":
            from shusheng.uniperceiver import UniPerceiver
            from shusheng.weights import bundled_path

            task = VQATask(UniPerceiver.from_pretrained(bundled_path("shusheng-mini-uniperceiver")),
                           n=args.quality_n)
            for name in ("torch eager", "onnxruntime fp32", "onnxruntime int8 static", "onnxruntime int8 dynamic"):
                quality[name] = {"metric": "VQA accuracy", "value": task.score(lambda x, r=runners[name]: r(x)[0])}
        else:
            for name in ("onnxruntime int8 static", "onnxruntime int8 dynamic"):
                mode = name.rsplit(" ", 1)[1]
                quality[name] = {"metric": "relative L2 error of the outputs (check scenes)",
                                 "value": int8_files[mode].rel_error}

        base = quality.get("torch eager", {})
        for name in runners:
            for b in args.batches:
                row = {"model": label, "runtime": name, "batch": b, "ms_per_batch": ms[(name, b)],
                       "images_per_s": 1000 * b / ms[(name, b)], "x_eager": ms[("torch eager", b)] / ms[(name, b)]}
                q = quality.get(name)
                if q and b == args.batches[-1]:
                    row["metric"] = q["metric"]
                    if "plain" in q:
                        row["quality"] = f"{q['plain']:.3f} / {q['paraphrase']:.3f}"
                        row["delta_points"] = (f"{100 * (q['plain'] - base['plain']):+.1f} / "
                                               f"{100 * (q['paraphrase'] - base['paraphrase']):+.1f}")
                    else:
                        row["quality"] = round(q["value"], 4)
                        if "value" in base:
                            row["delta_points"] = f"{100 * (q['value'] - base['value']):+.1f}"
                if name == "torch.compile" and b == args.batches[0] and compile_s is not None:
                    row["note"] = f"first compiles {compile_s:.0f} s"
                rows.append(row)
        auto_ms = {int(b): t for b, t in choice.times_ms.get(choice.runtime, {}).items()}
        eager_auto = {int(b): t for b, t in choice.times_ms["torch"].items()}
        for b in sorted(auto_ms):
            rows.append({"model": label, "runtime": f"auto → {choice.runtime}", "batch": b,
                         "ms_per_batch": auto_ms[b], "images_per_s": 1000 * b / auto_ms[b],
                         "x_eager": eager_auto[b] / auto_ms[b],
                         "note": "auto's own measurement" + (f"; invalid: {', '.join(choice.invalid)}"
                                                             if choice.invalid else "")})
        for r in rows:
            if r["model"] == label:
                print(f"  {r['runtime']:<26} b{r['batch']:<2} {r['ms_per_batch']:9.2f} ms  "
                      f"{r['images_per_s']:8.1f} img/s  x{r['x_eager']:.2f}  {r.get('quality', '')} "
                      f"{r.get('delta_points', '')}", flush=True)

    meta = {**machine_info(), "quick": args.quick, "trials": args.trials, "budget_s": args.budget,
            "quality_n": args.quality_n, "calibration_images": args.calibration_images,
            "seconds": round(time.time() - t_start, 1),
            "command": "python bench/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    cols = [("model", "model"), ("runtime", "runtime"), ("batch", "batch"), ("ms_per_batch", "ms / batch"),
            ("images_per_s", "images/s"), ("x_eager", "x eager"), ("metric", "int8 quality metric"),
            ("quality", "value"), ("delta_points", "Δ points vs eager"), ("note", "note")]
    md = write_results("deploy" + ("_quick" if args.quick else ""), rows, cols, args.out, meta)
    print("\n" + md)
    print(f"\n{meta['seconds']} s; load average at start {meta['loadavg_at_start']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
