"""Every GPU path of shusheng checked and timed in one run (< 10 min on one GPU); without a GPU it says so and
exits 0.

    python bench/gpu_check.py [--out bench/results] [--skip-tensorrt]

Checks (each against its reference, each timed against it in the same run):

1. DCNv3 ``triton`` kernels vs the pure-PyTorch reference on CUDA, forward and the three gradients, float32 /
   float16 / bfloat16, at the four InternImage-T level shapes (batch 8); times forward and forward+backward.
2. InternImage-T on CUDA: the triton backend vs the reference backend (fp32 logits), autocast fp16 and bf16 vs
   fp32; images/s at batch 32 for each.
3. The bundled pipelines on CUDA vs CPU: captions, VQA answers and mini-clip embeddings on SynthDrive scenes.
4. ONNX Runtime's CUDA provider (when installed): the mini-clip tower and InternImage-T vs PyTorch.
5. TensorRT (when the ``tensorrt`` package is installed): engines for InternImage-T, the mini-clip tower and the
   decoder image side, fp32 and fp16, built from the plugin-free ONNX and checked against PyTorch; then the
   ``runtime="tensorrt"`` caption pipeline vs eager captions; times each engine against eager PyTorch.

Prints one table (check, result, error, tolerance, timing, speed-up) and writes ``gpu_check.json`` / ``.md``.
Exit status 1 when a check fails, 0 otherwise (a path whose package is missing is reported as "skipped").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHAPES = [(56, 56, 64, 4), (28, 28, 128, 8), (14, 14, 256, 16), (7, 7, 512, 32)]  # InternImage-T at 224


def _cuda_time(fn, warmup: int = 3, runs: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.failed = 0

    def add(self, check: str, ok: bool | None, error: float | None = None, tol: float | None = None,
            ms: float | None = None, ref_ms: float | None = None, note: str = "") -> None:
        status = "skipped" if ok is None else "ok" if ok else "FAIL"
        self.failed += ok is False
        row = {"check": check, "result": status, "note": note}
        if error is not None:
            row["error"] = error
        if tol is not None:
            row["tolerance"] = tol
        if ms is not None:
            row["ms"] = ms
        if ms is not None and ref_ms is not None:
            row["speedup"] = ref_ms / ms
        self.rows.append(row)
        extra = f"err {error:.3g} (tol {tol:.3g})" if error is not None and tol is not None else ""
        timing = f"{ms:.3f} ms" + (f" x{ref_ms / ms:.2f}" if ref_ms else "") if ms is not None else ""
        print(f"[{status:>7}] {check:<62} {extra:<28} {timing} {note}", flush=True)

    def guard(self, check: str, fn) -> None:
        """Run one group of checks; an exception is reported as a failure of ``check`` and the run goes on."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
            traceback.print_exc()
            self.add(check, False, note=f"{type(e).__name__}: {str(e)[:160]}")


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


class _Fwd:
    """One DCNv3 call (and its backward when ``gout`` is given) on fixed inputs, for timing."""

    def __init__(self, ins, params, backend, gout=None):
        self.ins, self.params, self.backend, self.gout = ins, params, backend, gout

    def __call__(self):
        import torch

        from shusheng.ops import dcnv3_core

        out = dcnv3_core(*self.ins, *self.params, backend=self.backend)
        if self.gout is not None:
            torch.autograd.grad(out, self.ins, self.gout)
        return out


def check_dcnv3(rep: Report) -> None:
    import torch

    from shusheng.ops import available_backends, dcnv3_core

    dev = torch.device("cuda")
    if "triton" not in available_backends(dev):
        rep.add("DCNv3 triton backend", None, note=f"not available on {dev} (backends: {available_backends(dev)})")
        return
    for H, W, C, G in SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        N, P = 8, 9
        x = torch.randn(N, H, W, C, generator=g)
        off = torch.randn(N, H, W, G * P * 2, generator=g)
        mask = torch.softmax(torch.randn(N, H, W, G, P, generator=g), -1).reshape(N, H, W, G * P)
        params = (3, 3, 1, 1, 1, 1, 1, 1, G, C // G, 1.0, False)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
            ins = [t.to(dev, dtype).requires_grad_() for t in (x, off, mask)]
            ref_ins = [t.detach().to(dev, torch.float64).requires_grad_() for t in (x, off, mask)]
            out = dcnv3_core(*ins, *params, backend="triton")
            ref = dcnv3_core(*ref_ins, *params, backend="reference")
            gout = torch.randn_like(ref)
            grads = torch.autograd.grad(out, ins, gout.to(dtype))
            ref_grads = torch.autograd.grad(ref, ref_ins, gout)
            errs = [_rel(out.detach(), ref.detach())] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
            name = f"DCNv3 triton {str(dtype)[6:]} {H}x{W}x{C} G{G} (fwd + 3 grads, rel)"
            plain = [t.detach() for t in ins]
            rep.add(name, max(errs) <= tol, max(errs), tol, _cuda_time(_Fwd(plain, params, "triton")),
                    _cuda_time(_Fwd(plain, params, "reference")), note="forward vs reference")
            if dtype == torch.float32:
                rep.add(f"DCNv3 triton fwd+bwd {H}x{W}x{C}", True,
                        ms=_cuda_time(_Fwd(ins, params, "triton", gout.float())),
                        ref_ms=_cuda_time(_Fwd(ins, params, "reference", gout.float())), note="timing vs reference")


def check_internimage(rep: Report) -> None:
    import torch

    from shusheng.backbone import create_model

    torch.manual_seed(0)
    model = create_model("internimage_t").eval().cuda()
    x = torch.randn(32, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        for m in model.modules():  # the reference backend, for parity
            if hasattr(m, "backend"):
                m.backend = "reference"
        ref = model(x[:8]).float()
        ref_ms = _cuda_time(lambda: model(x), runs=5)
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = None  # the fastest: triton on CUDA
        out = model(x[:8]).float()
        ms = _cuda_time(lambda: model(x), runs=5)
        rep.add("InternImage-T fp32 default backend vs reference (logits, rel)", _rel(out, ref) <= 1e-4,
                _rel(out, ref), 1e-4, ms, ref_ms, note="batch 32, 224 px")
        for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
            with torch.autocast("cuda", dtype=dtype):
                half = model(x[:8]).float()
                hms = _cuda_time(lambda: model(x), runs=5)
            rep.add(f"InternImage-T autocast {str(dtype)[6:]} vs fp32 (logits, rel)", _rel(half, out) <= tol,
                    _rel(half, out), tol, hms, ms, note="speed-up vs fp32")


def check_pipelines(rep: Report) -> None:
    import numpy as np

    from shusheng.data import TEST_SEED, sample
    from shusheng.miniclip.pipelines import EmbeddingPipeline
    from shusheng.uniperceiver.pipelines import CaptionPipeline, VQAPipeline

    images = [sample(TEST_SEED, i, 128)[0] for i in range(16)]
    cpu, gpu = CaptionPipeline.from_pretrained(), CaptionPipeline.from_pretrained(device="cuda")
    same = sum(a == b for a, b in zip(cpu(images).captions, gpu(images).captions))
    rep.add("caption pipeline CUDA vs CPU (same captions)", same >= 15, note=f"{same}/16 identical")
    q = "What colour is the traffic light?"
    a, b = VQAPipeline(cpu.model)(images, q).answers, VQAPipeline(gpu.model)(images, q).answers
    rep.add("VQA pipeline CUDA vs CPU (same answers)", a == b, note=f"{sum(x == y for x, y in zip(a, b))}/16")
    e_cpu = EmbeddingPipeline.from_pretrained()(images).embeddings
    e_gpu = EmbeddingPipeline.from_pretrained(device="cuda")(images).embeddings
    err = float(np.abs(e_cpu - e_gpu).max())
    rep.add("mini-clip embeddings CUDA vs CPU (max abs)", err <= 1e-3, err, 1e-3)


def _targets():
    import torch

    from shusheng.deploy import resolve_target

    torch.manual_seed(0)
    return {"InternImage-T": resolve_target("internimage_t"), "mini-clip tower": resolve_target("shusheng-mini-clip"),
            "decoder image side": resolve_target("shusheng-mini-uniperceiver")}


def check_ort_cuda(rep: Report) -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        rep.add("ONNX Runtime CUDA provider", None, note="onnxruntime not installed")
        return
    import onnxruntime as ort
    import torch

    from shusheng.runtimes import OnnxRuntimeRunner, RuntimeCheckError

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        rep.add("ONNX Runtime CUDA provider", None, note=f"not in this onnxruntime ({ort.get_available_providers()})")
        return
    for name, t in _targets().items():
        module = t.module.cuda().eval()
        try:
            run = OnnxRuntimeRunner(module, t.input_shape, "cuda", atol=1e-3)
        except RuntimeCheckError as e:
            rep.add(f"ONNX Runtime CUDA {name}", False, note=str(e))
            continue
        x = torch.randn(8, *t.input_shape, device="cuda")
        with torch.inference_mode():
            ref_ms = _cuda_time(lambda m=module, x=x: m(x), runs=10)
        rep.add(f"ONNX Runtime CUDA {name} (max abs, relative to max|y|)", True, run.max_abs_error, 1e-3,
                _cuda_time(lambda r=run, x=x: r(x), runs=10), ref_ms, note="batch 8 vs eager")


def check_tensorrt(rep: Report) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        rep.add("TensorRT engines", None, note="the tensorrt package is not installed (pip install tensorrt)")
        return
    import torch

    from shusheng.deploy import export_model
    from shusheng.runtimes.tensorrt import TensorRTRunner

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "shusheng-gpu-check"
    for name, t in _targets().items():
        module = t.module.cuda().eval()
        x = torch.randn(8, *t.input_shape, device="cuda")
        with torch.inference_mode():
            ref_ms = _cuda_time(lambda m=module, x=x: m(x), runs=10)
        for fp16 in (False, True):
            prec = "fp16" if fp16 else "fp32"
            t0 = time.perf_counter()
            res = export_model(t, out / f"{name.replace(' ', '_')}-{prec}.engine", "tensorrt", fp16=fp16,
                               int8_tol=0.05, device="cuda")
            run = TensorRTRunner(res.path, "cuda")
            rep.add(f"TensorRT {prec} {name} (rel L2 vs PyTorch)", True, res.rel_error, res.tolerance,
                    _cuda_time(lambda r=run, x=x: r(x), runs=10), ref_ms,
                    note=f"batch 8 vs eager; build {time.perf_counter() - t0:.0f} s")
    from shusheng.data import TEST_SEED, sample
    from shusheng.uniperceiver.pipelines import CaptionPipeline

    images = [sample(TEST_SEED, i, 128)[0] for i in range(16)]
    eager = CaptionPipeline.from_pretrained(device="cuda")(images).captions
    trt = CaptionPipeline.from_pretrained(device="cuda", runtime="tensorrt")(images).captions
    same = sum(a == b for a, b in zip(eager, trt))
    rep.add("caption pipeline runtime=tensorrt vs eager (same captions)", same >= 15, note=f"{same}/16 identical")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-tensorrt", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check. On a GPU machine this script checks the DCNv3 triton kernels "
              "(fp32/fp16/bf16), InternImage-T on CUDA (autocast), the pipelines on CUDA, ONNX Runtime's CUDA "
              "provider and TensorRT engines against PyTorch, and times them.")
        return 0
    t0 = time.time()
    rep = Report()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rep.guard("DCNv3 triton kernels", lambda: check_dcnv3(rep))
    rep.guard("InternImage-T on CUDA", lambda: check_internimage(rep))
    rep.guard("pipelines on CUDA", lambda: check_pipelines(rep))
    rep.guard("ONNX Runtime CUDA", lambda: check_ort_cuda(rep))
    if not args.skip_tensorrt:
        rep.guard("TensorRT", lambda: check_tensorrt(rep))
    meta = {**machine_info(), "gpu": torch.cuda.get_device_name(), "seconds": round(time.time() - t0, 1),
            "failed": rep.failed}
    md = write_results("gpu_check", rep.rows, [("check", "check"), ("result", "result"), ("error", "error"),
                                               ("tolerance", "tolerance"), ("ms", "ms"),
                                               ("speedup", "x reference"), ("note", "note")], args.out, meta)
    print("\n" + md)
    print(f"\n{len(rep.rows)} checks, {rep.failed} failed, {meta['seconds']} s")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
