"""Parity of the ``cpu`` DCNv3 backend (fused C++ kernel) with the pure-PyTorch reference.

Everything goes through ``dcnv3_core(..., backend="cpu")``, i.e. the ``torch.library`` custom op and its autograd
registration. Tolerances:

* float64 vs float64 reference: output and all three gradients within 1e-10 (relative and absolute);
* float32 vs float64 reference: within 1e-5 of the largest magnitude of each tensor;
* float16 / bfloat16 vs float64 reference on the same (rounded) inputs: within 2e-3 (float16) and 1.5e-2
  (bfloat16) of the largest magnitude of each tensor. The kernel accumulates in float32; the remaining error is
  the final rounding to the low-precision dtype. Offsets there are kept away from integers, because with coarse
  low-precision offsets sampling positions would otherwise land exactly on pixel centres, where the bilinear
  derivative jumps and any rounding of the position picks a side.
"""

from __future__ import annotations

import logging

import pytest
import torch

from shusheng.ops import dcnv3_core, dcnv3_core_pytorch, dcnv3_cpu
from shusheng.ops.dcnv3_reference import output_size

if not dcnv3_cpu.is_available("cpu"):
    pytest.skip(f"DCNv3 CPU kernel unavailable: {dcnv3_cpu.build_error()}", allow_module_level=True)

# (N, H, W, G, gc, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, offset_scale,
#  remove_center, offset magnitude)
CASES = [
    (1, 8, 8, 1, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0),
    (2, 7, 9, 2, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, True, 1.0),
    (3, 6, 5, 4, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1.0, False, 2.0),
    (1, 9, 7, 3, 5, 3, 3, 1, 1, 0, 0, 1, 1, 0.5, False, 1.0),
    (2, 8, 10, 2, 32, 3, 3, 1, 1, 2, 2, 2, 2, 2.0, False, 1.0),
    (1, 10, 9, 1, 3, 5, 5, 1, 1, 2, 2, 1, 1, 1.0, False, 1.0),
    (2, 11, 8, 2, 12, 5, 5, 2, 1, 2, 1, 1, 1, 1.0, True, 2.0),
    (1, 9, 9, 3, 6, 3, 5, 1, 1, 1, 2, 1, 1, 1.0, False, 1.0),
    (1, 9, 8, 2, 7, 5, 3, 1, 2, 2, 0, 1, 2, 0.5, False, 1.0),
    (2, 6, 6, 8, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0),
    (1, 7, 7, 8, 16, 3, 3, 1, 1, 1, 1, 1, 1, 2.0, True, 1.0),
    (1, 7, 5, 5, 24, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.5),
    (2, 5, 6, 2, 20, 3, 3, 1, 1, 1, 0, 1, 1, 1.0, False, 1.0),
    (1, 6, 7, 2, 10, 3, 3, 2, 1, 0, 1, 1, 1, 2.0, False, 1.0),
    (1, 12, 11, 2, 9, 3, 3, 2, 2, 0, 0, 2, 2, 1.0, False, 1.0),
    (2, 9, 6, 1, 16, 3, 3, 1, 1, 0, 2, 1, 2, 0.5, True, 1.0),
    (1, 5, 8, 3, 11, 1, 3, 1, 1, 0, 1, 1, 1, 1.0, True, 1.0),
    (3, 4, 4, 2, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 3.0),
    (1, 3, 3, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0),
    (2, 8, 7, 4, 32, 3, 3, 2, 2, 1, 1, 1, 1, 1.0, True, 1.0),
    (1, 13, 10, 2, 16, 5, 5, 1, 1, 4, 4, 2, 2, 2.0, False, 1.0),
    (1, 8, 9, 6, 3, 5, 3, 2, 1, 2, 1, 1, 1, 0.5, True, 2.0),
    # wide groups: several channel chunks plus a tail
    (1, 5, 6, 2, 70, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0),
    (2, 4, 5, 1, 72, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, True, 1.0),
    # samples far outside the image (whole samples zero, partial corners at the borders)
    (2, 6, 7, 2, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 20.0),
    (1, 5, 6, 3, 5, 3, 3, 1, 1, 1, 1, 1, 1, 2.0, True, 50.0),
    (2, 7, 6, 4, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 8.0),
    (1, 6, 9, 2, 32, 5, 3, 1, 2, 2, 0, 1, 2, 1.0, False, 6.0),
]


def _case_id(case) -> str:
    N, H, W, G, gc, kh, kw, sh, sw, ph, pw, dh, dw, s, rc, mag = case
    return (f"n{N}_{H}x{W}_g{G}x{gc}_k{kh}x{kw}_s{sh}{sw}_p{ph}{pw}_d{dh}{dw}_os{s}"
            f"{'_rc' if rc else ''}_off{mag}")


def _inputs(case, dtype, seed=0, integer_safe=False):
    N, H, W, G, gc, kh, kw, sh, sw, ph, pw, dh, dw, s, rc, mag = case
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = output_size(H, kh, sh, ph, dh), output_size(W, kw, sw, pw, dw)
    P = kh * kw - (1 if rc else 0)
    x = torch.randn(N, H, W, G * gc, generator=gen, dtype=torch.float64)
    if integer_safe:
        # integer part in [-mag, mag] plus a fraction in [0.1, 0.9]: positions stay off pixel centres
        whole = torch.randint(-int(mag), int(mag) + 1, (N, Ho, Wo, G * P * 2), generator=gen)
        off = whole + 0.1 + 0.8 * torch.rand(N, Ho, Wo, G * P * 2, generator=gen, dtype=torch.float64)
    else:
        off = torch.randn(N, Ho, Wo, G * P * 2, generator=gen, dtype=torch.float64) * mag
    mask = torch.rand(N, Ho, Wo, G * P, generator=gen, dtype=torch.float64) * 2 - 0.5
    grad_out = torch.randn(N, Ho, Wo, G * gc, generator=gen, dtype=torch.float64)
    params = (kh, kw, sh, sw, ph, pw, dh, dw, G, gc, s, rc)
    return [t.to(dtype) for t in (x, off, mask)], grad_out.to(dtype), params


def _run(fn, tensors, grad_out, params, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *params, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(),) + tuple(grads)


def _assert_relative(actual, expected, tol, name):
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * max(scale, 1e-12), f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


NAMES = ("output", "grad_input", "grad_offset", "grad_mask")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_float64_matches_reference(case):
    tensors, grad_out, params = _inputs(case, torch.float64)
    got = _run(dcnv3_core, tensors, grad_out, params, backend="cpu")
    want = _run(dcnv3_core_pytorch, tensors, grad_out, params)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[8], CASES[13], CASES[22], CASES[23], CASES[24]],
                         ids=_case_id)
def test_float32_matches_reference(case):
    tensors, grad_out, params = _inputs(case, torch.float32, seed=1)
    got = _run(dcnv3_core, tensors, grad_out, params, backend="cpu")
    want = _run(dcnv3_core_pytorch, [t.double() for t in tensors], grad_out.double(), params)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32, name
        _assert_relative(a, b, 1e-5, name)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[12], CASES[25]], ids=_case_id)
def test_low_precision_matches_float64_reference(case, dtype, tol):
    tensors, grad_out, params = _inputs(case, dtype, seed=2, integer_safe=True)
    got = _run(dcnv3_core, tensors, grad_out, params, backend="cpu")
    want = _run(dcnv3_core_pytorch, [t.double() for t in tensors], grad_out.double(), params)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype, name
        _assert_relative(a, b, tol, name)


def test_gradcheck_float64():
    case = (1, 4, 5, 2, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0)
    tensors, _, params = _inputs(case, torch.float64, seed=3)
    leaves = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(lambda i, o, m: dcnv3_core(i, o, m, *params, backend="cpu"), leaves,
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_samples_outside_are_zero_with_zero_gradients():
    case = (1, 5, 5, 2, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, False, 1.0)
    tensors, grad_out, params = _inputs(case, torch.float32)
    x, off, mask = tensors
    off = torch.full_like(off, 100.0)  # every sample far to the bottom-right of the image
    out, gx, goff, gmask = _run(dcnv3_core, [x, off, mask], grad_out, params, backend="cpu")
    for t in (out, gx, goff, gmask):
        assert torch.count_nonzero(t) == 0


def test_is_available_only_for_cpu():
    assert dcnv3_cpu.is_available("cpu")
    assert dcnv3_cpu.is_available(torch.device("cpu"))
    assert not dcnv3_cpu.is_available("meta")
    assert not dcnv3_cpu.is_available("cuda")


def test_build_failure_warns_once_and_reports_unavailable(monkeypatch, caplog):
    calls = []

    def failing_load():
        calls.append(1)
        raise RuntimeError("Error building extension: no compiler")

    monkeypatch.setattr(dcnv3_cpu, "_state", {"tried": False, "ok": False, "error": None})
    monkeypatch.setattr(dcnv3_cpu, "_ops_registered", lambda: False)
    monkeypatch.setattr(dcnv3_cpu, "_load", failing_load)
    with caplog.at_level(logging.WARNING, logger=dcnv3_cpu.__name__):
        assert not dcnv3_cpu.is_available("cpu")
        assert not dcnv3_cpu.is_available("cpu")
    assert len(calls) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reference backend" in warnings[0].getMessage() and "no compiler" in warnings[0].getMessage()
    assert "no compiler" in dcnv3_cpu.build_error()


def test_build_key_depends_on_cpu(monkeypatch):
    monkeypatch.setattr(dcnv3_cpu, "_cpu_signature", lambda: "cpu-a")
    key_a = dcnv3_cpu._build_key()
    monkeypatch.setattr(dcnv3_cpu, "_cpu_signature", lambda: "cpu-b")
    assert dcnv3_cpu._build_key() != key_a
    monkeypatch.setattr(dcnv3_cpu, "_cpu_signature", lambda: "cpu-a")
    assert dcnv3_cpu._build_key() == key_a
