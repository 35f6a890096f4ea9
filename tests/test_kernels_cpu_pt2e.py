"""CPU int8 through torchao's pt2e flow (X86InductorQuantizer): shapes, batch handling, accuracy vs fp32, sampling."""
import pytest
import torch
from diffusers import DDPMScheduler

from diffquant.calibration import capture_calibration_set
from diffquant.kernels.cpu_pt2e import EXPORT_BATCH, cpu_has_vnni, quantize_pt2e_x86, torchao_available
from diffquant.models.configs import DDPM_SCHEDULER, build_unet
from diffquant.sampling import SamplerSpec, sample
from _unets import tiny_unet_config

pytestmark = pytest.mark.skipif(not torchao_available(), reason="needs torchao (pip install torchao)")

SMALL = tiny_unet_config(sample_size=16)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = build_unet(SMALL, seed=0).eval()
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    calib = capture_calibration_set(model, sched, num_per_step=8, num_steps=4, spec=SamplerSpec("ddim", 8),
                                    progress=False)
    return model, sched, calib


@pytest.fixture(scope="module")
def converted(setup):
    """The setup model through the pt2e flow, uncompiled (the reference numerics): the tests below only run it."""
    model, _, calib = setup
    return quantize_pt2e_x86(model, calib, compile=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pt2e_int8_close_to_fp32_any_batch(setup, converted):
    model, sched, calib = setup
    q = converted
    x, t, _ = calib.batch(torch.arange(EXPORT_BATCH[1] + 2) % len(calib))  # 65 rows: split into 63 + 2
    x, t = x.float(), t.float()
    with torch.no_grad():
        ref = model(x, t).sample
        out = q(x, t)
    assert out.shape == ref.shape
    # 8-bit weights and activations (7-bit activations where the CPU lacks VNNI: 13.5 % on this random-weight UNet,
    # 4.5 % on zoo:cifar10-ddpm; AVX2 AMD EPYC, 2026-11-29)
    assert _rel(out, ref) < (0.2 if q.reduce_range else 0.1)
    assert _rel(out, ref) > 0  # it is quantized
    with torch.no_grad():  # batch 1 is padded to the exported minimum; rows do not depend on the batch
        one = q(x[:1], t[:1])
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-4)
    imgs = sample(q, sched, num=2, seed=0, spec=SamplerSpec("ddim", 2), progress=False).images
    assert imgs.shape == (2, 16, 16, 3)


def test_pt2e_compiled_matches_converted(setup, converted):
    """The compiled model (oneDNN's fused int8 kernels) computes what the converted graph (reference quantize /
    dequantize numerics) does, on this CPU: with full-range activations where it has VNNI, with 7-bit ones where it
    has not (there, full-range u8 x s8 products overflow oneDNN's 16-bit pair sums: 21.8 % from the reference on
    a 2-core AMD EPYC with AVX2, 2026-11-29). Both warm-up graphs are checked: 4 rows run in the one for batches
    2..15, 20 rows in the one for 16..63 (the batch range that sampling at 16 or more images uses)."""
    model, _, calib = setup
    eager = converted
    comp = quantize_pt2e_x86(model, calib, compile=True)
    assert eager.reduce_range == comp.reduce_range == (not cpu_has_vnni())
    for rows in (4, 20):
        x, t, _ = calib.batch(torch.arange(rows) % len(calib))
        with torch.no_grad():
            ref = model(x.float(), t.float()).sample
            a, b = eager(x.float(), t.float()), comp(x.float(), t.float())
        # fused int8 kernels vs the reference graph: different rounding order, twice as coarse with 7-bit activations
        assert _rel(b, a) < (0.045 if comp.reduce_range else 0.02), rows
        assert _rel(b, ref) < 1.25 * _rel(a, ref) + 0.005, rows  # no error of its own (saturation) on quantization


def test_pt2e_reduced_range_follows_the_cpu(setup, monkeypatch):
    """reduce_range=None: 7-bit activations exactly where the CPU lacks VNNI (the quantizer's config asked with
    reduce_range accordingly); an explicit value wins."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    model, _, calib = setup
    asked = []
    real = xiq.get_default_x86_inductor_quantization_config
    monkeypatch.setattr(xiq, "get_default_x86_inductor_quantization_config",
                        lambda **kw: asked.append(kw["reduce_range"]) or real(**kw))
    got = []
    for vnni, rr in ((True, None), (False, None), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v)
        got.append(quantize_pt2e_x86(model, calib, compile=False, reduce_range=rr).reduce_range)
    assert got == asked == [False, True, False]


def test_pt2e_refusals(setup):
    model, _, calib = setup
    with pytest.raises(ValueError, match="calibration set"):
        quantize_pt2e_x86(model, None)
    with pytest.raises(ValueError, match="calibration set"):
        quantize_pt2e_x86(model, calib.subset(1, seed=0))


def test_pt2e_class_conditional():
    """A class-conditional UNet2DModel (the consistency-model layouts) exports with class_labels as an input."""
    from diffquant.models.configs import cm_scheduler

    torch.set_num_threads(1)
    model = build_unet(dict(SMALL, num_class_embeds=10), seed=0).eval()
    calib = capture_calibration_set(model, cm_scheduler(), num_per_step=4, spec=SamplerSpec("cm", 2), cm_chains=(1, 2),
                                    progress=False)
    assert "class_labels" in calib.cond
    q = quantize_pt2e_x86(model, calib, compile=False)
    x, t, cond = calib.batch(torch.arange(3))
    with torch.no_grad():
        ref = model(x.float(), t.float(), class_labels=cond["class_labels"]).sample
        out = q(x.float(), t.float(), class_labels=cond["class_labels"])
    assert _rel(out, ref) < 0.1
    with pytest.raises(ValueError, match="class_labels"):
        q(x.float(), t.float())
    imgs = sample(q, cm_scheduler(), num=2, seed=0, spec=SamplerSpec("cm", 1), progress=False).images
    assert imgs.shape == (2, 16, 16, 3)
