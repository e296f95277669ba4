"""Parity of the triton DCNv3 backend with the pure-PyTorch reference: output and all three gradients.

Runs the kernels on CUDA tensors when a GPU is present, otherwise on CPU tensors through the triton interpreter
(``TRITON_INTERPRET=1``, set in ``conftest.py``): shapes are tiny because the interpreter is slow.
Every call goes through ``dcnv3_core(..., backend="triton")``, i.e. the custom op and its autograd formula.
"""

from __future__ import annotations

import os

import pytest
import torch
from dcnv3_naive import dcnv3_naive

from shusheng.ops import dcnv3_core, dcnv3_core_pytorch, dcnv3_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not dcnv3_triton.is_available(DEVICE),
                                reason=f"triton backend cannot run on {DEVICE} here")

# (N, H, W, G, gc, (kh, kw), (sh, sw), (ph, pw), (dh, dw), offset_scale, remove_center, offset magnitude)
CASES = [
    (1, 5, 6, 1, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False, 1.0),
    (2, 6, 5, 2, 3, (3, 3), (2, 2), (1, 1), (1, 1), 1.0, False, 1.0),
    (1, 7, 6, 4, 5, (3, 3), (1, 1), (0, 0), (1, 1), 2.0, False, 1.5),
    (1, 6, 7, 3, 6, (3, 3), (1, 1), (2, 2), (2, 2), 0.5, True, 1.0),
    (2, 5, 4, 2, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, True, 2.0),
    (1, 8, 7, 1, 7, (5, 5), (1, 1), (2, 2), (1, 1), 1.0, False, 1.0),
    (1, 9, 8, 2, 3, (5, 5), (2, 2), (2, 2), (2, 2), 2.0, True, 1.0),
    (1, 6, 5, 3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False, 12.0),  # mostly far outside the image
    (1, 5, 7, 2, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2.0, False, 4.0),   # partly outside
    (1, 6, 9, 2, 3, (3, 5), (1, 2), (1, 2), (2, 1), 1.0, True, 1.0),    # every axis different
    (2, 4, 4, 1, 9, (3, 3), (2, 1), (0, 1), (1, 2), 0.3, False, 1.0),
]


def _ids(case):
    N, H, W, G, gc, k, s, p, d, scale, rc, mag = case
    return f"N{N}-{H}x{W}-G{G}x{gc}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-sc{scale}-rc{int(rc)}-off{mag}"


def _make(case, dtype, seed=0):
    N, H, W, G, gc, (kh, kw), (sh, sw), (ph, pw), (dh, dw), scale, rc, mag = case
    gen = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    P = kh * kw - int(rc)
    x = torch.randn(N, H, W, G * gc, generator=gen, dtype=torch.float64)
    off = torch.randn(N, Ho, Wo, G * P * 2, generator=gen, dtype=torch.float64) * mag
    mask = torch.rand(N, Ho, Wo, G * P, generator=gen, dtype=torch.float64)
    gout = torch.randn(N, Ho, Wo, G * gc, generator=gen, dtype=torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        # Coarse half offsets often land exactly on pixel rows/columns, where the bilinear derivative jumps
        # and the two implementations may legitimately take different one-sided derivatives: use odd
        # multiples of 1/8 (exact in half precision) to stay off the grid for offset_scale 1 and 2.
        off = (torch.round(off * 4 - 0.5) + 0.5) / 4
    tensors = [t.to(device=DEVICE, dtype=dtype) for t in (x, off, mask, gout)]
    params = (kh, kw, sh, sw, ph, pw, dh, dw, G, gc, scale, rc)
    return tensors, params


def _run(fn, x, off, mask, gout, params, **kw):
    x, off, mask = (t.detach().clone().requires_grad_() for t in (x, off, mask))
    out = fn(x, off, mask, *params, **kw)
    grads = torch.autograd.grad(out, (x, off, mask), gout)
    return (out, *grads)


def _compare(case, dtype, tol):
    (x, off, mask, gout), params = _make(case, dtype)
    got = _run(dcnv3_core, x, off, mask, gout, params, backend="triton")
    want = _run(dcnv3_core_pytorch, x, off, mask, gout, params)
    for name, g, w in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - w.double()).abs().max().item()
        scale = max(1.0, w.double().abs().max().item())
        assert err <= tol * scale, f"{name}: max abs error {err:.3g} (reference max {scale:.3g})"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_parity_float64(case):
    _compare(case, torch.float64, 1e-10)


@pytest.mark.parametrize("case", CASES[:3] + CASES[7:8], ids=_ids)
def test_parity_float32(case):
    _compare(case, torch.float32, 2e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", [CASES[4], CASES[6]], ids=_ids)
def test_parity_half(case, dtype, tol):
    _compare(case, dtype, tol)


def test_matches_naive_loops():
    """Independent check of the forward against a direct loop transcription of the sampling rule."""
    case = CASES[9]
    (x, off, mask, _), params = _make(case, torch.float64, seed=3)
    got = dcnv3_core(x, off, mask, *params, backend="triton").cpu()
    want = dcnv3_naive(x.cpu(), off.cpu(), mask.cpu(), *params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    (x, off, mask, _), params = _make((1, 4, 5, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False, 1.0),
                                      torch.float64, seed=5)
    inputs = tuple(t.requires_grad_() for t in (x, off, mask))
    assert torch.autograd.gradcheck(lambda a, b, c: dcnv3_core(a, b, c, *params, backend="triton"), inputs,
                                    fast_mode=True)


def test_is_available():
    assert dcnv3_triton.is_available(DEVICE)
    assert dcnv3_triton.is_available("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")
    assert not dcnv3_triton.is_available("meta")
