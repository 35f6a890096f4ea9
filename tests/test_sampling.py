"""Sampling loops, per-sample RNG, calibration capture."""
import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, DDIMScheduler, DDPMScheduler, UNet2DModel

from diffquant.calibration import CalibrationSet, capture_calibration_set, step_indices
from diffquant.models.configs import DDPM_SCHEDULER
from diffquant.sampling import SamplerSpec, ddim_timesteps, load_samples, sample, save_samples
from _unets import tiny_unet_config

TINY = tiny_unet_config()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet2DModel(**TINY).eval()


def test_ddim_uniform_matches_diffusers_ddim_scheduler(tiny):
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    res = sample(tiny, sched, num=3, seed=5, spec=SamplerSpec("ddim", 10), progress=False, return_float=True)
    ds = DDIMScheduler(**DDPM_SCHEDULER, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    ds.set_timesteps(10)
    x = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    with torch.no_grad():
        for t in ds.timesteps:
            x = ds.step(tiny(x, t).sample, t, x).prev_sample
    assert torch.allclose(res.float_images, x, atol=1e-5)


def test_ddim_spacings():
    assert ddim_timesteps(1000, 10, "uniform").tolist() == list(range(0, 1000, 100))
    quad = ddim_timesteps(1000, 100, "quad")
    assert quad[0] == 0 and quad[-1] == 800 and np.all(np.diff(quad) >= 0)
    assert np.diff(quad)[-1] > np.diff(quad)[10]  # denser near t=0
    with pytest.raises(ValueError, match="spacing="):
        SamplerSpec("ddim", 10, "cubic")
    with pytest.raises(ValueError, match="sampler="):
        SamplerSpec("euler", 10)


@pytest.mark.parametrize("spec", [SamplerSpec("ddpm", 8), SamplerSpec("ddim", 8, "quad", eta=1.0)])
def test_stochastic_samples_do_not_depend_on_batch_size(tiny, spec):
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    a = sample(tiny, sched, num=5, seed=11, spec=spec, batch_size=5, progress=False, return_float=True)
    b = sample(tiny, sched, num=5, seed=11, spec=spec, batch_size=2, progress=False, return_float=True)
    assert torch.allclose(a.float_images, b.float_images, atol=1e-4)
    c = sample(tiny, sched, num=2, seed=14, spec=spec, batch_size=2, progress=False, return_float=True)
    assert torch.allclose(a.float_images[3:], c.float_images, atol=1e-4)  # sample i owns seed+i
    d = sample(tiny, sched, num=5, seed=12, spec=spec, batch_size=5, progress=False, return_float=True)
    assert not torch.allclose(a.float_images, d.float_images, atol=1e-2)


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sampler_one_and_two_steps(steps):
    torch.manual_seed(0)
    model = UNet2DModel(**dict(TINY, num_class_embeds=10)).eval()
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    calls = []
    res = sample(model, sched, num=3, seed=0, spec=SamplerSpec("cm", steps), progress=False,
                 callback=lambda k, t, x, c: calls.append((k, t, tuple(c["class_labels"].shape))))
    assert res.images.shape == (3, 8, 8, 3)
    assert [c[0] for c in calls] == list(range(steps)) and calls[0][2] == (3,)
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler"):
        sample(model, DDPMScheduler(**DDPM_SCHEDULER), num=1, spec=SamplerSpec("cm", 1), progress=False)


def test_calibration_capture_steps_shapes_and_roundtrip(tiny, tmp_path):
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    spec = SamplerSpec("ddim", 10)
    cal = capture_calibration_set(tiny, sched, num_per_step=5, num_steps=5, spec=spec, batch_size=2, progress=False)
    assert len(cal) == 25 and cal.xs.shape == (25, 3, 8, 8)
    seq = ddim_timesteps(1000, 10, "uniform")[::-1]
    expected_t = np.repeat(seq[step_indices(10, 5)], 5)
    assert cal.ts.numpy().tolist() == expected_t.tolist()
    # the first kept step is the initial noise of trajectories seeded 1_000_000 + i
    x0 = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1_000_000 + i)) for i in range(5)])
    assert torch.equal(cal.xs[:5], x0)
    cal.save(tmp_path / "cal.safetensors")
    back = CalibrationSet.load(tmp_path / "cal.safetensors")
    assert torch.equal(back.xs, cal.xs) and torch.equal(back.ts, cal.ts) and back.meta == cal.meta
    x, t, c = back.batch(torch.arange(3))
    assert t.dtype == torch.long
    with pytest.raises(ValueError, match="max_bytes"):
        capture_calibration_set(tiny, sched, num_per_step=100, num_steps=5, spec=spec, max_bytes=1000, progress=False)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read calibration file"):
        CalibrationSet.load(tmp_path / "bad.safetensors")


def test_sample_file_roundtrip_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    save_samples(tmp_path / "s.npz", imgs, np.arange(4), {"a": 1})
    i, s, m = load_samples(tmp_path / "s.npz")
    assert np.array_equal(i, imgs) and s.tolist() == [0, 1, 2, 3] and m == {"a": 1}
    with pytest.raises(ValueError, match="uint8"):
        save_samples(tmp_path / "t.npz", imgs.astype(np.float32), np.arange(4))
    with pytest.raises(ValueError, match="does not exist"):
        load_samples(tmp_path / "missing.npz")
