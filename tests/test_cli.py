"""The diffquant CLI end to end on the tiny bundled model (quantize -> sample -> compare, demo)."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from diffquant.cli import cli
from diffquant.kernels.cpu_pt2e import torchao_available
from diffquant.sampling import load_samples


def _run(args):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    return res


def test_quantize_sample_compare_roundtrip(tmp_path):
    q = tmp_path / "w8a8"
    r = _run(["quantize", "zoo:tiny-random", "--weight-bits", "8", "--act-bits", "8", "--calib-num", "4",
              "--calib-st", "2", "--calib-steps", "4", "--override", "conv_out=skip", "--device", "cpu",
              "--calib-data", str(tmp_path / "cal.safetensors"), "--out", str(q), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["config"] == "W8A8" and info["calib_rows"] == 8
    assert info["report"]["float_layers"] == ["conv_out"]
    assert (tmp_path / "cal.safetensors").is_file() and (q / "model.safetensors").is_file()

    for name, model in (("fp", "zoo:tiny-random"), ("q", str(q))):
        r = _run(["sample", model, "--steps", "3", "--num", "3", "--seed", "7", "--batch-size", "2",
                  "--device", "cpu", "--out", str(tmp_path / f"{name}.npz"), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["num"] == 3
    imgs, seeds, meta = load_samples(tmp_path / "q.npz")
    assert imgs.shape == (3, 32, 32, 3) and seeds.tolist() == [7, 8, 9] and meta["quantized"] is True
    assert (tmp_path / "q.png").is_file()

    r = _run(["compare", str(tmp_path / "fp.npz"), str(tmp_path / "q.npz"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "psnr" in json.dumps(out) and "ssim" in json.dumps(out)

    # weights-only: no calibration data needed
    r = _run(["quantize", "zoo:tiny-random", "--weight-bits", "4", "--act-bits", "32", "--device", "cpu",
              "--out", str(tmp_path / "w4"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calib_rows"] == 0


def test_cli_rejects_bad_input(tmp_path):
    r = _run(["quantize", "zoo:tiny-random", "--weight-bits", "9", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "bits=9" in r.output and "2..8" in r.output
    r = _run(["quantize", "zoo:nope", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "unknown zoo model" in r.output
    r = _run(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "s.npz")])
    assert r.exit_code != 0 and "no such folder" in r.output
    r = _run(["quantize", "zoo:tiny-random", "--override", "conv_in=w3x", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "override" in r.output


def test_demo_writes_report(tmp_path):
    out = tmp_path / "demo"
    r = _run(["demo", "--model", "zoo:tiny-random", "--num", "4", "--steps", "3", "--calib-num", "4",
              "--calib-st", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [row["variant"] for row in res["rows"]] == ["FP", "W8A8", "W4A8"]
    sizes = [row["size_MiB"] for row in res["rows"]]
    assert sizes[0] > sizes[1] > sizes[2]
    assert all(np.isfinite(row["psnr_vs_fp"]) for row in res["rows"][1:])
    for f in ("report.md", "results.json", "side_by_side.png", "samples_W4A8.npz"):
        assert (out / f).is_file()


def test_quantize_qdiffusion_cli_with_resume(tmp_path):
    args = ["quantize", "zoo:tiny-random", "--method", "qdiffusion", "--weight-bits", "4", "--act-bits", "32",
            "--calib-num", "2", "--calib-st", "1", "--calib-steps", "2", "--weight-iters", "2",
            "--device", "cpu", "--out", str(tmp_path / "qd"), "--json"]
    r = _run(args)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["method"] == "qdiffusion" and info["recon"]["weight_iters"] == 2
    prog = json.loads((tmp_path / "qd" / "recon" / "progress.json").read_text())
    assert len(prog["done"]["weights"]) > 10 and prog["done"]["acts"] == []  # weights-only: no activation stage
    r = _run(args)  # the work dir holds a finished run: refused without --resume
    assert r.exit_code != 0 and "resume" in r.output
    r = _run(args + ["--resume"])
    assert r.exit_code == 0, r.output
    r = _run(["quantize", "zoo:tiny-random", "--resume", "--out", str(tmp_path / "n")])
    assert r.exit_code != 0 and "qdiffusion only" in r.output
    # W4A8 from the finished W4A32 weight stage: activations only
    a8 = [a if a != "32" else "8" for a in args]
    a8[a8.index(str(tmp_path / "qd"))] = str(tmp_path / "qd8")
    r = _run(a8 + ["--act-iters", "1", "--weights-from", str(tmp_path / "qd" / "recon")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["weights_from"]["folder"] == str(tmp_path / "qd" / "recon")
    prog = json.loads((tmp_path / "qd8" / "recon" / "progress.json").read_text())
    assert prog["done"]["acts"] and not [x for x in prog["losses"] if x["phase"] == "weights" and x.get("seconds") is None]
    w3 = [a if a != "4" else "3" for a in a8]
    w3[w3.index(str(tmp_path / "qd8"))] = str(tmp_path / "qd3")
    r = _run(w3 + ["--weights-from", str(tmp_path / "qd" / "recon")])
    assert r.exit_code != 0 and "weights fingerprint" in r.output


def test_sample_real_kernels(tmp_path):
    """`diffquant sample QDIR --real int8`: the quantized folder converted to real int8 modules (the reference ops on
    the CPU; fused norms and stacked Q/K/V), sampled with the same seeds as the fake-quant model: near-identical
    images; the conversion report in the samples' metadata; bad combinations refused with the reason."""
    q = tmp_path / "w8a8"
    r = _run(["quantize", "zoo:tiny-random", "--weight-bits", "8", "--act-bits", "8", "--calib-num", "4",
              "--calib-st", "2", "--calib-steps", "4", "--device", "cpu", "--out", str(q), "--json"])
    assert r.exit_code == 0, r.output
    base = ["sample", str(q), "--steps", "3", "--num", "2", "--device", "cpu", "--no-grid", "--json"]
    r = _run(base + ["--out", str(tmp_path / "fake.npz"), "--real-attention", "simulate"])
    assert r.exit_code == 0, r.output
    r = _run(base + ["--real", "int8", "--real-attention", "simulate", "--out", str(tmp_path / "real.npz")])
    assert r.exit_code == 0, r.output
    real = json.loads(r.stdout)["real_kernels"]
    assert real["backend"] == "int8" and len(real["converted"]) > 20 and real["fuse"] is True
    assert "group_norm_act" in real["norms"]
    from diffquant.evaluation.fidelity import paired_fidelity

    fake, real_imgs = load_samples(tmp_path / "fake.npz")[0], load_samples(tmp_path / "real.npz")[0]
    assert paired_fidelity(fake, real_imgs)["psnr"]["mean"] > 30  # 37.1 dB on this CPU, 2026-11-28
    r = _run(base + ["--real", "fp8", "--out", str(tmp_path / "x.npz")])
    assert r.exit_code != 0 and "--real fp8: no layer" in r.output and "needs fp8_e4m3 weights" in r.output
    r = _run(["sample", "zoo:tiny-random", "--steps", "2", "--num", "1", "--device", "cpu", "--real", "int8",
              "--out", str(tmp_path / "y.npz")])
    assert r.exit_code != 0 and "--real needs a quantized folder" in r.output
    r = _run(base + ["--real", "int8", "--shard-size", "1", "--out", str(tmp_path / "z.npz")])
    assert r.exit_code != 0 and "in one go" in r.output


def test_sample_real_fp8_gemm_option(tmp_path):
    """`diffquant sample QDIR --real fp8 --fp8-gemm MODE`: the FP8 folder samples with the option recorded in the
    metadata (no cuBLAS GEMM on the CPU: 0 layers switched, said so); the option without --real fp8 is refused."""
    from diffquant.algorithms.naive import naive_ptq
    from diffquant.calibration import capture_calibration_set
    from diffquant.convert import config_for_backend
    from diffquant.io import save_quantized
    from diffquant.models.loading import load_model
    from diffquant.sampling import SamplerSpec

    loaded = load_model("zoo:tiny-random", device="cpu")
    cal = capture_calibration_set(loaded.model, loaded.scheduler, num_per_step=1, spec=SamplerSpec("ddim", 2),
                                  progress=False)
    q = naive_ptq(loaded.model, config_for_backend("fp8"), cal)
    save_quantized(q, tmp_path / "fp8", loaded.scheduler)
    base = ["sample", str(tmp_path / "fp8"), "--steps", "2", "--num", "1", "--device", "cpu", "--no-grid", "--json"]
    r = _run(base + ["--real", "fp8", "--fp8-gemm", "tensorwise-except-qkv", "--out", str(tmp_path / "a.npz")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)["real_kernels"]
    assert info["backend"] == "fp8" and info["fp8_gemm"] == {"mode": "tensorwise-except-qkv", "layers_switched": 0}
    assert "GPU only" in r.stderr
    r = _run(base + ["--real", "int8", "--fp8-gemm", "tensorwise", "--out", str(tmp_path / "b.npz")])
    assert r.exit_code != 0 and "applies to --real fp8 only" in r.output


@pytest.mark.skipif(not torchao_available(), reason="needs torchao")
def test_sample_cpu_int8(tmp_path, monkeypatch):
    """`diffquant sample --cpu-int8`: calibrate on the FP sampler, pt2e int8 on the CPU, sample; close to FP.
    Only the first of quantize_pt2e_x86's warm-up graphs is compiled (batches 2..15, where these batch-2 samples
    run): the second (16..63, ~70 s of Inductor on the 2-core CI machine) would never be called here."""
    from diffquant.kernels import cpu_pt2e

    monkeypatch.setattr(cpu_pt2e, "WARMUP_BATCHES", cpu_pt2e.WARMUP_BATCHES[:1])
    base = ["sample", "zoo:tiny-random", "--steps", "2", "--num", "2", "--device", "cpu", "--no-grid", "--json"]
    r = _run(base + ["--out", str(tmp_path / "fp.npz")])
    assert r.exit_code == 0, r.output
    r = _run(base + ["--cpu-int8", "--calib-num", "2", "--out", str(tmp_path / "q.npz")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)["cpu_int8"]
    assert info["calib_rows"] == 2 * 10
    from diffquant.evaluation.fidelity import paired_fidelity

    fp, q = load_samples(tmp_path / "fp.npz"), load_samples(tmp_path / "q.npz")
    assert paired_fidelity(fp[0], q[0])["psnr"]["mean"] > 20
    r = _run(base + ["--cpu-int8", "--shard-size", "1", "--out", str(tmp_path / "s.npz")])
    assert r.exit_code != 0 and "in one go" in r.output


def test_benchmark_scripts_answer_help_without_running():
    """Every script in benchmarks/ answers --help with its usage and exits, on a machine without a GPU or Triton,
    without touching a result file (two of them used to ignore --help, run, and rewrite their results)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    needs_triton = {"ptxas_report.py"}  # compiles kernels for sm_90 at import: Triton is its point
    scripts = sorted(p for p in (root / "benchmarks").glob("*.py") if p.name not in needs_triton)
    assert len(scripts) >= 15
    from concurrent.futures import ThreadPoolExecutor

    def helps(script):  # each start imports torch: as many at once as there are cores
        return script, subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                      timeout=300, cwd=root)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for script, r in pool.map(helps, scripts):
            assert r.returncode == 0 and "usage:" in r.stdout, (script.name, r.stdout[-300:], r.stderr[-600:])
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert after == before


def test_cli_quiets_third_party_import_noise_unless_verbose():
    """Without -v the CLI raises torchao's, torch's pytree and diffusers' torchao-quantizer loggers to ERROR (their
    import-time warnings on a CPU machine say nothing about diffquant's work); with -v they keep their level."""
    import logging

    from diffquant.cli import _QUIET_LOGGERS

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    r = _run(["-v", "zoo", "--help"])
    assert r.exit_code == 0 and all(logging.getLogger(n).level == logging.NOTSET for n in _QUIET_LOGGERS)
    r = _run(["zoo", "--help"])
    assert r.exit_code == 0 and all(logging.getLogger(n).level == logging.ERROR for n in _QUIET_LOGGERS)
