"""Compact packed checkpoints: bit packing, bit-exact round trip, sizes, refusal of mismatches."""
import json

import pytest
import torch

from diffquant.config import QuantConfig, QuantScheme
from diffquant.io import load_quantized, save_quantized
from diffquant.models.adapter import call_model, example_inputs
from diffquant.models.configs import build_unet
from diffquant.quant.packing import pack, unpack
from diffquant.quantize import calibrate, quant_report, quantize

SMALL = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    p = pack(codes, bits)
    per = 4 if bits <= 2 else 2 if bits <= 4 else 1
    assert p.dtype == torch.uint8 and p.numel() == -(-n // per)
    assert torch.equal(unpack(p, bits, n), codes.to(torch.uint8))


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack(torch.tensor([0, 16]), 4)


@pytest.mark.parametrize("wb,act", [(8, True), (4, True), (2, False), (3, True)])
def test_packed_checkpoint_is_bit_exact_and_small(tmp_path, wb, act):
    model = build_unet(SMALL, seed=1).eval()
    cfg = QuantConfig(weight=QuantScheme(wb, granularity="per_channel", symmetric=wb == 3),
                      act=QuantScheme(8) if act else None, softmax_bits=8 if act else 16)
    q = quantize(model, cfg)
    x, t, c = example_inputs(model, batch=2)
    if act:
        with torch.no_grad(), calibrate(q):
            call_model(q, x, t, c)
    save_quantized(q, tmp_path / "q")
    save_quantized(q, tmp_path / "fq", packed=False)
    man = json.loads((tmp_path / "q" / "diffquant.json").read_text())
    assert man["format"] == "diffquant-packed/1" and len(man["packed"]) == 51  # every Conv2d/Linear
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(call_model(q, x, t, c), call_model(loaded.model, x, t, c))
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    fp16 = quant_report(model).fp16_bytes
    container = 2 if wb <= 2 else 4 if wb <= 4 else 8
    assert size < (container / 16 + 0.12) * fp16  # codes + fp32 scales/biases/norms
    assert size < (tmp_path / "fq" / "model.safetensors").stat().st_size


def test_fp8_weights_pack_and_roundtrip(tmp_path):
    model = build_unet(SMALL, seed=2).eval()
    q = quantize(model, QuantConfig(weight=QuantScheme(8, dtype="fp8_e4m3", granularity="per_channel"), act=None))
    save_quantized(q, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    x, t, c = example_inputs(model, batch=2)
    with torch.no_grad():
        assert torch.equal(call_model(q, x, t, c), call_model(loaded.model, x, t, c))


def test_checkpoint_with_wrong_config_is_refused(tmp_path):
    model = build_unet(SMALL).eval()
    q = quantize(model, QuantConfig(weight=QuantScheme(4, granularity="per_channel"), act=None))
    save_quantized(q, tmp_path / "q")
    qc = tmp_path / "q" / "quant_config.json"
    d = json.loads(qc.read_text())
    d["weight"]["granularity"] = "per_tensor"
    qc.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match"):
        load_quantized(tmp_path / "q")
    d["weight"]["bits"] = 11
    qc.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bits=11"):
        load_quantized(tmp_path / "q")
