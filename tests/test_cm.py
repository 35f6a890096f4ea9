"""Consistency models (issue 6): the cm sampler against diffusers' ConsistencyModelPipeline, the
consistency-distillation recipe (loss step, exact resume, carry state, bundle), calibration over the
consistency chain's noise levels, and the ImageNet-64 architecture at reduced width through
quantize -> save -> load -> 1-step sample."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffquant.calibration import capture_calibration_set, cm_chain_levels
from diffquant.models.configs import (CD_IMAGENET64_L2, DDPM_SCHEDULER, ZOO_CIFAR10_CM_SCHEDULER, cd_imagenet64_config,
                                      cm_scheduler)
from diffquant.sampling import SamplerSpec, sample
from diffquant.zoo.checkpoint import load_state
from _unets import tiny_unet_config

TINY = tiny_unet_config()
TEACHER = dict(TINY, sample_size=16)


@pytest.fixture(scope="module")
def tiny_cm():
    torch.manual_seed(0)
    return UNet2DModel(**dict(TINY, num_class_embeds=10)).eval()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """12 random 16x16 JPEGs, packed."""
    from diffquant.data import pack_jpeg_zip

    d = tmp_path_factory.mktemp("cmdata")
    rng = np.random.default_rng(0)
    z = d / "t.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            zf.writestr(f"a/{i:03d}.jpg", buf.getvalue())
    pack_jpeg_zip(z, d / "t.npz")
    return str(d / "t.npz")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return UNet2DModel(**TEACHER).eval(), DDPMScheduler(**DDPM_SCHEDULER)


# ------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_cm_sampler_matches_consistency_pipeline(tiny_cm, steps):
    sched = cm_scheduler()  # the zoo:cifar10-cm setting: N = 18 Karras sigmas 0.002..80
    labels = [3, 1, 7]
    ts = []
    res = sample(tiny_cm, sched, num=3, seed=5, spec=SamplerSpec("cm", steps), class_labels=labels, progress=False,
                 return_float=True, callback=lambda k, t, x, c: ts.append(t))
    ref_sched = CMStochasticIterativeScheduler(**ZOO_CIFAR10_CM_SCHEDULER)
    ref_sched.set_timesteps(steps)
    assert ts == pytest.approx(ref_sched.timesteps.tolist())  # the pipeline's multistep schedule
    assert ts[0] == pytest.approx(250 * np.log(80.0))  # step 1 is always at sigma_max
    pipe = ConsistencyModelPipeline(unet=tiny_cm, scheduler=CMStochasticIterativeScheduler(**ZOO_CIFAR10_CM_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    out = pipe(batch_size=3, class_labels=torch.tensor(labels), num_inference_steps=steps, generator=gens,
               output_type="pt").images
    ours = (res.float_images / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(ours, out, atol=1e-5)
    with pytest.raises(ValueError, match="noise levels"):
        sample(tiny_cm, sched, num=1, spec=SamplerSpec("cm", 19), progress=False)
    with pytest.raises(ValueError, match="sampler 'cm'"):
        sample(tiny_cm, sched, num=1, spec=SamplerSpec("ddim", 4), progress=False)


# ------------------------------------------------------------------------------------ VP <-> VE


def test_vp_ve_conversion_and_euler_is_ddim(teacher):
    from diffquant.sampling.samplers import _to_x0_eps
    from diffquant.zoo.train_cm import ve_to_vp, vp_sigmas, vp_t_from_sigma

    model, ts = teacher
    acp = ts.alphas_cumprod
    s_vp = vp_sigmas(acp)
    assert np.allclose(vp_t_from_sigma(s_vp[[0, 10, 500, 999]], acp), [0, 10, 500, 999])
    assert vp_t_from_sigma([1e-4], acp)[0] == 0.0  # below the teacher's range: t = 0
    x0, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = torch.tensor(3.0)
    a = 1 / (1 + s**2)
    assert torch.allclose(ve_to_vp(x0 + s * z, s), a.sqrt() * x0 + (1 - a).sqrt() * z, atol=1e-6)
    # one Euler step of dx/dsigma = eps in VE coordinates == one DDIM step in VP coordinates
    x = torch.randn(2, 3, 16, 16) * 5
    hi, lo = torch.tensor(5.0), torch.tensor(2.0)
    t_hi = torch.tensor(vp_t_from_sigma([5.0], acp), dtype=torch.float32).expand(2)
    with torch.no_grad():
        eps = model(ve_to_vp(x, hi), t_hi).sample
    euler = x + (lo - hi) * eps
    a_hi, a_lo = 1 / (1 + hi**2), 1 / (1 + lo**2)
    x0_hat, eps2 = _to_x0_eps(eps, ve_to_vp(x, hi), a_hi, "epsilon")
    ddim_vp = a_lo.sqrt() * x0_hat + (1 - a_lo).sqrt() * eps2
    assert torch.allclose(ve_to_vp(euler, lo), ddim_vp, atol=1e-5)


# ------------------------------------------------------------------------------------ CD recipe


def _cfg(data, run_dir, **kw):
    from diffquant.zoo.train_cm import CMTrainConfig

    base = dict(data=data, run_dir=str(run_dir), batch_size=4, lr=1e-3, warmup_steps=2, init_steps=2, log_every=2,
                device="cpu", save_every_minutes=1e9, scheduler={"num_train_timesteps": 6})
    base.update(kw)
    return CMTrainConfig(**base)


def test_cd_loss_step_and_exact_resume(tiny_data, teacher, tmp_path):
    from diffquant.zoo.train_cm import CMTrainer, train_cm

    torch.set_num_threads(1)
    tr = CMTrainer(_cfg(tiny_data, tmp_path / "x"), teacher=teacher)
    # student starts as the teacher; grid: N Karras sigmas from sigma_max down, teacher times decreasing
    assert all(torch.equal(a, b) for a, b in zip(tr.model.parameters(), teacher[0].parameters()))
    assert tr.grid.sigma[0] == pytest.approx(80.0) and tr.grid.sigma[-1] == pytest.approx(0.002)
    assert np.all(np.diff(tr.grid.teacher_t64) <= 0) and tr.grid.c_out[-1].abs() < 1e-7  # f(x, sigma_min) = x
    assert [tr.phase_at(s) for s in range(4)] == ["init", "init", "cd", "cd"]
    for _ in range(3):  # 2 warm-start steps, then a consistency-distillation step
        loss, gnorm = tr.train_step().tolist()
        assert np.isfinite(loss) and np.isfinite(gnorm) and loss > 0

    # a run killed after 2 steps (warm start) and resumed from its full state == the uninterrupted run
    a = train_cm(_cfg(tiny_data, tmp_path / "a"), resume=None, until_step=4, teacher=teacher)
    train_cm(_cfg(tiny_data, tmp_path / "b"), resume=None, until_step=2, teacher=teacher)
    b = train_cm(_cfg(tiny_data, tmp_path / "b"), resume="auto", until_step=4, teacher=teacher)
    assert a["step"] == b["step"] == 4 and b["resumed_from"] == "full" and b["start_step"] == 2
    ta, da = load_state(tmp_path / "a" / "state")
    tb, db = load_state(tmp_path / "b" / "state")
    assert sorted(ta) == sorted(tb) and any(k.startswith("target.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert da["kind"] == "full" and da["phase"] == "cd" and db["resumes"][0]["kind"] == "full"
    rec = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "phase", "loss", "images_per_s"} <= set(rec)


def test_cd_carry_state_resume_and_bundle(tiny_data, teacher, tmp_path):
    from diffquant.zoo.bundle import load_bundled_unet
    from diffquant.zoo.train_cm import CMTrainer, bundle_cm, cm_unet, train_cm

    torch.set_num_threads(1)
    carry = tmp_path / "carry"
    train_cm(_cfg(tiny_data, tmp_path / "a", carry_dir=str(carry)), resume=None, until_step=3, teacher=teacher)
    t, doc = load_state(carry)
    assert doc["kind"] == "carry" and doc["step"] == 3
    assert all(k.startswith("ema.") for k in t) and {v.dtype for v in t.values()} == {torch.float16}
    full, _ = load_state(tmp_path / "a" / "state")
    # a fresh machine: warm restart from the carry state (EMA in fp16) -> student, target, EMA = those weights
    tr = CMTrainer(_cfg(tiny_data, tmp_path / "b", rewarm_steps=4), teacher=teacher)
    assert tr.load(carry) == "carry" and tr.step == 3 and tr.rewarm_from == 3
    p0 = tr.params[0]
    assert torch.equal(p0, full[f"ema.{tr.names[0]}"].half().float())
    assert torch.equal(tr.target_params[0], p0) and torch.equal(tr.ema[0], p0)
    assert not tr.opt.state and tr.lr_at(3) == pytest.approx(tr.cfg.lr / 4)
    assert np.isfinite(tr.train_step()[0].item()) and tr.step == 4
    # a running trainer writes the carry state on request (RUN/EXPORT_NOW), then clears the request
    (tmp_path / "b" / "EXPORT_NOW").touch()
    tr.cfg.carry_dir = str(tmp_path / "carry2")
    tr.train(until_step=5)
    assert not (tmp_path / "b" / "EXPORT_NOW").exists() and load_state(tmp_path / "carry2")[1]["step"] == 5
    assert load_state(tmp_path / "b" / "state")[1]["rewarm_from"] == 3
    with pytest.raises(ValueError, match="sigma grid"):
        CMTrainer(_cfg(tiny_data, tmp_path / "c", scheduler={"num_train_timesteps": 7}), teacher=teacher).load(carry)

    # bundle -> a zoo folder that loads as (UNet2DModel, CMStochasticIterativeScheduler) and samples
    folder = bundle_cm(carry, tmp_path / "zoo")
    model, sched = load_bundled_unet(folder)
    assert isinstance(sched, CMStochasticIterativeScheduler) and sched.config.num_train_timesteps == 6
    card = json.loads((folder / "card.json").read_text())
    assert card["kind"] == "cm" and card["training"]["steps"] == 3
    m2, s2, _ = cm_unet(carry)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 10.0).sample, m2(x, 10.0).sample)
    imgs = sample(model, sched, num=2, seed=0, spec=SamplerSpec("cm", 2), progress=False).images
    assert imgs.shape == (2, 16, 16, 3)

    # the bundled folder itself is a warm-restart point (more training for a bundled zoo model on a fresh machine)
    tr3 = CMTrainer(_cfg(tiny_data, tmp_path / "d"), teacher=teacher)
    assert tr3.load(folder) == "carry" and tr3.step == 3 and tr3.rewarm_from == 3
    assert torch.equal(tr3.ema[0], t[f"ema.{tr3.names[0]}"].float()) and torch.equal(tr3.params[0], tr3.ema[0])
    assert np.isfinite(tr3.train_step()[0].item()) and tr3.step == 4
    card["kind"] = "ddpm"
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="not a consistency model"):
        CMTrainer(_cfg(tiny_data, tmp_path / "e"), teacher=teacher).load(folder)


def test_cd_config_is_checked(tiny_data, tmp_path):
    from diffquant.zoo.train_cm import CMTrainer

    with pytest.raises(ValueError, match="solver"):
        _cfg(tiny_data, tmp_path, solver="rk4")
    with pytest.raises(ValueError, match="target_decay"):
        _cfg(tiny_data, tmp_path, target_decay=1.0)
    cond = (UNet2DModel(**dict(TEACHER, num_class_embeds=3)), DDPMScheduler(**DDPM_SCHEDULER))
    with pytest.raises(ValueError, match="class-conditional"):
        CMTrainer(_cfg(tiny_data, tmp_path), teacher=cond)
    with pytest.raises(ValueError, match="expects"):  # 16x16 images, 8x8 teacher
        CMTrainer(_cfg(tiny_data, tmp_path), teacher=(UNet2DModel(**TINY), DDPMScheduler(**DDPM_SCHEDULER)))


def test_cd_smaller_student(tiny_data, teacher, tmp_path):
    """A narrower student (student overrides): refused with init='teacher'; with init='random' the warm start
    regresses the teacher's denoiser, CD runs, and the carry state bundles as the narrower architecture."""
    from diffquant.zoo.bundle import load_bundled_unet
    from diffquant.zoo.train_cm import CMTrainer, bundle_cm, train_cm

    torch.set_num_threads(1)
    narrow = {"block_out_channels": [8, 16], "norm_num_groups": 4}
    with pytest.raises(ValueError, match="init='random'"):
        CMTrainer(_cfg(tiny_data, tmp_path / "x", student=narrow), teacher=teacher)
    with pytest.raises(ValueError, match="not keys"):
        CMTrainer(_cfg(tiny_data, tmp_path / "x", student={"channels": 3}, init="random"), teacher=teacher)
    out = train_cm(_cfg(tiny_data, tmp_path / "s", student=narrow, init="random", carry_dir=str(tmp_path / "c")),
                   resume=None, until_step=3, teacher=teacher)
    assert out["step"] == 3
    model, sched = load_bundled_unet(bundle_cm(tmp_path / "c", tmp_path / "zoo"))
    assert tuple(model.config.block_out_channels) == (8, 16) and model.config.norm_num_groups == 4
    n_student = sum(p.numel() for p in model.parameters())
    assert n_student < sum(p.numel() for p in teacher[0].parameters()) / 3
    imgs = sample(model, sched, num=2, seed=0, spec=SamplerSpec("cm", 1), progress=False).images
    assert imgs.shape == (2, 16, 16, 3)


# ------------------------------------------------------------------------ calibration over noise levels


def test_calibration_over_consistency_chain_levels(tiny_cm):
    sched = cm_scheduler()
    levels = cm_chain_levels(sched, (1, 2, 4))
    ref = {}
    for k in (4, 2, 1):
        s = CMStochasticIterativeScheduler(**ZOO_CIFAR10_CM_SCHEDULER)
        s.set_timesteps(k)
        ref.update({round(float(t), 6): float(t) for t in s.timesteps})
    assert [lv["t"] for lv in levels] == pytest.approx(sorted(ref.values(), reverse=True))  # union: 5 levels
    # grid indices 0, 4, 8, 9, 12 of N = 18; each from the first chain (in the given order) that visits it
    assert [lv["chain"] for lv in levels] == [1, 4, 4, 2, 4]

    cal = capture_calibration_set(tiny_cm, sched, num_per_step=3, spec=SamplerSpec("cm", 4), cm_chains=(1, 2, 4),
                                  batch_size=2, progress=False)
    assert len(cal) == 15 and cal.meta["cm_chains"] == [1, 2, 4]
    assert cal.ts.tolist() == pytest.approx(np.repeat([lv["t"] for lv in levels], 3).tolist())
    assert cal.cond["class_labels"].shape == (15,)
    # level 1 (sigma_max): the scaled initial noise of trajectories seeded 1_000_000 + i
    x0 = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1_000_000 + i)) for i in range(3)])
    assert torch.allclose(cal.xs[:3], x0 * 80 / (80**2 + 0.25) ** 0.5, atol=1e-6)
    # the 2-step chain's second level holds exactly what that chain feeds the model there
    seen = {}
    sample(tiny_cm, sched, num=3, seed=1_000_000, spec=SamplerSpec("cm", 2), progress=False,
           callback=lambda k, t, x, c: seen.setdefault(k, x.clone()))
    slot = [lv["chain"] for lv in levels].index(2)
    assert torch.allclose(cal.xs[3 * slot: 3 * slot + 3], seen[1], atol=1e-6)
    _, t, _ = cal.batch(torch.arange(4))
    assert t.dtype == torch.float32  # sigma-derived, non-integer time steps
    sub = capture_calibration_set(tiny_cm, sched, num_per_step=2, num_steps=2, spec=SamplerSpec("cm", 4),
                                  cm_chains=(1, 2, 4), progress=False)
    assert len(sub) == 4 and sub.ts[0] == pytest.approx(levels[0]["t"])
    with pytest.raises(ValueError, match="cm_chains entry"):
        capture_calibration_set(tiny_cm, sched, num_per_step=1, spec=SamplerSpec("cm", 1), cm_chains=(19,), progress=False)
    with pytest.raises(ValueError, match="consistency sampler"):
        capture_calibration_set(tiny_cm, DDPMScheduler(**DDPM_SCHEDULER), num_per_step=1, num_steps=1,
                                spec=SamplerSpec("ddim", 2), cm_chains=(1,), progress=False)


# ------------------------------------------------------------------------------ ImageNet-64 layout


def test_imagenet64_config_is_the_hub_layout():
    with torch.device("meta"):
        full = UNet2DModel(**CD_IMAGENET64_L2)
    assert sum(p.numel() for p in full.parameters()) == 295_899_267
    assert cd_imagenet64_config() == CD_IMAGENET64_L2
    with pytest.raises(ValueError, match="multiple of 32"):
        cd_imagenet64_config(48)


def test_imagenet64_reduced_width_quantize_save_load_one_step(tmp_path):
    from diffquant.algorithms import naive_ptq
    from diffquant.config import QuantConfig, QuantScheme
    from diffquant.io import load_quantized, save_quantized
    from diffquant.models.configs import CD_IMAGENET64_SCHEDULER, build_unet
    from diffquant.nn import QuantConv2d

    # the full layout (3 layers per block, attention at the three lower resolutions, 1000 classes, scale-shift
    # norm, resnet up/down sampling) at base width 32 (8.4M parameters) and 8x8 inputs
    model = build_unet(cd_imagenet64_config(32, sample_size=8), seed=0).eval()
    sched = cm_scheduler(CD_IMAGENET64_SCHEDULER)
    cal = capture_calibration_set(model, sched, num_per_step=2, spec=SamplerSpec("cm", 2), cm_chains=(1, 2),
                                  progress=False)
    assert len(cal) == 4 and set(cal.cond) == {"class_labels"}
    assert cal.cond["class_labels"].dtype == torch.long and int(cal.cond["class_labels"].max()) < 1000
    q = naive_ptq(model, QuantConfig(weight=QuantScheme(8, granularity="per_channel"), act=QuantScheme(8),
                                     softmax_bits=8), cal)
    assert any(isinstance(m, QuantConv2d) for m in q.modules())
    save_quantized(q, tmp_path / "q", sched)
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.scheduler, CMStochasticIterativeScheduler)
    assert loaded.scheduler.config.num_train_timesteps == 40
    labels = [1, 999]
    a = sample(q, sched, num=2, seed=3, spec=SamplerSpec("cm", 1), class_labels=labels, progress=False, return_float=True)
    b = sample(loaded.model, loaded.scheduler, num=2, seed=3, spec=SamplerSpec("cm", 1), class_labels=labels,
               progress=False, return_float=True)
    fp = sample(model, sched, num=2, seed=3, spec=SamplerSpec("cm", 1), class_labels=labels, progress=False,
                return_float=True)
    assert a.images.shape == (2, 8, 8, 3)
    assert torch.equal(a.float_images, b.float_images)
    assert not torch.equal(a.float_images, fp.float_images)


# --------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def zoo_cm(tiny_cm):
    from diffquant import zoo
    from diffquant.zoo import ZooModel

    zoo.available()  # load the real entries first

    @zoo.register("test-cm")
    def _entry():
        return ZooModel("test-cm", "cm", tiny_cm, cm_scheduler(), {}, None)

    yield "zoo:test-cm"
    zoo._REGISTRY.pop("test-cm", None)


def test_cli_sample_and_quantize_consistency_model(zoo_cm, tmp_path):
    from click.testing import CliRunner

    from diffquant.cli import cli

    r = CliRunner().invoke(cli, ["sample", zoo_cm, "--sampler", "cm", "--steps", "4", "--num", "2", "--device", "cpu",
                                 "--out", str(tmp_path / "s.npz"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sampler"] == "cm"
    r = CliRunner().invoke(cli, ["sample", zoo_cm, "--steps", "4", "--num", "1", "--device", "cpu",
                                 "--out", str(tmp_path / "d.npz")], catch_exceptions=False)
    assert r.exit_code != 0 and "sampler 'cm'" in r.output
    # quantize: calibration switches to the consistency chains 1, 2, 4 (5 noise levels x 2 trajectories)
    r = CliRunner().invoke(cli, ["quantize", zoo_cm, "--weight-bits", "8", "--act-bits", "8", "--calib-num", "2",
                                 "--device", "cpu", "--out", str(tmp_path / "q"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calib_rows"] == 10
    r = CliRunner().invoke(cli, ["sample", str(tmp_path / "q"), "--sampler", "cm", "--steps", "1", "--num", "2",
                                 "--device", "cpu", "--out", str(tmp_path / "qs.npz"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def test_consistency_pipeline_folder_loads_like_the_hub_checkpoint(tiny_cm, tmp_path):
    """A ConsistencyModelPipeline folder (the layout of openai/diffusers-cd_imagenet64_l2: unet/ + scheduler/,
    safetensors) loads as UNet2DModel + CMStochasticIterativeScheduler and samples through the cm path."""
    from diffquant.models.loading import load_model

    ConsistencyModelPipeline(unet=tiny_cm, scheduler=cm_scheduler()).save_pretrained(tmp_path / "pipe")
    loaded = load_model(str(tmp_path / "pipe"))
    assert isinstance(loaded.scheduler, CMStochasticIterativeScheduler)
    assert loaded.scheduler.config.num_train_timesteps == 18
    a = sample(loaded.model, loaded.scheduler, num=2, seed=0, spec=SamplerSpec("cm", 2), progress=False).images
    b = sample(tiny_cm, cm_scheduler(), num=2, seed=0, spec=SamplerSpec("cm", 2), progress=False).images
    assert np.array_equal(a, b)
