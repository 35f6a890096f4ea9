"""Time-step sensitivity analysis of a quantized model along the FP trajectory."""
import math

from diffusers import DDPMScheduler

from diffquant.algorithms import naive_ptq
from diffquant.calibration import capture_calibration_set
from diffquant.config import QuantConfig, QuantScheme
from diffquant.evaluation.sensitivity import timestep_sensitivity
from diffquant.models.configs import DDPM_SCHEDULER, build_unet
from diffquant.sampling import SamplerSpec, ddim_timesteps
from _unets import tiny_unet_config

SMALL = tiny_unet_config()


def test_per_step_error_rows_and_bit_ordering():
    model = build_unet(SMALL, seed=0).eval()
    sched = DDPMScheduler(**DDPM_SCHEDULER)
    spec = SamplerSpec("ddim", 5)
    calib = capture_calibration_set(model, sched, num_per_step=4, num_steps=5, spec=spec, progress=False)
    res = {}
    for wb in (8, 3):
        q = naive_ptq(model, QuantConfig(weight=QuantScheme(wb, granularity="per_channel"), act=QuantScheme(8)), calib,
                      progress=False)
        res[wb] = timestep_sensitivity(model, q, sched, num=4, spec=spec, batch_size=4)
    assert [r["t"] for r in res[8]] == sorted(ddim_timesteps(1000, 5, "uniform").tolist())
    assert all(r["n"] == 4 and r["mse"] > 0 and math.isfinite(r["sqnr_db"]) for r in res[8])
    # fewer weight bits -> larger error at every step
    assert all(a["rel_err"] < b["rel_err"] for a, b in zip(res[8], res[3]))
    # the same model against itself has no error
    same = timestep_sensitivity(model, model, sched, num=2, spec=spec, batch_size=2)
    assert all(r["mse"] == 0 for r in same)


def test_sensitivity_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from diffquant.cli import cli

    r = CliRunner().invoke(cli, ["quantize", "zoo:tiny-random", "--weight-bits", "4", "--act-bits", "32", "--device", "cpu",
                                 "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["sensitivity", "zoo:tiny-random", str(tmp_path / "q"), "--steps", "3", "--num", "2",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert len(rows) == 3 and all(row["rel_err"] > 0 for row in rows)
    r = CliRunner().invoke(cli, ["sensitivity", "zoo:tiny-random", "zoo:tiny-random", "--steps", "3"])
    assert r.exit_code != 0 and "not a quantized checkpoint" in r.output
