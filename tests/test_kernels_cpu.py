"""CPU int8 path (diffquant.kernels.cpu): oneDNN int8 layers from a calibrated fake-quant model.

Oracle: ``simulate_cpu_int8`` (the fake-quant model on the kernels' activation grids). Given the same
input, every converted layer equals it up to fp32 accumulation order (and rare activation rounding
ties); end to end, a tie that flips one activation code propagates through a random network, so the
end-to-end check is an SQNR floor rather than an exact match.
"""
import pytest
import torch
from diffusers import UNet2DModel

from diffquant.config import QuantScheme
from diffquant.kernels.cpu import (
    Int8Conv2d,
    Int8Linear,
    convert_cpu,
    cpu_int8_available,
    cpu_int8_report,
    kernel_act_qparams,
    simulate_cpu_int8,
)
from diffquant.nn.modules import QuantConv2d, QuantLinear
from diffquant.quant.affine import sqnr_db
from diffquant.quantize import calibrate, quantize
from diffquant.recipes import build_config
from _unets import tiny_unet_config

pytestmark = pytest.mark.skipif(cpu_int8_available() is not None, reason=str(cpu_int8_available()))

TINY = tiny_unet_config()
# relative to the layer's output magnitude; fp32 accumulation order alone gives ~1e-6, an activation
# code flipped by a rounding tie gives one weight times one step: well under 1 %
LAYER_RTOL = 1e-2


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)


def _calibrated(layer, x):
    with torch.no_grad(), calibrate(layer):
        layer(x)
    return layer


@pytest.mark.parametrize("wsym", [False, True])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("reduce_range", [True, False])
@pytest.mark.parametrize("kind", ["conv3", "conv1s2", "split", "linear", "linear_split"])
def test_layer_matches_simulation(kind, wsym, asym, reduce_range):
    if not reduce_range and not torch.cpu._is_vnni_supported():
        pytest.skip("8-bit activations are exact only with VNNI/AMX (AVX2 int16 pair sums saturate)")
    torch.manual_seed(0)
    ws = QuantScheme(8, granularity="per_channel", symmetric=wsym)
    acs = QuantScheme(8, symmetric=asym)
    if kind.startswith("linear"):
        q = QuantLinear.from_float(torch.nn.Linear(24, 20), ws, acs, name="l", split=10 if kind == "linear_split" else None)
        x = torch.randn(3, 5, 24) + 0.3
    else:
        k, s = (1, 2) if kind == "conv1s2" else (3, 1)
        q = QuantConv2d.from_float(torch.nn.Conv2d(24, 20, k, stride=s, padding=k // 2), ws, acs, name="c",
                                   split=10 if kind == "split" else None)
        x = torch.randn(2, 24, 7, 7) + 0.3
    q = _calibrated(q, x)
    sim = simulate_cpu_int8(q, reduce_range=reduce_range)
    m = (Int8Linear if kind.startswith("linear") else Int8Conv2d)(q, reduce_range)
    with torch.no_grad():
        ref, out = sim(x), m(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = float((out - ref).abs().max()) / float(ref.abs().max())
    assert err < LAYER_RTOL, err


def test_reduce_range_grid_covers_the_simulated_range():
    aq = QuantLinear.from_float(torch.nn.Linear(4, 4), QuantScheme(8, granularity="per_channel"), QuantScheme(8),
                                name="l").act_quantizer
    aq.scale.fill_(0.1)
    aq.zero_point.fill_(30.0)
    aq.calibrated.fill_(True)
    aq._is_calibrated = True
    s, z, qmax = kernel_act_qparams(aq, reduce_range=False)
    assert (s, z, qmax) == (pytest.approx(0.1), 30, 255)
    s7, z7, q7 = kernel_act_qparams(aq, reduce_range=True)
    assert q7 == 127
    lo, hi = (0 - 30) * 0.1, (255 - 30) * 0.1
    assert (0 - z7) * s7 == pytest.approx(lo, abs=s7) and (127 - z7) * s7 == pytest.approx(hi, abs=s7)


@pytest.fixture(scope="module")
def tiny_quantized():
    torch.manual_seed(0)
    fp = UNet2DModel(**TINY).eval()
    cfg = build_config(8, 8, overrides=["conv_out=a16"])  # conv_out weights-only: cannot be converted
    q = quantize(fp, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), calibrate(q):
        for i in range(4):
            q(torch.randn(4, 3, 8, 8, generator=g), torch.full((4,), 100 * i + 1))
    return fp, q


def test_convert_tiny_unet_close_to_simulation(tiny_quantized):
    fp, q = tiny_quantized
    c = convert_cpu(q, quant="eager")
    rep = cpu_int8_report(c)
    n_layers = sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in q.modules())
    assert len(rep.converted) == n_layers - 1
    assert list(rep.kept_float) == ["conv_out"] and "weights-only" in rep.kept_float["conv_out"]
    assert isinstance(c.conv_out, QuantConv2d)  # left as it was
    assert isinstance(c.conv_in, Int8Conv2d) and isinstance(c.time_embedding.linear_1, Int8Linear)
    split = [n for n in rep.converted if c.get_submodule(n).split is not None]
    assert split, "the up path's concatenated skip inputs must be converted as split layers"
    assert len(rep.fake_quant_matmuls) == 8  # 4 attention blocks (down, mid, 2 up) x (QK, PV)
    assert isinstance(q.conv_in, QuantConv2d)

    sim = simulate_cpu_int8(q, reduce_range=rep.reduce_range)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.full((4,), 500)
    with torch.no_grad():
        y_int8, y_sim, y_fp = c(x, t).sample, sim(x, t).sample, fp(x, t).sample
    assert torch.isfinite(y_int8).all()
    # end to end: a random UNet amplifies single rounding-tie flips; measured ~34 dB on this model
    assert sqnr_db(y_sim, y_int8) > 25
    # the int8 model is as close to full precision as its own simulation (within 2 dB)
    assert sqnr_db(y_fp, y_int8) > sqnr_db(y_fp, y_sim) - 2


def test_convert_refuses_unquantized_and_reports_unsupported():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="quantized"):
        convert_cpu(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    ws = QuantScheme(4, granularity="per_group", group_size=4)
    q = torch.nn.Sequential(
        QuantLinear.from_float(torch.nn.Linear(8, 8), ws, QuantScheme(8), name="0"),
        QuantLinear.from_float(torch.nn.Linear(8, 8), QuantScheme(8, granularity="per_channel"), QuantScheme(8), name="1"),
    )
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(x)
    c = convert_cpu(q, quant="eager")
    rep = cpu_int8_report(c)
    assert rep.converted == []
    assert "per-group" in rep.kept_float["0"] and "not calibrated" in rep.kept_float["1"]
    with pytest.raises(ValueError, match="reduce_range"):
        convert_cpu(q, reduce_range="sometimes")
    with pytest.raises(ValueError, match="quant="):
        convert_cpu(q, quant="fast")


def test_activation_codes_equal_the_simulation_codes_eager_and_compiled():
    # the int8 input codes are those of the fake quantizer (no rounding-tie differences), also compiled
    from diffquant.kernels.cpu import _compiled_quant_codes, _inv, _quant_codes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 5, generator=g) * 3
    s, z = 0.0173, 40
    ref = torch.round(torch.fake_quantize_per_tensor_affine(x, s, z, 0, 127) / s + z)
    for fn in (_quant_codes, _compiled_quant_codes()):
        codes = fn(x, _inv(s), z, 127)
        assert codes.dtype == torch.uint8
        assert torch.equal(codes.float(), ref)
