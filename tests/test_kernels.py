"""Low-bit kernels (diffquant::qconv), converted layers and convert().

CPU (default suite): the reference op against an independent dequantize-then-conv definition,
packing, opcheck of the custom op, convert() of a tiny UNet layer by layer against the fake-quant
model, refusals. GPU (``pytest -m gpu``): the Triton kernel against the reference on random shapes
(odd sizes included) with poisoned outputs, torch.compile and CUDA-graph usability, FP8 through
torch._scaled_mm, a converted UNet in bf16 against the fake-quant model.
"""
import copy
import json
import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from diffquant.convert import config_for_backend, convert, weight_bytes
from diffquant.kernels import qconv, qconv_ref, triton_available
from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.reference import pack_w4, pad_correction, unpack_w4
from diffquant.kernels.tuning import CANDIDATES_WIDE
from diffquant.models.adapter import call_model, example_inputs
from diffquant.models.configs import build_unet
from diffquant.quantize import calibrate, quantize
from _unets import tiny_sd_unet, tiny_unet_config


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The CPU tests run tiny convs (float64 reference included): one intra-op thread is faster
    than two (OpenMP barriers cost more than the work, badly so on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = tiny_unet_config(in_channels=4)


def _rand_case(kind, n=2, cin=40, cout=24, h=7, w=6, k=3, wzp=False, a_zp=0, device="cpu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "int8":
        x = torch.randint(-128, 128, (n, cin, h, w), generator=g, dtype=torch.int8)
    elif kind == "fp8":
        x = (torch.randn(n, cin, h, w, generator=g) * 4).to(torch.float8_e4m3fn)
    else:
        x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    if kind in ("w4a8", "w4a16"):
        wt = pack_w4(torch.randint(-8, 8, (cout, k, k, cin), generator=g))
        if kind == "w4a8":
            x = torch.randint(-128, 128, (n, cin, h, w), generator=g, dtype=torch.int8)
    elif kind == "fp8":
        wt = torch.randn(cout, k, k, cin, generator=g).to(torch.float8_e4m3fn)
    else:
        wt = torch.randint(-128, 128, (cout, k, k, cin), generator=g, dtype=torch.int8)
    x = x.contiguous(memory_format=torch.channels_last).to(device)
    a_int = x.dtype == torch.int8
    ws = (torch.rand(cout, generator=g) * 0.01 + 1e-3).to(device)
    asc = None if kind == "w4a16" else (torch.rand(1, generator=g) + 0.1).to(device)
    corr = torch.randint(-1000, 1000, (cout,), generator=g, dtype=torch.int32).to(device) if a_int else None
    wz = torch.randint(-5, 5, (cout,), generator=g, dtype=torch.int32).to(device) if wzp else None
    bias = torch.randn(cout, generator=g).to(device)
    a_zp = a_zp if a_int else 0
    # int8 weights, no weight zero point: the kernel's zero-filled padding + epilogue fix-up path
    pc = pad_correction(wt, a_zp).to(device) if kind == "int8" and not wzp and a_zp else None
    return dict(x=x, w=wt.to(device), w_scale=ws, a_scale=asc, corr=corr, wzp=wz, bias=bias, add=None,
                a_zp=a_zp, w4=kind in ("w4a8", "w4a16"), pad_corr=pc)


def _call(fn, c, stride=1, pad=1, dil=1, out_dtype=torch.float32):
    extra = (c["pad_corr"],) if c.get("pad_corr") is not None else ()
    return fn(c["x"], c["w"], c["w_scale"], c["a_scale"], c["corr"], c["wzp"], c["bias"], c["add"], c["a_zp"],
              [stride, stride], [pad, pad], [dil, dil], c["w4"], out_dtype, *extra)


def _definition(c, stride, pad, dil):
    """out = conv((x - a_zp), (w - wzp)) * a_scale * w_scale + bias, from scratch in float64."""
    wv = (unpack_w4(c["w"]) if c["w4"] else c["w"]).double().permute(0, 3, 1, 2)
    if c["wzp"] is not None:
        wv = wv - c["wzp"].double().view(-1, 1, 1, 1)
    xv = c["x"].double() - c["a_zp"]
    out = F.conv2d(xv, wv, None, stride, pad, dil)
    # corr folds the activation zero point: -a_zp * colsum(v_w) + K * a_zp * wzp; remove the
    # test's random corr and add the true one
    out = out * (c["w_scale"].double() * (c["a_scale"].double() if c["a_scale"] is not None else 1.0)).view(1, -1, 1, 1)
    return out + c["bias"].double().view(1, -1, 1, 1)


def _true_corr(c):
    v = (unpack_w4(c["w"]) if c["w4"] else c["w"]).to(torch.int64).reshape(c["w"].shape[0], -1)
    k = v.shape[1]
    corr = -c["a_zp"] * v.sum(1)
    if c["wzp"] is not None:
        corr = corr + k * c["a_zp"] * c["wzp"].to(torch.int64)
    return corr.to(torch.int32)


# ---- CPU: reference op ---------------------------------------------------------------------------
def test_pack_w4_roundtrip_and_size():
    v = torch.randint(-8, 8, (5, 3, 3, 10))
    p = pack_w4(v)
    assert p.dtype == torch.uint8 and p.shape == (5, 3, 3, 5)
    assert torch.equal(unpack_w4(p).to(torch.int64), v)
    with pytest.raises(ValueError, match="even"):
        pack_w4(torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("kind,wzp,a_zp,stride,pad,dil", [
    ("int8", False, 0, 1, 1, 1), ("int8", True, -7, 2, 1, 1), ("int8", False, 11, 1, 2, 2),
    ("w4a8", True, 3, 1, 1, 1), ("w4a16", False, 0, 1, 0, 1), ("fp8", False, 0, 2, 1, 1)])
def test_reference_matches_definition(kind, wzp, a_zp, stride, pad, dil):
    c = _rand_case(kind, wzp=wzp, a_zp=a_zp)
    if c["corr"] is not None:
        c["corr"] = _true_corr(c)
    got = _call(qconv_ref, c, stride, pad, dil, torch.float64)
    want = _definition(c, stride, pad, dil)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_reference_linear_and_add():
    c = _rand_case("int8", cin=33, cout=17, h=1, w=1, k=1, a_zp=5)
    c["add"] = torch.randn(2, 17, 1, 1)
    got = _call(qconv_ref, c, 1, 0)
    c2 = dict(c, add=None)
    torch.testing.assert_close(got, _call(qconv_ref, c2, 1, 0) + c["add"], rtol=1e-6, atol=1e-6)


def test_pad_correction_is_the_padding_share():
    """The kernel's padding scheme: zero-filled padding plus a_zp * (per-tap weight sum) for each padded
    tap of an output pixel equals the reference, whose padding holds a_zp."""
    c = _rand_case("int8", cin=12, cout=5, h=5, w=4, a_zp=-9)
    c["corr"] = None
    ref = _call(qconv_ref, c, 1, 1, 1, torch.float64)
    pc = pad_correction(c["w"], c["a_zp"]).double()  # [Cout, 9]
    zero = _call(qconv_ref, dict(c, a_zp=0), 1, 1, 1, torch.float64)
    inside = torch.zeros(1, 1, 7, 6, dtype=torch.float64)
    inside[..., 1:-1, 1:-1] = 1
    fix = torch.zeros_like(ref)
    for t in range(9):
        kh, kw = divmod(t, 3)
        outside = 1 - inside[..., kh:kh + 5, kw:kw + 4]  # [1, 1, Ho, Wo]: tap t reads padding
        fix += outside * pc[:, t].view(1, -1, 1, 1)
    scale = (c["w_scale"].double() * c["a_scale"].double()).view(1, -1, 1, 1)
    torch.testing.assert_close(zero + fix * scale, ref, rtol=1e-12, atol=1e-9)


def test_scaled_mm_operand_layouts(monkeypatch):
    """FP8 1x1 / linear layers through torch._scaled_mm hand cuBLASLt a row-major first and a
    column-major second operand, whatever the input's strides (a transposed attention input
    included); checked with a stand-in that applies cuBLASLt's layout rule."""
    def layout(t):
        (m, n), (s0, s1) = t.shape, t.stride()
        return "col" if s0 == 1 and s1 >= max(1, m) else "row" if s1 == 1 and s0 >= max(1, n) else "bad"

    calls = []

    def fake(a, b, scale_a, scale_b, bias=None, out_dtype=None, **kw):
        calls.append((layout(a), layout(b)))
        y = (a.float() * scale_a) @ (b.float() * scale_b)
        return (y if bias is None else y + bias.float()).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake)
    model, q, inputs = _calibrated("fp8")
    cm = convert(q, "fp8", attention="float")
    for m in cm.modules():
        if isinstance(m, LowBitLayer) and len(m.parts) == 1 and m.kernel_size == (1, 1):
            m.fp8_gemm = "scaled_mm"
    with torch.no_grad():
        out, ref = call_model(cm, *inputs), call_model(q, *inputs)
    assert calls and all(c == ("row", "col") for c in calls), set(calls)
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_tensorwise_scaled_mm_matches_rowwise():
    """set_fp8_gemm(model, "tensorwise"): the cuBLAS FP8 layers run torch._scaled_mm with one scale per operand (0-dim
    tensors: the tensor-wise kernels) and apply the weight's per-channel scales and the bias to the output. Each
    layer computes what the row-wise one does up to the bf16 rounding of the GEMM's output, and the whole model stays
    as close to the fake-quant model as the row-wise one (the real _scaled_mm, here on the CPU)."""
    from diffquant.kernels.modules import set_fp8_gemm

    model, q, inputs = _calibrated("fp8", model=tiny_sd_unet())
    cm = convert(q, "fp8", attention="float")
    gemms = [m for m in cm.modules() if isinstance(m, LowBitLayer) and len(m.parts) == 1 and m._is_gemm()]
    for m in gemms:
        m.fp8_gemm = "scaled_mm"
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, m.in_channels, generator=g) if m.kind == "linear" else
          torch.randn(2, m.in_channels, 3, 5, generator=g).contiguous(memory_format=torch.channels_last) for m in gemms]
    with torch.no_grad():
        want_layers = [m(x) for m, x in zip(gemms, xs)]
        want, ref = call_model(cm, *inputs), call_model(q, *inputs)
    scales = []
    real = torch._scaled_mm

    def spy(a, b, scale_a, scale_b, **kw):
        scales.append((scale_a.dim(), scale_b.dim()))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    n = set_fp8_gemm(cm, "tensorwise")
    assert n == len(gemms) > 0 and all(m.fp8_gemm == "scaled_mm_tw" for m in gemms)
    torch._scaled_mm = spy
    try:
        with torch.no_grad():
            got_layers = [m(x) for m, x in zip(gemms, xs)]
            got = call_model(cm, *inputs)
    finally:
        torch._scaled_mm = real
    assert len(scales) >= 2 * n and set(scales) == {(0, 0)}
    for m, a, b in zip(gemms, want_layers, got_layers):
        assert float((a - b).norm() / a.norm()) < 1e-2, m.layer_name
    base = float((want - ref).norm() / ref.norm())
    assert float((got - ref).norm() / ref.norm()) <= 1.5 * base + 1e-2, base
    assert set_fp8_gemm(cm, "rowwise") == n and all(m.fp8_gemm == "scaled_mm" for m in gemms)
    # attention's Q/K/V projections excluded: they stay (or go back to) row-wise, the rest is tensor-wise
    qkv = ("to_q", "to_k", "to_v")
    set_fp8_gemm(cm, "tensorwise")
    n_x = set_fp8_gemm(cm, "tensorwise", exclude=qkv)
    kept = [m for m in gemms if m.layer_name.endswith(qkv)]
    assert kept and n_x == n - len(kept)
    assert all((m.fp8_gemm == "scaled_mm") == m.layer_name.endswith(qkv) for m in gemms)
    with pytest.raises(ValueError, match="allowed"):
        set_fp8_gemm(cm, "columnwise")
    with pytest.raises(TypeError, match="sequence"):
        set_fp8_gemm(cm, "tensorwise", exclude="to_q")


def test_bench_variant_names_parse():
    """Every dq-* variant of the bench names a backend followed by suffixes it knows, in the order they are peeled
    (so "-twq" is not read as "-tw", nor a misspelt suffix as part of the backend); a bad name is refused."""
    from diffquant.kernels.bench import _SUFFIXES, VARIANTS, split_variant

    dq = [v for v in VARIANTS if v.startswith("dq-")]
    assert dq
    for v in dq:
        backend, on = split_variant(v[3:])
        rebuilt = backend + "".join(sfx for sfx in reversed(_SUFFIXES) if sfx in on)
        assert rebuilt == v[3:], (v, backend, on)
    assert split_variant("fp8-gn-qkv-te-ff-twq")[1] == {"-gn", "-qkv", "-te", "-ff", "-twq"}
    assert split_variant("fp8-gn-qkv-te-ff-twq-fa") == ("fp8", {"-gn", "-qkv", "-te", "-ff", "-twq", "-fa"})
    assert "dq-fp8-gn-qkv-te-ff-twq-fa" in VARIANTS
    for bad in ("fp8-tw-gn", "fp9-gn", "fp8-gnx", "fp8-fa-gn"):
        with pytest.raises(ValueError, match="not a backend"):
            split_variant(bad)
    with pytest.raises(ValueError, match="both choose the attention"):
        split_variant("fp8-fp8attn-gn-fa")


def test_custom_op_opcheck():
    c = _rand_case("int8", cin=8, cout=8, h=4, w=4, a_zp=3)
    args = (c["x"], c["w"], c["w_scale"], c["a_scale"], c["corr"], c["wzp"], c["bias"], c["add"], c["a_zp"],
            [1, 1], [1, 1], [1, 1], False, torch.float32, c["pad_corr"])
    assert c["pad_corr"] is not None
    torch.library.opcheck(torch.ops.diffquant.qconv.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---- CPU: convert ----------------------------------------------------------------------------------
def _calibrated(backend, model=None, batch=1):
    model = model if model is not None else build_unet(SMALL).eval()
    q = quantize(model, config_for_backend(backend))
    x, t, c = example_inputs(model, batch=batch)
    with torch.no_grad(), calibrate(q):
        call_model(q, x, t, c)
    return model, q, (x, t, c)


def _layer_errors(q, cm, inputs):
    """Each converted layer on the exact input its fake-quant twin saw: relative error."""
    seen, hooks = {}, []
    names = set(cm._diffquant_convert_report.converted)
    for n, mod in q.named_modules():
        if n in names:
            hooks.append(mod.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o))))
    with torch.no_grad():
        call_model(q, *inputs)
    for h in hooks:
        h.remove()
    errs = {}
    for n, mod in cm.named_modules():
        if isinstance(mod, LowBitLayer):
            a, o = seen[n]
            with torch.no_grad():
                y = mod(a)
            errs[n] = float((y - o).norm() / o.norm().clamp_min(1e-12))
    return errs


@pytest.mark.parametrize("backend", ["int8", "w4a8", "w4a16", "fp8"])
def test_convert_layers_equal_fake_quant(backend):
    model, q, inputs = _calibrated(backend)
    cm = convert(q, backend)
    rep = cm._diffquant_convert_report
    n_layers = sum(1 for m in q.modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear"))
    assert len(rep.converted) == n_layers and not rep.kept
    assert any("split" in v for v in rep.converted.values())
    errs = _layer_errors(q, cm, inputs)
    assert len(errs) == n_layers
    assert max(errs.values()) < 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    with torch.no_grad():
        out, ref = call_model(cm, *inputs), call_model(q, *inputs)
    # end to end: per-layer differences of fp32 rounding can flip an activation code downstream
    assert float((out - ref).norm() / ref.norm()) < (1e-5 if backend == "w4a16" else 0.1)


def test_keep_float_layers_stay_plain():
    """config_for_backend(keep_float=...): matching layers stay ordinary float layers through quantize + convert."""
    from torch import nn

    model = build_unet(SMALL).eval()
    cfg = config_for_backend("fp8", keep_float=("conv_out",))
    assert cfg.schemes_for("conv_out") is None and cfg.schemes_for("conv_in") is not None
    q = quantize(model, cfg)
    x, t, c = example_inputs(model, batch=1)
    with torch.no_grad(), calibrate(q):
        call_model(q, x, t, c)
    cm = convert(q, "fp8")
    assert type(cm.conv_out) is nn.Conv2d and isinstance(cm.conv_in, LowBitLayer)
    assert "conv_out" not in cm._diffquant_convert_report.converted
    assert config_for_backend("int8", keep_float="conv_out").schemes_for("conv_out") is None


def test_convert_weight_bytes_w4_and_dtype_moves():
    model, q, inputs = _calibrated("w4a16")
    cm = convert(q, "w4a16")
    bf16 = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    w4 = sum(m.weight_bytes for m in cm.modules() if isinstance(m, LowBitLayer))
    assert w4 / bf16 < 0.3
    assert weight_bytes(cm) < weight_bytes(model)
    cm.to(torch.bfloat16).to(memory_format=torch.channels_last)
    layer = next(m for m in cm.modules() if isinstance(m, LowBitLayer))
    assert layer.parts[0].w.dtype == torch.uint8 and layer.parts[0].w_scale.dtype == torch.float32
    assert layer.parts[0].w.is_contiguous()


def test_convert_refusals_and_fallbacks():
    from diffquant.config import QuantConfig, QuantScheme

    model = build_unet(SMALL).eval()
    q = quantize(model, QuantConfig(weight=QuantScheme(8, granularity="per_group", group_size=4), act=QuantScheme(8),
                                    quantize_attention=False))
    x, t, c = example_inputs(model, batch=1)
    with torch.no_grad(), calibrate(q):
        call_model(q, x, t, c)
    with pytest.raises(ValueError, match="per_group"):
        convert(q, "int8", unsupported="error")
    sim = convert(q, "int8")
    assert sim._diffquant_convert_report.kept and not sim._diffquant_convert_report.converted
    flt = convert(q, "int8", unsupported="float")
    assert all(type(m).__name__ != "QuantConv2d" for m in flt.modules())
    with pytest.raises(ValueError, match="backend"):
        convert(q, "int3")
    with pytest.raises(ValueError, match="cannot be converted to backend 'fp8'"):
        convert(q, "fp8", unsupported="error")
    with pytest.raises(ValueError, match="no quantized layers"):
        convert(build_unet(SMALL), "int8")


def test_convert_from_packed_checkpoint(tmp_path):
    from diffquant.io import save_quantized

    model, q, inputs = _calibrated("int8")
    save_quantized(q, tmp_path / "ck")
    a = convert(q, "int8")
    b = convert(tmp_path / "ck", "int8")
    with torch.no_grad():
        torch.testing.assert_close(call_model(b, *inputs), call_model(a, *inputs), rtol=0, atol=0)


# ---- GPU ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + Triton")

GPU_CASES = [
    # kind, n, cin, cout, h, w, k, stride, pad, wzp, a_zp
    ("int8", 2, 64, 64, 16, 16, 3, 1, 1, False, 0),
    ("int8", 3, 40, 24, 7, 9, 3, 1, 1, True, -7),
    ("int8", 1, 320, 640, 11, 13, 3, 2, 1, False, 12),
    ("int8", 5, 129, 77, 5, 3, 1, 1, 0, False, 3),
    ("int8", 37, 320, 1280, 1, 1, 1, 1, 0, True, 0),
    ("int8", 2, 3, 130, 9, 9, 3, 1, 1, False, -128),
    ("w4a8", 2, 64, 96, 10, 10, 3, 1, 1, False, 5),
    ("w4a8", 3, 130, 33, 6, 5, 3, 1, 1, True, -3),
    ("w4a16", 2, 64, 128, 12, 12, 3, 1, 1, False, 0),
    ("w4a16", 7, 258, 300, 1, 1, 1, 1, 0, True, 0),
    ("fp8", 2, 64, 64, 16, 16, 3, 1, 1, False, 0),
    ("fp8", 3, 48, 40, 9, 7, 3, 2, 1, False, 0),
    ("fp8", 77, 768, 320, 1, 1, 1, 1, 0, False, 0),
]


def _poisoned_call(c, stride, pad):
    ho = (c["x"].shape[2] + 2 * pad - c["w"].shape[1]) // stride + 1
    wo = (c["x"].shape[3] + 2 * pad - c["w"].shape[2]) // stride + 1
    n_out = c["x"].shape[0] * c["w"].shape[0] * ho * wo
    # fill what the caching allocator will hand out next with NaN: unwritten outputs show up
    junk = torch.full((n_out * 2 + 4096,), float("nan"), device="cuda", dtype=torch.float32)
    del junk
    return _call(qconv, c, stride, pad, 1, torch.float32)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_kernel_matches_reference(case):
    kind, n, cin, cout, h, w, k, stride, pad, wzp, a_zp = case
    for seed in (0, 1):
        c = _rand_case(kind, n=n, cin=cin, cout=cout, h=h, w=w, k=k, wzp=wzp, a_zp=a_zp, device="cuda", seed=seed,
                       dtype=torch.bfloat16)
        got = _poisoned_call(c, stride, pad)
        torch.cuda.synchronize()
        want = _call(qconv_ref, c, stride, pad, 1, torch.float64)
        assert torch.isfinite(got).all(), "unwritten (NaN) or non-finite outputs"
        rel = float((got.double() - want).norm() / want.norm())
        tol = 1e-5 if kind in ("int8", "w4a8") else 5e-3 if kind == "fp8" else 1e-4
        assert rel < tol, (case, seed, rel)


@pytest.mark.gpu
@gpu
def test_gpu_kernel_w4a16_fp32_activations_large_tile():
    """fp32 activations at a 128x128-tile shape: W4A16 with BLOCK_K 64 asked for 245,760 bytes of shared memory
    on an H200 (limit 232,448) when the converted CIFAR UNet ran with fp32 I/O (2026-11-28)."""
    c = _rand_case("w4a16", n=8, cin=256, cout=256, h=16, w=16, k=3, wzp=False, a_zp=0, device="cuda", seed=3,
                   dtype=torch.float32)
    want = _call(qconv_ref, c, 1, 1, 1, torch.float64)
    # fp32 operands follow torch.backends.cudnn.allow_tf32 like PyTorch's own conv: TF32 (10-bit mantissa) when
    # allowed (measured 3.4e-4 relative, 2026-11-28), IEEE fp32 when not
    for tf32, tol in ((True, 2e-3), (False, 1e-5)):
        with torch.backends.cudnn.flags(allow_tf32=tf32):
            got = _poisoned_call(c, 1, 1)
            torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < tol, (tf32, rel)


@pytest.mark.gpu
@gpu
def test_gpu_kernel_add_and_strided_input():
    c = _rand_case("int8", n=2, cin=96, cout=64, h=8, w=8, a_zp=4, device="cuda")
    full = c["x"]
    c["x"] = full[:, 32:]  # a channel slice of a channels-last tensor (split-shortcut second half)
    c["w"] = c["w"][..., 32:].contiguous()
    c["pad_corr"] = pad_correction(c["w"].cpu(), c["a_zp"]).cuda()  # of the weights that remain (it was of all 96)
    c["add"] = torch.randn(2, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_call(qconv, c, 1, 1), _call(qconv_ref, c, 1, 1).float(), rtol=1e-5, atol=1e-4)


def _gpu_converted(backend, dtype=torch.bfloat16):
    model, q, inputs = _calibrated(backend)
    cm = convert(q, backend, attention="float", device="cuda").to(dtype)
    x, t, c = inputs
    return q, cm, (x.cuda(), t.cuda(), {k: v.cuda() for k, v in c.items()})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["int8", "fp8", "w4a8", "w4a16"])
def test_gpu_converted_unet_close_to_fake_quant(backend):
    q, cm, (x, t, c) = _gpu_converted(backend, torch.float32)
    with torch.no_grad():
        ref = call_model(q, x.cpu(), t.cpu(), {k: v.cpu() for k, v in c.items()})
        out = call_model(cm, x, t, c).cpu()
    rel = float((out - ref).norm() / ref.norm())
    assert math.isfinite(rel) and rel < 0.1, rel
    if backend == "fp8":
        assert any(m.fp8_gemm == "scaled_mm" for m in cm.modules() if isinstance(m, LowBitLayer))


def test_write_gpu_result_records_the_run(tmp_path, monkeypatch):
    """The GPU benchmark scripts' result file: the command line, date, device, torch version, rows and extras."""
    from diffquant.kernels.bench import write_gpu_result

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_geglu.py", "--out", "x.json"])
    out = tmp_path / "r.json"
    res = write_gpu_result(str(out), [{"shape": "a", "ms": 1.5}], per_unet_call={"ms": 3.0})
    assert json.loads(out.read_text()) == res
    assert res["command"] == "python benchmarks/bench_geglu.py --out x.json" and res["device"] == "NVIDIA H200"
    assert res["rows"] == [{"shape": "a", "ms": 1.5}] and res["per_unet_call"] == {"ms": 3.0}
    assert res["torch"] == torch.__version__ and time.strftime("%Y-") in res["date"]


def test_time_call_refuses_negative_inner():
    from diffquant.kernels.bench import time_call

    with pytest.raises(ValueError, match="inner must be"):
        time_call(lambda: None, inner=-1)


@pytest.mark.gpu
@gpu
def test_gpu_time_call_inner_removes_launch_latency():
    """time_call(inner=0) times a microsecond kernel without the graph launch's latency: below the one-call time,
    and the same (within 15 %) for a call long enough that the latency does not matter."""
    from diffquant.kernels.bench import time_call

    tiny = torch.zeros(1024, device="cuda")
    one = time_call(lambda: tiny.add_(1), reps=50)[0]
    many = time_call(lambda: tiny.add_(1), reps=50, inner=0)[0]
    assert many < one * 0.8, (one, many)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big1 = time_call(lambda: a @ a, reps=10)[0]
    big0 = time_call(lambda: a @ a, reps=10, inner=0)[0]
    assert big1 > 0.5 and abs(big0 - big1) / big1 < 0.15, (big1, big0)


@pytest.mark.gpu
@gpu
def test_gpu_compile_and_cuda_graph():
    q, cm, (x, t, c) = _gpu_converted("int8")
    x = x.to(torch.bfloat16)
    c = {k: v.to(torch.bfloat16) for k, v in c.items()}
    with torch.no_grad():
        eager = call_model(cm, x, t, c).float()
        compiled = torch.compile(cm, fullgraph=False)
        out_c = call_model(compiled, x, t, c).float()
        torch.testing.assert_close(out_c, eager, rtol=5e-2, atol=5e-2)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                call_model(cm, x, t, c)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(g):
            static_out = call_model(cm, static_x, t, c)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out.float(), call_model(cm, x2, t, c).float(), rtol=1e-3, atol=1e-3)


# ---- tuned block configs (diffquant.kernels.tuning): the table logic runs anywhere --------------------------
def test_tuning_shape_key_and_candidates():
    from diffquant.kernels import tuning

    k = tuning.shape_key((8, 320, 64, 64), torch.float8_e4m3fn, (320, 3, 3, 320), False, [1, 1], [1, 1], [1, 1],
                         torch.bfloat16, has_add=True)
    assert k == "fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16:add"
    assert tuning.shape_key((2, 64, 8, 8), torch.int8, (32, 1, 1, 32), True, [2, 2], [0, 0], [1, 1],
                            torch.float32).startswith("int8-w4:2x64x8x8:o32:k1x1:s2x2:p0x0")
    c8 = tuning.candidates(1, False, cout=1280, ck=1280)
    assert c8 and all(tuning.smem_bytes(c, 1, False) <= tuning.SMEM_LIMIT for c in c8)
    assert {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3} in c8
    # a 64-channel layer gets no 256-wide tiles; fp32 activations get BLOCK_K <= 32; tiny limits leave nothing
    assert all(c["BLOCK_N"] <= 128 for c in tuning.candidates(1, False, cout=64, ck=64))
    assert all(c["BLOCK_K"] <= 32 for c in tuning.candidates(4, True, cout=256, ck=128))
    assert tuning.candidates(1, False, cout=256, ck=256, limit=1024) == []
    # the TMA kernel's candidates: 8-bit only, each marked with its path; other paths are refused
    tma = tuning.candidates(1, False, cout=320, ck=320, path="tma")
    assert tma and all(c["path"] == "tma" for c in tma)
    assert all("path" not in c for c in c8)
    assert tuning.candidates(2, False, cout=320, ck=320, path="tma") == []
    assert [dict(c, path="tma") for c in tuning.candidates(1, False, cout=320, ck=320, path="tma4d")] == tma
    assert tuning.candidates(1, True, cout=320, ck=160, path="tma") == []
    with pytest.raises(ValueError, match="path"):
        tuning.candidates(1, False, cout=320, ck=320, path="cudnn")
    # split-K candidates of tma4d: layers with few output tiles (SD-1.5's 8x8 level at batch 8: 512 pixels), each
    # split keeping 8 or more K steps; none where the output pixels are unknown, the tiles many, or K short
    sd8 = tuning.candidates(1, False, cout=1280, ck=1280, path="tma4d", m=512)
    splits = [c for c in sd8 if "SPLIT_K" in c]
    assert len(splits) == 18 and {c["SPLIT_K"] for c in splits} == {2, 3, 4}
    assert all(c["path"] == "tma4d" for c in splits) and tuning.config_label(splits[0]) == "tma4d-k2"
    assert tuning.config_label(tma[0]) == "tma" and tuning.config_label(c8[0]) == "gather"
    assert [c for c in tuning.candidates(1, False, cout=1280, ck=1280, path="tma", m=512) if "SPLIT_K" in c] == \
        [dict(c, path="tma") for c in splits]
    for kw in (dict(cout=1280, ck=1280, path="tma4d"), dict(cout=320, ck=320, path="tma4d", m=8 * 64 * 64),
               dict(cout=1280, ck=1280, path="tma4dp", m=512), dict(cout=1280, ck=1280, path="tma4dr", m=512),
               dict(cout=128, ck=64, path="tma4d", m=512)):
        assert not any("SPLIT_K" in c for c in tuning.candidates(1, False, **kw)), kw
    # 3x3 over 256 channels: 18 K steps at BLOCK_K 128, so 2 splits only; 36 at BLOCK_K 64, so 2 to 4
    got = {(c["BLOCK_K"], c["SPLIT_K"]) for c in tuning.candidates(1, False, cout=256, ck=256, path="tma4d", m=512)
           if "SPLIT_K" in c}
    assert got == {(128, 2), (64, 2), (64, 3), (64, 4)}
    # small unsplit tiles for the same few-tile layers (CIFAR's 32x32 level at batch 1: 8 tiles of 128x128), not for
    # a layer of many tiles, and not for the kernels without split-K
    small = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=4, path="tma4d") for bk in (128, 64)]
    b1 = tuning.candidates(1, False, cout=128, ck=128, path="tma4d", m=32 * 32)
    assert all(c in b1 for c in small) and sum("SPLIT_K" not in c and c["BLOCK_N"] == 64 == c["BLOCK_M"]
                                               for c in b1) == 2
    assert not any(c in tuning.candidates(1, False, cout=128, ck=128, path="tma4d", m=256 * 32 * 32) for c in small)
    assert not any(c["BLOCK_M"] == 64 == c["BLOCK_N"] for c in
                   tuning.candidates(1, False, cout=128, ck=128, path="tma4dp", m=32 * 32))
    # wide tiles (BLOCK_N2) of tma4d: SD's 320 / 640 / 1,280 channels, where 320- or 160-channel tiles pad no more
    # than 128-wide ones; not 256 or 128 channels, not the other kernels; their shared memory counts both B blocks
    wide = [c for c in tuning.candidates(1, False, cout=320, ck=320, path="tma4d", m=8 * 64 * 64) if "BLOCK_N2" in c]
    assert len(wide) == len(tuning.CANDIDATES_WIDE) and "SPLIT_K" not in str(wide)
    assert {tuning.config_label(c) for c in wide} == {"tma4d-w320", "tma4d-w160"}
    assert all(tuning.smem_bytes(c, 1, False) == c["num_stages"] * c["BLOCK_K"] * (
        c["BLOCK_M"] + c["BLOCK_N"] + c["BLOCK_N2"]) <= tuning.SMEM_LIMIT for c in wide)
    for cout in (640, 1280):
        assert sum("BLOCK_N2" in c for c in tuning.candidates(1, False, cout=cout, ck=640, path="tma4d", m=8192)) == len(tuning.CANDIDATES_WIDE)
    for cout, path in ((256, "tma4d"), (128, "tma4d"), (200, "tma4d"), (320, "tma"), (320, "tma4dp"), (320, "tma4dr")):
        assert not any("BLOCK_N2" in c for c in tuning.candidates(1, False, cout=cout, ck=320, path=path, m=32768))


def test_tuning_table_lookup_validation_and_device(tmp_path, monkeypatch):
    from diffquant.kernels import tuning

    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    table = {"format": tuning.FORMAT, "device": "GPU-A", "configs": {"k1": cfg}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table))
    monkeypatch.setenv("DIFFQUANT_QCONV_TUNED", str(p))
    try:
        assert tuning.lookup("k1", "GPU-A") == cfg
        assert tuning.lookup("k1", "GPU-B") is None  # measured on another GPU model: not used
        assert tuning.lookup("k2", "GPU-A") is None  # not tuned: the heuristic decides
        tuning.use_table({**table, "configs": {}})  # an explicit table wins over the environment
        assert tuning.lookup("k1", "GPU-A") is None
    finally:
        tuning.use_table(None)
    assert tuning.lookup("k1", "GPU-A") == cfg
    monkeypatch.setenv("DIFFQUANT_QCONV_TUNED", "off")  # no table at all, not even the packaged ones
    assert tuning.active_tables() == []
    monkeypatch.delenv("DIFFQUANT_QCONV_TUNED")
    assert tuning.active_tables() == tuning.packaged_tables()
    with tuning.no_tables():  # the tuner's baseline: the heuristic only
        assert tuning.active_tables() == [] and tuning.lookup("k1", "GPU-A") is None
    assert tuning.active_tables() == tuning.packaged_tables()
    tuning.validate_table({**table, "configs": {"k": {**cfg, "path": "tma"}, "k2": {**cfg, "path": "gather"},
                                                "k3": {**cfg, "path": "tma4d", "SPLIT_K": 3},
                                                "k4": {**cfg, "path": "tma4d", "BLOCK_N2": 64}}})
    bad = [{"format": "other"}, {**table, "device": 3}, {**table, "configs": {"k": {**cfg, "BLOCK_M": 0}}},
           {**table, "configs": {"k": {"BLOCK_M": 64}}}, {**table, "configs": {"k": {**cfg, "path": "cudnn"}}},
           {**table, "configs": {"k": {**cfg, "extra": 1}}}, {**table, "configs": {"k": {**cfg, "SPLIT_K": 2}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4dp", "SPLIT_K": 2}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4d", "SPLIT_K": 0}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4d", "SPLIT_K": "2"}}},
           {**table, "configs": {"k": {**cfg, "path": "tma", "BLOCK_N2": 64}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4d", "BLOCK_N2": 48}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4d", "BLOCK_N2": 8}}},
           {**table, "configs": {"k": {**cfg, "path": "tma4d", "BLOCK_N2": 64, "SPLIT_K": 2}}}]
    for b in bad:
        with pytest.raises(ValueError):
            tuning.validate_table(b)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        tuning.load_table(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        tuning.load_table(tmp_path / "missing.json")


def test_tuning_record_and_force_contexts_nest():
    from diffquant.kernels import tuning

    idle = {"calls": None, "force": None, "sc_calls": None}
    assert tuning._RECORD == idle
    with tuning.record_calls() as outer:
        with tuning.record_calls() as inner:
            assert tuning._RECORD["calls"] is inner
        assert tuning._RECORD["calls"] is outer
        with tuning.forced_config({"BLOCK_M": 64}):
            assert tuning._RECORD["force"] == {"BLOCK_M": 64}
        with tuning.record_sc_calls() as sc:
            assert tuning._RECORD["sc_calls"] is sc and tuning._RECORD["calls"] is outer
    assert tuning._RECORD == idle


def test_tuning_lookup_nearest_borrows_the_same_layer_at_the_nearest_size():
    """lookup_nearest: a shape without an entry takes the config of the same layer (channels, kernel, stride,
    padding, output, residual, activation kind) at the nearest N*H*W; another layer, GPU or activation kind: None."""
    from diffquant.kernels import tuning

    cfg = lambda bm, path=None: dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3,  # noqa: E731
                                     **({"path": path} if path else {}))
    key = lambda n, c, h, o=320, act="fp8", add="": (f"{act}:{n}x{c}x{h}x{h}:o{o}:k3x3:s1x1:p1x1:d1x1:bfloat16"  # noqa: E731
                                                    + add)
    table = {"format": tuning.FORMAT, "device": "GPU-A", "configs": {
        key(8, 320, 64): cfg(256, "tma4d"), key(8, 320, 32): cfg(128, "tma4d"), key(8, 320, 16, o=640): cfg(64),
        key(8, 320, 8, add=":add"): cfg(32)}}
    tuning.use_table(table)
    try:
        assert tuning.lookup_nearest(key(1, 320, 64), "GPU-A") == cfg(128, "tma4d")  # 4096 rows: nearest 8192
        assert tuning.lookup_nearest(key(64, 320, 64), "GPU-A") == cfg(256, "tma4d")
        assert tuning.lookup_nearest(key(2, 320, 16, o=640), "GPU-A") == cfg(64)
        assert tuning.lookup_nearest(key(2, 320, 8, add=":add"), "GPU-A") == cfg(32)
        for miss in (key(1, 640, 64), key(1, 320, 64, act="int8"), key(1, 320, 64, o=1280)):
            assert tuning.lookup_nearest(miss, "GPU-A") is None
        assert tuning.lookup_nearest(key(1, 320, 64), "GPU-B") is None
        # --untuned-only: the recorded calls whose exact shape has no entry on this GPU (all of them on another GPU)
        calls = [(key(8, 320, 64), (), {}), (key(1, 320, 64), (), {}), (key(8, 320, 32), (), {}),
                 (key(1, 320, 64), (), {})]
        assert [c[0] for c in tuning.untuned_calls(calls, "GPU-A")] == [key(1, 320, 64)] * 2
        assert tuning.untuned_calls(calls, "GPU-B") == calls
        # --shapes: the calls whose key contains one of the strings
        assert [c[0] for c in tuning.calls_matching(calls, ["x32x32:", "1x320x64"])] == \
            [key(1, 320, 64), key(8, 320, 32), key(1, 320, 64)]
        assert tuning.calls_matching(calls, ["x8x8:"]) == []
    finally:
        tuning.use_table(None)


def test_tuner_bookkeeping_on_cpu_with_a_fake_clock():
    """tune_calls on the CPU (reference op, a fake timer that reads the forced config): every candidate that ran is
    in the row's candidates_ms with its time, the best is their minimum, best_ms_by_path holds each kernel's
    minimum, and a best that beats the heuristic by more than 3 % becomes the shape's entry."""
    from diffquant.kernels import tuning
    from diffquant.kernels.reference import qconv_reference

    c = _rand_case("fp8", n=2, cin=128, cout=128, h=8, w=8)
    args = (c["x"], c["w"], c["w_scale"], c["a_scale"], c["corr"], c["wzp"], c["bias"], c["add"], c["a_zp"],
            [1, 1], [1, 1], [1, 1], c["w4"], torch.float32)
    key = tuning.shape_key(c["x"].shape, c["x"].dtype, c["w"].shape, False, [1, 1], [1, 1], [1, 1], torch.float32, False)

    def fake_ms(fn):  # the heuristic 1.0 ms; a candidate: a time from its config (TMA ones a little faster)
        cfg = tuning._RECORD["force"]
        if cfg is None:
            return 1.0
        return 0.5 + cfg["BLOCK_M"] / 1024 + cfg["num_stages"] / 100 - (0.05 if cfg.get("path") == "tma4d" else 0)

    configs, rows = tuning.tune_calls([(key, args, {})], qconv_reference, progress=lambda s: None, time_fn=fake_ms,
                                      paths_for=lambda a, kw: {"tma4d"})
    (row,) = rows
    cands = row["candidates_ms"]
    assert len(cands) == row["tried"] > 1 and row["failed"] == 0
    want = min(cands, key=lambda r: r[-1])
    assert row["best_ms"] == want[-1] and [row["best"][f] for f in tuning.CONFIG_FIELDS] == want[:5]
    assert row["best"].get("path") == want[5] == "tma4d" and configs[key] == row["best"]
    for path in ("gather", "tma4d"):
        assert row["best_ms_by_path"][path] == min(r[-1] for r in cands if r[5] == path)
    # the active table's entry (an incumbent) competes even where its kernel is not among the paths tried, and wins
    # when fastest; one that is slower loses, and one already among the candidates is not timed twice
    inc = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, path="tma")

    def fake_tma(fn):
        cfg = tuning._RECORD["force"]
        return 0.3 if cfg is not None and cfg.get("path") == "tma" else fake_ms(fn)

    configs, (row,) = tuning.tune_calls([(key, args, {})], qconv_reference, progress=lambda s: None,
                                        time_fn=fake_tma, paths_for=lambda a, kw: {"tma4d"}, incumbents={key: inc})
    assert row["best"] == inc == row["incumbent"] and configs[key] == inc and row["best_ms_by_path"]["tma"] == 0.3
    _, (row2,) = tuning.tune_calls([(key, args, {})], qconv_reference, progress=lambda s: None, time_fn=fake_ms,
                                   paths_for=lambda a, kw: {"tma4d"}, incumbents={key: dict(inc, path="tma4d")})
    assert row2["best"]["path"] == "tma4d" and row2["tried"] == row["tried"] - 1


@pytest.mark.gpu
@gpu
def test_gpu_tuner_on_a_small_layer_picks_a_config_that_matches():
    """The tuner on one recorded call: a config per shape whose output equals the heuristic's, and the table it
    writes steers the kernel (output unchanged)."""
    from diffquant.kernels import tuning
    from diffquant.kernels.triton_conv import qconv_triton

    from diffquant.kernels.triton_conv import tma_paths

    c = _rand_case("fp8", n=4, cin=128, cout=128, h=16, w=16, device="cuda")
    with tuning.record_calls() as calls:
        want = _call(qconv_triton, c, 1, 1)
    assert len(calls) == 1
    paths_for = lambda a, kw: tma_paths(a[0], a[1], a[5], a[9], a[10], a[11], a[12], a[8], kw.get("pad_corr"))  # noqa: E731
    configs, rows = tuning.tune_calls(calls, qconv_triton, reps=3, progress=lambda s: None, paths_for=paths_for)
    assert rows[0]["tried"] >= 1 and rows[0]["best_ms"] <= rows[0]["heuristic_ms"]
    # both TMA kernels' candidates competed on this stride-1 fp8 shape (and only kernels that can run it: labels are
    # a path, with "-k<split>" for split-K and "-w<channels>" for wide candidates)
    labels = set(rows[0]["best_ms_by_path"])
    assert {"gather", "tma", "tma4d"} <= labels
    assert {lab.split("-k")[0].split("-w")[0] for lab in labels} <= {"gather"} | set(paths_for(*calls[0][1:])), labels
    assert len(rows[0]["candidates_ms"]) == rows[0]["tried"]
    tuning.use_table({"format": tuning.FORMAT, "device": torch.cuda.get_device_name(),
                      "configs": {calls[0][0]: rows[0]["best"] or tuning.candidates(1, False, 128, 128)[0]}})
    try:
        got = _call(qconv_triton, c, 1, 1)
    finally:
        tuning.use_table(None)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_tuning_packaged_tables_are_valid_and_cover_the_bench_shapes():
    """The shipped tables load, name their GPU and command, and hold configs the candidate list can produce."""
    from diffquant.kernels import tuning

    tables = tuning.packaged_tables()
    assert tables, "diffquant/kernels/tuned/ ships at least the H200 table"
    for t in tables:
        assert t["device"] and t.get("command") and t.get("date")
        for key, cfg in t["configs"].items():
            kind = key.split(":")[0]
            assert kind in ("fp8", "int8", "fp8-w4", "int8-w4", "bfloat16", "bfloat16-w4", "float16", "float32")
            assert tuning.smem_bytes(cfg, 1 if kind.split("-")[0] in ("fp8", "int8") else 2, "-w4" in kind) \
                <= tuning.SMEM_LIMIT
    h200 = [t for t in tables if t["device"] == "NVIDIA H200"][0]
    assert tuning.lookup("fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16", "NVIDIA H200") == \
        h200["configs"]["fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16"]
    assert tuning.lookup("fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16", "NVIDIA A100-SXM4-80GB") is None


TMA_GPU_CASES = [  # kind, n, cin, cout, h, w, k, pad, a_zp
    ("fp8", 2, 320, 320, 17, 13, 3, 1, 0), ("int8", 3, 64, 40, 9, 7, 3, 1, 5), ("fp8", 4, 128, 1280, 8, 8, 3, 1, 0),
    ("int8", 2, 48, 24, 6, 5, 1, 0, 0), ("fp8", 1, 256, 200, 33, 31, 3, 1, 0),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bm,bn,bk,warps,stages", [(128, 128, 128, 8, 4), (256, 128, 64, 8, 3), (128, 64, 128, 4, 4)])
@pytest.mark.parametrize("case", [("fp8", 2, 320, 320, 64, 64, 3, 1, 0), ("int8", 1, 128, 96, 17, 80, 3, 1, 5),
                                  ("fp8", 3, 64, 200, 5, 64, 3, 1, 0)], ids=lambda c: "-".join(map(str, c)))
def test_gpu_tma4d_rows_path_matches_reference(case, bm, bn, bk, warps, stages, monkeypatch):
    """The one-dot-per-row 4-D TMA kernel ("tma4dr"; rows of 64 or 128 pixels, 2 or 4 a tile, rows past the image and
    from two images, an int8 zero point's padding fix) against the reference op, poisoned output; the rows kernel
    must be the one that ran."""
    from diffquant.kernels import triton_conv_tma as tt
    from diffquant.kernels import tuning

    kind, n, cin, cout, h, w, k, pad, a_zp = case
    c = _rand_case(kind, n=n, cin=cin, cout=cout, h=h, w=w, k=k, a_zp=a_zp, device="cuda")
    launched, real = [], tt._qconv_tma4d_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(tt, "_qconv_tma4d_rows_kernel", Spy())
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, path="tma4dr")
    with tuning.forced_config(cfg):
        got = _poisoned_call(c, 1, pad)
    torch.cuda.synchronize()
    # 80-pixel rows in tiles of 128: one row a tile, the plain 4-D kernel's case; every other case takes the rows kernel
    assert len(launched) == (0 if (w, bm) == (80, 128) else 1) and (tt.rows_split(bm, h, w) is None) == (not launched)
    want = _call(qconv_ref, c, 1, pad, 1, torch.float64)
    assert torch.isfinite(got).all()
    assert float((got.double() - want).norm() / want.norm()) < (1e-5 if kind == "int8" else 5e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path,split", [("tma4d", 2), ("tma4d", 4), ("tma", 3)])
@pytest.mark.parametrize("case", [("fp8", 8, 1280, 1280, 8, 8, 3, 1, 0), ("int8", 3, 256, 200, 9, 7, 3, 1, 5),
                                  ("fp8", 2, 640, 1280, 16, 16, 3, 1, 0)], ids=lambda c: "-".join(map(str, c)))
def test_gpu_split_k_matches_reference(case, path, split, monkeypatch):
    """Split-K on the TMA conv kernels (SD-1.5's 8x8 level at batch 8, an odd int8 shape with a zero point and a
    residual, a 16x16 layer) against the reference op, poisoned output; both the split kernel and the reduce kernel
    must have run."""
    from diffquant.kernels import triton_conv_tma as tt
    from diffquant.kernels import tuning

    kind, n, cin, cout, h, w, k, pad, a_zp = case
    c = _rand_case(kind, n=n, cin=cin, cout=cout, h=h, w=w, k=k, a_zp=a_zp, device="cuda")
    if kind == "int8":
        c["add"] = torch.randn(n, cout, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    launched = []
    for name in (f"_qconv_{path}_splitk_kernel", "_qconv_splitk_reduce_kernel"):
        real = getattr(tt, name)

        class Spy:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def __getitem__(self, grid):
                launched.append((self.name, grid))
                return self.real[grid]

        monkeypatch.setattr(tt, name, Spy(real, name))
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, path=path, SPLIT_K=split)
    with tuning.forced_config(cfg):
        got = _poisoned_call(c, 1, pad)
    torch.cuda.synchronize()
    assert [nm for nm, _ in launched] == [f"_qconv_{path}_splitk_kernel", "_qconv_splitk_reduce_kernel"]
    assert launched[0][1][1] == split
    want = _call(qconv_ref, c, 1, pad, 1, torch.float64)
    assert torch.isfinite(got).all()
    assert float((got.double() - want).norm() / want.norm()) < (1e-5 if kind == "int8" else 5e-3)


ROW_STATS_GPU_CASES = [  # kind, n, cin, cout, h, w, a_zp, BLOCK_M: SD-1.5's 64x64 ResNet conv at batch 2
    ("fp8", 2, 320, 320, 64, 64, 0, 128),  # (2-row tiles), CIFAR's 32x32 level (4-row tiles), two 8x8 images a tile,
    ("fp8", 4, 128, 128, 32, 32, 0, 128),  # an odd int8 shape with a zero point (a partial last tile), and rows
    ("fp8", 3, 256, 256, 8, 8, 0, 128),  # wider than the tile (the statistics pass instead)
    ("int8", 2, 64, 48, 9, 7, 5, 64),
    ("fp8", 1, 64, 64, 8, 160, 0, 128),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("epilogue", ["shuffle", "dot"])
@pytest.mark.parametrize("case", ROW_STATS_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_conv_row_stats_feed_the_norm(case, epilogue, monkeypatch):
    """diffquant::qconv_stats on the GPU (the 4-D kernel's statistics epilogue, its reductions by warp shuffles or
    on the tensor cores, or the statistics pass where rows are wider than a tile): output against the reference op,
    the row statistics against those of the output it returned; then diffquant::group_norm_act_stats (with a
    time-embedding addend, e4m3 out) against group_norm_act on the same tensor."""
    from diffquant.kernels import ops, tuning
    from diffquant.kernels.reference import row_stats_reference

    monkeypatch.setenv("DIFFQUANT_GN_STATS_EPILOGUE", epilogue)

    kind, n, cin, cout, h, w, a_zp, bm = case
    c = _rand_case(kind, n=n, cin=cin, cout=cout, h=h, w=w, a_zp=a_zp, device="cuda")
    cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, num_warps=8 if bm == 128 else 4, num_stages=4, path="tma4d")
    with tuning.forced_config(cfg):
        out, mean, m2 = _call(ops.qconv_stats, c, 1, 1, 1, torch.bfloat16)
    want = _call(qconv_ref, c, 1, 1, 1, torch.float64)
    assert float((out.double() - want).norm() / want.norm()) < (1e-2 if kind == "fp8" else 5e-3)
    wm, wq = row_stats_reference(out)
    assert torch.isfinite(mean).all() and torch.isfinite(m2).all()
    torch.testing.assert_close(mean, wm, rtol=1e-4, atol=1e-3 * float(wm.abs().max()))
    torch.testing.assert_close(m2, wq, rtol=1e-3, atol=1e-3 * float(wq.abs().max()))
    g = torch.Generator(device="cuda").manual_seed(1)
    add = torch.randn(n, cout, device="cuda", generator=g)
    wt, bs = torch.randn(cout, device="cuda", generator=g), torch.randn(cout, device="cuda", generator=g)
    so = torch.tensor([0.02], device="cuda")
    got = ops.group_norm_act_stats(out, mean, m2, add, wt, bs, 16, 1e-5, True, so, torch.float8_e4m3fn).float()
    ref = ops.group_norm_act(out, None, add, wt, bs, 16, 1e-5, True, so, torch.float8_e4m3fn).float()
    assert float((got != ref).float().mean()) < 0.01


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["tma", "tma4d", "tma4dp"])
@pytest.mark.parametrize("case", TMA_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_tma_path_matches_reference(case, path, monkeypatch):
    """The TMA conv kernels (padded copy: DIFFQUANT_QCONV_TMA=1; 4-D boxes: =4d; the persistent 4-D kernel: =4dp)
    against the reference op, odd sizes, poisoned output; the 4-D paths also on a channel slice read in place."""
    from diffquant.kernels.triton_conv import tma_paths

    kind, n, cin, cout, h, w, k, pad, a_zp = case
    monkeypatch.setenv("DIFFQUANT_QCONV_TMA", {"tma": "1", "tma4d": "4d", "tma4dp": "4dp"}[path])
    c = _rand_case(kind, n=n, cin=cin, cout=cout, h=h, w=w, k=k, a_zp=a_zp, device="cuda")
    slices = [False, True] if path != "tma" and cin % 32 == 0 else [False]
    for sliced in slices:
        if sliced:  # the second half of the channels (a split layer's second part)
            c["x"] = c["x"][:, cin // 2:]
            c["w"] = c["w"][..., cin // 2:].contiguous()
            if c["pad_corr"] is not None:
                c["pad_corr"] = pad_correction(c["w"], c["a_zp"])
        ok = tma_paths(c["x"], c["w"], c["wzp"], [1, 1], [pad, pad], [1, 1], c["w4"], c["a_zp"], c["pad_corr"])
        assert path in ok, (path, ok)
        got = _poisoned_call(c, 1, pad)
        torch.cuda.synchronize()
        want = _call(qconv_ref, c, 1, pad, 1, torch.float64)
        assert torch.isfinite(got).all()
        # int8: exact up to the fp32 epilogue; fp8: Hopper's FP8 MMA accumulates with fewer bits (the gather test's 5e-3)
        assert float((got.double() - want).norm() / want.norm()) < (1e-5 if kind == "int8" else 5e-3), sliced


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", CANDIDATES_WIDE, ids=lambda c: "x".join(map(str, c)))
def test_gpu_tma4d_wide_tiles_match_reference(cfg, monkeypatch):
    """The 4-D kernel's wide tiles (BLOCK_N + BLOCK_N2 channels a program: tuning.CANDIDATES_WIDE) on the GPU against
    the reference op, poisoned output: SD-1.5's 320 channels at 64x64 with a residual add (FP8), and an odd int8 case
    with a zero point whose 200 channels end inside a tile's second block."""
    import diffquant.kernels.triton_conv_tma as tt
    from diffquant.kernels import tuning

    bm, bn, bn2, bk, nw, ns = cfg
    force = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, path="tma4d", BLOCK_N2=bn2)
    launched = []
    real = tt._qconv_tma4d_wide_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(tt, "_qconv_tma4d_wide_kernel", Spy())
    for kind, kw, tol in (("fp8", dict(n=2, cin=320, cout=320, h=64, w=64), 5e-3),
                          ("int8", dict(n=3, cin=96, cout=200, h=17, w=13, a_zp=5), 1e-5)):
        c = _rand_case(kind, k=3, device="cuda", **kw)
        if kind == "fp8":
            c["add"] = torch.randn(kw["n"], kw["cout"], kw["h"], kw["w"], device="cuda").contiguous(
                memory_format=torch.channels_last)
        with tuning.forced_config(force):
            got = _poisoned_call(c, 1, 1)
        torch.cuda.synchronize()
        want = _call(qconv_ref, c, 1, 1, 1, torch.float64)
        assert torch.isfinite(got).all()
        assert float((got.double() - want).norm() / want.norm()) < tol, (kind, cfg)
    assert len(launched) == 2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path,h,w", [("tma4d", 64, 64), ("tma4d", 17, 13), ("gather", 17, 13), ("tma", 17, 13)])
def test_gpu_fp8_precise_accumulation_matches_reference(path, h, w, monkeypatch):
    """DIFFQUANT_FP8_ACC=precise (FP8 products promoted into the fp32 accumulator every 64): the FP8 conv kernels
    (the 4-D TMA kernel with one-row tiles; with multi-row tiles rerouted to the padded 2-D kernel), the GEGLU GEMM
    and the attention kernel compile and match their references at least as closely as in the default mode."""
    from diffquant.kernels import ops, triton_conv, tuning
    from diffquant.kernels import triton_geglu as tg
    from diffquant.kernels.reference import fp8_attention_reference, linear_geglu_reference

    c = _rand_case("fp8", n=2, cin=256, cout=128, h=h, w=w, k=3, device="cuda")
    want = _call(qconv_ref, c, 1, 1, 1, torch.float64)
    cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, path=path)
    errs = {}
    real = triton_conv.precise_path  # taken once: inside the loop the second mode would wrap the first's wrapper
    for mode in ("fast", "precise"):
        monkeypatch.setenv("DIFFQUANT_FP8_ACC", mode)
        seen = []
        monkeypatch.setattr(triton_conv, "precise_path", lambda *a: seen.append(real(*a)) or seen[-1])
        with tuning.forced_config(cfg):
            got = _call(qconv, c, 1, 1, 1, torch.float32)
        assert torch.isfinite(got).all()
        errs[mode] = float((got.double() - want).norm() / want.norm())
        if mode == "precise" and path == "tma4d":  # one row of 64 keeps the 4-D kernel; 17 x 13 does not
            assert seen == ["tma4d" if w == 64 else "tma"], seen
    assert errs["precise"] < 5e-3 and errs["precise"] <= errs["fast"] * 1.05 + 1e-7, errs
    if path != "gather" or h != 17:
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 1280, device="cuda", generator=g)
    a_s = x.abs().amax().reshape(1) / 448
    xq = (x / a_s).to(torch.float8_e4m3fn)
    wt = torch.randn(2 * 640, 1280, device="cuda", generator=g) * 0.05
    ws = wt.abs().amax(1) / 448
    wq = (wt / ws[:, None]).to(torch.float8_e4m3fn)
    so = torch.tensor([0.01], device="cuda")
    want8 = linear_geglu_reference(xq, wq, ws, a_s, None, so, torch.float8_e4m3fn).float()
    q, k, v = (torch.randn(2, 8, 1024, 40, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    want_a = fp8_attention_reference(q, k, v, 40 ** -0.5).float()
    differ, rel_a = {}, {}
    for mode in ("fast", "precise"):
        monkeypatch.setenv("DIFFQUANT_FP8_ACC", mode)
        got8 = tg.linear_geglu_triton(xq, wq, ws, a_s, None, so, torch.float8_e4m3fn).float()
        differ[mode] = float((got8 != want8).float().mean())
        got_a = ops.fp8_attention(q, k, v, 40 ** -0.5).float()
        rel_a[mode] = float((got_a - want_a).norm() / want_a.norm())
    assert differ["precise"] <= differ["fast"] and differ["precise"] < 2e-2, differ
    assert rel_a["precise"] < 2e-2, rel_a


# ---- FP8 attention (diffquant::fp8_attention) --------------------------------------------------------------
def test_fp8_attention_reference_close_to_float_and_op_checks():
    from diffquant.kernels import fp8_attention
    from diffquant.kernels.reference import fp8_attention_reference, fp8_attention_scales

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 40, generator=g) for _ in range(3))
    k, v = k[:, :, :21], v[:, :, :21]  # cross-attention shape: fewer keys than queries
    exact = F.scaled_dot_product_attention(q, k, v)
    ref = fp8_attention_reference(q, k, v, 40 ** -0.5)
    rel = float((ref - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.1, rel  # FP8 error: present, and bounded (measured 0.03-0.06 on Gaussian inputs)
    # the block size of the online softmax changes only where P's e4m3 rounding falls
    assert float((fp8_attention_reference(q, k, v, 40 ** -0.5, block_n=8) - ref).norm() / ref.norm()) < 0.05
    assert torch.equal(fp8_attention(q, k, v, 40 ** -0.5), ref)  # the op on the CPU is the reference
    s = fp8_attention_scales(q, k, v)
    assert len(s) == 3 and all(t.shape == (6,) for t in s)
    assert torch.allclose(s[0], q.abs().amax(dim=(2, 3)).reshape(-1) / 448)
    with pytest.raises(ValueError, match="fp8_attention needs"):
        fp8_attention(q, k[:, :2], v[:, :2], 1.0)
    # the op on pre-quantized e4m3 inputs: output [B, H, Sq, D] stored as [B, Sq, H, D] (heads merge for free)
    from diffquant.kernels.ops import fp8_attention_fp8
    from diffquant.kernels.reference import fp8_attention_quantize

    q8, k8, v8, s_q, s_k, s_v = fp8_attention_quantize(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)
    assert q8.dtype == torch.float8_e4m3fn and q8.stride() == q.transpose(1, 2).contiguous().transpose(1, 2).stride()
    out = fp8_attention_fp8(q8, k8, v8, s_q, s_k, s_v, 40 ** -0.5, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_attention_fp8(q, k, v, s_q, s_k, s_v, 1.0, torch.float32)
    # e4m3 output for a consumer with a static input scale: the float output / that scale, rounded to e4m3
    o_scale = torch.tensor([0.01])
    o8 = fp8_attention_fp8(q8, k8, v8, s_q, s_k, s_v, 40 ** -0.5, torch.float8_e4m3fn, o_scale)
    o32 = fp8_attention_fp8(q8, k8, v8, s_q, s_k, s_v, 40 ** -0.5, torch.float32)
    assert o8.dtype == torch.float8_e4m3fn and o8.transpose(1, 2).is_contiguous()
    assert torch.equal(o8.float(), (o32 / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    with pytest.raises(ValueError, match="out_scale"):
        fp8_attention_fp8(q8, k8, v8, s_q, s_k, s_v, 1.0, torch.float32, o_scale)
    # (test_schema is left out: it multiplies the inputs, which CPU float8 tensors do not support)
    torch.library.opcheck(torch.ops.diffquant.fp8_attention_fp8.default, (q8, k8, v8, s_q, s_k, s_v, 0.125, torch.float32),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_convert_attention_fp8_installs_processor_and_runs():
    from diffquant.kernels.attention_processor import FP8AttnProcessor

    model, q, (x, t, c) = _calibrated("fp8")
    ref_model = convert(copy.deepcopy(q), "fp8", attention="float")
    cm = convert(q, "fp8", attention="fp8")
    procs = [m.processor for m in cm.modules() if isinstance(getattr(m, "processor", None), FP8AttnProcessor)]
    assert procs and "FP8 e4m3" in cm._diffquant_convert_report.attention
    with torch.no_grad():
        out = call_model(cm, x, t, c)
        ref = call_model(ref_model, x, t, c)
    assert all(p.fp8_calls >= 1 and p.float_calls == 0 for p in procs)
    rel = float((out - ref).norm() / ref.norm())
    assert math.isfinite(rel) and rel < 0.1, rel
    # to_out's static FP8 input quantization fused into the attention output: the same numbers, one pass fewer
    assert all(p.fused_out_calls == p.fp8_calls for p in procs)
    for p in procs:
        p.fuse_out = False
    with torch.no_grad():
        unfused = call_model(cm, x, t, c)
    assert all(p.fused_out_calls < p.fp8_calls for p in procs)
    torch.testing.assert_close(out, unfused, rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention="):
        convert(q, "fp8", attention="int4")


def test_cudnn_fp8_attention_backend_reference_and_checks(monkeypatch):
    """fp8_attention(backend="cudnn") (DIFFQUANT_FP8_ATTN_BACKEND=cudnn): per-tensor e4m3 Q, K, V with the head dim
    zero-padded to a multiple of 16 (40 -> 48) into diffquant::cudnn_fp8_sdpa, here its CPU reference; close to float
    attention, in q's dtype or as e4m3 codes of the next layer's input scale, the padding dropped; the op's checks;
    the converted model's FP8 attention processor through it; an attention block of it compiles as one graph."""
    import torch.nn.functional as F

    from diffquant.kernels import ops
    from diffquant.kernels.cudnn_attention import cudnn_fp8_sdpa_reference, padded_head_dim

    assert [padded_head_dim(d) for d in (40, 48, 80, 160, 8)] == [48, 48, 80, 160, 16]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 37, 40, generator=g)
    k, v = torch.randn(2, 3, 29, 40, generator=g), torch.randn(2, 3, 29, 40, generator=g)
    exact = F.scaled_dot_product_attention(q, k, v, scale=40 ** -0.5)
    calls = []
    real = ops.cudnn_fp8_sdpa

    def spy(*a):
        calls.append(tuple(a[0].shape))
        return real(*a)

    monkeypatch.setattr(ops, "cudnn_fp8_sdpa", spy)
    out = ops.fp8_attention(q, k, v, 40 ** -0.5, backend="cudnn")
    assert calls == [(2, 3, 37, 48)] and out.shape == q.shape and out.dtype == q.dtype
    assert float((out - exact).norm() / exact.norm()) < 0.08
    o_scale = torch.tensor([0.01])
    o8 = ops.fp8_attention(q, k, v, 40 ** -0.5, out_scale=o_scale, backend="cudnn")
    assert o8.dtype == torch.float8_e4m3fn and o8.shape == q.shape
    assert float((o8.float() * 0.01 - exact).norm() / exact.norm()) < 0.1
    monkeypatch.setenv("DIFFQUANT_FP8_ATTN_BACKEND", "cudnn")
    calls.clear()
    ops.fp8_attention(q, k, v, 0.1)
    assert len(calls) == 1
    monkeypatch.setenv("DIFFQUANT_FP8_ATTN_BACKEND", "flash")
    with pytest.raises(ValueError, match="DIFFQUANT_FP8_ATTN_BACKEND"):
        ops.fp8_attention(q, k, v, 0.1)
    monkeypatch.setattr(ops, "cudnn_fp8_sdpa", real)
    # the reference (P rounded to e4m3 after x 448, cuDNN's scale_s) against float attention on the same codes
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q[..., :32], k[..., :32], v[..., :32]))
    one = torch.ones(1)
    ref = cudnn_fp8_sdpa_reference(q8, k8, v8, one, one, one, one, 0.2).float()
    want = F.scaled_dot_product_attention(q8.float(), k8.float(), v8.float(), scale=0.2)
    assert float((ref - want).norm() / want.norm()) < 0.05
    # its online softmax (cuDNN's key blocks; the row sum from P before rounding): with every key in one block it is
    # the one-pass formula exactly; blocks of 8 keys round P against running maxima and stay within e4m3's error
    s = (q8.float() @ k8.float().transpose(-1, -2)) * 0.2
    p = torch.exp(s - s.amax(-1, keepdim=True)) * 448
    one_pass = ((p.to(torch.float8_e4m3fn).float() @ v8.float()) / p.sum(-1, keepdim=True)).to(torch.float8_e4m3fn)
    whole = cudnn_fp8_sdpa_reference(q8, k8, v8, one, one, one, one, 0.2, block_keys=29)
    torch.testing.assert_close(whole.float(), one_pass.float(), rtol=0, atol=0)
    torch.testing.assert_close(ref.float(), whole.float(), rtol=0, atol=0)  # 29 keys: one block of 256
    blocked = cudnn_fp8_sdpa_reference(q8, k8, v8, one, one, one, one, 0.2, block_keys=8).float()
    assert 0 < float((blocked - whole.float()).norm() / whole.float().norm()) < 0.04
    with pytest.raises(ValueError, match="block_keys"):
        cudnn_fp8_sdpa_reference(q8, k8, v8, one, one, one, one, 0.2, block_keys=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.cudnn_fp8_sdpa(q8[..., :24], k8[..., :24], v8[..., :24], one, one, one, one, 0.2)
    with pytest.raises(ValueError, match="one value"):
        ops.cudnn_fp8_sdpa(q8, k8, v8, torch.ones(2), one, one, one, 0.2)
    # the converted model's FP8 attention processor on this backend (to_out's input quantization fused)
    from diffquant.kernels.attention_processor import FP8AttnProcessor

    monkeypatch.setenv("DIFFQUANT_FP8_ATTN_BACKEND", "cudnn")
    _, qm, inputs = _calibrated("fp8")
    ref_model = convert(copy.deepcopy(qm), "fp8", attention="float")
    cm = convert(qm, "fp8", attention="fp8")
    with torch.no_grad():
        got, want = call_model(cm, *inputs), call_model(ref_model, *inputs)
    procs = [m.processor for m in cm.modules() if isinstance(getattr(m, "processor", None), FP8AttnProcessor)]
    assert procs and all(p.fused_out_calls >= 1 for p in procs)
    assert float((got - want).norm() / want.norm()) < 0.1
    _blocks_compile_to(cm, inputs, ["down_blocks.1.attentions.0"], 1e-3)  # the processor, the op's fake kernel


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(2, 8, 4096, 40, 4096), (2, 8, 1024, 80, 77), (2, 8, 256, 160, 256)])
def test_gpu_cudnn_fp8_attention_matches_reference(shape):
    """diffquant::cudnn_fp8_sdpa through cuDNN's FP8 kernel (skipped without the cudnn-frontend package) against its
    reference on SD-1.5's head dims (40 padded to 48, 80, 160; 77 keys), and fp8_attention(backend="cudnn") against
    float attention."""
    import torch.nn.functional as F

    from diffquant.kernels import cudnn_attention as ca
    from diffquant.kernels import ops

    why = ca.unavailable(torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    b, h, sq, d, sk = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, sq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(b, h, sk, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    out = ops.fp8_attention(q, k, v, d ** -0.5, backend="cudnn")
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and float((out.float() - exact).norm() / exact.norm()) < 0.08
    dp = ca.padded_head_dim(d)
    q8, k8, v8 = (F.pad(t, (0, dp - d)).to(torch.float8_e4m3fn) for t in (q, k, v))
    one = torch.ones(1, device="cuda")
    got = ops.cudnn_fp8_sdpa(q8, k8, v8, one, one, one, one * 100, d ** -0.5).float()
    want = ca.cudnn_fp8_sdpa_reference(q8, k8, v8, one, one, one, one * 100, d ** -0.5).float()
    assert float((got - want).norm() / want.norm()) < 0.03


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(2, 8, 4096, 40, 4096), (2, 8, 1024, 80, 77), (1, 8, 64, 160, 64),
                                   (2, 8, 256, 160, 256), (3, 2, 50, 64, 37)])
def test_gpu_fp8_attention_kernel_matches_reference(shape, monkeypatch):
    from diffquant.kernels import fp8_attention, reference
    from diffquant.kernels.reference import fp8_attention_reference

    real_out_like = reference.attention_out_like

    def poisoned(q, dtype):  # NaN in every element (0x7F in e4m3): an element the kernel does not write fails
        out = real_out_like(q, dtype)
        out.view(torch.uint8).fill_(0x7F) if dtype == torch.float8_e4m3fn else out.fill_(float("nan"))
        return out

    monkeypatch.setattr(reference, "attention_out_like", poisoned)
    b, h, sq, d, sk = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, sq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(b, h, sk, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    got = fp8_attention(q, k, v, d ** -0.5).float()
    want = fp8_attention_reference(q, k, v, d ** -0.5).float()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 2e-2
    # e4m3 output with a consumer's static input scale
    o_scale = (want.abs().amax() / 200).reshape(1)
    got8 = fp8_attention(q, k, v, d ** -0.5, out_scale=o_scale)
    assert got8.dtype == torch.float8_e4m3fn and torch.isfinite(got8.float()).all()
    assert float((got8.float() * o_scale - want).norm() / want.norm()) < 4e-2


# ---- flash attention (diffquant::flash_attention) ----------------------------------------------------------
def _heads(t, heads):
    """[B, S, H*D] (a projection's output, or a column slice of a stacked one) -> its [B, H, S, D] view."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def test_flash_attention_reference_matches_sdpa_and_op_checks(monkeypatch):
    """diffquant::flash_attention on the CPU (its reference): SDPA's result at the given scale (fp32, and bf16 rounded
    once; odd sizes, cross-attention shapes, head dims 40/80/160; contiguous inputs and views of stacked projections),
    always stored as [B, Sq, H, D]; the reference's query chunks change nothing; clear errors; the op's schema and fake
    pass opcheck."""
    from diffquant.kernels import flash_attention, reference
    from diffquant.kernels.reference import flash_attention_reference

    g = torch.Generator().manual_seed(0)
    for b, h, sq, sk, d in ((2, 3, 77, 77, 40), (1, 2, 100, 256, 80), (2, 2, 77, 256, 160), (1, 1, 100, 77, 40)):
        scale = 0.7 * d ** -0.5  # not SDPA's default: the op must use the scale it is given
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, h, sq, d, generator=g).to(dtype)
            k, v = (torch.randn(b, h, sk, d, generator=g).to(dtype) for _ in range(2))
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            got = flash_attention(q, k, v, scale)
            assert got.dtype == dtype and got.shape == (b, h, sq, d)
            assert got.stride() == (sq * h * d, d, h * d, 1), got.stride()  # a [B, Sq, H, D] buffer
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:  # fp32 math, rounded once to bf16
                torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5)
            # the same inputs as views of stacked projections ([B, S, 3HD] / [B, S, 2HD] buffers): the same result
            qkv = torch.cat([q.transpose(1, 2).reshape(b, sq, h * d)] * 3, dim=-1)
            kv = torch.cat([t.transpose(1, 2).reshape(b, sk, h * d) for t in (k, v)], dim=-1)
            qs, (ks, vs) = _heads(qkv.chunk(3, dim=-1)[1], h), (_heads(t, h) for t in kv.chunk(2, dim=-1))
            assert qs.stride(2) == 3 * h * d and ks.stride(2) == 2 * h * d
            torch.testing.assert_close(flash_attention(qs, ks, vs, scale), got, rtol=0, atol=0)
    # fp64 stays fp64
    q64, k64, v64 = (torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(flash_attention(q64, k64, v64, 0.3),
                               F.scaled_dot_product_attention(q64, k64, v64, scale=0.3), rtol=1e-12, atol=1e-12)
    # the reference in query chunks (bounded memory on long sequences): the same numbers
    monkeypatch.setattr(reference, "FLASH_REFERENCE_CHUNK", 1000)
    torch.testing.assert_close(flash_attention_reference(q, k, v, scale), got, rtol=0, atol=1e-6)
    monkeypatch.undo()
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    for bad in ((q, k[:, :2], v[:, :2]), (q, k[..., :4], v[..., :4]), (q, k, v[:, :, :4]), (q[0], k[0], v[0])):
        with pytest.raises(ValueError, match="flash_attention needs q"):
            flash_attention(*bad, 1.0)
    for bad in ((q, k.bfloat16(), v), (q.double(), k.double(), v), (q.long(), k.long(), v.long()),
                tuple(t.to(torch.float8_e4m3fn) for t in (q, k, v))):
        with pytest.raises(ValueError, match="one floating dtype"):
            flash_attention(*bad, 1.0)
    torch.library.opcheck(torch.ops.diffquant.flash_attention.default, (q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3))


def test_flash_attention_op_hands_the_kernel_token_major_inputs(monkeypatch):
    """Where the Gluon kernel runs (bf16 / fp16, head dim <= its MAX_HEAD_DIM, flash_kernel_unavailable None: faked
    here, with a stand-in for the gluon_attention module), the op hands it Q, K, V in the layout it reads: views of
    stacked projections as they are (no copy), anything else copied into a new [B, S, H, D] buffer (contiguous
    [B, H, S, D], a row stride not a multiple of 8, a start not 16-byte aligned, one token: strides .contiguous() would
    keep); fp32, a wider head and H x D not a multiple of 8 run the reference. flash_kernel_unavailable: the module's answer
    on CUDA devices, cached; a module that does not import; CPU tensors; DIFFQUANT_KERNELS=reference."""
    import types

    from diffquant.kernels import ops
    from diffquant.kernels.reference import flash_attention_reference

    seen = []

    def fake_kernel(q, k, v, scale):
        seen.append((q, k, v))
        return flash_attention_reference(q, k, v, scale)

    fake = types.ModuleType("diffquant.kernels.gluon_attention")
    fake.flash_attention_gluon = fake_kernel
    fake.MAX_HEAD_DIM = 128
    fake.unavailable = lambda device: None if device.index == 0 else f"no kernel on {device}"
    monkeypatch.setitem(sys.modules, "diffquant.kernels.gluon_attention", fake)
    monkeypatch.setattr(ops, "_FLASH_WHY", {})
    assert ops.flash_kernel_unavailable(torch.device("cuda", 0)) is None
    assert ops.flash_kernel_unavailable(torch.device("cuda", 1)) == "no kernel on cuda:1"
    assert ops.flash_kernel_unavailable(torch.device("cpu")) == "not a CUDA tensor"
    monkeypatch.setitem(sys.modules, "diffquant.kernels.gluon_attention", None)  # import fails
    assert ops.flash_kernel_unavailable(torch.device("cuda", 0)) is None  # cached
    monkeypatch.setattr(ops, "_FLASH_WHY", {})
    assert "cannot be imported" in ops.flash_kernel_unavailable(torch.device("cuda", 0))
    monkeypatch.setenv("DIFFQUANT_KERNELS", "reference")
    assert ops.flash_kernel_unavailable(torch.device("cuda", 0)) == "DIFFQUANT_KERNELS=reference"
    monkeypatch.delenv("DIFFQUANT_KERNELS")
    monkeypatch.setitem(sys.modules, "diffquant.kernels.gluon_attention", fake)
    monkeypatch.setattr(ops, "flash_kernel_unavailable", lambda device: None)  # these CPU tensors count as CUDA

    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 4, 9, 40

    def run(q, k, v, copied):  # copied: whether each of q, k, v reaches the kernel as a copy; None: the reference
        n = len(seen)
        out = ops.flash_attention(q, k, v, 0.2)
        want = flash_attention_reference(q.float(), k.float(), v.float(), 0.2)
        torch.testing.assert_close(out.float(), want, rtol=2 ** -7, atol=1e-5)
        nh, sq, hd = q.shape[1], q.shape[2], q.shape[3]
        assert out.dtype == q.dtype and out.stride() == (sq * nh * hd, hd, nh * hd, 1)
        if copied is None:  # the reference
            assert len(seen) == n
            return
        assert len(seen) == n + 1
        for t, got, cp in zip((q, k, v), seen[-1], copied):
            assert ops.flash_token_major(got) and torch.equal(got, t)
            assert (got.data_ptr() != t.data_ptr()) == cp
            if cp:
                assert got.stride() == (t.shape[2] * nh * hd, hd, nh * hd, 1)

    qkv = torch.randn(b, s, 3 * h * d, generator=g, dtype=torch.bfloat16)
    stacked = [_heads(t, h) for t in qkv.chunk(3, dim=-1)]
    assert all(ops.flash_token_major(t) for t in stacked)
    run(*stacked, copied=(False,) * 3)
    run(*(t.half() for t in stacked), copied=(False,) * 3)  # fp16; .half() keeps a dense view's strides: [B, S, H, D]
    run(*(t.contiguous() for t in stacked), copied=(True,) * 3)
    wide = torch.randn(b, s, h * d + 4, generator=g, dtype=torch.bfloat16)[..., : h * d]  # row stride 164
    assert not ops.flash_token_major(_heads(wide, h))
    run(_heads(wide, h), *stacked[1:], copied=(True, False, False))
    flat = torch.randn(b * s * h * d + 1, generator=g, dtype=torch.bfloat16)[1:]  # starts 2 bytes off
    assert flat.data_ptr() % 16 and not ops.flash_token_major(_heads(flat.view(b, s, h * d), h))
    run(_heads(flat.view(b, s, h * d), h), *stacked[1:], copied=(True, False, False))
    one = torch.randn(b, h, 1, d, generator=g, dtype=torch.bfloat16)  # one query token, contiguous [B, H, 1, D]
    assert not ops.flash_token_major(one.transpose(1, 2).contiguous().transpose(1, 2))  # size-1 strides kept
    run(one, *stacked[1:], copied=(True, False, False))
    run(*(t.float() for t in stacked), copied=None)  # fp32: the reference
    run(*(_heads(t, 2) for t in qkv.chunk(3, dim=-1)), copied=(False,) * 3)  # 2 heads of 80
    wide_heads = [_heads(t, 1) for t in qkv.chunk(3, dim=-1)]  # 1 head of 160 > MAX_HEAD_DIM
    assert all(ops.flash_token_major(t) for t in wide_heads)
    run(*wide_heads, copied=None)
    odd = torch.randn(1, 3, 5, 4, generator=g, dtype=torch.bfloat16)  # H x D = 12: no layout of 16-byte rows
    n = len(seen)
    ops.flash_attention(odd, odd, odd, 0.5)
    assert len(seen) == n


def test_flash_attn_processor_matches_sdpa_and_masks_take_sdpa():
    """FlashAttnProcessor on a diffusers Attention block (cross-attention, with and without Q/K norms) computes what
    AttnProcessor2_0 computes; a call with an attention mask goes to SDPA and is counted in float_calls."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from diffquant.kernels.attention_processor import FlashAttnProcessor

    torch.manual_seed(0)
    h, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 16)
    mask = torch.zeros(2, 1, 7)
    mask[1, :, 4:] = -10000.0
    for qk_norm in (None, "layer_norm"):
        attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8, qk_norm=qk_norm).eval()
        with torch.no_grad():
            attn.set_processor(AttnProcessor2_0())
            want, want_masked = attn(h, ctx), attn(h, ctx, attention_mask=mask)
            p = FlashAttnProcessor()
            attn.set_processor(p)
            got = attn(h, ctx)
            assert (p.flash_calls, p.float_calls, p.path) == (1, 0, "flash")
            got_masked = attn(h, ctx, attention_mask=mask)
            assert (p.flash_calls, p.float_calls, p.path) == (1, 1, "float_masked")
        assert not torch.allclose(want_masked, want, atol=1e-3)  # the mask matters
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_masked, want_masked, rtol=1e-5, atol=1e-5)


def test_convert_attention_flash_matches_float_and_compiles(monkeypatch):
    """convert(attention="flash"): every attention block on FlashAttnProcessor, its Q/K/V handed to
    diffquant::flash_attention as views of the projections (stacked ones with fuse_qkv=True, which keeps the
    processor); the text-to-image UNet computes what attention="float" computes (fp32; bf16 no further from fp32
    than SDPA in bf16), with and without fuse_qkv; a transformer block of it compiles as one graph that does not
    recompile (the counters count eager calls only). A UNet2DModel with fuse_norms too keeps the flash processor (its
    attention norm is not fused)."""
    from diffusers.models.attention_processor import Attention

    from diffquant.kernels import ops
    from diffquant.kernels.attention_processor import FlashAttnProcessor

    # weights-only quantization: attention's rounding reaches the output, not absorbed by an activation quantizer
    _, q, inputs = _calibrated("w4a16", model=tiny_sd_unet())
    plain = convert(q, "w4a16", attention="float")
    cm = convert(q, "w4a16", attention="flash")
    cmq = convert(q, "w4a16", attention="flash", fuse_qkv=True)
    assert "diffquant::flash_attention" in cm._diffquant_convert_report.attention
    blocks = [m for m in cmq.modules() if isinstance(m, Attention)]
    assert {m.is_cross_attention for m in blocks} == {True, False}
    assert all(type(m.processor) is FlashAttnProcessor for m in blocks)
    assert all(type(m.processor) is FlashAttnProcessor for m in cm.modules() if isinstance(m, Attention))
    assert all(m.to_k is None and (m.to_kv if m.is_cross_attention else m.to_qkv) is not None for m in blocks)
    real = ops.flash_attention_reference
    seen = []

    def spy(q_, k_, v_, scale):
        seen.append((all(ops.flash_token_major(t) for t in (q_, k_, v_)), k_.stride(2) // k_.shape[3] // k_.shape[1]))
        return real(q_, k_, v_, scale)

    monkeypatch.setattr(ops, "flash_attention_reference", spy)
    with torch.no_grad():
        want = call_model(plain, *inputs)
        got = call_model(cm, *inputs)
        assert len(seen) == len(blocks)
        got_q = call_model(cmq, *inputs)
    assert len(seen) == 2 * len(blocks) and all(tm for tm, _ in seen)
    # K's rows: to_k's own output (1 x H*D), to_kv's (2 x), to_qkv's (3 x)
    assert {r for _, r in seen[: len(blocks)]} == {1} and {r for _, r in seen[len(blocks):]} == {2, 3}
    assert all((m.processor.flash_calls, m.processor.float_calls) == (1, 0) for m in blocks)
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    torch.testing.assert_close(got_q, want, rtol=1e-5, atol=tol)
    x, t, c = inputs
    bf_inputs = (x.bfloat16(), t, {k: v.bfloat16() for k, v in c.items()})
    with torch.no_grad():
        err = {name: float((call_model(copy.deepcopy(m).to(torch.bfloat16), *bf_inputs).float() - want).norm()
                           / want.norm()) for name, m in (("flash", cmq), ("sdpa", plain))}
    assert err["flash"] < 2e-2 and err["flash"] < 1.5 * err["sdpa"], err  # measured 0.0099 and 0.0108
    monkeypatch.setattr(ops, "flash_attention_reference", real)
    # compiled: a transformer block (self-attention on to_qkv, cross-attention on to_kv; the whole UNet takes ~70 s to
    # compile on 2 cores, the block ~12 s), on the inputs it sees in the model
    from torch._dynamo.utils import counters

    block = cmq.down_blocks[0].attentions[0]
    seen_in = {}
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen_in.update(a=a, kw=kw), with_kwargs=True)
    with torch.no_grad():
        call_model(cmq, *inputs)
        hook.remove()
        eager = block(*seen_in["a"], **seen_in["kw"])[0]
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(block)
        compiled = fn(*seen_in["a"], **seen_in["kw"])[0]
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = fn(*seen_in["a"], **seen_in["kw"])[0]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert {m.processor.flash_calls for m in block.modules() if isinstance(m, Attention)} == {3}  # eager calls only
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    # UNet2DModel, fuse_norms + fuse_qkv: the blocks keep the flash processor (FusedNormQKVAttnProcessor is SDPA's)
    _, q2, inputs2 = _calibrated("fp8")
    cm2 = convert(q2, "fp8", attention="flash", fuse_norms=True, fuse_qkv=True)
    blocks2 = [m for m in cm2.modules() if isinstance(m, Attention)]
    assert blocks2 and all(type(m.processor) is FlashAttnProcessor and m.to_qkv is not None for m in blocks2)
    assert "input group norm" not in cm2._diffquant_convert_report.projections
    ref2 = convert(q2, "fp8", attention="float", fuse_norms=True, fuse_qkv=True)
    with torch.no_grad():
        got2, want2 = call_model(cm2, *inputs2), call_model(ref2, *inputs2)
    assert float((got2 - want2).norm() / want2.norm()) < 1e-3


def test_convert_keeps_thin_layers_simulated():
    """min_channels: layers with fewer input or output channels (conv_in, conv_out) keep their fake-quant module,
    reported as such; the model computes what the fully converted one does (reference ops on the CPU: the same
    quantization, up to accumulation order); the kept layers compile (one graph, the same output); a bad value is
    refused."""
    from diffquant.nn.modules import QuantConv2d

    model, q, (x, t, c) = _calibrated("int8")
    full = convert(q, "int8")
    thin = convert(q, "int8", min_channels=16)
    kept = thin._diffquant_convert_report.kept
    assert set(kept) == {"conv_in", "conv_out"} and all("min_channels=16" in why for why in kept.values())
    assert type(thin.conv_in) is QuantConv2d and isinstance(full.conv_in, LowBitLayer)
    assert len(thin._diffquant_convert_report.converted) == len(full._diffquant_convert_report.converted) - 2
    with torch.no_grad():
        a, b = call_model(full, x, t, c), call_model(thin, x, t, c)
    assert float((a - b).norm() / a.norm()) < 2e-2
    # compiled, each on the input it sees in the model: the kept fake-quant layers are one graph without breaks (the
    # weight cache's data-pointer key and the fused fake-quant op without a fake-tensor kernel broke them: 10 graphs
    # for the whole model) and compute what they compute eager (the whole UNet takes ~4x as long to compile on 2 cores)
    _blocks_compile_to(thin, (x, t, c), list(kept), 1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_channels"):
            convert(q, "int8", min_channels=bad)


def test_group_norm_act_op_checks_and_compiles():
    """diffquant::group_norm_act on the CPU (the reference): a fused norm + SiLU + FP8 quantization equals the
    unfused float ops followed by the FP8 quantization of the consumer; bad shapes and an output dtype that does not
    match out_scale are refused; torch.compile traces it through its fake implementation."""
    from diffquant.kernels.ops import group_norm_act
    from diffquant.kernels.reference import quantize_act_fp8

    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(2, 24, 5, 7, generator=g), torch.randn(2, 16, 5, 7, generator=g)
    t = torch.randn(2, 40, generator=g)
    w, b = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    s = torch.tensor([0.02])
    got = group_norm_act(x, x2, t, w, b, 8, 1e-6, True, s, torch.float8_e4m3fn)
    ref = F.silu(F.group_norm(torch.cat([x, x2], 1).double() + t.double()[:, :, None, None], 8, w.double(), b.double(),
                              1e-6)).float()
    assert got.dtype == torch.float8_e4m3fn and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.view(torch.uint8), quantize_act_fp8(ref, s).view(torch.uint8))
    plain = group_norm_act(x, None, None, w[:24], b[:24], 4, 1e-6, False, None, torch.float32)
    torch.testing.assert_close(plain, F.group_norm(x, 4, w[:24], b[:24], 1e-6), rtol=1e-5, atol=1e-5)
    for args, msg in (((x, x2[:1], None, w, b, 8), "x2"), ((x, None, None, w[:24], b[:24], 5), "groups"),
                      ((x, x2, t[:, :8], w, b, 8), "add_nc")):
        with pytest.raises(ValueError, match=msg):
            group_norm_act(*args, 1e-6, True, s, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out_scale"):
        group_norm_act(x, x2, t, w, b, 8, 1e-6, True, None, torch.float8_e4m3fn)
    f = torch.compile(lambda a: group_norm_act(a * 2, x2, t, w, b, 8, 1e-6, True, s, torch.float8_e4m3fn))
    assert torch.equal(f(x).view(torch.uint8), group_norm_act(x * 2, x2, t, w, b, 8, 1e-6, True, s,
                                                               torch.float8_e4m3fn).view(torch.uint8))
    # the dual op: the same first output, and the raw input quantized for a second consumer; its checks
    from diffquant.kernels.ops import group_norm_act_dual

    rs = torch.rand(40, generator=g) * 0.02 + 0.005
    n1, raw = group_norm_act_dual(x, x2, w, b, 8, 1e-6, True, s, torch.float8_e4m3fn, None, 0, 0, 0, rs,
                                  torch.float8_e4m3fn, None, 0, 0, 0)
    assert torch.equal(n1.view(torch.uint8), group_norm_act(x, x2, None, w, b, 8, 1e-6, True, s,
                                                            torch.float8_e4m3fn).view(torch.uint8))
    assert raw.is_contiguous(memory_format=torch.channels_last) and torch.equal(
        raw.view(torch.uint8), quantize_act_fp8(torch.cat([x, x2], 1), rs.view(1, -1, 1, 1)).view(torch.uint8))
    for raw_args, msg in (((rs, torch.float8_e4m3fn, rs), "raw_zp"), ((rs[:7], torch.float8_e4m3fn, None), "raw_scale"),
                          ((rs, torch.float32, None), "raw output")):
        with pytest.raises(ValueError, match=msg):
            group_norm_act_dual(x, x2, w, b, 8, 1e-6, True, s, torch.float8_e4m3fn, None, 0, 0, 0, *raw_args, 0, 0, 0)
    fd = torch.compile(lambda a: group_norm_act_dual(a, x2, w, b, 8, 1e-6, True, s, torch.float8_e4m3fn, None, 0, 0, 0,
                                                     rs, torch.float8_e4m3fn, None, 0, 0, 0)[1])
    assert torch.equal(fd(x).view(torch.uint8), raw.view(torch.uint8))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(8, 320, 0, 64, 64, 32, True), (8, 1280, 1280, 16, 16, 32, False),
                                   (256, 128, 0, 32, 32, 32, True), (3, 96, 40, 5, 9, 8, True)])
def test_gpu_group_norm_act_matches_reference(shape):
    """The Triton kernels on the GPU (bf16 channels-last input, SD- and CIFAR-sized, a concatenated skip; loads
    plain and software-pipelined; the finalize step separate and folded into apply) against the float64 reference: e4m3 codes equal but for rounding-edge flips, bf16
    output to bf16 precision."""
    from diffquant.kernels.ops import group_norm_act
    from diffquant.kernels.reference import group_norm_act_reference

    n, c1, c2, h, w, groups, add = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(n, c1, h, w, device="cuda", generator=g, dtype=torch.bfloat16).contiguous(memory_format=cl)
    x2 = torch.randn(n, c2, h, w, device="cuda", generator=g, dtype=torch.bfloat16).contiguous(memory_format=cl) \
        if c2 else None
    c = c1 + c2
    t = torch.randn(n, c, device="cuda", generator=g, dtype=torch.bfloat16) if add else None
    wt = torch.rand(c, device="cuda", generator=g) + 0.5
    b = torch.randn(c, device="cuda", generator=g)
    s = torch.tensor([0.01], device="cuda")
    from diffquant.kernels.triton_norm import group_norm_act_triton, norm_plan, whole_plan

    want = group_norm_act_reference(x, x2, t, wt, b, groups, 1e-5, True, s, torch.float8_e4m3fn)
    want_bf = group_norm_act_reference(x, x2, t, wt, b, groups, 1e-5, False, None, torch.float32)
    # the op (segmented kernels), the same with software-pipelined loads (3 stages), and the one-launch kernel for
    # images of up to 1,024 pixels
    piped = dict(norm_plan(n, c, h * w, x.device, c1=c1 if c2 else None), stages=3)
    folded = dict(norm_plan(n, c, h * w, x.device, c1=c1 if c2 else None), fold=True)  # no finalize launch
    runs = [lambda *a: group_norm_act(*a), lambda *a: group_norm_act_triton(*a, plan=piped),
            lambda *a: group_norm_act_triton(*a, plan=folded)]
    if h * w <= 1024:
        runs.append(lambda *a: group_norm_act_triton(*a, plan=whole_plan(c, h * w, groups)))
    for run in runs:
        got = run(x, x2, t, wt, b, groups, 1e-5, True, s, torch.float8_e4m3fn)
        assert torch.isfinite(got.float()).all() and float((got.float() != want.float()).float().mean()) < 5e-3
        got = run(x, x2, t, wt, b, groups, 1e-5, False, None, torch.bfloat16).float()
        assert float((got - want_bf).abs().max()) < 2e-2 * float(want_bf.abs().max())


def test_lowbit_layer_adds_a_residual_in_the_kernel():
    """LowBitLayer(x, residual=r) == LowBitLayer(x) + r (up to the output's rounding) for every converted layer of a
    model: single-part and split convs through diffquant::qconv's add, linears (the CPU reference ops here)."""
    model, q, (x, t, c) = _calibrated("int8")
    cm = convert(q, "int8")
    seen = {}
    layers = {n: m for n, m in cm.named_modules() if isinstance(m, LowBitLayer)}
    def keep(name):
        def hook(mod, args, out):  # returns None: the output is not replaced
            seen.setdefault(name, args[0].clone())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        call_model(cm, x, t, c)
        for h in hooks:
            h.remove()
        kinds = set()
        for n, inp in seen.items():
            m = layers[n]
            y = m(inp)
            r = torch.randn_like(y)
            torch.testing.assert_close(m(inp, residual=r), y + r, rtol=1e-5, atol=1e-5)
            kinds.add((m.kind, len(m.parts)))
    assert {("conv", 1), ("conv", 2), ("linear", 1)} <= kinds


def _block_inputs(model, inputs, names):
    """{name: (args, kwargs)}: what each named submodule of ``model`` gets on its first call when ``model`` runs on
    ``inputs`` (tensors cloned)."""
    from torch.utils._pytree import tree_map

    mods, seen = dict(model.named_modules()), {}

    def keep(name):
        def hook(mod, args, kwargs):
            if name not in seen:
                seen[name] = tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, (args, kwargs))
        return hook

    hooks = [mods[n].register_forward_pre_hook(keep(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            call_model(model, *inputs)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(names), (sorted(seen), names)
    return seen


def _tensors(out) -> list:
    """The tensors of a block's output (a tensor, a tuple of them, nested tuples, a diffusers output object)."""
    if torch.is_tensor(out):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    assert isinstance(out, (tuple, list)), type(out)
    return [t for o in out for t in _tensors(o)]


def _layer_kinds(modules) -> set:
    """(input quantization, kind, kernel size, parts) of the converted layers among ``modules``."""
    return {(m.act, m.kind, m.kernel_size, len(m.parts)) for m in modules if isinstance(m, LowBitLayer)}


def _blocks_compile_to(model, inputs, names, tol: float | None, ref=None) -> dict:
    """Each named block of ``model`` (a ResNet step, an attention module, a transformer block, an up block) compiled
    on the inputs it sees when ``model`` runs on ``inputs``: one graph without breaks, giving what the block gives
    eager (or, with ``ref``, what the same-named block of the model ``ref`` gives eager on those inputs) to ``tol``
    (relative, and absolute relative to the largest value; None: finite values only). The blocks are where convert()'s
    fused paths trace; a whole tiny UNet takes ~4x as long to compile on the 2-core CI machine (a cold Inductor
    cache). {name: compiled output}."""
    from torch._dynamo.utils import counters

    seen = _block_inputs(model, inputs, names)
    got = {}
    for n in names:
        args, kwargs = seen[n]
        with torch.no_grad():
            want = (ref if ref is not None else model).get_submodule(n)(*args, **kwargs)
            torch._dynamo.reset()
            counters.clear()
            got[n] = torch.compile(model.get_submodule(n))(*args, **kwargs)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], (n, dict(counters["graph_break"]))
        g, w = _tensors(got[n]), _tensors(want)
        assert len(g) == len(w), n
        for a, b in zip(g, w):
            if tol is None:
                assert a.shape == b.shape and a.dtype == b.dtype and torch.isfinite(a).all(), n
            else:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()),
                                           msg=lambda m, n=n: f"{n}: {m}")
    return got


def _check_fused_blocks(cm, fused, inputs, tol, seen=None):
    """Run ``cm``; every fused block's output against diffusers' own class's forward on the inputs it saw (``seen``,
    filled with name: (args, kwargs, output))."""
    seen = {} if seen is None else seen

    def keep(name):
        def hook(mod, args, kwargs, out):
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            seen.setdefault(name, (args, kwargs, out.clone()))
        return hook

    mods = dict(cm.named_modules())
    hooks = [mods[n].register_forward_hook(keep(n), with_kwargs=True) for n in fused]
    try:
        out = call_model(cm, *inputs)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(fused)
    for n, (args, kwargs, got) in seen.items():
        m = mods[n]
        if "skip" in kwargs:  # a fused up block's call: diffusers' blocks get the concatenation
            kwargs = dict(kwargs)
            args = (torch.cat([args[0], kwargs.pop("skip")], 1), *args[1:])
        fused_cls, m.__class__ = type(m), type(m).__bases__[1]  # diffusers' own class, same module, same inputs
        try:
            want = m(*args, **kwargs)
        finally:
            m.__class__ = fused_cls
        got, want = (v[0] if isinstance(v, tuple) else getattr(v, "sample", v) for v in (got, want))
        assert float((got.float() - want.float()).norm() / want.float().norm()) < tol, n
    return out


@pytest.mark.gpu
@gpu
def test_gpu_fused_resnet_norms_match_diffusers_blocks():
    """convert(fuse_norms=True) on the GPU (Triton norm kernels, bf16): each fused block against diffusers' forward
    of the same converted block on the same input."""
    from diffquant.kernels import fused_blocks
    from diffquant.kernels.reference import group_norm_act_dual_reference, group_norm_act_reference

    model, q, (x, t, c) = _calibrated("fp8")
    cm = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True).to(torch.bfloat16)
    fused = [n for n, m in cm.named_modules() if type(m).__name__ == "FusedNormResnetBlock2D"]
    seen = {}
    with torch.no_grad():
        # against diffusers: its bf16 norm output is rounded to bf16 before the conv's FP8 quantization, ours goes
        # from fp32 to e4m3 once; the double rounding moves values across e4m3 edges (3.2 % in one block, H200)
        out = _check_fused_blocks(cm, fused, (x.cuda().bfloat16(), t.cuda(),
                                              {k: v.cuda().bfloat16() for k, v in c.items()}), 6e-2, seen)
        # against the same blocks with the float64 reference norm on the same inputs: only the summation order
        # differs, so few e4m3 codes may move
        mods = dict(cm.named_modules())
        real, real_dual = fused_blocks.group_norm_act, fused_blocks.group_norm_act_dual
        fused_blocks.group_norm_act = group_norm_act_reference
        fused_blocks.group_norm_act_dual = group_norm_act_dual_reference
        try:
            for n, (args, kwargs, got) in seen.items():
                want = mods[n](*args, **kwargs)
                err = float((got.float() - want.float()).norm() / want.float().norm())
                assert err < 1e-2, (n, err)
        finally:
            fused_blocks.group_norm_act, fused_blocks.group_norm_act_dual = real, real_dual
    assert fused and torch.isfinite(out).all()


def test_converted_model_compiles_with_inductor_freezing():
    """The bench's DIFFQUANT_BENCH_FREEZE=1 path: a converted model with fused norms (FP8 and int8) compiled with
    Inductor's freezing (parameters and buffers folded as constants) is one graph and computes what it computes
    eager. Block by block, each on the inputs it sees in the model (the whole UNet takes ~4x as long to compile on 2
    cores): a down block (a fused ResNet step with a one-part shortcut, an attention block), an up block's fused ResNet
    step (split conv1 and shortcut, the dual norm) and the fused output norm; together every layer kind of the
    model."""
    import torch._inductor.config as inductor_config

    names = ["down_blocks.1", "up_blocks.0.resnets.0", "conv_norm_out"]
    for backend in ("fp8", "int8"):
        _, q, inputs = _calibrated(backend)
        cm = convert(q, backend, fuse_norms=True)
        assert _layer_kinds(m for n in names for m in cm.get_submodule(n).modules()) == _layer_kinds(cm.modules())
        assert [type(cm.get_submodule(n)).__name__ for n in names[1:]] == ["FusedNormResnetBlock2D",
                                                                            "FusedGroupNormSiLU"], backend
        with inductor_config.patch(freezing=True):
            _blocks_compile_to(cm, inputs, names, 1e-5)


def test_fuse_qkv_stacks_attention_projections():
    """convert(fuse_qkv=True): every float-attention block's Q/K/V (cross-attention: K/V) become one stacked
    LowBitLayer run by diffusers' FusedAttnProcessor2_0; the model computes what the unstacked one does (FP8, int8,
    W4A16; a UNet2DModel and a text-to-image UNet), a transformer block of it (self- and cross-attention) compiles as
    one graph, and the model holds no more bytes; a block whose projections are quantized differently is left alone
    with the reason."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from diffquant.kernels.fused_attention import fuse_qkv, stack_linears

    for backend, unet in (("fp8", None), ("int8", tiny_sd_unet()), ("w4a16", tiny_sd_unet())):
        _, q, inputs = _calibrated(backend, model=unet)
        plain = convert(q, backend, attention="float")
        cm = convert(q, backend, attention="float", fuse_qkv=True)
        blocks = [m for m in cm.modules() if isinstance(m, Attention)]
        assert blocks and all(type(m.processor) is FusedAttnProcessor2_0 for m in blocks), backend
        for m in blocks:
            stacked = m.to_kv if m.is_cross_attention else m.to_qkv
            assert isinstance(stacked, LowBitLayer) and m.to_k is None and m.to_v is None
            assert stacked.out_channels == (2 if m.is_cross_attention else 3) * m.inner_dim
        assert f"{len(blocks)} attention blocks run Q/K/V" in cm._diffquant_convert_report.projections
        assert weight_bytes(cm) <= weight_bytes(plain)
        with torch.no_grad():
            want = call_model(plain, *inputs)
            got = call_model(cm, *inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        if backend != "int8":
            continue
        # self- and cross-attention compiled: a transformer block (attn1 on to_qkv, attn2 on to_kv; the whole UNet
        # takes ~4x as long to compile on 2 cores), on the inputs it sees in the model, against the eager unstacked
        # block on the same inputs: compiled and eager give the same int8 codes here (0 difference for the whole model
        # and for the unstacked one, 2-core AMD EPYC, torch 2.13, 2026-11-29). When this was written Inductor's
        # rounding moved some (0.021 of 0.99) and the reference was the compiled unstacked model, a second compile:
        # if codes move again, compare against that
        _blocks_compile_to(cm, inputs, ["down_blocks.0.attentions.0.transformer_blocks.0"], 1e-5, ref=plain)
    # FP8 attention keeps its processor and reads the stacked layers (self- and cross-attention)
    from diffquant.kernels.attention_processor import FP8AttnProcessor

    _, q, inputs = _calibrated("fp8", model=tiny_sd_unet())
    plain = convert(q, "fp8", attention="fp8")
    cm = convert(q, "fp8", attention="fp8", fuse_qkv=True)
    blocks = [m for m in cm.modules() if isinstance(m, Attention)]
    assert blocks and all(type(m.processor) is FP8AttnProcessor for m in blocks)
    assert {m.is_cross_attention for m in blocks} == {True, False}
    assert all(m.to_k is None and (m.to_kv if m.is_cross_attention else m.to_qkv) is not None for m in blocks)
    with torch.no_grad():
        want = call_model(plain, *inputs)
        got = call_model(cm, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert sum(m.processor.fp8_calls for m in blocks) == len(blocks)
    # different input scales: not stacked, and the reason is given
    _, q, inputs = _calibrated("fp8")
    cm = convert(q, "fp8", attention="float")
    attn = cm.get_submodule("mid_block.attentions.0")
    attn.to_k.act_scale.mul_(2)
    merged, left = fuse_qkv(cm)
    assert "mid_block.attentions.0" not in merged and "act_scale" in left["mid_block.attentions.0"]
    with pytest.raises(ValueError, match="different input quantization"):
        stack_linears([attn.to_q, attn.to_k, attn.to_v], "x")


def test_fuse_ff_runs_geglu_in_one_op():
    """convert(fuse_ff=True) on a text-to-image UNet (FP8): each GEGLU feed-forward runs its projection, GELU gate
    and net[2]'s input quantization as diffquant::linear_geglu, which hands net[2] e4m3 codes; the model computes what
    the unfused one does up to the rounding of the projection, a fused feed-forward compiles as one graph (on the
    input it sees in the model), and training mode runs the original layers; an int8 model is left alone with the
    reason."""
    from diffquant.kernels import ops
    from diffquant.kernels.fused_ff import FusedGEGLUFeedForward, fuse_feed_forward

    _, q, inputs = _calibrated("fp8", model=tiny_sd_unet())
    plain = convert(q, "fp8", attention="float")
    cm = convert(q, "fp8", attention="float", fuse_ff=True)
    ffs = [m for m in cm.modules() if isinstance(m, FusedGEGLUFeedForward)]
    n_ff = sum(type(m).__name__ == "FeedForward" for m in plain.modules())
    assert n_ff >= 2 and len(ffs) == n_ff
    assert f"{n_ff} GEGLU feed-forward blocks" in cm._diffquant_convert_report.feed_forward
    seen = []  # the op's output: e4m3, handed to net[2] as it is
    h = ffs[0].net[2].register_forward_pre_hook(lambda mod, a, kw: seen.append((a[0].dtype, kw.get("out_dtype"))),
                                                with_kwargs=True)
    with torch.no_grad():
        want = call_model(plain, *inputs)
        got = call_model(cm, *inputs)
    h.remove()
    assert seen == [(torch.float8_e4m3fn, torch.float32)]
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-3, rel  # 0.0 on this CPU: the same e4m3 codes reach net[2]
    # the feed-forward alone: the unfused projection (fp32) -> GEGLU -> quantize; the op rounds once from float64
    ff_plain = plain.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff")
    ff = cm.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff")
    x = torch.randn(2, 5, ff_plain.net[0].proj.in_channels)
    with torch.no_grad():
        a, b = ff_plain(x), ff(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-3
    _blocks_compile_to(cm, inputs, ["down_blocks.0.attentions.0.transformer_blocks.0.ff"], 1e-4)
    ff.train()
    with torch.no_grad():
        torch.testing.assert_close(ff(x), ff_plain(x))  # the original layers, one by one
    ff.eval()
    _, q8, _ = _calibrated("int8", model=tiny_sd_unet())
    c8 = convert(q8, "int8", attention="float")
    fused, left = fuse_feed_forward(c8)
    assert not fused and left and all("static FP8 input scale" in why for why in left.values())
    w8 = ff.net[0].proj.parts[0].w.view(-1, x.shape[-1])
    with pytest.raises(ValueError, match="e4m3 input"):
        ops.linear_geglu(x[0], w8, torch.ones(1), torch.ones(1), None, None, torch.float32)
    xq = x[0].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out_scale"):
        ops.linear_geglu(xq, w8, torch.ones(w8.shape[0]), torch.ones(1), None, None, torch.float8_e4m3fn)
    torch.library.opcheck(torch.ops.diffquant.linear_geglu.default,
                          (xq, w8, torch.rand(w8.shape[0]) * 0.01, torch.tensor([0.02]), torch.randn(w8.shape[0]),
                           torch.tensor([0.05]), torch.float8_e4m3fn),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))  # schema test: no e4m3 mul on CPU


def test_add_layer_norm_reference_is_the_unfused_steps_and_op_checks():
    """diffquant::add_layer_norm's reference equals the converted model's unfused steps in bf16 (the tensor-wise
    projection's dequantization rounded to bf16, the residual add, nn.LayerNorm, the next Linear's e4m3 quantization)
    bit for bit; without a residual, scale or bias ``h`` is empty; bad arguments are refused with the reason; the op
    passes opcheck."""
    from diffquant.kernels import ops
    from diffquant.kernels.reference import add_layer_norm_reference, quantize_act_fp8

    g = torch.Generator().manual_seed(0)
    y = (torch.randn(3, 7, 48, generator=g) * 4).bfloat16()
    r = (torch.randn(3, 7, 48, generator=g) * 8).bfloat16()
    ys, yb = torch.rand(48, generator=g) * 0.02 + 0.01, torch.randn(48, generator=g) * 0.1
    norm = torch.nn.LayerNorm(48).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(48, generator=g) * 0.1)
    s = torch.tensor([0.02])
    h_want = (y.float() * ys + yb).to(torch.bfloat16) + r
    with torch.no_grad():
        q_want = quantize_act_fp8(norm(h_want), s)
        h, q = ops.add_layer_norm(y, ys, yb, r, norm.weight, norm.bias, norm.eps, s, torch.float8_e4m3fn)
        assert torch.equal(h, h_want) and torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))
        h, n = ops.add_layer_norm(y, None, None, None, norm.weight, norm.bias, norm.eps, None, torch.bfloat16)
        assert h.numel() == 0 and torch.equal(n, norm(y))
        h, n = add_layer_norm_reference(y, None, None, r, None, None, 1e-6, None, torch.float32)
        assert torch.equal(h, y + r)
        torch.testing.assert_close(n, F.layer_norm((y + r).float(), (48,), eps=1e-6).bfloat16().float())
    for kw, match in ((dict(residual=r[:, :3]), "residual"), (dict(y_scale=ys[:5]), "y_scale has 5"),
                      (dict(out_scale=None), "out_scale"), (dict(out_scale=torch.ones(3)), "out_scale"),
                      (dict(out_dtype=torch.int8), "out_dtype"), (dict(y=y.int()), "float input")):
        args = dict(y=y, y_scale=None, y_bias=None, residual=None, weight=None, bias=None, eps=1e-5, out_scale=s,
                    out_dtype=torch.float8_e4m3fn)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            ops.add_layer_norm(**args)
    torch.library.opcheck(torch.ops.diffquant.add_layer_norm.default,
                          (y, ys, yb, r, norm.weight.detach(), norm.bias.detach(), 1e-5, s, torch.float8_e4m3fn),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.diffquant.add_layer_norm.default,
                          (y, None, None, None, None, None, 1e-5, None, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fuse_ln_runs_layer_norms_in_one_op(monkeypatch):
    """convert(fuse_ln=True) on a text-to-image UNet (FP8, with fuse_qkv and fuse_ff): every BasicTransformerBlock runs
    its three LayerNorms as diffquant::add_layer_norm, whose e4m3 output reaches to_qkv, to_q and the GEGLU op as it
    is; the model computes what the unfused conversion computes (fp32 on the CPU: the same numbers; with tensor-wise
    GEMMs in bf16, each norm taking its producer's raw output, also the same), a fused block compiles as one graph,
    and training mode or a mask runs diffusers' forward. Blocks without stacked Q/K/V, or of an INT8 model, are
    left alone with the reason; the convert report says what was done."""
    from diffquant.kernels import fused_transformer as ft
    from diffquant.kernels import ops

    _, q, inputs = _calibrated("fp8", model=tiny_sd_unet())
    kw = dict(attention="float", fuse_norms=True, fuse_qkv=True, fuse_ff=True)
    plain = convert(q, "fp8", **kw)
    cm = convert(q, "fp8", **kw, fuse_ln=True)
    cls = ft.fused_block_class()
    blocks = [m for m in cm.modules() if type(m) is cls]
    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in plain.modules())
    assert n_blocks >= 2 and len(blocks) == n_blocks
    assert f"{n_blocks} transformer blocks run their LayerNorms" in cm._diffquant_convert_report.layer_norms
    calls, real = [], ops.add_layer_norm
    monkeypatch.setattr(ft, "add_layer_norm", lambda *a: calls.append(a[0].dtype) or real(*a))
    seen = []  # what the consumers receive
    hooks = [m.register_forward_pre_hook(lambda mod, a, k: seen.append(a[0].dtype), with_kwargs=True)
             for m in (blocks[0].attn1.to_qkv, blocks[0].attn2.to_q, blocks[0].ff)]
    with torch.no_grad():
        want = call_model(plain, *inputs)
        got = call_model(cm, *inputs)
    for h in hooks:
        h.remove()
    assert len(calls) == 3 * n_blocks and seen == [torch.float8_e4m3fn] * 3
    assert torch.equal(got, want)
    monkeypatch.setattr(ft, "add_layer_norm", real)
    # compiled: one fused block, on the inputs it sees in the model, as one graph (the whole UNet compiles in about
    # 4x the time on 2 cores)
    from torch._dynamo.utils import counters

    seen_in = {}
    hook = blocks[0].register_forward_pre_hook(lambda m, a, k: seen_in.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        call_model(cm, *inputs)
        hook.remove()
        eager = blocks[0](*seen_in["a"], **seen_in["k"])
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(blocks[0])(*seen_in["a"], **seen_in["k"])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    # diffusers' forward: training mode, and a call with a mask
    block, plain_block = blocks[0], plain.get_submodule(next(n for n, m in cm.named_modules() if m is blocks[0]))
    x = torch.randn(2, 6, block.norm1.normalized_shape[0])
    ctx = torch.randn(2, 3, block.attn2.to_kv.in_channels)
    with torch.no_grad():
        torch.testing.assert_close(block(x, encoder_hidden_states=ctx), plain_block(x, encoder_hidden_states=ctx))
        mask = torch.zeros(2, 6)
        torch.testing.assert_close(block(x, attention_mask=mask, encoder_hidden_states=ctx),
                                   plain_block(x, attention_mask=mask, encoder_hidden_states=ctx))
        block.train()
        torch.testing.assert_close(block(x, encoder_hidden_states=ctx), plain_block(x, encoder_hidden_states=ctx))
        block.eval()
    # tensor-wise GEMMs (set_fp8_gemm; PyTorch's CPU _scaled_mm here) in bf16, Q/K/V excluded as in the shipped SD
    # variant: every norm takes its producer's raw GEMM output (norm1 proj_in's), and the model equals the unfused one
    from diffquant.kernels.modules import set_fp8_gemm

    excl = ("to_qkv", "to_kv", "to_q", "to_k", "to_v")

    def tensorwise(m):
        m = m.to(torch.bfloat16)
        for layer in m.modules():
            if isinstance(layer, LowBitLayer) and len(layer.parts) == 1 and layer.act == "fp8" and (
                    layer.kind == "linear" or layer.kernel_size == (1, 1)):
                layer.fp8_gemm = "scaled_mm"  # (convert picks the cuBLAS path on GPUs only)
        assert set_fp8_gemm(m, "tensorwise", exclude=excl) > 0
        return m

    plain_tw, cm_tw = tensorwise(convert(q, "fp8", **kw)), tensorwise(convert(q, "fp8", **kw, fuse_ln=True))
    bf_inputs = (inputs[0].bfloat16(), inputs[1], {k: v.bfloat16() for k, v in inputs[2].items()})
    calls.clear()
    monkeypatch.setattr(ft, "add_layer_norm", lambda *a: calls.append(a[1] is not None) or real(*a))
    with torch.no_grad():
        want = call_model(plain_tw, *bf_inputs)
        got = call_model(cm_tw, *bf_inputs)
    assert calls == [True] * 3 * n_blocks and torch.equal(got, want)
    monkeypatch.setattr(ft, "add_layer_norm", real)
    # a block handed proj_in's raw output and called with a mask dequantizes it and runs diffusers' forward
    name = next(n for n, m in cm_tw.named_modules() if getattr(m, "_raw_from", None))
    block, plain_block, src = cm_tw.get_submodule(name), plain_tw.get_submodule(name), None
    src = block._raw_from[0]
    raw = torch.randn(2, 6, src.out_channels).bfloat16()
    ctx = torch.randn(2, 3, block.attn2.to_kv.in_channels).bfloat16()
    deq = (raw.float() * src.parts[0].w_scale + src.bias).bfloat16()
    with torch.no_grad():
        assert torch.equal(block(raw, attention_mask=torch.zeros(2, 6), encoder_hidden_states=ctx),
                           plain_block(deq, attention_mask=torch.zeros(2, 6), encoder_hidden_states=ctx))
    # left alone, with the reason
    odd = convert(q, "fp8", **kw)
    next(m for m in odd.modules() if type(m).__name__ == "BasicTransformerBlock").attn1.scale = 1.0
    _, left = ft.fuse_layer_norms(odd)
    assert len(left) == 1 and "is not 1/sqrt(head dim)" in next(iter(left.values()))
    _, left = ft.fuse_layer_norms(convert(q, "fp8", attention="float"))
    assert len(left) == n_blocks and all("to_qkv (fuse_qkv)" in why for why in left.values())
    _, q8, _ = _calibrated("int8", model=tiny_sd_unet())
    _, left = ft.fuse_layer_norms(convert(q8, "int8", attention="float", fuse_qkv=True))
    assert len(left) == n_blocks and all("static FP8 input scale" in why for why in left.values())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,i", [(4099, 320, 1280), (77, 640, 2560), (1000, 48, 40)])
def test_gpu_linear_geglu_matches_reference(m, k, i):
    """diffquant::linear_geglu's Triton kernel on the GPU against the float64 reference: SD-1.5 widths with a row
    tail, a short sequence, odd small sizes; poisoned output; e4m3 output (codes may cross a rounding edge: Hopper's
    FP8 MMA accumulates differently), also from the persistent kernel, with per-element stores and with libdevice's
    erf, and bf16 output."""
    from diffquant.kernels import ops
    from diffquant.kernels import triton_geglu as tg
    from diffquant.kernels.reference import linear_geglu_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g)
    a_s = x.abs().amax().reshape(1) / 448
    xq = (x / a_s).to(torch.float8_e4m3fn)
    w = torch.randn(2 * i, k, device="cuda", generator=g) * 0.05
    ws = w.abs().amax(1) / 448
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    b = torch.randn(2 * i, device="cuda", generator=g)
    so = torch.tensor([0.01], device="cuda")
    orig = tg.new_out
    try:
        tg.new_out = lambda *a: orig(*a).view(torch.uint8).fill_(0x7F).view(a[2]) if a[2] == torch.float8_e4m3fn \
            else orig(*a).fill_(float("nan"))
        got8 = ops.linear_geglu(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn).float()
        gotb = ops.linear_geglu(xq, wq, ws, a_s, b, None, torch.bfloat16).float()
        # the persistent kernel (one program per SM walking the tiles)
        got8p = tg.linear_geglu_triton(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn,
                                       config=dict(tg.pick_geglu_config(m, i, k), BLOCK_M=128, num_warps=8,
                                                   num_stages=3, persistent=True)).float()
        # per-element stores instead of the TMA store (the default where a row is a multiple of 16 bytes)
        got8s = tg.linear_geglu_triton(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn, config={"tma_out": False}).float()
        # libdevice's erff instead of the polynomial
        got8e = tg.linear_geglu_triton(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn, config={"gelu": "erf"}).float()
    finally:
        tg.new_out = orig
    want8 = linear_geglu_reference(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn).float()
    wantb = linear_geglu_reference(xq, wq, ws, a_s, b, None, torch.float32)
    assert all(bool(torch.isfinite(t).all()) for t in (got8, gotb, got8p, got8s, got8e))
    for got in (got8, got8p, got8s, got8e):
        assert float((got != want8).float().mean()) < 2e-2
        assert float((got - want8).norm() / want8.norm()) < 2e-2
    assert float((gotb - wantb).norm() / wantb.norm()) < 1e-2


def _gluon_available() -> bool:
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _gluon_available(), reason="needs Triton's Gluon and a Hopper GPU")
def test_gpu_gluon_kernels_match_reference(monkeypatch):
    """The experimental Gluon kernels (not on any op's path yet) against the float64 references, poisoned outputs:
    the FP8 conv (gluon_conv.gconv: one-row and multi-row tiles, several images a tile, channel and pixel tails; the
    plain kernel and the warp-specialized one, 2 and 3 buffers a consumer) and the GEGLU (gluon_geglu: row and
    column tails, the two consumers' rings; e4m3 codes may cross a rounding edge, as the Triton kernel's)."""
    from diffquant.kernels import gluon_conv, gluon_geglu
    from diffquant.kernels.reference import linear_geglu_reference, qconv_reference

    real_conv_out, real_gg_out = gluon_conv.new_out, gluon_geglu.new_out
    monkeypatch.setattr(gluon_conv, "new_out", lambda *a: real_conv_out(*a).fill_(float("nan")))
    monkeypatch.setattr(gluon_geglu, "new_out", lambda *a: real_gg_out(*a).view(torch.uint8).fill_(0x7F).view(
        torch.float8_e4m3fn))
    g = torch.Generator(device="cuda").manual_seed(0)
    one = [1, 1]
    for n, c, cout, h, w in ((2, 64, 40, 8, 64), (3, 48, 136, 7, 9), (1, 320, 320, 16, 64), (2, 128, 64, 5, 128)):
        x = (torch.randn(n, c, h, w, device="cuda", generator=g) * 3).to(torch.float8_e4m3fn).contiguous(
            memory_format=torch.channels_last)
        wt = torch.randn(cout, 3, 3, c, device="cuda", generator=g).to(torch.float8_e4m3fn)
        ws = torch.rand(cout, device="cuda", generator=g) * 0.01 + 1e-3
        sa = torch.rand(1, device="cuda", generator=g) + 0.1
        bias = torch.randn(cout, device="cuda", generator=g)
        want = qconv_reference(x, wt, ws, sa, None, None, bias, None, 0, one, one, one, False, torch.float32)
        for cfg in ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "STAGES": 4},
                    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "STAGES": 3},
                    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 2, "ws": True},
                    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "ws": True}):
            got = gluon_conv.gconv(x, wt, ws, sa, bias, one, cfg).float()
            assert torch.isfinite(got).all(), (n, c, cout, h, w, cfg)
            assert float((got - want).norm() / want.norm()) < 1e-2, (n, c, cout, h, w, cfg)
    for m, k, i in ((4099, 320, 1280), (1000, 48, 40)):
        x = torch.randn(m, k, device="cuda", generator=g)
        a_s = x.abs().amax().reshape(1) / 448
        xq = (x / a_s).to(torch.float8_e4m3fn)
        wf = torch.randn(2 * i, k, device="cuda", generator=g) * 0.05
        ws = wf.abs().amax(1) / 448
        wq = (wf / ws[:, None]).to(torch.float8_e4m3fn)
        b = torch.randn(2 * i, device="cuda", generator=g)
        so = torch.tensor([0.01], device="cuda")
        want8 = linear_geglu_reference(xq, wq, ws, a_s, b, so, torch.float8_e4m3fn).float()
        for cfg in ({}, {"STAGES": 3}, {"BLOCK_M": 64, "STAGES": 4}):
            got = gluon_geglu.linear_geglu_gluon(xq, wq, ws, a_s, b, so, cfg).float()
            assert torch.isfinite(got).all(), (m, k, i, cfg)
            assert float((got != want8).float().mean()) < 2e-2, (m, k, i, cfg)
            assert float((got - want8).norm() / want8.norm()) < 2e-2, (m, k, i, cfg)


FLASH_GPU_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (1, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
                    (1, 2, 100, 77, 64), (3, 5, 130, 200, 40)]  # B, H, Sq, Sk, D: SD-1.5's and odd ones


@pytest.mark.gpu
@pytest.mark.skipif(not _gluon_available(), reason="needs Triton's Gluon and a Hopper GPU")
@pytest.mark.parametrize("shape", FLASH_GPU_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_gpu_flash_attention_matches_reference(shape, monkeypatch):
    """The Gluon flash attention (gluon_attention.py) against the fp32 reference, its output buffer poisoned with NaN:
    Q, K, V as views of stacked projections ([B, S, 3HD] for self-attention; [B, Sq, HD] and [B, Sk, 2HD] for
    cross-attention), handed to the kernel as they are, and as contiguous [B, H, S, D] tensors, which
    diffquant::flash_attention copies to that layout first; bf16, and fp16 on one shape; the output stored as
    [B, Sq, H, D]. Heads wider than the kernel's MAX_HEAD_DIM (160 > 128) take PyTorch's SDPA: no kernel call, the
    same checks. One shape also through the op under torch.compile (one graph), equal to the eager call."""
    from torch._dynamo.utils import counters

    from diffquant.kernels import gluon_attention, ops
    from diffquant.kernels.reference import flash_attention_reference

    assert ops.flash_kernel_unavailable(torch.device("cuda")) is None  # Gluon on a Hopper GPU: the kernel must run
    assert gluon_attention.unavailable(torch.device("cpu")) is not None
    real_new_out, real_kernel = gluon_attention.new_out, gluon_attention.flash_attention_gluon
    outs = []

    def poisoned(*a, **kw):  # NaN in every element: an element the kernel does not write fails
        outs.append(real_new_out(*a, **kw).fill_(float("nan")))
        return outs[-1]

    monkeypatch.setattr(gluon_attention, "new_out", poisoned)
    calls = []

    def spy(q, k, v, scale):  # what the op hands the kernel
        calls.append(tuple(t.data_ptr() for t in (q, k, v)))
        return real_kernel(q, k, v, scale)

    monkeypatch.setattr(gluon_attention, "flash_attention_gluon", spy)
    b, h, sq, sk, d = shape
    hd, scale = h * d, d ** -0.5
    kernel = d <= gluon_attention.MAX_HEAD_DIM
    g = torch.Generator(device="cuda").manual_seed(0)
    heads = lambda t: t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)  # noqa: E731
    for dtype, tol in ((torch.bfloat16, 2e-2),) + (((torch.float16, 1e-2),) if shape == (1, 8, 1024, 1024, 80) else ()):
        if sq == sk:
            qkv = torch.randn(b, sq, 3 * hd, device="cuda", generator=g, dtype=dtype)
            q, k, v = (heads(t) for t in qkv.chunk(3, dim=-1))
        else:
            q = heads(torch.randn(b, sq, hd, device="cuda", generator=g, dtype=dtype))
            k, v = (heads(t) for t in torch.randn(b, sk, 2 * hd, device="cuda", generator=g, dtype=dtype).chunk(2, -1))
        assert all(ops.flash_token_major(t) for t in (q, k, v))
        want = flash_attention_reference(q.float(), k.float(), v.float(), scale)
        plain = tuple(t.contiguous() for t in (q, k, v))
        runs = [("op", lambda: ops.flash_attention(q, k, v, scale)),
                ("op-contiguous", lambda: ops.flash_attention(*plain, scale))]
        if kernel:
            runs.insert(0, ("kernel", lambda: real_kernel(q, k, v, scale)))
            if gluon_attention.head_boxes(d, True)[1]:  # a head the kernel can read in two column boxes: both ways
                runs += [("kernel-" + str(sp), lambda sp=sp: real_kernel(q, k, v, scale, config={"SPLIT": sp}))
                         for sp in (0, 1)]
        n_calls = len(calls)
        for name, run in runs:
            n_outs = len(outs)
            got = run()
            assert got.dtype == dtype and got.shape == (b, h, sq, d), (name, dtype)
            if kernel:  # the output is the poisoned buffer
                assert len(outs) == n_outs + 1 and got.data_ptr() == outs[-1].data_ptr(), (name, dtype)
            else:
                assert len(outs) == n_outs, (name, dtype)
            assert got.stride() == (sq * hd, d, hd, 1), (name, dtype, got.stride())  # a [B, Sq, H, D] buffer
            assert not got.isnan().any(), (name, dtype)
            err = float((got.float() - want).abs().max())
            assert err <= tol, (name, dtype, err)
        if not kernel:
            assert len(calls) == n_calls, dtype
            continue
        # the op ran the kernel both times: on the stacked views themselves, on copies of the contiguous tensors
        assert len(calls) == n_calls + 2 and calls[-2] == tuple(t.data_ptr() for t in (q, k, v)), dtype
        assert all(p != t.data_ptr() for p, t in zip(calls[-1], plain)), dtype
    if shape != (3, 5, 130, 200, 40):
        return
    fn = torch.compile(lambda q_, k_, v_: torch.ops.diffquant.flash_attention(q_, k_, v_, scale))
    torch._dynamo.reset()
    counters.clear()
    n = len(calls)
    compiled = fn(q, k, v)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and len(calls) == n + 1
    assert compiled.stride() == (sq * hd, d, hd, 1)
    torch.testing.assert_close(compiled, ops.flash_attention(q, k, v, scale), rtol=0, atol=0)


def test_fuse_temb_stacks_the_time_projections():
    """convert(fuse_norms=True, fuse_temb=True): the ResNet blocks' time projections become one stacked LowBitLayer
    run once after the time embedding (the blocks read their columns); the model computes what the unstacked one
    does (FP8, int8; a UNet2DModel and a text-to-image UNet), holds no more bytes, and refuses training mode with a
    clear error; the stacked embedding and the blocks reading it compile as one graph each, with their eager output;
    without fused blocks it is left alone with the reason."""
    from diffquant.kernels.fused_blocks import StackedTimeEmbedding, _TembSlice, stack_time_projections

    for backend, unet in (("fp8", None), ("int8", tiny_sd_unet()), ("fp8", tiny_sd_unet())):
        _, q, inputs = _calibrated(backend, model=unet)
        plain = convert(q, backend, attention="float", fuse_norms=True)
        cm = convert(q, backend, attention="float", fuse_norms=True, fuse_temb=True)
        slices = [m for m in cm.modules() if isinstance(m, _TembSlice)]
        n_proj = sum(isinstance(getattr(m, "time_emb_proj", None), LowBitLayer) for m in plain.modules())
        assert isinstance(cm.time_embedding, StackedTimeEmbedding) and len(slices) == n_proj > 2, backend
        assert f"{n_proj} ResNet blocks' time projections" in cm._diffquant_convert_report.projections
        assert cm.time_embedding.proj.out_channels == slices[-1].hi == sum(s.hi - s.lo for s in slices)
        assert weight_bytes(cm) <= weight_bytes(plain)
        with torch.no_grad():
            want = call_model(plain, *inputs)
            got = call_model(cm, *inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # compiled (the text-to-image UNet), each on the inputs it gets in the model: the stacked time embedding, and a
    # down and an up block's ResNet step reading their columns of it (the whole UNet takes ~4x as long to compile on 2
    # cores)
    readers = [n for n, m in cm.named_modules() if isinstance(getattr(m, "time_emb_proj", None), _TembSlice)]
    names = ["time_embedding"] + [next(n for n in readers if n.startswith(b)) for b in ("down_blocks", "up_blocks")]
    _blocks_compile_to(cm, inputs, names, 1e-4)
    cm.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        call_model(cm, *inputs)
    _, q, inputs = _calibrated("fp8")
    unfused = convert(q, "fp8", attention="float")
    n, why = stack_time_projections(unfused)
    assert n == 0 and "keeps diffusers' forward" in why
    assert "not stacked" in convert(q, "fp8", attention="float", fuse_temb=True)._diffquant_convert_report.projections


def test_attention_input_norm_runs_into_stacked_qkv(monkeypatch):
    """convert(fuse_norms=True, fuse_qkv=True) on a UNet2DModel: each attention block's input group norm runs as
    diffquant::group_norm_act writing to_qkv's quantized input (e4m3 / int8 codes), the model computes what it
    computes with diffusers' FusedAttnProcessor2_0 (the norm in PyTorch), and an attention block compiles as one
    graph."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from diffquant.kernels import fused_blocks

    real, real_dual = fused_blocks.group_norm_act, fused_blocks.group_norm_act_dual
    for backend, out_dtype in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
        _, q, inputs = _calibrated(backend)
        cm = convert(q, backend, attention="float", fuse_norms=True, fuse_qkv=True)
        blocks = [m for m in cm.modules() if isinstance(m, Attention)]
        assert blocks and all(type(m.processor).__name__ == "FusedNormQKVAttnProcessor" for m in blocks)
        assert f"{len(blocks)} of them run their input group norm" in cm._diffquant_convert_report.projections
        calls = []

        def counted(*a):
            out = real(*a)
            calls.append(out.dtype)
            return out

        def counted_dual(*a):  # an up block's norm1: conv1's input and the shortcut's, from one read
            out = real_dual(*a)
            calls.append(out[0].dtype)
            return out

        monkeypatch.setattr(fused_blocks, "group_norm_act", counted)
        monkeypatch.setattr(fused_blocks, "group_norm_act_dual", counted_dual)
        resnets = sum(type(m).__name__ == "FusedNormResnetBlock2D" for m in cm.modules())
        with torch.no_grad():
            got = call_model(cm, *inputs)
            # ResNet norms and attention norms quantized for their consumers, the output norm in float
            assert len(calls) == 2 * resnets + len(blocks) + 1, (backend, calls)
            assert calls.count(torch.float32) == 1 and set(calls) == {out_dtype, torch.float32}, (backend, calls)
            monkeypatch.setattr(fused_blocks, "group_norm_act", real)
            monkeypatch.setattr(fused_blocks, "group_norm_act_dual", real_dual)
            for m in blocks:
                m.set_processor(FusedAttnProcessor2_0())
            want = call_model(cm, *inputs)
        assert float((got - want).norm() / want.norm()) < 1e-3, backend
    # the int8 model, its processors back to the fused-norm ones: an attention block compiles as one graph
    from diffquant.kernels.fused_attention import fuse_attention_norms

    assert len(fuse_attention_norms(cm)) == len(blocks)
    name = next(n for n, m in cm.named_modules() if m is blocks[0])
    assert type(blocks[0].processor).__name__ == "FusedNormQKVAttnProcessor"
    _blocks_compile_to(cm, inputs, [name], None)


def test_split_gemm_switch_runs_split_shortcuts_as_scaled_mm(monkeypatch):
    """DIFFQUANT_SPLIT_GEMM=scaled_mm: an FP8 split 1x1 shortcut (an up block's, on (h, skip)) runs one row-wise
    torch._scaled_mm per part (PyTorch's CPU _scaled_mm stands in for cuBLAS here) instead of one diffquant::qconv
    per part, and computes what the qconv path computes up to bf16 rounding: on its own, with a residual, and in the
    whole model; its ResNet step compiles as one graph, with its eager output; int8 layers and the default keep qconv;
    a bad value is refused."""
    from diffquant.kernels import modules, ops

    monkeypatch.setattr(modules, "scaled_mm_works", lambda dev: True)
    monkeypatch.setenv("DIFFQUANT_SC_FUSE", "0")  # (on, conv2 would take the split shortcuts)
    monkeypatch.setenv("DIFFQUANT_SPLIT_FUSE", "0")
    real_parts, real_qconv = LowBitLayer._scaled_mm_parts, ops.qconv
    gemm_parts, qconvs = [], []

    def parts_spy(self, pieces, *a):
        gemm_parts.append(len(pieces))
        return real_parts(self, pieces, *a)

    def qconv_spy(*a):
        qconvs.append(tuple(a[1].shape))
        return real_qconv(*a)

    monkeypatch.setattr(LowBitLayer, "_scaled_mm_parts", parts_spy)
    monkeypatch.setattr(ops, "qconv", qconv_spy)
    _, q, inputs = _calibrated("fp8")
    cm = convert(q, "fp8", fuse_norms=True)
    split = [m for m in cm.modules() if isinstance(m, LowBitLayer) and len(m.parts) > 1 and m.act == "fp8"
             and m.kernel_size == (1, 1)]
    assert split
    sc = split[0]
    h = torch.randn(2, sc.parts[0].hi, 4, 4).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, sc.parts[1].hi - sc.parts[1].lo, 4, 4).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, sc.out_channels, 4, 4)
    with torch.no_grad():
        want, want_r = sc.forward_pieces([h, skip]), sc.forward_pieces([h, skip], res)
        qconvs.clear()
        want_model = call_model(cm, *inputs)
        n_qconv = len(qconvs)
        assert gemm_parts == []  # the default: qconv per part
        monkeypatch.setenv("DIFFQUANT_SPLIT_GEMM", "scaled_mm")
        got, got_r = sc.forward_pieces([h, skip]), sc.forward_pieces([h, skip], res)
        assert gemm_parts == [2, 2]
        gemm_parts.clear()
        qconvs.clear()
        got_model = call_model(cm, *inputs)
    assert gemm_parts == [2] * len(split) and len(qconvs) == n_qconv - 2 * len(split)
    # the layer: bf16 rounding of each part's GEMM output (the CPU qconv path stays in fp32); the model: that
    # rounding moves later layers' FP8 input codes across rounding edges (e4m3 steps are 6-12 %)
    for g, w, tol in ((got, want, 1e-2), (got_r, want_r, 1e-2), (got_model, want_model, 0.1)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert float((g - w).norm() / w.norm()) < tol, float((g - w).norm() / w.norm())
    assert float((got_r - got - res).abs().max()) < 0.05 * float(res.abs().max())
    monkeypatch.setattr(LowBitLayer, "_scaled_mm_parts", real_parts)
    monkeypatch.setattr(ops, "qconv", real_qconv)
    # compiled: the up block's ResNet step whose split shortcut this is
    _blocks_compile_to(cm, inputs, [next(n for n, m in cm.named_modules() if getattr(m, "conv_shortcut", None) is sc)],
                       2e-2)
    monkeypatch.setattr(LowBitLayer, "_scaled_mm_parts", parts_spy)
    _, q8, inputs8 = _calibrated("int8")
    cm8 = convert(q8, "int8", fuse_norms=True)
    gemm_parts.clear()
    with torch.no_grad():
        call_model(cm8, *inputs8)
    assert gemm_parts == []
    monkeypatch.setenv("DIFFQUANT_SPLIT_GEMM", "cublas")
    with pytest.raises(ValueError, match="DIFFQUANT_SPLIT_GEMM"):
        sc.forward_pieces([h, skip])


def _sc_case(n=2, c=24, cout=40, h=5, w=6, parts=(32, 16), k=3, seed=0, device="cpu", sc_k=1, x_extra=0):
    """Random FP8 operands of ``diffquant::qconv_sc``: conv2's input and weight, and the shortcut's sources (channel
    slices of one channels-last tensor, as an up block's quantized (h, skip)) with their 1x1 weights and scales.
    ``x_extra``: conv2's input is the first ``c`` channels of a ``c + x_extra``-channel tensor (a split conv's first
    part, sliced on the device)."""
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = (torch.randn(n, c + x_extra, h, w, generator=g) * 4).to(torch.float8_e4m3fn).contiguous(memory_format=cl)
    x = x.to(device)[:, :c]
    raw = (torch.randn(n, sum(parts), h, w, generator=g) * 4).to(torch.float8_e4m3fn).contiguous(memory_format=cl)
    raw = raw.to(device)  # (sliced on the device: the sources stay views of one tensor)
    lo, sx = 0, []
    for p in parts:
        sx.append(raw[:, lo:lo + p])
        lo += p
    case = dict(x=x, w=torch.randn(cout, k, k, c, generator=g).to(torch.float8_e4m3fn),
                w_scale=torch.rand(cout, generator=g) * 0.01 + 1e-3, a_scale=torch.rand(1, generator=g) + 0.1,
                bias=torch.randn(cout, generator=g), sc_x=sx,
                sc_w=[torch.randn(cout, sc_k, sc_k, p, generator=g).to(torch.float8_e4m3fn) for p in parts],
                sc_w_scale=[torch.rand(cout, generator=g) * 0.03 + 1e-4 for _ in parts],
                sc_a_scale=[torch.rand(1, generator=g) * 2 + 0.05 for _ in parts], sc_bias=torch.randn(cout, generator=g),
                padding=[(k - 1) // 2] * 2)
    return {k_: ([t if k_ == "sc_x" else t.to(device) for t in v] if isinstance(v, list) and k_ != "padding"
                 else v if k_ == "x" else v.to(device) if isinstance(v, torch.Tensor) else v)
            for k_, v in case.items()}


def _sc_args(c, out_dtype=torch.float32) -> list:
    return [c["x"], c["w"], c["w_scale"], c["a_scale"], c["bias"], c["sc_x"], c["sc_w"], c["sc_w_scale"],
            c["sc_a_scale"], c["sc_bias"], c["padding"], out_dtype]


def _sc_call(fn, c, out_dtype=torch.float32):
    return fn(*_sc_args(c, out_dtype))


def test_qconv_sc_op_is_conv2_plus_its_shortcut():
    """diffquant::qconv_sc on the CPU (its float64 reference): conv2 of x plus the 1x1 shortcut of each source, each
    dequantized by its own scales, plus both biases, from scratch with F.conv2d; the same as the composed qconv calls
    (the unfused block's path) up to their intermediate rounding; one- and two-source calls, a 1x1 conv2, no biases;
    3x3 sources (a split conv's second part); the composed calls in the unfused layers' order; mismatched lists
    refused; traced by torch.compile as one graph (its fake kernel)."""
    from diffquant.kernels import ops

    def definition(c):
        y = F.conv2d(c["x"].double(), c["w"].double().permute(0, 3, 1, 2), padding=c["padding"])
        y = y * (c["w_scale"].double() * c["a_scale"].double()).view(1, -1, 1, 1)
        for xs, ws, wss, sas in zip(c["sc_x"], c["sc_w"], c["sc_w_scale"], c["sc_a_scale"]):
            y = y + F.conv2d(xs.double(), ws.double().permute(0, 3, 1, 2), padding=(ws.shape[1] - 1) // 2) * (
                wss.double() * sas.double()).view(1, -1, 1, 1)
        for b in (c["bias"], c["sc_bias"]):
            if b is not None:
                y = y + b.double().view(1, -1, 1, 1)
        return y

    for kw in (dict(), dict(parts=(24,)), dict(k=1, parts=(16, 48), h=3, w=3), dict(n=1, c=8, cout=16, seed=3),
               dict(parts=(16,), sc_k=3), dict(parts=(16, 8), sc_k=3, seed=5)):
        c = _sc_case(**kw)
        if kw.get("seed"):
            c["bias"] = c["sc_bias"] = None
        want = definition(c)
        got = _sc_call(ops.qconv_sc, c)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(_sc_call(ops.qconv_sc_composed, c).double(), want, rtol=1e-5, atol=1e-4)
        assert _sc_call(ops.qconv_sc, c, torch.bfloat16).dtype == torch.bfloat16
    # the composed calls run in the order of the unfused layers (so each finds its tuned entry): a shortcut's 1x1
    # sources before conv2, which adds them; a split conv's first part (the conv) before its later part
    order, real = [], ops.qconv
    ops.qconv = lambda *a: order.append((a[1].shape[1], a[7] is not None)) or real(*a)
    try:
        for kw, want in ((dict(), [(1, False), (1, True), (3, True)]), (dict(parts=(16,), sc_k=3),
                                                                          [(3, False), (3, True)])):
            order.clear()
            _sc_call(ops.qconv_sc_composed, _sc_case(**kw))
            assert order == want, (kw, order)
    finally:
        ops.qconv = real
    c = _sc_case()
    with pytest.raises(ValueError, match="shortcut sources"):
        ops.qconv_sc(c["x"], c["w"], c["w_scale"], c["a_scale"], c["bias"], c["sc_x"], c["sc_w"][:1],
                     c["sc_w_scale"], c["sc_a_scale"], c["sc_bias"], c["padding"], torch.float32)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(lambda: _sc_call(ops.qconv_sc, c), fullgraph=True)()
    torch.testing.assert_close(got, _sc_call(ops.qconv_sc, c))


def test_shortcut_tuner_picks_the_fastest_correct_candidate(tmp_path):
    """tune_sc_calls (the shortcut kernel's tuner, GPU-free here: the CPU reference op stands in for the kernel and
    a fake clock times each forced config): distinct shapes once each, largest first; the fastest candidate whose
    output matches the composed calls is written as a tma4d entry; a wrong candidate is skipped; a win under 3 % over
    the default writes the default; composed calls faster than every config write a "composed" entry; past the
    budget, shapes are skipped."""
    from diffquant.kernels import ops, tuning
    from diffquant.kernels.tune_models import format_rows, sc_candidates, tune_sc_calls

    small, big = _sc_case(n=1, c=16, cout=16, h=4, w=4, parts=(16, 16)), _sc_case(n=2, c=32, cout=64, h=8, w=8,
                                                                                   parts=(32, 32))
    args = [tuple(_sc_args(c)) for c in (small, big)]
    calls = [("small", args[0]), ("big", args[1]), ("small", args[0])]
    default = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    cands = sc_candidates(64, 32 * 9 + 64, 128)
    assert cands and all(set(c) - {"BLOCK_N2"} == set(default) for c in cands)
    fast = next(c for c in cands if c != default)
    wrong = next(c for c in cands if c not in (default, fast))

    def sc_fn(*a):
        y = ops.qconv_sc(*a)
        return y * 2 if tuning._RECORD["force"] == wrong else y

    def clock(fn):
        fn()
        f = tuning._RECORD["force"]
        return 0.5 if f == wrong else 0.8 if f == fast else 1.0 if f is not None else 1.2  # composed: 1.2

    order = []
    configs, rows = tune_sc_calls(calls, sc_fn, ops.qconv_sc_composed, clock, lambda a: order.append(a) or default,
                                  progress=lambda s: None, counts={"small": 2, "big": 1})
    assert [r["key"] for r in rows] == ["big", "small"] and order == [args[1], args[0]]
    assert configs == {"big": dict(fast, path="tma4d"), "small": dict(fast, path="tma4d")}
    r = rows[0]
    assert (r["composed_ms"], r["default_ms"], r["best_ms"], r["best"], r["calls"]) == (1.2, 1.0, 0.8, fast, 1)
    assert r["failed"] == 1 and r["tried"] == len(sc_candidates(64, 32 * 9 + 64, 128)) - 1
    # a 2 % win writes the default; composed calls faster than every config write "composed"; past the budget every
    # shape is skipped
    configs, _ = tune_sc_calls(calls, ops.qconv_sc, ops.qconv_sc_composed,
                               lambda fn: 0.98 if tuning._RECORD["force"] == fast else 1.0, lambda a: default,
                               progress=lambda s: None)
    assert configs == {"big": dict(default, path="tma4d"), "small": dict(default, path="tma4d")}
    configs, _ = tune_sc_calls(calls, ops.qconv_sc, ops.qconv_sc_composed,
                               lambda fn: 0.7 if tuning._RECORD["force"] is None else 0.8 if tuning._RECORD["force"] == fast
                               else 1.0, lambda a: default, progress=lambda s: None)
    assert configs == {"big": tuning.SC_COMPOSED, "small": tuning.SC_COMPOSED}
    tuning.validate_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {"x:sc320": tuning.SC_COMPOSED}})
    with pytest.raises(ValueError, match="must have"):  # only a shortcut shape may be "composed"
        tuning.validate_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {"x:add": tuning.SC_COMPOSED}})
    _, skipped = tune_sc_calls(calls, ops.qconv_sc, ops.qconv_sc_composed, clock, lambda a: default, budget_s=-1,
                               progress=lambda s: None)
    assert [r.get("skipped") for r in skipped] == ["budget", "budget"]
    # tune_qconv.py --print-rows reads these rows too (and the conv tuner's)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows + skipped))
    lines = format_rows(str(path))
    assert len(lines) == 2 and "composed 1.2000 default 1.0000 best 0.8000" in lines[0]

def test_shortcut_kernel_config_comes_from_its_entry_or_the_conv_it_replaces(monkeypatch):
    """sc_config (Triton needed to import it; no GPU: a stand-in input on a "cuda" device): the call's own
    ``:sc<channels>`` entry; else conv2's ``:add`` tma4d entry (wide tiles kept); else the plain conv's tma4d entry
    (a split conv's first part), a non-tma4d ``:add`` entry skipped; only tile keys come back."""
    import types

    pytest.importorskip("triton")
    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import tuning

    monkeypatch.setattr(tc, "_device_name", lambda d: "GPU-A")
    x = types.SimpleNamespace(shape=(8, 320, 64, 64), dtype=torch.float8_e4m3fn,
                              device=types.SimpleNamespace(type="cuda"))
    w, sx, bf = torch.empty(320, 3, 3, 320), [torch.empty(8, 640, 64, 64)], torch.bfloat16
    base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    add_key, plain_key = (tuning.shape_key(x.shape, x.dtype, w.shape, False, (1, 1), [1, 1], (1, 1), bf, a)
                          for a in (True, False))
    cases = [({add_key: dict(base, path="tma4d", BLOCK_N2=32)}, dict(base, BLOCK_N2=32)),
             ({add_key: dict(base, path="tma"), plain_key: dict(base, path="tma4d", BLOCK_M=64)},
              dict(base, BLOCK_M=64)),
             ({tc.sc_key(x.shape, w.shape, [1, 1], bf, [640]): dict(base, path="tma4d", BLOCK_K=64),
               add_key: dict(base, path="tma4d", BLOCK_N2=32)}, dict(base, BLOCK_K=64))]
    try:
        for configs, want in cases:
            tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": configs})
            assert tc.sc_config(x, w, [1, 1], bf, sx) == want
        # a "composed" entry of its own: the conv's entry gives the tiles (for a forced or timed kernel run)
        tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {
            tc.sc_key(x.shape, w.shape, [1, 1], bf, [640]): tuning.SC_COMPOSED, add_key: dict(base, path="tma4d")}})
        assert tc.sc_config(x, w, [1, 1], bf, sx) == base
    finally:
        tuning.use_table(None)


def test_shortcut_kernel_runs_where_its_tiles_fill_the_gpu_or_its_entry_says(monkeypatch):
    """sc_composed_reason (no GPU: stand-in inputs on a "cuda" device with 132 SMs): the call's own tma4d entry or a
    forced config run the kernel; its own "composed" entry, a borrowed conv entry that splits K, or fewer output tiles
    than SMs send it to the composed qconv calls; a CPU (interpreter) call always runs the kernel. Its inputs are read
    in place where TMA can."""
    import types

    pytest.importorskip("triton")
    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import tuning

    monkeypatch.setattr(tc, "_device_name", lambda d: "GPU-A")
    monkeypatch.setattr(tc, "_num_sms", lambda d: 132)

    def stand_in(n, c, h, device="cuda"):
        return types.SimpleNamespace(shape=(n, c, h, h), dtype=torch.float8_e4m3fn,
                                     device=types.SimpleNamespace(type=device))

    bf, base = torch.bfloat16, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    w = torch.empty(320, 3, 3, 320)

    def reason(x, configs, sc=(640,)):
        tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": configs})
        return tc.sc_composed_reason(x, w, [1, 1], bf, [torch.empty(x.shape[0], c, 1, 1) for c in sc])

    big, small = stand_in(8, 320, 64), stand_in(1, 320, 64)  # 256 x 3 tiles of 128 x 128; 32 x 3
    add = {n: tuning.shape_key(x.shape, x.dtype, w.shape, False, (1, 1), [1, 1], (1, 1), bf, True)
           for n, x in (("big", big), ("small", small))}
    own = {n: tc.sc_key(x.shape, w.shape, [1, 1], bf, [640]) for n, x in (("big", big), ("small", small))}
    try:
        assert reason(big, {}) is None
        assert reason(small, {}) == "96 output tiles for 132 SMs"
        # wide tiles borrowed from conv2: 64-pixel tiles of 128 + 32 channels -> 64 x 2
        assert reason(small, {add["small"]: dict(base, BLOCK_M=64, BLOCK_N2=32, path="tma4d")}) \
            == "128 output tiles for 132 SMs"
        assert "split K in 3" in reason(big, {add["big"]: dict(base, path="tma4d", SPLIT_K=3)})
        assert reason(small, {own["small"]: dict(base, path="tma4d")}) is None
        assert "composed qconv calls are faster" in reason(big, {own["big"]: tuning.SC_COMPOSED})
        with tuning.forced_config(base):
            assert reason(small, {own["small"]: tuning.SC_COMPOSED}) is None
        assert reason(stand_in(1, 320, 64, "cpu"), {}) is None
    finally:
        tuning.use_table(None)
    # the kernel reads a channel slice in place (a split conv's first part); a start or strides off 16 bytes, or
    # channels not innermost, are copied to channels-last
    t = torch.zeros(2, 64, 4, 4).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    y = t[:, 16:48]
    assert tc._in_place_or_copy(y) is y
    for bad in (t[:, 8:40], t.contiguous()):
        c = tc._in_place_or_copy(bad)
        assert c.data_ptr() != bad.data_ptr() and c.is_contiguous(memory_format=torch.channels_last)

def test_shortcut_fusion_switch_runs_conv2_and_its_shortcut_as_one_op(monkeypatch):
    """DIFFQUANT_SC_FUSE (on by default): every fused ResNet block whose conv2 and 1x1 shortcut are FP8 with static
    input scales (the down blocks' one-part shortcuts on the block input, the up blocks' split shortcuts on (h, skip))
    runs them as one diffquant::qconv_sc, and the model computes what it computes with DIFFQUANT_SC_FUSE=0 (a
    UNet2DModel and a text-to-image UNet); its blocks of both kinds compile as one graph each, with their eager output;
    with 0, no call; int8 keeps its path; a bad value is refused. (DIFFQUANT_SPLIT_FUSE=0 here: its calls are the next
    test's.)"""
    from diffquant.kernels import ops

    real = ops.qconv_sc
    calls = []

    def spy(*a):
        calls.append(len(a[5]))
        return real(*a)

    monkeypatch.setattr(ops, "qconv_sc", spy)
    monkeypatch.setenv("DIFFQUANT_SPLIT_FUSE", "0")
    for unet in (None, tiny_sd_unet()):
        _, q, inputs = _calibrated("fp8", model=unet)
        cm = convert(q, "fp8", fuse_norms=True)
        shortcuts = [m for m in cm.modules() if getattr(m, "conv_shortcut", None) is not None]
        n_split = sum(len(m.conv_shortcut.parts) == 2 for m in shortcuts)
        assert shortcuts and n_split
        with torch.no_grad():
            calls.clear()
            monkeypatch.setenv("DIFFQUANT_SC_FUSE", "0")
            want = call_model(cm, *inputs)
            assert calls == []
            monkeypatch.delenv("DIFFQUANT_SC_FUSE")
            got = call_model(cm, *inputs)
        assert sorted(calls) == sorted(len(m.conv_shortcut.parts) for m in shortcuts), calls
        # one rounding instead of two (the shortcut's output was rounded to fp32 before conv2 added it)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(ops, "qconv_sc", real)
        # compiled: a down block's ResNet step (one-part shortcut) and an up block's (split shortcut)
        names = [next(n for n, m in cm.named_modules() if getattr(m, "conv_shortcut", None) is not None
                      and len(m.conv_shortcut.parts) == k) for k in (1, 2)]
        _blocks_compile_to(cm, inputs, names, 1e-3)
        monkeypatch.setattr(ops, "qconv_sc", spy)
    _, q8, inputs8 = _calibrated("int8")
    cm8 = convert(q8, "int8", fuse_norms=True)
    calls.clear()
    with torch.no_grad():
        call_model(cm8, *inputs8)
    assert calls == []
    monkeypatch.setenv("DIFFQUANT_SC_FUSE", "yes")
    with pytest.raises(ValueError, match="DIFFQUANT_SC_FUSE"):
        with torch.no_grad():
            call_model(cm, *inputs)

def test_split_fusion_switch_runs_both_parts_of_a_split_conv_as_one_op(monkeypatch):
    """DIFFQUANT_SPLIT_FUSE (on by default): every split FP8 conv with static input scales that keeps the size (an up
    block's conv1, 3x3, and its shortcut, 1x1, on (h, skip)) runs its two parts as one diffquant::qconv_sc (the
    second part a source of the first's conv); the model computes what it computes with both switches 0, and with
    DIFFQUANT_SC_FUSE on too (the shortcuts then go into conv2); an up block's ResNet step compiles as one graph, with
    its eager output; a bad value is refused."""
    from diffquant.kernels import ops

    real = ops.qconv_sc
    calls = []

    def spy(*a):
        calls.append((a[1].shape[1], a[6][0].shape[1]))  # (conv kernel, source kernel)
        return real(*a)

    monkeypatch.setattr(ops, "qconv_sc", spy)
    for unet in (None, tiny_sd_unet()):
        _, q, inputs = _calibrated("fp8", model=unet)
        cm = convert(q, "fp8", fuse_norms=True)
        split = [m for m in cm.modules() if isinstance(m, LowBitLayer) and len(m.parts) == 2 and m.act == "fp8"]
        k3 = sum(m.kernel_size == (3, 3) for m in split)
        k1 = sum(m.kernel_size == (1, 1) for m in split)
        assert k3 and k1 and k3 + k1 == len(split)
        blocks = [m for m in cm.modules() if getattr(m, "conv_shortcut", None) is not None]
        with torch.no_grad():
            monkeypatch.setenv("DIFFQUANT_SPLIT_FUSE", "0")
            monkeypatch.setenv("DIFFQUANT_SC_FUSE", "0")
            calls.clear()
            want = call_model(cm, *inputs)
            assert calls == []
            monkeypatch.delenv("DIFFQUANT_SPLIT_FUSE")
            got = call_model(cm, *inputs)
            assert sorted(calls) == sorted([(1, 1)] * k1 + [(3, 3)] * k3), calls
            monkeypatch.delenv("DIFFQUANT_SC_FUSE")
            calls.clear()
            both = call_model(cm, *inputs)
        # conv1 splits fused, and one conv2-with-shortcut call a block (3x3 conv, 1x1 sources)
        assert sorted(calls) == sorted([(3, 3)] * k3 + [(3, 1)] * len(blocks)), calls
        for out in (got, both):
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(ops, "qconv_sc", real)
        # compiled (both switches on): an up block's ResNet step, where the split convs are
        name = next(n for n, m in cm.named_modules() if m in blocks and len(m.conv1.parts) == 2)
        _blocks_compile_to(cm, inputs, [name], 1e-3)
        monkeypatch.setattr(ops, "qconv_sc", spy)
    monkeypatch.setenv("DIFFQUANT_SPLIT_FUSE", "on")
    with pytest.raises(ValueError, match="DIFFQUANT_SPLIT_FUSE"):
        with torch.no_grad():
            call_model(cm, *inputs)

def test_fused_up_blocks_skip_the_concatenation(monkeypatch):
    """convert(fuse_norms=True) on UpBlock2D, AttnUpBlock2D and CrossAttnUpBlock2D (a UNet2DModel and a text-to-image
    UNet; FP8 and int8): the ResNet steps get (h, skip), no [h, skip] channel concatenation is made, and the model
    computes exactly what it computes with diffusers' up-block forward (which concatenates); a shortcut that is not
    split gets the concatenation."""
    from diffquant.kernels.fused_blocks import _FusedUpMixin

    real_cat = torch.cat
    cats = []

    def counting_cat(tensors, dim=0, **kw):  # [h, skip] concatenations outside the reference ops (the CPU norm op's
        caller = sys._getframe(1).f_globals.get("__name__", "")  # own float64 concatenation is not one)
        if dim == 1 and len(tensors) == 2 and all(t.dim() == 4 for t in tensors) and not caller.endswith(".reference"):
            cats.append(tuple(t.shape[1] for t in tensors))
        return real_cat(tensors, dim, **kw)

    for backend, unet in (("fp8", None), ("int8", None), ("fp8", tiny_sd_unet()), ("int8", tiny_sd_unet())):
        _, q, inputs = _calibrated(backend, model=unet)
        cm = convert(q, backend, fuse_norms=True)
        ups = [m for m in cm.modules() if isinstance(m, _FusedUpMixin)]
        assert len(ups) == 2, backend
        assert "2 up blocks hand their ResNet steps (h, skip)" in cm._diffquant_convert_report.norms
        with torch.no_grad():
            monkeypatch.setattr(torch, "cat", counting_cat)
            cats.clear()
            got = call_model(cm, *inputs)
            n_fused = len(cats)
            for m in ups:  # diffusers' up-block forward: it concatenates, the ResNet blocks get one tensor
                m.__class__ = type(m).__bases__[1]
            cats.clear()
            want = call_model(cm, *inputs)
            monkeypatch.setattr(torch, "cat", real_cat)
        assert n_fused == 0 and len(cats) == 4, (backend, n_fused, cats)  # 2 up blocks of 2 ResNet steps
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # forward_pieces on its own (the fused path takes the dual norm op for these static scales): a split shortcut
        # on (h, skip) equals the layer on their concatenation
        sc = next(m.conv_shortcut for m in ups[0].resnets)
        h = torch.randn(2, sc.parts[0].hi, 4, 4).contiguous(memory_format=torch.channels_last)
        skip = torch.randn(2, sc.parts[1].hi - sc.parts[1].lo, 4, 4).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert sc.takes_pieces([h, skip])
            torch.testing.assert_close(sc.forward_pieces([h, skip]), sc(torch.cat([h, skip], 1)), rtol=0, atol=1e-6)
    monkeypatch.setenv("DIFFQUANT_FUSE_UP", "0")  # the A/B switch: plain up blocks and output norm
    cm0 = convert(q, backend, fuse_norms=True)
    assert not any(isinstance(m, _FusedUpMixin) for m in cm0.modules())
    assert type(cm0.conv_norm_out) is torch.nn.GroupNorm and "up blocks" in cm0._diffquant_convert_report.norms
    monkeypatch.delenv("DIFFQUANT_FUSE_UP")
    # a shortcut that is not split (split_shortcut=False): the step concatenates, and still computes the same
    from diffquant.config import QuantConfig

    model = build_unet(SMALL).eval()
    cfg = config_for_backend("fp8")
    q = quantize(model, QuantConfig(**{**vars(cfg), "split_shortcut": False}))
    x, t, c = example_inputs(model)
    with torch.no_grad(), calibrate(q):
        call_model(q, x, t, c)
    cm = convert(q, "fp8", fuse_norms=True)
    with torch.no_grad():
        monkeypatch.setattr(torch, "cat", counting_cat)
        cats.clear()
        got = call_model(cm, x, t, c)
        monkeypatch.setattr(torch, "cat", real_cat)
        n_fused = len(cats)
        for m in cm.modules():
            if isinstance(m, _FusedUpMixin):
                m.__class__ = type(m).__bases__[1]
        want = call_model(cm, x, t, c)
    assert n_fused == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_gpu_fuse_qkv_matches_separate_projections():
    """convert(fuse_qkv=True, fuse_norms=True) on the GPU (bf16, FP8 through torch._scaled_mm where it runs; a
    text-to-image UNet with self- and cross-attention, and a UNet2DModel whose attention input norms run as
    diffquant::group_norm_act into to_qkv): the stacked projections give the separate ones' output, eager and
    compiled."""
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for unet, blocks in ((tiny_sd_unet(), 8), (None, 4)):
        _, q, (x, t, c) = _calibrated("fp8", model=unet)
        inputs = (x.cuda().bfloat16(), t.cuda(), {k: v.cuda().bfloat16() for k, v in c.items()})
        ref = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True)  # fp32 activations
        plain = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True).to(torch.bfloat16)
        cm = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True, fuse_qkv=True).to(torch.bfloat16)
        assert cm._diffquant_convert_report.projections.startswith(f"{blocks} attention blocks")
        with torch.no_grad():
            want32 = call_model(ref, x.cuda(), t.cuda(), {k: v.cuda() for k, v in c.items()}).float()
            base = rel(call_model(plain, *inputs).float(), want32)
        # bf16 activations move FP8 codes in these tiny random UNets (on the CPU with the reference ops: 9-12 % from
        # the fp32 model for both variants; the attention norm rounding once instead of twice: 10.4 vs 9.3 %), so
        # the stacked model is held to the unstacked one's distance from fp32, not to the unstacked output
        _held_to_distance(cm, inputs, want32, base, blocks)


def _tiny_sd_bf16_on_gpu():
    """A calibrated FP8 text-to-image UNet ``q``; its inputs on the GPU in bf16; the plain conversion in bf16; the
    fp32-activation conversion's output ``want32``; and the plain conversion's distance from it, ``base``."""
    _, q, (x, t, c) = _calibrated("fp8", model=tiny_sd_unet())
    inputs = (x.cuda().bfloat16(), t.cuda(), {k: v.cuda().bfloat16() for k, v in c.items()})
    ref = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True)  # fp32 activations
    plain = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True).to(torch.bfloat16)
    with torch.no_grad():
        want32 = call_model(ref, x.cuda(), t.cuda(), {k: v.cuda() for k, v in c.items()}).float()
        got = call_model(plain, *inputs).float()
    return q, inputs, plain, want32, float((got - want32).norm() / want32.norm())


def _held_to_distance(model, inputs, want32, base: float, tag) -> None:
    """``model``'s output, eager and compiled, is finite and no further from ``want32`` (the fp32-activation model's)
    than 1.5 x ``base`` (the plain conversion's distance) + 1e-2."""
    with torch.no_grad():
        got = call_model(model, *inputs).float()
        torch._dynamo.reset()
        compiled = call_model(torch.compile(model), *inputs).float()
    for out in (got, compiled):
        d = float((out - want32).norm() / want32.norm())
        assert torch.isfinite(out).all() and d <= 1.5 * base + 1e-2, (tag, d, base)


@pytest.mark.gpu
@gpu
def test_gpu_fuse_ff_and_tensorwise_gemms_hold_the_model():
    """convert(fuse_ff=True, fuse_temb=True) and set_fp8_gemm(..., "tensorwise") on the GPU (bf16, the Triton GEGLU
    kernel, the stacked time projection, cuBLAS FP8 GEMMs): a text-to-image UNet's output stays as close to the
    fp32-activation model as the plain conversion,
    eager and compiled (bf16 moves FP8 codes in these tiny random UNets, so the distance, not the output, is held)."""
    from diffquant.kernels.fused_ff import FusedGEGLUFeedForward
    from diffquant.kernels.modules import set_fp8_gemm

    q, inputs, _, want32, base = _tiny_sd_bf16_on_gpu()
    for tensorwise in (False, True):
        cm = convert(q, "fp8", attention="float", device="cuda", fuse_norms=True, fuse_ff=True,
                     fuse_temb=True).to(torch.bfloat16)
        assert "time projections run as one stacked GEMM" in cm._diffquant_convert_report.projections
        assert any(isinstance(m, FusedGEGLUFeedForward) for m in cm.modules())
        if tensorwise:
            assert set_fp8_gemm(cm, "tensorwise") > 0
        _held_to_distance(cm, inputs, want32, base, tensorwise)


@pytest.mark.gpu
@gpu
def test_gpu_split_gemm_scaled_mm_holds_the_model(monkeypatch):
    """DIFFQUANT_SPLIT_GEMM=scaled_mm on the GPU (bf16, cuBLAS's row-wise FP8 GEMMs for the up blocks' split
    shortcuts, the Triton kernels elsewhere): the split layer against its qconv path, and the text-to-image UNet held
    to the fp32-activation model as closely as without the switch, eager and compiled."""
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    _, inputs, cm, want32, base = _tiny_sd_bf16_on_gpu()
    split = [m for m in cm.modules() if isinstance(m, LowBitLayer) and len(m.parts) > 1 and m.kernel_size == (1, 1)]
    assert split
    sc = split[0]
    h = torch.randn(2, sc.parts[0].hi, 8, 8, device="cuda", dtype=torch.bfloat16)
    skip = torch.randn(2, sc.parts[1].hi - sc.parts[1].lo, 8, 8, device="cuda", dtype=torch.bfloat16)
    h, skip = (v.contiguous(memory_format=torch.channels_last) for v in (h, skip))
    with torch.no_grad():
        layer_q = sc.forward_pieces([h, skip]).float()
        monkeypatch.setenv("DIFFQUANT_SPLIT_GEMM", "scaled_mm")
        assert sc.split_gemm_scaled_mm(h)
        layer_g = sc.forward_pieces([h, skip]).float()
    assert rel(layer_g, layer_q) < 1e-2
    _held_to_distance(cm, inputs, want32, base, False)


@pytest.mark.gpu
@gpu
def test_gpu_qconv_sc_matches_reference_and_holds_the_model(monkeypatch):
    """diffquant::qconv_sc on the GPU: the shortcut kernel (SD-like 320-channel halves, one source, channel tails,
    several images a tile, a 3x3 source, a split conv's first part read in place as a channel slice) against the
    float64 reference with poisoned outputs; sources whose rows TMA cannot read take the composed qconv calls, as does
    a grid of fewer tiles than SMs (untuned); and DIFFQUANT_SC_FUSE (then DIFFQUANT_SPLIT_FUSE too) holds the
    text-to-image UNet to the fp32-activation model as closely as both at 0, eager and compiled (the kernel forced on
    its small grids; compiled calls launch it too)."""
    import diffquant.kernels.reference as ref_mod
    from diffquant.kernels import ops, tuning

    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import triton_conv_tma as tt

    real_out_like, real_grid, real_kernel = ref_mod.out_like, tc._sc_grid_reason, tt.qconv_tma4d_sc
    launches = []
    monkeypatch.setattr(tt, "qconv_tma4d_sc", lambda *a: launches.append(a[0].shape) or real_kernel(*a))
    monkeypatch.setattr(ref_mod, "out_like", lambda *a, **k: real_out_like(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(tc, "_sc_grid_reason", lambda *a: None)  # the kernel on these small grids too
    for kw in (dict(n=2, c=320, cout=320, h=16, w=16, parts=(320, 320)), dict(n=1, c=64, cout=40, h=7, w=9,
                                                                             parts=(48, 32)),
               dict(n=3, c=32, cout=64, h=8, w=8, parts=(64,)), dict(n=1, c=16, cout=8, h=3, w=5, parts=(16, 8)),
               dict(n=2, c=320, cout=320, h=16, w=16, parts=(320,), sc_k=3),
               dict(n=2, c=320, cout=320, h=16, w=16, parts=(320,), sc_k=3, x_extra=320)):  # a split conv's parts
        c = _sc_case(**kw, device="cuda")
        launches.clear()
        got = _sc_call(ops.qconv_sc, c, torch.bfloat16).float()
        want = _sc_call(ref_mod.qconv_sc_reference, c, torch.bfloat16).float()
        assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 1e-2, kw
        assert len(launches) == (0 if kw["c"] == 16 else 1), kw  # 24-byte source rows: the composed calls
    monkeypatch.setattr(ref_mod, "out_like", real_out_like)
    monkeypatch.setattr(tc, "_sc_grid_reason", real_grid)
    # the untimed rule: one image of 64 x 64 (96 tiles of 128 x 128 for 132 SMs) takes the composed calls, eight
    # images the kernel; the same numbers either way
    for n, want_launches in ((1, 0), (8, 1)):
        c = _sc_case(n=n, c=320, cout=320, h=64, w=64, parts=(640,), device="cuda")
        launches.clear()
        with tuning.no_tables():
            got = _sc_call(ops.qconv_sc, c, torch.bfloat16).float()
        want = _sc_call(ref_mod.qconv_sc_reference, c, torch.bfloat16).float()
        assert len(launches) == want_launches and float((got - want).norm() / want.norm()) < 1e-2, n
    monkeypatch.setenv("DIFFQUANT_SC_FUSE", "0")
    monkeypatch.setenv("DIFFQUANT_SPLIT_FUSE", "0")
    _, inputs, cm, want32, base = _tiny_sd_bf16_on_gpu()
    monkeypatch.setattr(tc, "_sc_grid_reason", lambda *a: None)  # (the tiny UNet's grids are all small)
    monkeypatch.delenv("DIFFQUANT_SC_FUSE")
    launches.clear()
    _held_to_distance(cm, inputs, want32, base, "sc")
    monkeypatch.delenv("DIFFQUANT_SPLIT_FUSE")
    n_sc = len(launches)
    _held_to_distance(cm, inputs, want32, base, "sc+split")
    assert n_sc and len(launches) > 2 * n_sc

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,c", [(32768, 320), (8195, 640), (515, 1280), (77, 96), (9, 112), (3, 40)])
def test_gpu_add_layer_norm_matches_reference(t, c, monkeypatch):
    """diffquant::add_layer_norm's Triton kernel on the GPU against the reference (run on the same GPU tensors), its
    outputs poisoned: SD-1.5 b8's widths with row tails, widths of one padded chunk (96 = 64 + 32 is two; 112 is
    padded), bf16 and fp16, with and without the projection's scale / bias and the residual, e4m3 output with one and
    per-channel scales, bf16 output. The new residual equals the reference's bit for bit; at most 0.1 % of the
    outputs differ (statistics summed in another order), each by at most one step."""
    from diffquant.kernels import ops
    from diffquant.kernels import triton_layernorm as tl_mod
    from diffquant.kernels.reference import add_layer_norm_reference

    real_new_out, launches = tl_mod.new_out, []

    def poisoned(shape, dtype, device):
        out = real_new_out(shape, dtype, device)
        return out.view(torch.uint8).fill_(0x7F).view(dtype) if dtype == torch.float8_e4m3fn else out.fill_(float("nan"))

    monkeypatch.setattr(tl_mod, "new_out", poisoned)
    real_kernel = tl_mod.add_layer_norm_triton
    monkeypatch.setattr(tl_mod, "add_layer_norm_triton", lambda *a, **k: launches.append(1) or real_kernel(*a, **k))
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.bfloat16, torch.float16):
        y = (torch.randn(t, c, device="cuda", generator=g) * 4).to(dt)
        r = (torch.randn(t, c, device="cuda", generator=g) * 8).to(dt)
        ys = torch.rand(c, device="cuda", generator=g) * 0.02 + 0.01
        yb = torch.randn(c, device="cuda", generator=g) * 0.1
        w, b = (torch.rand(c, device="cuda", generator=g) + 0.5).to(dt), (torch.randn(c, device="cuda", generator=g) * 0.1).to(dt)
        for args in ((ys, yb, r), (None, None, r), (None, None, None)):
            for o_scale, o_dt in ((torch.tensor([0.02], device="cuda"), torch.float8_e4m3fn),
                                  (torch.rand(c, device="cuda", generator=g) * 0.02 + 0.01, torch.float8_e4m3fn),
                                  (None, dt)):
                h0, o0 = add_layer_norm_reference(y, *args, w, b, 1e-5, o_scale, o_dt)
                h1, o1 = ops.add_layer_norm(y, *args, w, b, 1e-5, o_scale, o_dt)
                assert h0.shape == h1.shape and torch.equal(h0, h1), (dt, [a is None for a in args])
                o0, o1 = o0.float(), o1.float()
                assert torch.isfinite(o1).all()
                differ = o0 != o1
                step = o0.abs().clamp_min(2 ** -6) * (2 ** -3 if o_dt == torch.float8_e4m3fn else 2 ** -7)
                assert float(differ.float().mean()) <= 1e-3 and bool(((o0 - o1).abs() <= step * 1.01).all()), \
                    (dt, [a is None for a in args], o_dt, float(differ.float().mean()))
    assert len(launches) == 18


@pytest.mark.gpu
@gpu
def test_gpu_fuse_ln_holds_the_model(monkeypatch):
    """convert(fuse_ln=True) with fuse_qkv, fuse_ff and the tensor-wise output projections (set_fp8_gemm, Q/K/V
    excluded: the shipped SD-1.5 configuration) on the GPU in bf16: the kernel runs three times a block, and the
    text-to-image UNet equals the unfused conversion in eager mode (the op rounds where the model rounds) up to
    1e-2 relative, and stays as close to the fp32-activation model as the plain conversion, eager and compiled."""
    from diffquant.kernels import triton_layernorm as tl_mod
    from diffquant.kernels.modules import set_fp8_gemm

    q, inputs, _, want32, base = _tiny_sd_bf16_on_gpu()
    kw = dict(attention="float", device="cuda", fuse_norms=True, fuse_qkv=True, fuse_ff=True, fuse_temb=True)
    plain = convert(q, "fp8", **kw).to(torch.bfloat16)
    cm = convert(q, "fp8", **kw, fuse_ln=True).to(torch.bfloat16)
    excl = ("to_qkv", "to_kv", "to_q", "to_k", "to_v")
    assert set_fp8_gemm(plain, "tensorwise", exclude=excl) == set_fp8_gemm(cm, "tensorwise", exclude=excl) > 0
    n_blocks = sum(type(m).__name__ == "FusedLNBasicTransformerBlock" for m in cm.modules())
    assert n_blocks >= 2
    launches, real = [], tl_mod.add_layer_norm_triton
    monkeypatch.setattr(tl_mod, "add_layer_norm_triton", lambda *a, **k: launches.append(a[1] is not None) or real(*a, **k))
    with torch.no_grad():
        want = call_model(plain, *inputs).float()
        got = call_model(cm, *inputs).float()
    # every norm takes its producer's raw GEMM output: norm1 proj_in's, norm2 / norm3 to_out's
    assert len(launches) == 3 * n_blocks and sum(launches) == 3 * n_blocks
    assert float((got - want).norm() / want.norm()) < 1e-2
    monkeypatch.setattr(tl_mod, "add_layer_norm_triton", real)
    _held_to_distance(cm, inputs, want32, base, "fuse_ln")


def test_fused_resnet_norms_compute_what_diffusers_does(monkeypatch):
    """convert(fuse_norms=True): every plain ResNet block runs norm + SiLU (+ time embedding) through
    diffquant::group_norm_act, handing converted FP8 convs their e4m3 input (int8 convs their int8 codes); on the
    inputs each block sees, it
    returns what diffusers' own forward returns (the reference op: the same FP8 codes here); the model compiles as
    one graph; a block of another form is left alone with its reason."""
    from diffusers.models.resnet import ResnetBlock2D

    from diffquant.kernels import fused_blocks, ops
    from diffquant.kernels.bench import _kernel_class

    model, q, (x, t, c) = _calibrated("fp8")
    cm = convert(q, "fp8", fuse_norms=True)
    fused = [n for n, m in cm.named_modules() if type(m).__name__ == "FusedNormResnetBlock2D"]
    # int8: the norm writes the conv's int8 codes; a text-to-image UNet: transformer input norms into proj_in too
    for backend, unet in (("int8", None), ("fp8", tiny_sd_unet())):
        mi, qi, inputs = _calibrated(backend, model=unet)
        ci8 = convert(qi, backend, fuse_norms=True)
        names = [n for n, m in ci8.named_modules() if type(m).__name__.startswith("FusedNorm")]
        assert unet is None or any(type(m).__name__ == "FusedNormTransformer2DModel" for m in ci8.modules())
        with torch.no_grad():
            _check_fused_blocks(ci8, names, inputs, 1e-3)
    assert fused and cm._diffquant_convert_report.norms.startswith(f"{len(fused)} blocks")
    calls, fp8_out, raw = [], [], []
    real, real_dual = fused_blocks.group_norm_act, fused_blocks.group_norm_act_dual

    def counted(*a):
        out = real(*a)
        calls.append(1)
        fp8_out.append(out.dtype == torch.float8_e4m3fn)
        return out

    def counted_dual(*a):  # an up block's norm1, with the split shortcut's e4m3 input from the same read
        out = real_dual(*a)
        calls.append(1)
        fp8_out.append(out[0].dtype == torch.float8_e4m3fn)
        raw.append(out[1].dtype)
        return out

    monkeypatch.setattr(fused_blocks, "group_norm_act", counted)
    monkeypatch.setattr(fused_blocks, "group_norm_act_dual", counted_dual)
    with torch.no_grad():
        out = _check_fused_blocks(cm, fused, (x, t, c), 1e-3)
        # two per ResNet block, e4m3 for their converted convs; one for the output norm + SiLU, in float
        assert len(calls) == 2 * len(fused) + 1 and sum(fp8_out) == 2 * len(fused)
        ups = [n for n in fused if n.startswith("up_blocks")]
        assert ups and raw == [torch.float8_e4m3fn] * len(ups)
        assert type(cm.conv_norm_out).__name__ == "FusedGroupNormSiLU" and isinstance(cm.conv_act, torch.nn.Identity)
        xo = torch.randn(2, cm.conv_norm_out.num_channels, 5, 6)
        fused_out = cm.conv_norm_out(xo)
        cm.conv_norm_out.train()  # training: the plain GroupNorm and SiLU
        torch.testing.assert_close(fused_out, cm.conv_norm_out(xo), rtol=1e-5, atol=1e-5)
        cm.conv_norm_out.eval()
        monkeypatch.setattr(fused_blocks, "group_norm_act", ops.group_norm_act)
        monkeypatch.setattr(fused_blocks, "group_norm_act_dual", ops.group_norm_act_dual)
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        compiled = call_model(torch.compile(cm), x, t, c)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled, out, rtol=1e-5, atol=1e-5)
    other = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, time_embedding_norm="scale_shift")
    done, left = fused_blocks.fuse_group_norms(torch.nn.Sequential(other))
    assert done == [] and "scale_shift" in left["0"]
    assert _kernel_class("_gn_apply_kernel") == "dq_norm"


def test_conv_row_stats_hand_norm2_its_statistics(monkeypatch):
    """DIFFQUANT_GN_CONV_STATS=1: in every fused ResNet block (FP8 and int8; a UNet2DModel and a text-to-image UNet)
    conv1 runs as diffquant::qconv_stats (a split conv1 of an up block: its last part, which adds the first's output)
    and norm2 as diffquant::group_norm_act_stats over its row statistics, and the model computes what it computes
    without the switch. The ops: the norm equals group_norm_act on the same tensor
    (the time embedding's addend included), uses the statistics it is given, and checks their shapes; with the switch,
    a ResNet step with a one-part conv1 and one with a split conv1 compile as one graph each, with their eager output."""
    from diffquant.kernels import fused_blocks, ops
    from diffquant.kernels.reference import row_stats_reference

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 16, 5, 7, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last) + 3
    add = torch.randn(2, 16, generator=g)
    wt, bs = torch.randn(16, generator=g), torch.randn(16, generator=g)
    mean, m2 = row_stats_reference(y)
    assert mean.shape == (2, 5, 16)
    for so, dt in ((None, torch.float32), (torch.tensor([0.02]), torch.float8_e4m3fn)):
        got = ops.group_norm_act_stats(y, mean, m2, add, wt, bs, 4, 1e-5, True, so, dt).float()
        want = ops.group_norm_act(y, None, add, wt, bs, 4, 1e-5, True, so, dt).float()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    off = ops.group_norm_act_stats(y, mean, m2 * 2, add, wt, bs, 4, 1e-5, True, None, torch.float32)
    assert (off - ops.group_norm_act(y, None, add, wt, bs, 4, 1e-5, True, None, torch.float32)).abs().max() > 0.1
    with pytest.raises(ValueError, match="fp32"):
        ops.group_norm_act_stats(y, mean[:, :4], m2, add, wt, bs, 4, 1e-5, True, None, torch.float32)
    monkeypatch.setenv("DIFFQUANT_GN_CONV_STATS", "yes")
    with pytest.raises(ValueError, match="DIFFQUANT_GN_CONV_STATS"):
        fused_blocks.conv_row_stats_enabled()

    calls = []
    real_conv, real_norm = ops.qconv_stats, fused_blocks.group_norm_act_stats

    def counted_conv(*a):
        calls.append("conv")
        return real_conv(*a)

    def counted_norm(*a):
        calls.append("norm")
        return real_norm(*a)

    for backend, unet in (("fp8", None), ("int8", None), ("fp8", tiny_sd_unet())):
        _, q, inputs = _calibrated(backend, model=unet)
        cm = convert(q, backend, fuse_norms=True)
        blocks = [m for m in cm.modules() if type(m).__name__ == "FusedNormResnetBlock2D"]
        assert any(len(m.conv1.parts) == 2 for m in blocks), backend  # up blocks' conv1 are split
        with torch.no_grad():
            monkeypatch.setenv("DIFFQUANT_GN_CONV_STATS", "0")
            want = call_model(cm, *inputs)
            monkeypatch.setenv("DIFFQUANT_GN_CONV_STATS", "1")
            monkeypatch.setattr(ops, "qconv_stats", counted_conv)
            monkeypatch.setattr(fused_blocks, "group_norm_act_stats", counted_norm)
            calls.clear()
            got = call_model(cm, *inputs)
            monkeypatch.setattr(ops, "qconv_stats", real_conv)
            monkeypatch.setattr(fused_blocks, "group_norm_act_stats", real_norm)
        assert calls == ["conv", "norm"] * len(blocks), (backend, calls)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # compiled, with the switch (the text-to-image UNet): a ResNet step with a one-part conv1 and one with a split one
    names = [next(n for n, m in cm.named_modules() if m in blocks and len(m.conv1.parts) == k) for k in (1, 2)]
    _blocks_compile_to(cm, inputs, names, 1e-4)


def test_inductor_kernels_joins_profile_and_generated_code(tmp_path):
    """benchmarks/inductor_kernels.py: kernel sources parsed from an Inductor output-code log (the format
    TORCH_LOGS=output_code prints) and joined with a bench row's profile, largest first."""
    import importlib.util
    from pathlib import Path

    from diffquant.kernels.bench import _kernel_class

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inductor_kernels.py"
    spec = importlib.util.spec_from_file_location("inductor_kernels", path)
    ik = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ik)
    q3 = "'" * 3
    log = (f"triton_red_fused_native_group_norm_3 = async_compile.triton('triton_red_fused_native_group_norm_3', {q3}\n"
           f"    x = tl.load(in_ptr0 + r)\n    tmp = triton_helpers.welford_reduce(x)\n    tl.store(out_ptr0 + x0, tmp)\n"
           f"{q3}, device_str='cuda')\n"
           f"triton_poi_fused_clamp_div_qconv_7 = async_compile.triton('triton_poi_fused_clamp_div_qconv_7', {q3}\n"
           f"    a = tl.load(in_ptr0 + x0)\n    b = tl.load(in_ptr1 + x0)\n"
           f"    tl.store(out_ptr0 + x0, tl.clamp(a / b, -448.0, 448.0).to(tl.float8e4nv))\n{q3}, device_str='cuda')\n")
    src = ik.kernel_sources(log)
    assert set(src) == {"triton_red_fused_native_group_norm_3", "triton_poi_fused_clamp_div_qconv_7"}
    # the same log as TORCH_LOGS=output_code writes it to stderr: each line behind the logger's prefix
    prefix = "V1129 14:04:45.260000 817 torch/_inductor/graph.py:2552] [8/0_1] [__output_code] "
    assert ik.kernel_sources("".join(prefix + line for line in log.splitlines(keepends=True))) == src
    row = {"kernel_breakdown": [{"variant": "dq-fp8", "top_kernels": [
        ["triton_poi_fused_clamp_div_qconv_7", 0.2, 5], ["triton_red_fused_native_group_norm_3", 0.5, 2],
        ["_qconv_tma4d_kernel", 3.0, 40], ["triton_poi_missing_9", 0.1, 1]]}]}
    rows = ik.table(row, src)
    assert [r["kernel"] for r in rows] == ["triton_red_fused_native_group_norm_3", "triton_poi_fused_clamp_div_qconv_7",
                                           "triton_poi_missing_9"]
    gn, q, missing = rows
    assert gn["welford"] and gn["reduction"] and gn["loads"] == 1 and not gn["quantizes"]
    assert q["quantizes"] and q["stores_fp8"] >= 1 and q["loads"] == 2 and not q["reduction"]
    assert missing["source"] == "not in the log" and _kernel_class("triton_poi_missing_9") == "inductor_fused"
    # bytes a launch moves: full-size accesses count every element, per-channel (evict_last) loads once
    meta = "triton_meta={'signature': {'in_ptr0': '*bf16', 'in_ptr1': '*fp32', 'out_ptr0': '*fp8e4nv', 'xnumel': 'i32'}}\n"
    body = ("    a = tl.load(in_ptr0 + (r0_1 + 320*x0), r0_mask, other=0.0)\n"
            "    w = tl.load(in_ptr1 + (r0_1), r0_mask, eviction_policy='evict_last', other=0.0)\n"
            "    tl.store(out_ptr0 + (r0_1 + 320*x0), y, r0_mask)\n")
    assert ik.traffic_bytes(meta + "    xnumel = 1000\n    r0_numel = 320\n" + body) == 1000 * 320 * 3 + 320 * 4
    pointwise = ("    xnumel = 4096\n    x0 = xindex\n    a = tl.load(in_ptr0 + (x0), None)\n"
                 "    s = tl.load(in_ptr1 + (x0 % 320), None, eviction_policy='evict_last')\n"
                 "    tl.store(out_ptr0 + (x0), a, None)\n")
    assert ik.traffic_bytes(meta + pointwise) == 4096 * 3
    assert ik.traffic_bytes(body) is None  # no sizes (dynamic shapes): no estimate


def test_bench_torchao_int8_skips_the_linears_torch_int_mm_cannot_run():
    """torchao's int8-dynamic variant in `diffquant bench`: the time-embedding linears (batch rows only, fewer than
    17 at small batches) stay bf16, the others are quantized; measured 2026-11-28 on the H200, applying it to every
    Linear failed at batch 8 ('self.size(0) needs to be greater than 16')."""
    pytest.importorskip("torchao")

    from diffquant.kernels.bench import _torchao, linear_rows
    from diffquant.models.adapter import example_inputs

    unet = tiny_sd_unet()
    inputs = example_inputs(unet, batch=2)
    rows = linear_rows(unet, inputs)
    assert rows["time_embedding.linear_1"] == 2 and rows["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 2 * 64
    m = _torchao(unet, "int8dyn", inputs)
    small = {n for n, r in rows.items() if r < 17}
    assert m._torchao_skipped == sorted(small) and "time_embedding.linear_1" in small
    mods = dict(m.named_modules())
    for name, r in rows.items():
        quantized = type(mods[name].weight) is not torch.nn.Parameter
        assert quantized == (name not in small), name
    with pytest.raises(ValueError, match="torchao variant"):
        _torchao(unet, "int4", inputs)


def test_bench_torchao_keeps_inductor_defaults(monkeypatch):
    """torchao's configs switch on Inductor's coordinate-descent tuning for the whole process unless told not to;
    every torchao bench row then stalled over 240 s in its first compiled call on the H200 (2026-11-28). The bench
    keeps Inductor's defaults, the same as for the bf16 and diffquant rows; DIFFQUANT_BENCH_TORCHAO_INDUCTOR=1 is
    torchao's own setting."""
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config

    from diffquant.kernels import bench
    from diffquant.models.adapter import example_inputs

    unet = tiny_sd_unet()
    inputs = example_inputs(unet, batch=2)
    # everything torchao's setter touches, restored afterwards for the tests that follow
    with inductor_config.patch({"coordinate_descent_tuning": False, "coordinate_descent_check_all_directions": False,
                                "force_fuse_int_mm_with_mul": False, "fx_graph_cache": inductor_config.fx_graph_cache,
                                "triton.unique_kernel_names": inductor_config.triton.unique_kernel_names}):
        bench._torchao(unet, "int8dyn", inputs)
        assert inductor_config.coordinate_descent_tuning is False
        monkeypatch.setattr(bench, "TORCHAO_INDUCTOR_CONFIG", True)
        bench._torchao(unet, "int8dyn", inputs)
        assert inductor_config.coordinate_descent_tuning is True  # torchao's setting, as the switch says


def test_bench_kernel_classes():
    """The profiler breakdown's classes: diffquant's kernels are not counted as cuDNN or attention (the TMA conv
    kernel's name contains 'conv' and was counted as cuDNN in the first TMA measurement)."""
    from diffquant.kernels.bench import _kernel_class

    assert _kernel_class("_qconv_kernel") == "dq_qconv"
    assert _kernel_class("_qconv_tma_kernel") == "dq_qconv" and _kernel_class("_qconv_tma4d_kernel") == "dq_qconv"
    assert _kernel_class("_fp8_attn_kernel") == "dq_attention"
    assert _kernel_class("_fa_kernel") == "dq_attention"  # the Gluon flash attention (gluon_attention.py)
    assert _kernel_class("flash_fwd_kernel") == "attention" and _kernel_class("fmha_cutlassF_bf16") == "attention"
    assert _kernel_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv_cudnn"
    assert _kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert _kernel_class("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_bias_TNT") == "gemm"
    assert _kernel_class("triton_per_fused_add_native_group_norm_silu_10") == "inductor_fused"


def test_bench_kernel_classes_cover_every_diffquant_kernel():
    """Every Triton kernel diffquant defines lands in a dq_ class: session 12's profiles counted the one-dot-per-row
    conv kernel as cuDNN and the GEGLU GEMM as 'other', because the classes listed kernel names one by one. Inductor's
    kernels land in inductor_fused, whatever op names theirs contain."""
    import ast
    from pathlib import Path

    import diffquant.kernels as pkg
    from diffquant.kernels.bench import _kernel_class

    names = []
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list) and node.name.endswith("_kernel"):
                names.append(node.name)
    assert len(names) >= 10 and "_qconv_tma4d_rows_kernel" in names and "_linear_geglu_kernel" in names
    wrong = {n: _kernel_class(n) for n in names if not _kernel_class(n).startswith("dq_")}
    assert not wrong, wrong
    # Inductor's kernels stay Inductor's where their names hold an op's name (until session 20 the GEGLU class
    # counted Inductor's norm kernels after the GEGLU op)
    for name in ("triton_per_fused__to_copy_add_clamp_div_linear_geglu_mul_native_layer_norm_permute_view_10",
                 "triton_poi_fused__to_copy_add_clamp_div_mul_permute_qconv_view_13"):
        assert _kernel_class(name) == "inductor_fused", name


def test_bench_isolated_rows_survive_a_stalled_row(tmp_path):
    """run_tasks_isolated: a row that times out or fails costs that row only; speedups come from the bf16-compile
    row of the same model and batch; the budget stops new rows; the merged result is saved after every row."""
    import subprocess

    from diffquant.kernels.bench import Task, run_tasks_isolated

    def spawn(tk, timeout_s, reps, layer_types, profile, work, **kw):
        if tk.variant == "torchao-fp8":
            raise subprocess.TimeoutExpired("row", timeout_s)
        if tk.variant == "dq-int8":
            raise RuntimeError("row process exited with 1: boom")
        ms = {"bf16-compile": 18.0, "dq-fp8": 20.0}[tk.variant]
        return {"rows": [{"model": tk.model, "batch": tk.batch, "variant": tk.variant, "ms": ms}],
                "kernel_breakdown": [{"variant": tk.variant}], "torchao": "0.16.0"}

    tasks = [Task("sd15-unet", 8, v) for v in ("dq-fp8", "torchao-fp8", "bf16-compile", "dq-int8")]
    out = tmp_path / "k.json"
    res = run_tasks_isolated(tasks, 5.0, out_path=str(out), spawn=spawn, progress=lambda s: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["dq-fp8"]["speedup_vs_bf16_compiled"] == 0.9 and rows["bf16-compile"]["speedup_vs_bf16_compiled"] == 1.0
    assert rows["torchao-fp8"]["error"].startswith("timeout") and "boom" in rows["dq-int8"]["error"]
    assert res["torchao"] == "0.16.0" and len(res["kernel_breakdown"]) == 2
    assert json.loads(out.read_text())["rows"] == res["rows"]
    res = run_tasks_isolated(tasks, 5.0, budget_s=0, spawn=spawn, progress=lambda s: None)
    assert res["rows"] == [] and len(res["skipped"]) == 4


def test_bench_timeout_names_the_last_phase(monkeypatch, tmp_path):
    """A row process killed at its timeout is reported with the last progress mark it printed (build, first call /
    compile, timing), read from the partial stderr; a process that printed none says so."""
    import subprocess

    from diffquant.kernels import bench
    from diffquant.kernels.bench import Task, run_tasks_isolated

    def fake_run(cmd, timeout=None, **kw):
        err = ("x\n" + bench._PHASE_MARK + " build the variant at 3 s\nwarning\n" + bench._PHASE_MARK
               + " first call (compiles) at 41 s\n") if "torchao-fp8" in " ".join(cmd) else "no marks"
        raise subprocess.TimeoutExpired(cmd, timeout, stderr=err.encode())

    monkeypatch.setattr(subprocess, "run", fake_run)
    tasks = [Task("sd15-unet", 8, "torchao-fp8"), Task("sd15-unet", 8, "torchao-int8dyn")]
    res = run_tasks_isolated(tasks, 300.0, progress=lambda s: None)
    errs = [r["error"] for r in res["rows"]]
    assert errs[0] == "timeout: no result within 300 s (process killed; last phase: first call (compiles) at 41 s)"
    assert errs[1].endswith("last phase: none reached)")


def test_bench_rows_in_parallel_one_per_gpu(tmp_path):
    """run_tasks_isolated(gpus=[...]): as many rows at once as GPUs, never two on one GPU, each row tagged with its GPU;
    rows merged in task order whatever order they finish in; speedups across GPUs from the bf16-compile row."""
    import threading

    from diffquant.kernels.bench import Task, run_tasks_isolated

    busy, lock, peak = set(), threading.Lock(), [0]

    def spawn(tk, timeout_s, reps, layer_types, profile, work, gpu=None):
        with lock:
            assert gpu not in busy, f"two rows on GPU {gpu}"
            busy.add(gpu)
            peak[0] = max(peak[0], len(busy))
        time.sleep(0.3 if tk.batch == 8 else 0.05)  # the first rows finish last
        with lock:
            busy.discard(gpu)
        if tk.variant == "dq-int8":
            raise RuntimeError("row process exited with 1: boom")
        return {"rows": [{"model": tk.model, "batch": tk.batch, "variant": tk.variant,
                          "ms": {"bf16-compile": 10.0, "dq-fp8": 8.0}[tk.variant]}]}

    tasks = [Task("sd15-unet", 8, "bf16-compile"), Task("sd15-unet", 8, "dq-fp8")]
    tasks += [Task("ddpm-cifar10-32", 256, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    out = tmp_path / "k.json"
    res = run_tasks_isolated(tasks, 5.0, out_path=str(out), spawn=spawn, progress=lambda s: None, gpus=[0, 1, 3])
    assert peak[0] == 3
    assert [(r["model"], r["variant"]) for r in res["rows"]] == [(t.model, t.variant) for t in tasks]
    assert {r["gpu"] for r in res["rows"]} <= {0, 1, 3} and len({r["gpu"] for r in res["rows"]}) >= 2
    assert [r.get("speedup_vs_bf16_compiled") for r in res["rows"]] == [1.0, 1.25, 1.0, 1.25, None]
    assert "boom" in res["rows"][-1]["error"] and res["gpus"] == [0, 1, 3]
    assert json.loads(out.read_text())["rows"] == res["rows"]


def test_bench_gpus_option_parses_and_refuses_what_is_not_there(monkeypatch):
    from diffquant.kernels.bench import visible_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert visible_gpus("all") == [0, 1, 2, 3] and visible_gpus("2") == [0, 1] and visible_gpus("1,3") == [1, 3]
    for bad, msg in (("5", "no GPU"), ("0,4", "no GPU"), ("0", "GPU 0 alone is '1'"), ("gpu0", "comma list")):
        with pytest.raises(ValueError, match=msg):
            visible_gpus(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the child process's failure path on a machine without a GPU")
def test_bench_isolated_row_process_reports_its_failure(tmp_path):
    """The real child process (python -m diffquant.kernels.bench --one ...): its command line parses, and a row
    that cannot run (no GPU here) comes back as an error row, not as a crash of the run."""
    from diffquant.kernels.bench import Task, run_tasks_isolated

    res = run_tasks_isolated([Task("zoo:cifar10-ddpm", 2, "bf16-eager", compile=False)], 120.0, progress=lambda s: None)
    (row,) = res["rows"]
    assert row["variant"] == "bf16-eager" and "exited with" in row["error"] and "CUDA" in row["error"]


def test_convert_fp8_dynamic_per_tensor_and_per_token():
    """fp8_dynamic: 'tensor' (or True) gives every single-part layer one scale per call; 'token' gives Linear and 1x1
    convs one scale per token (GEMM row) and the other convs one per call. Each converted layer computes exactly
    that quantization (checked against a from-scratch computation), and per-token tracks a float layer better when
    a few tokens carry outliers."""
    from diffquant.quant.affine import FP8_E4M3_MAX as FP8_MAX

    model, q, (x, t, c) = _calibrated("fp8")
    for mode, want_1x1 in ((True, "fp8_dynamic"), ("tensor", "fp8_dynamic"), ("token", "fp8_token")):
        cm = convert(q, "fp8", fp8_dynamic=mode)
        layers = {n: m for n, m in cm.named_modules() if isinstance(m, LowBitLayer)}
        assert not cm._diffquant_convert_report.kept  # split layers too: one dynamic scale per part
        gemm = [m for m in layers.values() if m._is_gemm() and len(m.parts) == 1]
        other = [m for m in layers.values() if not m._is_gemm() or len(m.parts) > 1]
        assert gemm and other and any(len(m.parts) > 1 for m in other)
        assert all(m.act == want_1x1 for m in gemm) and all(m.act == "fp8_dynamic" for m in other)
        rep = cm._diffquant_convert_report.converted
        assert sum("dynamic FP8 per token" in v for v in rep.values()) == (len(gemm) if mode == "token" else 0)
        with torch.no_grad():
            assert torch.isfinite(call_model(cm, x, t, c)).all()
    with pytest.raises(ValueError, match="fp8_dynamic"):
        convert(q, "fp8", fp8_dynamic="channel")
    with pytest.raises(ValueError, match="backend 'fp8' only"):
        convert(q, "int8", fp8_dynamic="token")

    # one Linear, by hand: per-row amax / 448, e4m3 values, float matmul with the e4m3 weight, x row scale x w_scale
    lin = next(m for m in cm.modules() if isinstance(m, LowBitLayer) and m.kind == "linear")
    g = torch.Generator().manual_seed(0)
    xin = torch.randn(5, lin.in_channels, generator=g)
    xin[2] *= 1e5  # an outlier token: with one scale per tensor the other tokens fall into e4m3's subnormals
    s = xin.abs().amax(dim=1, keepdim=True) / FP8_MAX
    xq = (xin / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double()
    p = lin.parts[0]
    want = (xq @ p.w.reshape(lin.out_channels, -1).double().t()) * s.double() * p.w_scale.double()
    want = want + (lin.bias.double() if lin.bias is not None else 0)
    with torch.no_grad():
        got = lin(xin)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # against the float layer with the same (dequantized) weight: on the ordinary tokens, per token beats per tensor
    w_deq = p.w.reshape(lin.out_channels, -1).float() * p.w_scale[:, None]
    exact = xin @ w_deq.t() + (lin.bias if lin.bias is not None else 0)
    lin_t = copy.deepcopy(lin)
    lin_t.set_act_fp8(None, "tensor")
    with torch.no_grad():
        err_tok = float(((lin(xin) - exact)[[0, 1, 3, 4]]).norm())
        err_ten = float(((lin_t(xin) - exact)[[0, 1, 3, 4]]).norm())
    assert err_tok < 0.5 * err_ten, (err_tok, err_ten)
    conv3 = next(m for m in cm.modules() if isinstance(m, LowBitLayer) and m.kernel_size == (3, 3) and len(m.parts) == 1)
    with pytest.raises(ValueError, match="per-token"):
        conv3.set_act_fp8(None, "token")
    # a split layer: each part quantized with the absolute maximum of its own channels
    split = next(m for m in cm.modules() if isinstance(m, LowBitLayer) and len(m.parts) > 1)
    xs = torch.randn(2, split.in_channels, 4, 4, generator=g)
    xs[:, : split.parts[0].hi] *= 100  # the first part's range would swamp the second part's with one scale
    want = 0
    for p_ in split.parts:
        part = xs[:, p_.lo:p_.hi].double()
        sc = part.abs().max() / FP8_MAX
        v = (part / sc).clamp(-FP8_MAX, FP8_MAX).float().to(torch.float8_e4m3fn).double() * sc
        wv = p_.w.double().permute(0, 3, 1, 2) * p_.w_scale.double().view(-1, 1, 1, 1)
        want = want + F.conv2d(v, wv, None, split.stride, split.padding)
    want = want + split.bias.double().view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(split(xs).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_fp8_per_token_layers_match_the_cpu_path():
    """fp8_dynamic='token' on the GPU (torch._scaled_mm with row-wise activation scales for Linear / 1x1 convs)
    against the same converted model on the CPU (reference op, rows scaled after it).

    Layer by layer, on the inputs each layer sees in the CPU model: only the accumulation order and the GPU GEMM's
    bf16 output differ, so they agree to bf16 precision. End to end, FP8 rounding amplifies those differences (a
    value near a rounding edge lands on the other side: 0.114 relative on the H200, 2026-11-28; on the CPU, scaling
    this model's input by 1 + 1e-3 moves its output by 8.4 % per token, 9.9 % static), so the model is held to a
    bound of that size."""
    from diffquant.kernels.modules import scaled_mm_works

    if not scaled_mm_works(torch.device("cuda")):
        pytest.skip("torch._scaled_mm with row-wise scales does not run on this GPU")
    model, q, (x, t, c) = _calibrated("fp8")
    cm_cpu = convert(q, "fp8", fp8_dynamic="token")
    cm_gpu = convert(q, "fp8", fp8_dynamic="token", device="cuda")
    gpu_layers = dict(cm_gpu.named_modules())
    token = [n for n, m in cm_gpu.named_modules()
             if isinstance(m, LowBitLayer) and m.fp8_gemm == "scaled_mm" and m.act == "fp8_token"]
    assert token
    seen = {}

    def keep(name):
        def hook(mod, args, out):  # first call's input and output (returns None: the output is not replaced)
            seen.setdefault(name, (args[0].clone(), out.clone()))
        return hook

    hooks = [dict(cm_cpu.named_modules())[n].register_forward_hook(keep(n)) for n in token]
    with torch.no_grad():
        ref = call_model(cm_cpu, x, t, c)
        for h in hooks:
            h.remove()
        assert set(seen) == set(token)
        for n, (inp, want) in seen.items():
            got = gpu_layers[n](inp.cuda()).cpu()
            assert got.shape == want.shape
            assert float((got - want).norm() / want.norm()) < 1e-2, n
        out = call_model(cm_gpu, x.cuda(), t.cuda(), {k: v.cuda() for k, v in c.items()}).cpu()
    rel = float((out - ref).norm() / ref.norm())
    assert math.isfinite(rel) and rel < 0.15, rel


def test_converted_fp8_model_compiles_on_cpu_with_fp8_attention_and_per_token_scales():
    """torch.compile of a converted model with the newest paths (FP8 attention writing to_out's e4m3 input, dynamic
    per-token scales): the custom ops' fake implementations, schemas and the processor's Python-side choices trace,
    and the compiled blocks compute what the eager ones do (CPU, reference ops). The blocks, each on the inputs it sees
    in the model, hold every kind of layer the model has (the whole UNet takes ~4x as long to compile on 2 cores): a
    down block (per-token time projection and one-part 1x1 shortcut, dynamic 3x3 convs, an attention block on FP8
    attention with per-token projections) and an up block's ResNet step (split 3x3 conv1 and 1x1 shortcut, dynamic
    per part)."""
    model, q, (x, t, c) = _calibrated("fp8")
    cm = convert(q, "fp8", attention="fp8", fp8_dynamic="token")
    names = ["down_blocks.1", "up_blocks.0.resnets.0"]
    assert _layer_kinds(m for n in names for m in cm.get_submodule(n).modules()) == _layer_kinds(cm.modules())
    assert any(type(m.processor).__name__ == "FP8AttnProcessor" for m in cm.get_submodule(names[0]).modules()
               if hasattr(m, "processor"))
    for name, (args, kwargs) in _block_inputs(cm, (x, t, c), names).items():
        block = cm.get_submodule(name)
        with torch.no_grad():
            eager = block(*args, **kwargs)
            torch._dynamo.reset()
            fn = torch.compile(block)
            compiled = fn(*args, **kwargs)
            # later calls reuse the graph: the attention processors' call counters once forced a recompile per call,
            # and after 8 the SD-1.5 UNet ran eager (H200, 2026-11-28)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(2):
                    again = fn(*args, **kwargs)
        for a, b in zip(_tensors(compiled), _tensors(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        for a, b in zip(_tensors(again), _tensors(compiled), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_tune_kernels_cli_checks_and_shows_rows(tmp_path):
    """`diffquant tune-kernels`: task specs checked before anything runs, a clear refusal without a GPU, and
    --show-rows prints a stored rows file on any machine."""
    from click.testing import CliRunner

    from diffquant.cli import cli
    from diffquant.kernels.tune_models import parse_tasks

    assert parse_tasks("sd15-unet:8:dq-fp8, zoo:cifar10-ddpm:256:dq-int8") == [
        ("sd15-unet", 8, "dq-fp8"), ("zoo:cifar10-ddpm", 256, "dq-int8")]
    r = CliRunner().invoke(cli, ["tune-kernels", "--tasks", "sd15-unet:8:bf16-compile"])
    assert r.exit_code != 0 and "only diffquant variants" in r.output
    r = CliRunner().invoke(cli, ["tune-kernels", "--tasks", "sd15-unet:dq-fp8"])
    assert r.exit_code != 0 and "model:batch:variant" in r.output
    r = CliRunner().invoke(cli, ["tune-kernels", "--skip-paths", "cudnn"])
    assert r.exit_code != 0 and "allowed: tma, tma4d, tma4dp" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli, ["tune-kernels", "--out", str(tmp_path / "t.json")])
        assert r.exit_code != 0 and "needs a CUDA GPU" in r.output and not (tmp_path / "t.json").exists()
    from pathlib import Path

    rows = Path(__file__).resolve().parents[1] / "benchmarks/results/qconv_tune_rows_tma.json"
    r = CliRunner().invoke(cli, ["tune-kernels", "--show-rows", str(rows)])
    assert r.exit_code == 0 and "fp8:8x1280x32x32:o1280:k3x3" in r.output and "tma" in r.output


def test_tuning_tables_merge(tmp_path):
    """A newer table of the same GPU replaces and adds entries, drops the shapes it timed without listing, keeps the
    rest and both provenances; tables of different GPUs do not merge; the CLI does it without a GPU."""
    from click.testing import CliRunner

    from diffquant.cli import cli
    from diffquant.kernels import tuning

    c1 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}
    c2 = {**c1, "num_warps": 4, "path": "tma"}
    base = {"format": tuning.FORMAT, "device": "GPU-A", "command": "old", "date": "2026-11-01",
            "configs": {"a": c1, "b": c1, "keep": c1}}
    new = {"format": tuning.FORMAT, "device": "GPU-A", "command": "new", "date": "2026-11-28",
           "configs": {"a": c2, "c": c2}, "tuned_keys": ["a", "b", "c"]}
    m = tuning.merge_tables(base, new)
    assert m["configs"] == {"a": c2, "c": c2, "keep": c1}  # b: timed again, the heuristic won: no entry
    assert [p["command"] for p in m["merged_from"]] == ["old", "new"] and m["date"] == "2026-11-28"
    assert "tuned_keys" not in m
    with pytest.raises(ValueError, match="different GPU models"):
        tuning.merge_tables(base, {**new, "device": "GPU-B"})
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    r = CliRunner().invoke(cli, ["tune-kernels", "--merge-from", str(tmp_path / "new.json"),
                                 "--merge-into", str(tmp_path / "base.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "base.json").read_text())["configs"] == m["configs"]
    r = CliRunner().invoke(cli, ["tune-kernels", "--merge-from", str(tmp_path / "new.json")])
    assert r.exit_code != 0 and "--merge-into" in r.output
