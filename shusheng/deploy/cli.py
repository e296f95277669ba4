"""``shusheng export MODEL --format onnx|onnx-int8|tensorrt --out PATH``: a checked deployment file.

Examples::

    shusheng export internimage_t --out internimage_t.onnx                     # random weights, 224 px, dynamic batch
    shusheng export shusheng-mini-clip --format onnx-int8 --out clip.int8.onnx  # static int8, SynthDrive calibration
    shusheng export runs/uniperceiver/final --out decoder-image.onnx --batch 8  # a saved folder, fixed batch
    shusheng export runs/seg/final --out seg.onnx                              # a segmenter: pixels -> logits
    shusheng export runs/det/final --out det-dense.onnx                        # a detector's dense part
    shusheng export internimage_b --format tensorrt --fp16 --out ii_b.engine     # needs a GPU and `tensorrt`

The file is compared with PyTorch on SynthDrive scenes and random inputs before it is written; the maximum
absolute error is printed. A failed check leaves no file and exits with status 1. Heavy imports in ``run`` only.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def _batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes 'dynamic' or a positive integer, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch must be positive, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a model to ONNX (plugin-free: DCNv3 as standard ops), int8 ONNX or a TensorRT "
                          "engine, checked against PyTorch before the file is written.")
    parser.add_argument("model", help="a registered backbone (internimage_t, internimage_test, ...), a bundled "
                                      "model (shusheng-mini-clip, shusheng-mini-uniperceiver) or a saved folder "
                                      "(also a segmenter, or a detector: its dense part)")
    parser.add_argument("--format", choices=("onnx", "onnx-int8", "tensorrt"), default="onnx")
    parser.add_argument("--out", required=True, metavar="PATH", help="the file to write")
    parser.add_argument("--batch", type=_batch, default="dynamic", metavar="dynamic|N",
                        help="dynamic batch dimension (default) or a fixed batch size")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size (default: the size the weights expect)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16; default 18)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest absolute difference from PyTorch allowed for fp32 ONNX (1e-4)")
    parser.add_argument("--int8-tol", type=float, default=0.2, metavar="REL",
                        help="largest relative L2 error allowed for int8 / fp16 files (0.2)")
    parser.add_argument("--quantization", choices=("static", "dynamic"), default="static",
                        help="onnx-int8: calibrated activations (static, default) or weights only (dynamic)")
    parser.add_argument("--calibration-images", type=int, default=64, metavar="N",
                        help="SynthDrive train scenes for static calibration (64)")
    parser.add_argument("--fp16", action="store_true", help="tensorrt: allow fp16 kernels")
    parser.add_argument("--int8", action="store_true", help="tensorrt: int8 from a calibrated Q/DQ graph")
    parser.add_argument("--device", default=None, help="tensorrt: CUDA device (default cuda)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from shusheng.deploy import ExportCheckError, export_model, resolve_target

    try:
        target = resolve_target(args.model, tuple(args.size) if args.size else None)
        res = export_model(target, args.out, args.format, batch=args.batch, opset=args.opset, atol=args.atol,
                           int8_tol=args.int8_tol, quantization=args.quantization,
                           calibration_images=args.calibration_images, fp16=args.fp16, int8=args.int8,
                           device=args.device)
    except ExportCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, **res.to_dict()}, indent=2))
        return 0
    measure = (f"max abs error {res.max_abs_error:.2e} (tolerance {res.tolerance:.0e})" if res.format == "onnx"
               else f"max abs error {res.max_abs_error:.2e}, relative L2 error {res.rel_error:.3f} "
                    f"(tolerance {res.tolerance:g})")
    print(f"{args.model} -> {res.path} ({res.format}, outputs {', '.join(target.output_names)}; batch {args.batch}, "
          f"input {'x'.join(map(str, target.input_shape))})\n"
          f"checked against PyTorch on {res.checked_on}: {measure}; {res.seconds:.1f} s")
    return 0
