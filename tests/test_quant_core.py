"""Quantization math: grids, SQNR floors, STE, estimators, config validation and JSON."""
import math

import pytest
import torch

from diffquant.config import LayerOverride, QuantConfig, QuantScheme
from diffquant.nn.modules import QuantConv2d
from diffquant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffquant.quant import (
    ActivationObserver,
    fake_quantize,
    fake_quantize_fp8,
    fake_quantize_weight,
    group_view,
    lp_search,
    qparams_from_range,
    qrange,
    quantize,
    sqnr_db,
    weight_qparams,
)


def _weight_fq(w, scheme):
    s, z = weight_qparams(group_view(w, scheme), scheme)
    return fake_quantize_weight(w, s, z, scheme), s, z


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel", "per_group"])
def test_values_on_grid_with_at_most_2b_levels(bits, symmetric, gran):
    torch.manual_seed(bits)
    w = torch.randn(8, 16, 3, 3) * torch.linspace(0.1, 3, 8).view(8, 1, 1, 1) + 0.3
    scheme = QuantScheme(bits, symmetric=symmetric, granularity=gran, group_size=36 if gran == "per_group" else None)
    wq, s, z = _weight_fq(w, scheme)
    rows = group_view(wq, scheme)
    codes = rows / s + z  # back on the integer grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    qmin, qmax = qrange(bits, symmetric)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    for r in range(rows.shape[0]):
        assert rows[r].unique().numel() <= 2**bits


@pytest.mark.parametrize("bits,floor", [(8, 35.0), (6, 25.0), (4, 14.0), (3, 8.0)])
def test_sqnr_floor_per_channel_weights(bits, floor):
    torch.manual_seed(0)
    w = torch.randn(128, 64, 3, 3) * torch.rand(128, 1, 1, 1)  # channels of very different scale
    wq, _, _ = _weight_fq(w, QuantScheme(bits, granularity="per_channel"))
    assert sqnr_db(w, wq) >= floor


def test_per_channel_beats_per_tensor_and_lp_beats_minmax_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 1024) * torch.logspace(-2, 0, 64).view(64, 1)
    per_t = sqnr_db(w, _weight_fq(w, QuantScheme(4, granularity="per_tensor"))[0])
    per_c = sqnr_db(w, _weight_fq(w, QuantScheme(4, granularity="per_channel"))[0])
    lp = sqnr_db(w, _weight_fq(w, QuantScheme(4, granularity="per_channel", estimator="lp"))[0])
    assert per_c > per_t + 5
    assert lp > per_c + 0.5


def test_activation_8bit_per_tensor_sqnr():
    torch.manual_seed(0)
    x = torch.randn(64, 32, 8, 8)
    q = ActQuantizer(QuantScheme(8), name="x")
    q.start_observing()
    q(x)
    q.finalize()
    assert sqnr_db(x, q(x)) >= 30.0


def test_ste_gradients_and_lsq_scale_gradient():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.49, 0.74, 5.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    zp = torch.tensor(0.0)
    y = fake_quantize(x, scale, zp, bits=3, symmetric=True)  # grid -4..3 -> range [-2, 1.5]
    assert torch.allclose(y.detach(), torch.tensor([-2.0, -0.5, 0.0, 0.5, 0.5, 1.5]))
    y.sum().backward()
    # identity inside the range, zero where the clamp is active
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    assert scale.grad is not None and scale.grad.abs() > 0


def test_fp8_values_are_representable():
    torch.manual_seed(0)
    x = torch.randn(1000) * 7
    s = x.abs().max() / 448
    y = fake_quantize_fp8(x, s)
    rt = (y / s).to(torch.float8_e4m3fn).to(torch.float32) * s
    assert torch.allclose(rt, y)
    assert sqnr_db(x, y) > 25  # 3 mantissa bits


def test_qparams_include_zero_and_asymmetric_range():
    s, z = qparams_from_range(torch.tensor(0.5), torch.tensor(2.0), 8, False)
    assert z.item() == 0.0  # range widened to include 0
    q = quantize(torch.tensor([0.0, 2.0]), s, z, 8, False)
    assert q.tolist() == [0.0, 255.0]


def test_lp_search_matches_bruteforce_grid():
    torch.manual_seed(1)
    x = torch.randn(1, 4000) ** 3
    scheme = QuantScheme(4, estimator="lp", lp_p=2.4)
    s, z = lp_search(x, scheme)
    best, best_r = math.inf, None
    for i in range(80):
        r = 1 - 0.01 * i
        ss, zz = qparams_from_range(x.min() * r, x.max() * r, 4, False)
        err = (x - fake_quantize(x, ss, zz, 4, False)).abs().pow(2.4).mean().item()
        if err < best:
            best, best_r = err, (ss, zz)
    assert torch.allclose(s.reshape(()), best_r[0]) and torch.allclose(z.reshape(()), best_r[1])
    assert s.item() < (x.max() - x.min()).item() / 15  # it clipped


def test_observer_estimators_and_bounded_reservoir():
    torch.manual_seed(0)
    obs = {e: ActivationObserver(QuantScheme(4, estimator=e), reservoir_size=5000) for e in ("minmax", "ema", "percentile", "lp")}
    for i in range(40):
        x = torch.randn(10000) * (1 + i % 3)
        for o in obs.values():
            o.update(x)
    assert obs["percentile"].pool_n <= 5000 and obs["lp"].pool_n <= 5000
    s = {e: o.qparams()[0].item() for e, o in obs.items()}
    assert s["percentile"] < s["minmax"] and s["lp"] < s["minmax"] and s["ema"] < s["minmax"]


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bad_integer_bits_raise(bits):
    with pytest.raises(ValueError, match=f"bits={bits}.*allowed: 2..8"):
        QuantScheme(bits)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="granularity='per_row'.*allowed"):
        QuantScheme(8, granularity="per_row")
    with pytest.raises(ValueError, match="group_size"):
        QuantScheme(4, granularity="per_group")
    with pytest.raises(ValueError, match="fp8_e4m3"):
        QuantScheme(4, dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="softmax_bits=12"):
        QuantConfig(softmax_bits=12)
    with pytest.raises(ValueError, match="activation granularity"):
        QuantConfig(act=QuantScheme(8, granularity="per_channel"))


def test_group_size_not_dividing_raises():
    scheme = QuantScheme(4, granularity="per_group", group_size=7)
    with pytest.raises(ValueError, match="group_size=7 does not divide.*144"):
        WeightQuantizer(scheme, torch.Size([8, 16, 3, 3]))


def test_nan_inf_in_calibration_data_raise():
    q = ActQuantizer(QuantScheme(8), name="blk.input")
    q.start_observing()
    with pytest.raises(ValueError, match="blk.input.*1 NaN"):
        q(torch.tensor([0.0, float("nan"), 1.0]))
    wq = WeightQuantizer(QuantScheme(8, granularity="per_channel"), torch.Size([2, 2]))
    with pytest.raises(ValueError, match="inf"):
        wq.init_from(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))


def test_uncalibrated_activation_quantizer_refuses_to_run():
    q = ActQuantizer(QuantScheme(8), name="layer.input")
    with pytest.raises(RuntimeError, match="layer.input.*not calibrated"):
        q(torch.zeros(3))


def test_config_json_roundtrip(tmp_path):
    cfg = QuantConfig(
        weight=QuantScheme(4, granularity="per_group", group_size=32, estimator="lp", symmetric=True),
        act=QuantScheme(8, estimator="percentile", percentile=99.9),
        attention=QuantScheme(8, dtype="fp8_e4m3"),
        softmax_bits=8,
        split_shortcut=False,
        overrides=(LayerOverride("conv_in", skip=True), LayerOverride("time_embedding.*", weight=QuantScheme(8), act_off=True)),
    )
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert QuantConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"wieght": None})


def test_override_resolution():
    cfg = QuantConfig(overrides=(LayerOverride("conv_in", skip=True), LayerOverride("*.time_emb_proj", act_off=True)))
    assert cfg.schemes_for("conv_in") is None
    w, a = cfg.schemes_for("down_blocks.0.resnets.0.time_emb_proj")
    assert w == cfg.weight and a is None
    assert cfg.schemes_for("conv_out") == (cfg.weight, cfg.act)


def test_split_shortcut_quantizes_halves_separately_and_wins_on_bimodal_input():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 1)
    with torch.no_grad():
        conv.weight[:, 16:] *= 0.01  # the skip half has much smaller weights, too
    x = torch.cat([torch.randn(8, 16, 6, 6) * 0.05, torch.randn(8, 16, 6, 6) * 20], dim=1)  # bimodal channels
    ref = conv(x)
    errs = {}
    for split in (None, 16):
        q = QuantConv2d.from_float(conv, QuantScheme(4, granularity="per_channel"), QuantScheme(8), name="c", split=split)
        for aq in q.act_quantizers():
            aq.start_observing()
        q(x)
        for aq in q.act_quantizers():
            aq.finalize()
        if split:
            assert q.act_quantizer.scale.item() < q.act_quantizer_b.scale.item() / 50
            assert q.weight_quantizer.scale.mean() > 10 * q.weight_quantizer_b.scale.mean()
        errs[split] = sqnr_db(ref, q(x))
    assert errs[16] > errs[None] + 3


@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_fast_paths_equal_reference_fake_quantize(symmetric):
    from diffquant.quant.affine import fake_quantize_fused
    from diffquant.quant.estimators import _fq_rows

    torch.manual_seed(3)
    x = torch.randn(16, 999) * 4
    xmin, xmax = x.amin(1, keepdim=True) * 0.8, x.amax(1, keepdim=True) * 0.8
    for bits in (2, 4, 8):
        scheme = QuantScheme(bits, symmetric=symmetric)
        s, z = qparams_from_range(xmin, xmax, bits, symmetric)
        assert torch.equal(_fq_rows(x, xmin, xmax, scheme)[0], fake_quantize(x, s, z, bits, symmetric))
        assert torch.equal(fake_quantize_fused(x[3], s[3], z[3], bits, symmetric), fake_quantize(x[3], s[3], z[3], bits, symmetric))
