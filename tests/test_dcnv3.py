"""DCNv3 core: reference semantics, validation, the module, torch.compile, autocast and ONNX export.

Backend parity (cpu, triton) against the reference lives in test_dcnv3_cpu.py / test_dcnv3_triton.py.
"""

import pytest
import torch
import torch.nn.functional as F
from dcnv3_naive import dcnv3_naive

from shusheng.ops import (
    DCNv3,
    DCNv3ArgumentError,
    available_backends,
    dcnv3_core,
    dcnv3_core_pytorch,
    default_backend,
)
from shusheng.ops.dcnv3_reference import output_size


def make_case(N=2, H=6, W=7, G=2, gc=3, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, rc=False,
              scale=1.0, off_std=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = output_size(H, kh, sh, ph, dh), output_size(W, kw, sw, pw, dw)
    P = kh * kw - int(rc)
    x = torch.randn(N, H, W, G * gc, generator=g, dtype=torch.float64)
    off = torch.randn(N, Ho, Wo, G * P * 2, generator=g, dtype=torch.float64) * off_std
    mask = torch.rand(N, Ho, Wo, G * P, generator=g, dtype=torch.float64)
    args = (kh, kw, sh, sw, ph, pw, dh, dw, G, gc, scale, rc)
    return x.to(dtype), off.to(dtype), mask.to(dtype), args


# (kh, kw, sh, sw, ph, pw, dh, dw, G, gc, scale, rc, H, W, N)
GRID = [
    (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False, 5, 6, 2),
    (3, 3, 2, 2, 0, 0, 1, 1, 1, 4, 0.5, False, 7, 5, 1),
    (3, 3, 1, 1, 2, 2, 2, 2, 3, 2, 2.0, True, 6, 6, 3),
    (5, 5, 1, 1, 2, 2, 1, 1, 2, 2, 1.0, False, 6, 5, 1),
    (5, 3, 1, 2, 2, 1, 1, 2, 3, 2, 0.5, False, 6, 8, 2),  # non-square kernel, pad_h != pad_w
    (3, 3, 2, 1, 1, 0, 1, 2, 4, 1, 1.0, True, 5, 9, 1),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "k{}x{}s{}{}p{}{}d{}{}g{}c{}o{}rc{}".format(*c[:12]))
def test_reference_matches_direct_sampling_rule(case):
    kh, kw, sh, sw, ph, pw, dh, dw, G, gc, scale, rc, H, W, N = case
    x, off, mask, args = make_case(N, H, W, G, gc, kh, kw, sh, sw, ph, pw, dh, dw, rc, scale, off_std=3.0)
    out = dcnv3_core_pytorch(x, off, mask, *args)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dcnv3_naive(x, off, mask, *args), atol=1e-12, rtol=0)


def test_reference_zero_offsets_is_a_masked_box_filter():
    # With zero offsets, offset_scale 1 and uniform mask the operator is a per-channel 3x3 mean, zero padded.
    x, off, _, args = make_case(N=1, H=5, W=4, G=2, gc=3, off_std=0.0)
    mask = torch.full((1, 5, 4, 2 * 9), 1 / 9, dtype=torch.float64)
    out = dcnv3_core_pytorch(x, off, mask, *args)
    box = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(out, box.permute(0, 2, 3, 1), atol=1e-12, rtol=0)


def test_offset_scale_scales_kernel_displacement():
    # offset_scale 2 with zero offsets samples like dilation 2 (spec: the kernel displacement is scaled too).
    x, off, mask, _ = make_case(N=1, H=8, W=8, G=1, gc=2, off_std=0.0)
    a = dcnv3_core_pytorch(x, off, mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 2.0, False)
    b = dcnv3_core_pytorch(x, off, mask, 3, 3, 1, 1, 2, 2, 2, 2, 1, 2, 1.0, False)
    torch.testing.assert_close(a, b)


def test_samples_far_outside_are_zero():
    x, off, mask, args = make_case(N=1, H=4, W=4, G=1, gc=2, off_std=0.0)
    out = dcnv3_core_pytorch(x, off + 100.0, mask, *args)
    assert out.abs().max() == 0


def test_reference_gradcheck_float64():
    x, off, mask, args = make_case(N=1, H=4, W=3, G=2, gc=2, rc=True, scale=0.5)
    ts = [t.requires_grad_() for t in (x, off, mask)]
    assert torch.autograd.gradcheck(lambda a, b, c: dcnv3_core_pytorch(a, b, c, *args), ts)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float32, 1e-5)])
def test_reference_low_precision(dtype, tol):
    x, off, mask, args = make_case(N=2, H=6, W=5, G=2, gc=8)
    ref = dcnv3_core_pytorch(x, off, mask, *args)
    out = dcnv3_core(x.to(dtype), off.to(dtype), mask.to(dtype), *args, backend="reference")
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol


def test_non_contiguous_input_is_handled():
    x, off, mask, args = make_case(N=2, H=5, W=6, G=2, gc=4)
    x_nc = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, non-contiguous
    assert not x_nc.is_contiguous()
    for backend in available_backends():
        torch.testing.assert_close(dcnv3_core(x_nc, off, mask, *args, backend=backend),
                                   dcnv3_core_pytorch(x, off, mask, *args), atol=1e-9, rtol=0)


def test_offset_and_mask_are_cast_to_input_dtype():
    x, off, mask, args = make_case()
    out = dcnv3_core(x.float(), off, mask.half(), *args, backend="reference")
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------

def _call(x, off, mask, args, **kw):
    return dcnv3_core(x, off, mask, *args, **kw)


def test_error_channels_mismatch():
    x, off, mask, args = make_case(G=2, gc=3)
    with pytest.raises(DCNv3ArgumentError, match=r"6 channels .* group \* group_channels = 2 \* 4 = 8"):
        _call(x, off, mask, args[:9] + (4,) + args[10:])


def test_error_nchw_input_gets_a_hint():
    x, off, mask, args = make_case(G=2, gc=3)
    with pytest.raises(DCNv3ArgumentError, match=r"channels-first .*permute\(0, 2, 3, 1\)"):
        _call(x.permute(0, 3, 1, 2), off, mask, args)


def test_error_offset_shape():
    x, off, mask, args = make_case(G=2, gc=3)
    with pytest.raises(DCNv3ArgumentError, match=r"offset has shape .* needs \(2, 6, 7, 36\)"):
        _call(x, off[..., :-2], mask, args)


def test_error_offset_shape_from_stride():
    x, off, mask, args = make_case(G=2, gc=3)
    stride2 = args[:2] + (2, 2) + args[4:]
    with pytest.raises(DCNv3ArgumentError, match=r"stride 2x2.* needs \(2, 3, 4, 36\)"):
        _call(x, off, mask, stride2)


def test_error_mask_shape():
    x, off, mask, args = make_case(G=2, gc=3)
    with pytest.raises(DCNv3ArgumentError, match=r"mask has shape .* needs \(2, 6, 7, 18\)"):
        _call(x, off, mask[..., :-1], args)


def test_error_not_4d():
    x, off, mask, args = make_case()
    with pytest.raises(DCNv3ArgumentError, match="input must be 4-D channels-last"):
        _call(x[0], off, mask, args)


def test_error_integer_dtype():
    x, off, mask, args = make_case()
    with pytest.raises(DCNv3ArgumentError, match=r"offset must be float16, bfloat16, float32 or float64"):
        _call(x, off.long(), mask, args)


def test_error_device_mismatch():
    x, off, mask, args = make_case()
    with pytest.raises(DCNv3ArgumentError, match="one device"):
        _call(x, off.to("meta"), mask, args)


def test_error_too_small_input():
    x, off, mask, args = make_case(H=2, W=2, ph=0, pw=0)
    big = (5, 5) + args[2:]
    with pytest.raises(DCNv3ArgumentError, match="too small for kernel 5x5"):
        _call(x, off, mask, big)


def test_error_unknown_backend_and_even_remove_center():
    x, off, mask, args = make_case()
    with pytest.raises(DCNv3ArgumentError, match="unknown DCNv3 backend 'cuda'"):
        _call(x, off, mask, args, backend="cuda")
    with pytest.raises(DCNv3ArgumentError, match="remove_center needs an odd kernel"):
        _call(x, off, mask, (2, 2) + args[2:11] + (True,))


def test_backend_listing():
    backends = available_backends()
    assert backends[-1] == "reference"
    assert default_backend() == backends[0]


# --------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------

def test_module_parameter_names_and_shapes():
    m = DCNv3(64, group=4, center_feature_scale=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "dw_conv.0.weight": (64, 1, 3, 3), "dw_conv.0.bias": (64,),
        "dw_conv.1.1.weight": (64,), "dw_conv.1.1.bias": (64,),
        "offset.weight": (72, 64), "offset.bias": (72,), "mask.weight": (36, 64), "mask.bias": (36,),
        "input_proj.weight": (64, 64), "input_proj.bias": (64,),
        "output_proj.weight": (64, 64), "output_proj.bias": (64,),
        "center_feature_scale_proj_weight": (4, 64), "center_feature_scale_proj_bias": (4,),
    }
    assert DCNv3(64, group=4, remove_center=True, dw_kernel_size=5).offset.weight.shape == (64, 64)


def test_module_at_init_is_a_box_filter_of_the_projection():
    torch.manual_seed(0)
    m = DCNv3(16, group=4, backend="reference").double()
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    v = m.input_proj(x).permute(0, 3, 1, 2)
    box = F.avg_pool2d(v, 3, stride=1, padding=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.output_proj(box))


def test_module_center_feature_scale_gate_starts_at_half():
    torch.manual_seed(0)
    m = DCNv3(16, group=4, center_feature_scale=True, backend="reference").double()
    plain = DCNv3(16, group=4, backend="reference").double()
    plain.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(1, 4, 4, 16, dtype=torch.float64)
    v = m.input_proj(x)
    y_plain = plain(x)
    # output_proj is affine: out = W(0.5*core + 0.5*v) + b = 0.5*(W core + b) + 0.5*(W v + b)
    expected = 0.5 * y_plain + 0.5 * m.output_proj(v)
    torch.testing.assert_close(m(x), expected)


def test_module_rejects_channels_first():
    m = DCNv3(16, group=4)
    with pytest.raises(ValueError, match=r"channels-first: use x.permute\(0, 2, 3, 1\)"):
        m(torch.randn(1, 16, 5, 5))


def test_module_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = DCNv3(16, group=2, center_feature_scale=True)
    # perturb the zero-initialised offset/mask weights so their gradients are not trivially structured
    for p in (m.offset.weight, m.mask.weight):
        torch.nn.init.normal_(p, std=0.1)
    m(torch.randn(2, 6, 5, 16)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_autocast_bfloat16():
    torch.manual_seed(0)
    m = DCNv3(32, group=4)
    x = torch.randn(2, 7, 7, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    m = DCNv3(16, group=2, backend=backend)
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    x = torch.randn(2, 6, 5, 16, requires_grad=True)
    ref = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    g_out, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_standard_ops_and_parity(tmp_path, dynamo):
    pytest.importorskip("onnxruntime")
    from shusheng.deploy.onnx import OnnxRunner, export_onnx, max_abs_error

    torch.manual_seed(0)
    m = DCNv3(32, group=4, offset_scale=2.0, center_feature_scale=True).eval()
    for p in (m.offset.weight, m.mask.weight):
        torch.nn.init.normal_(p, std=0.3)
    path = export_onnx(m, torch.randn(2, 9, 11, 32), tmp_path / "dcn.onnx", opset=17, dynamo=dynamo)
    runner = OnnxRunner(path)
    assert max_abs_error(m, runner, torch.randn(3, 9, 11, 32)) <= 1e-4  # other batch size: dynamic axis


def test_onnx_rejects_old_opset(tmp_path):
    from shusheng.deploy.onnx import export_onnx

    with pytest.raises(ValueError, match="opset >= 16"):
        export_onnx(DCNv3(8, group=2), torch.randn(1, 4, 4, 8), tmp_path / "x.onnx", opset=13)


def test_cli_ops_check(capsys):
    from shusheng.cli import main

    assert main(["ops", "--check"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "OK" in out and "FAIL" not in out
