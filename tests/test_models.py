"""Model loading (local folders, pipelines, hub offline) and text-to-image UNets."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffquant.config import QuantConfig
from diffquant.models.adapter import call_model, example_inputs
from diffquant.models.configs import DDPM_SCHEDULER
from diffquant.models.loading import load_model
from diffquant.nn import QuantAttnProcessor, QuantConv2d
from diffquant.quantize import calibrate, quant_report, quantize
from _unets import tiny_sd_unet, tiny_unet_config

TINY = tiny_unet_config()


def test_local_model_and_pipeline_folders(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY).eval()
    sched = DDIMScheduler(**DDPM_SCHEDULER)
    unet.save_pretrained(tmp_path / "model", safe_serialization=True)
    sched.save_pretrained(tmp_path / "model")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**DDPM_SCHEDULER)).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    x, t, c = example_inputs(unet, batch=2)
    ref = call_model(unet, x, t, c)
    for folder, sched_cls in ((tmp_path / "model", "DDIMScheduler"), (tmp_path / "pipe", "DDPMScheduler")):
        lm = load_model(str(folder))
        assert type(lm.scheduler).__name__ == sched_cls
        assert torch.allclose(call_model(lm.model, x, t, c), ref)


def test_pickle_only_folder_is_refused(tmp_path):
    unet = UNet2DModel(**TINY)
    unet.save_pretrained(tmp_path / "m", safe_serialization=False)  # writes a .bin pickle
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(str(tmp_path / "m"))


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants
    import diffusers.utils.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="could not load 'google/ddpm-cifar10-32'.*Offline"):
        load_model("google/ddpm-cifar10-32")


def test_text_to_image_unet_quantized_with_cross_attention():
    unet = tiny_sd_unet()
    q = quantize(unet, QuantConfig(softmax_bits=8))
    rep = quant_report(q)
    assert rep.counts["Conv2d"] == 0 and rep.counts["Linear"] == 0
    n_attn = sum(1 for m in unet.modules() if type(m).__name__ == "Attention")
    assert rep.counts["QuantMatMul"] == 2 * n_attn > 0
    assert sum(isinstance(m.processor, QuantAttnProcessor) for m in q.modules() if type(m).__name__ == "Attention") == n_attn
    splits = [m for m in q.modules() if isinstance(m, QuantConv2d) and m.split is not None]
    assert len(splits) >= 4  # conv1 + conv_shortcut of every up-path resnet
    x, t, c = example_inputs(unet, batch=2)
    assert c["encoder_hidden_states"].shape == (2, 77, 16)
    with torch.no_grad():
        with calibrate(q):
            call_model(q, x, t, c)
        ref, out = call_model(unet, x, t, c), call_model(q, x, t, c)
    rel = ((out - ref) ** 2).mean() / (ref**2).mean()
    assert rel < 0.05


def test_zoo_folder_loads_by_path():
    """A bundled zoo folder (model.safetensors + config.json with 'class') loads by path like zoo:NAME."""
    from diffquant.models.loading import load_model
    from diffquant.zoo import WEIGHTS_DIR

    folder = WEIGHTS_DIR / "cifar10-ddpm"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("zoo:cifar10-ddpm is not bundled")
    a, b = load_model(str(folder)), load_model("zoo:cifar10-ddpm")
    assert type(a.scheduler) is type(b.scheduler)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(a.model(x, t).sample, b.model(x, t).sample)
