"""``shusheng ops``: report which DCNv3 backends run here and check each one against the reference."""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="run every available backend on random inputs and compare with the reference")
    parser.add_argument("--device", default="cpu", help="device to check (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def self_test(backend: str, device: str = "cpu", seed: int = 0) -> dict:
    """Forward and backward of ``backend`` against the float64 reference on a random problem.

    Returns a dict with the max absolute errors of the output and of the three gradients, and the time taken.
    """
    import torch

    from shusheng.ops import dcnv3_core, dcnv3_core_pytorch

    g = torch.Generator().manual_seed(seed)
    N, H, W, G, gc, K = 2, 9, 7, 4, 8, 3
    P = K * K
    args = (K, K, 1, 1, 1, 1, 1, 1, G, gc, 1.0, False)
    x = torch.randn(N, H, W, G * gc, generator=g, dtype=torch.float64)
    off = torch.randn(N, H, W, G * P * 2, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(N, H, W, G * P, generator=g, dtype=torch.float64)
    grad = torch.randn(N, H, W, G * gc, generator=g, dtype=torch.float64)

    def run(fn, dtype, dev, **kw):
        ts = [t.detach().to(dev, dtype).requires_grad_() for t in (x, off, mask)]
        out = fn(*ts, *args, **kw)
        out.backward(grad.to(dev, dtype))
        return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ts]

    ref = run(dcnv3_core_pytorch, torch.float64, "cpu")
    t0 = time.perf_counter()
    got = run(dcnv3_core, torch.float32, device, backend=backend)
    dt = time.perf_counter() - t0
    names = ("output", "grad_input", "grad_offset", "grad_mask")
    errs = {n: float((a - b).abs().max()) for n, a, b in zip(names, got, ref)}
    return {"backend": backend, "device": device, "max_abs_err": errs, "seconds": dt,
            "ok": all(e < 1e-3 for e in errs.values())}


def run(args: argparse.Namespace) -> int:
    from shusheng.ops import available_backends, default_backend

    backends = available_backends(args.device)
    report = {"device": args.device, "available": backends, "default": default_backend(args.device)}
    if args.check:
        report["checks"] = [self_test(b, args.device) for b in backends]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"DCNv3 backends on {args.device}: {', '.join(backends)} (default: {report['default']})")
        for c in report.get("checks", []):
            errs = ", ".join(f"{k} {v:.1e}" for k, v in c["max_abs_err"].items())
            print(f"  {c['backend']:<10} {'OK ' if c['ok'] else 'FAIL'} max |err| vs float64 reference: {errs}"
                  f" ({c['seconds'] * 1000:.0f} ms)")
    return 0 if all(c["ok"] for c in report.get("checks", [])) else 1
