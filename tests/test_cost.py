"""Model cost accounting (diffquant.cost): MACs, BOPs and parameter bytes, by hand and on a UNet."""
import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from diffquant.cost import model_cost
from diffquant.quantize import quant_report, quantize
from diffquant.recipes import build_config
from _unets import tiny_unet_config

TINY = tiny_unet_config()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 8x8 -> 8x8
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)  # -> 4x4
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x, t):
        return self.fc(self.norm(self.dw(self.conv(x))).flatten(1))


def toy_example(batch=1):
    return torch.randn(batch, 3, 8, 8), torch.zeros(batch, dtype=torch.long), {}


def test_macs_bops_and_bytes_by_hand():
    m = Toy()
    conv_macs = (8 * 8 * 8) * 3 * 3 * 3
    dw_macs = (8 * 4 * 4) * (8 // 4) * 3 * 3
    fc_macs = 10 * 128
    c = model_cost(m, example=toy_example(), float_bits=16)
    got = {layer.name: layer.macs for layer in c.layers}
    assert got == {"conv": conv_macs, "dw": dw_macs, "fc": fc_macs}
    assert c.macs == conv_macs + dw_macs + fc_macs and c.bops == c.macs * 16 * 16
    n_params = sum(p.numel() for p in m.parameters())
    assert c.params_total == n_params and c.param_bytes == n_params * 2

    c48 = model_cost(m, weight_bits=4, act_bits=8, example=toy_example(), float_bits=32)
    assert c48.bops == c48.macs * 4 * 8
    # weights at 4 bits + per-output-channel fp16 scale and zero point; biases and norm at 32 bits
    w_bytes = sum(l.weight.numel() * 4 / 8 + l.weight.shape[0] * 2 * 2 for l in (m.conv, m.dw, m.fc))
    other = n_params - sum(l.weight.numel() for l in (m.conv, m.dw, m.fc))
    assert c48.param_bytes == w_bytes + other * 4 and c48.other_params == other
    # weights-only: activations stay float
    cw = model_cost(m, weight_bits=2, act_bits=16, example=toy_example())
    assert cw.bops == cw.macs * 2 * 16
    # per image: a batch of 3 costs 3x
    assert model_cost(m, example=toy_example(3)).macs == 3 * c.macs


def test_unet_quantized_model_matches_config_estimate_and_quant_report():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY).eval()
    fp = model_cost(unet)
    est = model_cost(unet, config=build_config(4, 8, softmax_bits=8))
    q = quantize(unet, build_config(4, 8, softmax_bits=8))
    real = model_cost(q)
    assert real.param_bytes == quant_report(q).quantized_bytes == est.param_bytes
    assert fp.param_bytes == quant_report(unet).fp16_bytes
    assert real.macs == est.macs == fp.macs and real.bops == est.bops < fp.bops
    # attention: the QuantMatMul modules of the quantized model and the hook on diffusers' Attention agree
    mm_q = {l.name: l for l in real.layers if l.type == "MatMul"}
    mm_fp = {l.name.replace(".qk", ".processor.qk").replace(".pv", ".processor.pv"): l
             for l in fp.layers if l.type == "MatMul"}
    assert set(mm_q) == set(mm_fp) and len(mm_q) > 0
    for name, layer in mm_q.items():
        assert layer.macs == mm_fp[name].macs
        assert layer.act_bits == (8, 8)  # softmax probabilities at 8 bits too
    # with softmax_bits=16 the probabilities stay float: softmax.V counts 16 x 8
    pv16 = {l.name: l.act_bits for l in model_cost(unet, config=build_config(4, 8)).layers if l.name.endswith(".pv")}
    assert set(pv16.values()) == {(16, 8)}
    # the 4x4 attention of the second down block: L = 16 tokens, 32 channels
    qk = mm_q["down_blocks.1.attentions.0.processor.qk"]
    assert qk.macs == 16 * 16 * 32 and qk.bops == qk.macs * 64
    conv_in = next(l for l in real.layers if l.name == "conv_in")
    assert conv_in.macs == 16 * 8 * 8 * 3 * 9 and (conv_in.weight_bits, conv_in.act_bits) == (4, (8,))
    assert real.by_type()["Conv2d"]["bops"] == sum(l.bops for l in real.layers if l.type == "Conv2d")
    rows = real.rows(top=3)
    assert len(rows) == 3 and rows[0]["GBOPs"] >= rows[1]["GBOPs"] and "W4A8" in real.summary()
    # the forward used for counting leaves the quantizers as they were
    assert all(m.mode == "quant" for m in q.modules() if hasattr(m, "mode") and hasattr(m, "scheme"))


def test_cost_rejects_bad_arguments():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY).eval()
    with pytest.raises(ValueError, match="float_bits=12"):
        model_cost(unet, float_bits=12)
    with pytest.raises(ValueError, match="either config or"):
        model_cost(unet, config=build_config(8, 8), weight_bits=4)
    q = quantize(unet, build_config(8, 16))
    with pytest.raises(ValueError, match="already quantized"):
        model_cost(q, weight_bits=4)
