"""CPU int8 through torchao's pt2e flow (X86InductorQuantizer): shapes, batch handling, accuracy vs fp32, sampling."""
import pytest
import torch
from diffusers import DDPMScheduler

from diffquant.calibration import capture_calibration_set
from diffquant.kernels.cpu_pt2e import EXPORT_BATCH, quantize_pt2e_x86, torchao_available
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


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pt2e_int8_close_to_fp32_any_batch(setup):
    model, sched, calib = setup
    q = quantize_pt2e_x86(model, calib, compile=False)
    x, t, _ = calib.batch(torch.arange(EXPORT_BATCH[1] + 2) % len(calib))  # 65 rows: split into 63 + 2
    x, t = x.float(), t.float()
    with torch.no_grad():
        ref = model(x, t).sample
        out = q(x, t)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 0.1  # 8-bit weights and activations
    assert _rel(out, ref) > 0  # it is quantized
    with torch.no_grad():  # batch 1 is padded to the exported minimum; rows do not depend on the batch
        one = q(x[:1], t[:1])
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-4)
    imgs = sample(q, sched, num=2, seed=0, spec=SamplerSpec("ddim", 2), progress=False).images
    assert imgs.shape == (2, 16, 16, 3)


def test_pt2e_compiled_matches_converted(setup):
    model, _, calib = setup
    eager = quantize_pt2e_x86(model, calib, compile=False)
    comp = quantize_pt2e_x86(model, calib, compile=True)
    x, t, _ = calib.batch(torch.arange(4))
    with torch.no_grad():
        a, b = eager(x.float(), t.float()), comp(x.float(), t.float())
    assert _rel(b, a) < 0.02  # fused int8 kernels vs the reference quantize/dequantize graph


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
