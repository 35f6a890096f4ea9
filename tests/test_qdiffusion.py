"""Q-Diffusion: AdaRound pieces, one-block reconstruction, resume after a kill."""
import pytest
import torch
from diffusers import DDPMScheduler

from diffquant.algorithms import qdiffusion as qd
from diffquant.algorithms.blocks import capture_unit_data, find_units
from diffquant.calibration import capture_calibration_set
from diffquant.config import QuantConfig, QuantScheme
from diffquant.models.configs import DDPM_SCHEDULER, build_unet
from diffquant.nn.quantizers import WeightQuantizer
from diffquant.quant.adaround import BetaSchedule, init_alpha, rectified_sigmoid, round_regularizer
from diffquant.quantize import quantize, set_quant_mode
from diffquant.sampling import SamplerSpec
from _unets import tiny_unet_config

SMALL = tiny_unet_config()


@pytest.fixture(scope="module")
def setup():
    model = build_unet(SMALL, seed=0).eval()
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    calib = capture_calibration_set(model, sched, num_per_step=8, num_steps=4, spec=SamplerSpec("ddim", 8), progress=False)
    return model, calib


def test_rectified_sigmoid_init_and_regulariser():
    frac = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    a = init_alpha(frac + 3.0)
    assert torch.allclose(rectified_sigmoid(a), frac, atol=1e-5)
    assert round_regularizer(torch.tensor([-50.0, 50.0]), beta=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert round_regularizer(init_alpha(torch.tensor([0.5])), beta=2.0).item() == pytest.approx(1.0, abs=1e-4)
    s = BetaSchedule(iters=100, warmup=0.2, start=20.0, end=2.0)
    assert not s.regularizer_on(19) and s.regularizer_on(20)
    assert s.beta(0) == 20.0 and s.beta(20) == 20.0 and s.beta(60) == pytest.approx(11.0) and s.beta(100) == 2.0


def test_adaround_soft_to_hard_switch():
    torch.manual_seed(0)
    w = torch.randn(8, 24)
    q = WeightQuantizer(QuantScheme(3, granularity="per_channel"), w.shape)
    q.init_from(w)
    nearest = q(w)
    q.start_adaround(w)
    soft = q(w)
    inside = (soft - w).abs() < 1e-5
    assert inside.float().mean() > 0.9  # soft weight = float weight except where the grid clamps
    q.rounding = "hard"
    assert torch.equal(q(w), nearest)  # hard rounding of the initial alpha is nearest rounding
    with torch.no_grad():
        q.alpha.copy_(torch.where(q.alpha >= 0, -q.alpha - 1, -q.alpha + 1))  # flip every decision
    flipped = q(w)
    assert (flipped != nearest).float().mean() > 0.5
    baked = q.bake_adaround(w)
    assert q.rounding == "nearest" and q.alpha is None
    assert torch.equal(q(baked), flipped) and torch.equal(baked, flipped)  # nearest rounding keeps AdaRound's choice


def test_one_block_reconstruction_beats_nearest_rounding(setup):
    model, calib = setup
    cfg = QuantConfig(weight=QuantScheme(3, granularity="per_channel", estimator="lp"), act=None)
    q = quantize(model, cfg)
    units = find_units(q, calib.batch(torch.arange(2)))
    unit = next(u for u in units if u.kind == "block" and u.name.startswith("down_blocks.0.resnets"))
    data = capture_unit_data(q, unit.module, model, model.get_submodule(unit.name), calib, batch_size=16,
                             device="cpu", cache_device="cpu", max_bytes=1 << 30)

    def err():
        with torch.no_grad():
            args, kwargs, target = data.batch(torch.arange(data.n))
            return qd.recon_loss(unit.module(*args, **kwargs), target, 2.0).item()

    before = err()
    rc = qd.ReconConfig(weight_iters=300, batch_size=16, weight_lr=1e-2)
    info = qd._reconstruct_weights(unit, data, rc, torch.Generator().manual_seed(0), "cpu", progress=False)
    after = err()
    assert after < 0.8 * before, (before, after, info)
    for wq in unit.weight_quantizers():  # hard-rounded and baked: back to nearest rounding
        assert wq.rounding == "nearest" and wq.alpha is None


def test_resume_after_kill_equals_uninterrupted_run(setup, tmp_path, monkeypatch):
    model, calib = setup
    calib = calib.subset(8, seed=1)
    cfg = QuantConfig(weight=QuantScheme(4, granularity="per_channel", estimator="lp"), act=QuantScheme(8, estimator="lp"))
    rc = qd.ReconConfig(weight_iters=3, act_iters=2, batch_size=4, act_init_rows=8)
    full = qd.qdiffusion_ptq(model, cfg, calib, recon=rc, progress=False)

    calls = {"n": 0}
    orig = qd._Progress.mark

    def dying_mark(self, *a, **k):
        orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(qd._Progress, "mark", dying_mark)
    with pytest.raises(KeyboardInterrupt):
        qd.qdiffusion_ptq(model, cfg, calib, recon=rc, checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(qd._Progress, "mark", orig)
    with pytest.raises(ValueError, match="already holds"):
        qd.qdiffusion_ptq(model, cfg, calib, recon=rc, checkpoint_dir=tmp_path / "ck", progress=False)
    resumed = qd.qdiffusion_ptq(model, cfg, calib, recon=rc, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other = QuantConfig(weight=QuantScheme(8, granularity="per_channel"), act=QuantScheme(8))
    with pytest.raises(ValueError, match="another model, calibration set or config"):
        qd.qdiffusion_ptq(model, other, calib, recon=rc, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)


def test_split_second_half_takes_part_in_rounding(setup):
    model, calib = setup
    q = quantize(model, QuantConfig(weight=QuantScheme(4, granularity="per_channel"), act=None))
    set_quant_mode(q, "fp", weights=False, acts=True)
    units = find_units(q, calib.batch(torch.arange(2)))
    unit = next(u for u in units if any(getattr(l, "split", None) for l in u.quant_layers()))
    wqs = unit.weight_quantizers()
    split_layers = [l for l in unit.quant_layers() if l.split is not None]
    assert all(l.weight_quantizer_b in wqs for l in split_layers)


def test_weights_from_equals_run_from_scratch(setup, tmp_path):
    """W4A8 taking the finished weight stage of a W4A32 run (weights_from) equals W4A8 from scratch;
    a source with another weight config, or an unfinished weight stage, is refused."""
    model, calib = setup
    calib = calib.subset(8, seed=2)
    w4 = QuantScheme(4, granularity="per_channel", estimator="lp")
    rc = qd.ReconConfig(weight_iters=3, act_iters=2, batch_size=4, act_init_rows=8)
    w4a8 = QuantConfig(weight=w4, act=QuantScheme(8, estimator="lp"))
    scratch = qd.qdiffusion_ptq(model, w4a8, calib, recon=rc, progress=False)
    src = tmp_path / "w4a32"
    # act-only settings of the source's recon may differ: the weight stage does not read them
    qd.qdiffusion_ptq(model, QuantConfig(weight=w4, act=None), calib, recon=qd.ReconConfig(
        weight_iters=3, act_iters=7, batch_size=4, act_init_rows=4), checkpoint_dir=src, progress=False)
    reused = qd.qdiffusion_ptq(model, w4a8, calib, recon=rc, weights_from=src, checkpoint_dir=tmp_path / "w4a8",
                               progress=False)
    a, b = scratch.state_dict(), reused.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert reused._diffquant_method["weights_from"]["folder"] == str(src)
    # the W4A8 checkpoint records the weight stage as done: resuming it does not need the source any more
    again = qd.qdiffusion_ptq(model, w4a8, calib, recon=rc, checkpoint_dir=tmp_path / "w4a8", resume=True,
                              progress=False)
    for k, v in again.state_dict().items():
        assert torch.equal(v, a[k]), k
    w3a8 = QuantConfig(weight=QuantScheme(3, granularity="per_channel", estimator="lp"), act=QuantScheme(8))
    with pytest.raises(ValueError, match="weights fingerprint"):
        qd.qdiffusion_ptq(model, w3a8, calib, recon=rc, weights_from=src, progress=False)
    with pytest.raises(ValueError, match="weights fingerprint"):  # other weight-stage settings
        qd.qdiffusion_ptq(model, w4a8, calib, recon=qd.ReconConfig(weight_iters=4, act_iters=2, batch_size=4),
                          weights_from=src, progress=False)
    with pytest.raises(ValueError, match="no reconstruction checkpoint"):
        qd.qdiffusion_ptq(model, w4a8, calib, recon=rc, weights_from=tmp_path / "nothing", progress=False)


def _act_unit(setup):
    """A resnet unit of a W8A8 model with calibrated activation ranges, and its captured data."""
    from diffquant.quantize import calibrate
    from diffquant.models.adapter import call_model

    model, calib = setup
    q = quantize(model, QuantConfig(weight=QuantScheme(8, granularity="per_channel"), act=QuantScheme(4)))
    with torch.no_grad(), calibrate(q):
        for i in range(0, len(calib), 16):
            x, t, c = calib.batch(torch.arange(i, min(i + 16, len(calib))))
            call_model(q, x, t, c)
    units = find_units(q, calib.batch(torch.arange(2)))
    unit = next(u for u in units if u.kind == "block" and u.name.startswith("down_blocks.0.resnets"))
    data = capture_unit_data(q, unit.module, model, model.get_submodule(unit.name), calib, batch_size=16,
                             device="cpu", cache_device="cpu", max_bytes=1 << 30)
    return unit, data


def test_act_stage_keeps_the_better_of_initial_and_learned_step_sizes(setup):
    """With a learning rate that wrecks the step sizes, the initial ones are restored; with a sane one the
    decision follows the fixed-row losses; act_keep_best_rows=0 keeps whatever was learned."""
    unit, data = _act_unit(setup)
    initial = [q.scale.detach().clone() for q in unit.act_quantizers()]
    bad = qd.ReconConfig(act_iters=20, batch_size=8, act_lr=5.0, act_keep_best_rows=64)
    info = qd._reconstruct_acts(unit, data, bad, torch.Generator().manual_seed(0), "cpu", progress=False)
    assert info["kept"] == "initial" and info["eval_loss_learned"] > info["eval_loss_initial"], info
    assert all(torch.equal(q.scale, s) for q, s in zip(unit.act_quantizers(), initial))
    assert all(not isinstance(q.scale, torch.nn.Parameter) for q in unit.act_quantizers())
    # learned kept whenever it is no worse on the same rows
    sane = qd.ReconConfig(act_iters=30, batch_size=8, act_lr=4e-4, act_keep_best_rows=64)
    info = qd._reconstruct_acts(unit, data, sane, torch.Generator().manual_seed(0), "cpu", progress=False)
    assert (info["kept"] == "learned") == (info["eval_loss_learned"] <= info["eval_loss_initial"])
    # off: the wrecked step sizes stay
    off = qd.ReconConfig(act_iters=20, batch_size=8, act_lr=5.0, act_keep_best_rows=0)
    before = [q.scale.detach().clone() for q in unit.act_quantizers()]
    info = qd._reconstruct_acts(unit, data, off, torch.Generator().manual_seed(0), "cpu", progress=False)
    assert "kept" not in info
    assert any(not torch.equal(q.scale, s) for q, s in zip(unit.act_quantizers(), before))
    with pytest.raises(ValueError, match="act_keep_best_rows"):
        qd.ReconConfig(act_keep_best_rows=-1)
