"""Sweeps (diffquant.experiments): spec parsing, cells, caching and reuse, results table, plots, report."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler, UNet2DModel

from diffquant.evaluation.fidelity import paired_fidelity
from diffquant.experiments.spec import SweepSpec, load_spec, parse_bits
from diffquant.experiments.sweep import plan_cells, run_sweep
from diffquant.models.configs import DDPM_SCHEDULER
from diffquant.sampling import load_samples
from _unets import tiny_unet_config

TINY16 = tiny_unet_config(sample_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny16")
    torch.manual_seed(0)
    UNet2DModel(**TINY16).save_pretrained(d, safe_serialization=True)
    DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(d)
    return str(d)


def test_spec_parsing_and_errors(tmp_path):
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w8a32") == (8, 16) and parse_bits("W2") == (2, 16)
    assert parse_bits([4, 8]) == (4, 8) and parse_bits({"weight_bits": 8}) == (8, 16)
    s = SweepSpec.from_dict({"model": "zoo:tiny-random", "weight_bits": [8, 4], "act_bits": [8, 16], "steps": [5, 10],
                             "samplers": ["ddim", {"sampler": "ddim", "spacing": "quad"}], "num_samples": 4})
    assert s.bits == ((8, 8), (8, 16), (4, 8), (4, 16)) and len(s.samplers) == 2
    cells = plan_cells(s)
    assert len(cells) == 2 * 2 * (1 + 4) and cells[0].is_fp and cells[0].config == "FP"
    assert {c.sampler.steps for c in cells} == {5, 10}
    for bad, match in [({"models": ["m"], "bits": ["W9A8"]}, "weight_bits=9.*2..8"),
                       ({"models": ["m"], "bits": ["8/8"]}, "W4A8"),
                       ({"models": ["m"], "colour": 1}, "unknown sweep spec keys.*colour"),
                       ({"models": ["m"], "recipes": ["magic"]}, "method='magic'.*naive"),
                       ({"models": ["m"], "metrics": ["fid_cifar"]}, "unknown metric.*fd_cifar"),
                       ({"models": ["m"], "steps": [0]}, "steps=0"),
                       ({"models": ["m"], "bits": ["W16A16"]}, "no quantized configuration"),
                       ({"bits": ["W8A8"]}, "names no model"),
                       ({"models": ["m"], "samplers": [{"sampler": "ddim", "steps": 3}]}, "unknown keys.*steps"),
                       ({"models": ["m"], "calibration": {"num": 3}}, "unknown calibration keys")]:
        with pytest.raises(ValueError, match=match):
            SweepSpec.from_dict(bad)
    p = tmp_path / "s.yaml"
    p.write_text("models: [zoo:tiny-random]\nbits: [W8A8]\nsteps: 3\nnum_samples: [2, 4]\n")
    assert load_spec(p).num_samples == (2, 4)
    p2 = tmp_path / "s.toml"
    p2.write_text("x")
    with pytest.raises(ValueError, match="allowed: .yaml, .yml, .json"):
        load_spec(p2)


def _fake_metrics(calls):
    """evaluate_images stand-in: 'fd_cifar' = mean pixel value (the zoo feature network may be absent)."""
    from diffquant.evaluation.suite import MetricResult

    def fake(images, metrics, **kw):
        calls.append((images.shape[0], tuple(metrics)))
        return [MetricResult(m, float(images.mean()) + (1 if m == "kid_cifar" else 0), reference="fake", floor=1.5)
                for m in metrics]

    return fake


def test_sweep_end_to_end_cache_reuse_and_report(model_dir, tmp_path, monkeypatch):
    import diffquant.evaluation.suite as suite
    import diffquant.recipes as recipes
    import diffquant.sampling.large as large

    calls = []
    monkeypatch.setattr(suite, "evaluate_images", _fake_metrics(calls))
    fake_ex = {"cifar10-features": object()}
    d = {"name": "t", "models": [model_dir], "bits": ["W8A8", "W4A16"], "steps": [2, 3], "num_samples": 5,
         "metrics": ["fd_cifar"], "compute_batch": 4, "batch_size": 4, "shard_size": 3, "grid": 4,
         "calibration": {"num_per_step": 4, "num_steps": 2, "steps": 4}}
    out = tmp_path / "sweep"
    res = run_sweep(SweepSpec.from_dict(d), out, device="cpu", progress=False, extractors=fake_ex)
    assert res.computed == 6 and res.cached == 0 and len(res.rows) == 6 and len(calls) == 6
    rows = {(r["config"], r["steps"]): r for r in res.rows}
    assert set(rows) == {(c, s) for c in ("FP", "W8A8", "W4A16") for s in (2, 3)}
    fp = rows[("FP", 3)]
    assert fp["method"] == "fp" and fp["ssim_vs_fp"] == 1.0 and fp["psnr_vs_fp"] is None
    assert fp["fd_cifar_floor"] == 1.5 and fp["size_MiB"] > rows[("W8A8", 3)]["size_MiB"] > rows[("W4A16", 3)]["size_MiB"]
    assert rows[("W4A16", 3)]["gbops"] > rows[("W8A8", 3)]["gbops"]  # 4x16 > 8x8 bit-operations per MAC
    # the paired numbers are those of the cached FP and quantized samples with the same seeds
    cells = {c["cell"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    q_cell = next(v for k, v in cells.items() if "W8A8" in k and "-3 " in k)
    fp_cell = next(v for k, v in cells.items() if " fp " in k and "-3 " in k)
    qi, qs, _ = load_samples(out / "cache" / "samples" / f"{q_cell['key']}.npz")
    fi, fs, _ = load_samples(out / "cache" / "samples" / f"{fp_cell['key']}.npz")
    assert qs.tolist() == fs.tolist() == [0, 1, 2, 3, 4] and not np.array_equal(qi, fi)
    f = paired_fidelity(fi, qi)
    assert rows[("W8A8", 3)]["psnr_vs_fp"] == pytest.approx(f["psnr_of_mean_mse"])
    assert rows[("W8A8", 3)]["fd_cifar"] == pytest.approx(float(qi.mean()))
    # the results table, plots, grids and reports
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 6 and {"model", "method", "weight_bits", "act_bits", "sampler", "steps", "num_samples",
                                "fd_cifar", "psnr_vs_fp", "ssim_vs_fp", "size_MiB", "calib_seconds"} <= set(table[0])
    for name in ("metric_vs_weight_bits", "metric_vs_act_bits", "metric_vs_steps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
    grids = list((out / "grids").glob("*.png"))
    assert len(grids) == 2
    md = (out / "report.md").read_text()
    assert "| naive | W4A16 |" in md and "plots/metric_vs_steps.png" in md and "what was quantized" in md
    assert "GBOPs" in md and "Conv2d" in md and "real-data floor" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # 3 plots + 2 grids, embedded
    assert len(list((out / "cost").glob("*.csv"))) == 3
    assert len(list((out / "cache" / "quantized").glob("*/diffquant.json"))) == 2
    assert len(list((out / "cache" / "calib").glob("*.safetensors"))) == 1  # shared by W8A8 (W4A16 needs none)

    # rerun: every cell cached; nothing sampled, quantized or measured
    def boom(*a, **k):
        raise AssertionError("should have been cached")

    monkeypatch.setattr(large, "sample_sharded", boom)
    monkeypatch.setattr(recipes, "run_ptq", boom)
    calls.clear()
    again = run_sweep(SweepSpec.from_dict(d), out, device="cpu", progress=False, extractors=fake_ex)
    assert again.computed == 0 and again.cached == 6 and calls == [] and again.rows == res.rows
    # a new metric is computed from the saved samples only
    again = run_sweep(SweepSpec.from_dict({**d, "metrics": ["fd_cifar", "kid_cifar"]}), out, device="cpu",
                      progress=False, extractors=fake_ex)
    assert again.computed == 6 and [c[1] for c in calls] == [("kid_cifar",)] * 6
    assert {r["kid_cifar"] - r["fd_cifar"] for r in again.rows} == {1.0}
    # new step counts reuse the cached quantized checkpoints (no PTQ) and the cached cells
    monkeypatch.undo()
    monkeypatch.setattr(suite, "evaluate_images", _fake_metrics(calls))
    monkeypatch.setattr(recipes, "run_ptq", boom)
    more = run_sweep(SweepSpec.from_dict({**d, "steps": [2, 3, 4]}), out, device="cpu", progress=False,
                     extractors=fake_ex)
    assert more.computed == 3 and more.cached == 6 and len(more.rows) == 9
    assert all(r["img_per_s"] and r["sample_seconds"] for r in more.rows)


def test_cli_sweep_and_report(model_dir, tmp_path):
    from diffquant.cli import cli

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "cli", "models": [model_dir], "bits": ["W8"], "steps": [2], "num_samples": 3,
                                "compute_batch": 3, "batch_size": 3, "grid": 3}))
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out), "--device", "cpu", "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "W8A16" in r.output and "psnr_vs_fp" in r.output and "2 cells computed" in r.output
    r = CliRunner().invoke(cli, ["report", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["rows"]) == 2
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0 and "2 cells" in r.output
    spec.write_text(json.dumps({"models": [model_dir], "bits": ["W3A33"]}))
    r = CliRunner().invoke(cli, ["sweep", str(spec), "--out", str(out)])
    assert r.exit_code != 0 and "act_bits=33" in r.output
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "results.json" in r.output


def test_sweep_over_a_consistency_model(tmp_path, monkeypatch):
    """Issue 6's sweep shape on a tiny class-conditional consistency model (ConsistencyModelPipeline folder):
    cm sampler at 1 and 2 steps, calibration over the noise levels of the 1- and 2-step chains, naive and
    qdiffusion recipes (iteration counts from the recipe options), first/last layers kept at 8 bits."""
    from diffusers import ConsistencyModelPipeline

    import diffquant.evaluation.suite as suite
    from diffquant.models.configs import cm_scheduler

    monkeypatch.setattr(suite, "evaluate_images", _fake_metrics([]))
    torch.manual_seed(0)
    unet = UNet2DModel(**dict(TINY16, num_class_embeds=10)).eval()
    ConsistencyModelPipeline(unet=unet, scheduler=cm_scheduler()).save_pretrained(tmp_path / "cm")
    d = {"name": "cm", "models": [str(tmp_path / "cm")], "bits": ["W8A8", "W4A8"], "samplers": [{"sampler": "cm"}],
         "steps": [1, 2], "num_samples": 3, "metrics": ["fd_cifar"], "compute_batch": 3, "batch_size": 4,
         "shard_size": 3, "grid": 3,
         "recipes": [{"name": "naive", "method": "naive", "first_last_bits": 8},
                     {"name": "qd", "method": "qdiffusion", "weight_estimator": "lp", "act_estimator": "lp",
                      "first_last_bits": 8, "options": {"weight_iters": 2, "act_iters": 1}}],
         "calibration": {"num_per_step": 2, "num_steps": None, "sampler": "cm", "steps": 2, "chains": [1, 2]}}
    spec = SweepSpec.from_dict(d)
    assert spec.calibration.chains == (1, 2)
    res = run_sweep(spec, tmp_path / "out", device="cpu", progress=False, extractors={"cifar10-features": object()})
    rows = {(r["method"], r["config"], r["steps"]): r for r in res.rows}
    assert set(rows) == {("fp", "FP", 1), ("fp", "FP", 2)} | {(m, c, s) for m in ("naive", "qd")
                                                            for c in ("W8A8", "W4A8") for s in (1, 2)}
    for k, r in rows.items():
        if k[0] != "fp":
            assert np.isfinite(r["psnr_vs_fp"]) and r["calib_seconds"] is not None
    from diffquant.calibration import CalibrationSet

    (cal_file,) = (tmp_path / "out" / "cache" / "calib").glob("*.safetensors")
    cal = CalibrationSet.load(str(cal_file))
    assert len(cal) == 2 * 2  # 2 trajectories x the distinct noise levels of the 1- and 2-step chains
    with pytest.raises(ValueError, match="consistency sampler"):
        SweepSpec.from_dict({**d, "calibration": {"sampler": "ddim", "chains": [1]}})
    with pytest.raises(ValueError, match="step counts"):
        SweepSpec.from_dict({**d, "calibration": {"sampler": "cm", "steps": 2, "chains": [0]}})


def test_issue6_single_step_spec_parses():
    """benchmarks/single_step.yaml (the issue-6 table) is a valid spec: FP + 2 recipes x 6 bit-widths, each at 1/2/4
    cm steps, calibrated over the 1/2/4-step chains."""
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parents[1] / "benchmarks" / "single_step.yaml"))
    cells = plan_cells(spec)
    assert len(cells) == 3 + 2 * 6 * 3
    assert spec.calibration.chains == (1, 2, 4) and spec.calibration.sampler == "cm"
    assert {c.sampler.steps for c in cells} == {1, 2, 4} and {c.num for c in cells} == {10000}
