"""CPU int8 (oneDNN) vs fp32 vs fake-quant on zoo:cifar10-ddpm: latency per layer type and end to end,
and correctness (per layer and DDIM-sample PSNR with the same seeds).

    .venv/bin/python benchmarks/bench_cpu_int8.py                 # batch 1 and 16, writes results/cpu_int8.json
    .venv/bin/python benchmarks/bench_cpu_int8.py --quick         # fewer runs/samples (smoke test)

Timing on a shared machine is only meaningful when nothing else runs: the script records the 1-minute
load average before and after every timed block, and waits (up to --wait-idle seconds) for the load to
drop below --max-load before it starts. Rerun it on an idle machine for numbers to publish.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffquant.evaluation.fidelity import psnr
from diffquant.kernels.cpu import Int8Linear, convert_cpu, cpu_int8_report, simulate_cpu_int8
from diffquant.models.loading import load_model
from diffquant.nn.modules import QuantLinear
from diffquant.recipes import CalibOptions, build_config, get_calibration, run_ptq
from diffquant.sampling import SamplerSpec, sample

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_int8.json"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_idle(max_load: float, wait_s: float) -> float:
    t0 = time.time()
    while load1() > max_load and time.time() - t0 < wait_s:
        time.sleep(5)
    return load1()


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def layer_kind(m) -> str:
    if isinstance(m, (QuantLinear, Int8Linear)):
        return "linear"
    k = tuple(m.kernel_size)
    return f"conv{k[0]}x{k[1]}"


@torch.no_grad()
def per_layer(qmodel, sim7, int8, x, t, runs: int) -> tuple[list[dict], dict]:
    """Each layer on its captured input: fp32 (float weight) vs fake-quant vs int8; errors vs sim7/sim8."""
    names = cpu_int8_report(int8).converted
    ins: dict[str, torch.Tensor] = {}
    hooks = [sim7.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: ins.__setitem__(n, a[0].detach().clone()))
             for n in names]
    sim7(x, t)
    for h in hooks:
        h.remove()
    by_kind: dict[str, dict[str, float]] = {}
    worst = {"max_abs_err_rel_vs_sim7": 0.0, "max_abs_err_rel_vs_sim8": 0.0}
    for n in names:
        q8, q7, qi = qmodel.get_submodule(n), sim7.get_submodule(n), int8.get_submodule(n)
        a = ins[n]
        ref7, ref8, out = q7(a), q8(a), qi(a)
        scale = float(ref7.abs().max().clamp_min(1e-12))
        worst["max_abs_err_rel_vs_sim7"] = max(worst["max_abs_err_rel_vs_sim7"], float((out - ref7).abs().max()) / scale)
        worst["max_abs_err_rel_vs_sim8"] = max(worst["max_abs_err_rel_vs_sim8"], float((out - ref8).abs().max()) / scale)
        w, b = q8.weight.detach(), q8.bias
        if isinstance(q8, QuantLinear):
            fp = lambda: F.linear(a, w, b)  # noqa: E731
        else:
            fp = lambda: q8._conv_forward(a, w, b)  # noqa: E731
        d = by_kind.setdefault(layer_kind(q8), {"layers": 0, "fp32": 0.0, "fakequant": 0.0, "int8": 0.0})
        d["layers"] += 1
        d["fp32"] += median_ms(fp, runs, 1)
        d["fakequant"] += median_ms(lambda: q8(a), runs, 1)
        d["int8"] += median_ms(lambda: qi(a), runs, 1)
    return [dict(kind=k, **v) for k, v in sorted(by_kind.items())], worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:cifar10-ddpm")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per end-to-end measurement (median)")
    ap.add_argument("--layer-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--psnr-samples", type=int, default=16)
    ap.add_argument("--psnr-steps", type=int, default=20)
    ap.add_argument("--calib-num", type=int, default=16, help="calibration trajectories per step")
    ap.add_argument("--calib-steps", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--wait-idle", type=float, default=0.0, help="seconds to wait for load < --max-load")
    ap.add_argument("--weight-symmetric", action="store_true", help="symmetric weights (no asymmetric-weight correction)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.layer_runs, args.psnr_samples, args.psnr_steps, args.calib_num = 3, 2, 4, 5, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")"
    date = datetime.date.today().isoformat()
    device = f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}"

    lm = load_model(args.model)
    fp, sched = lm.model.eval(), lm.scheduler
    cfg = build_config(8, 8, weight_symmetric=args.weight_symmetric)
    t0 = time.perf_counter()
    cal = get_calibration(fp, sched, CalibOptions(num_per_step=args.calib_num, num_steps=args.calib_steps,
                                                  spec=SamplerSpec("ddim", 20)), progress=False)
    qmodel = run_ptq(fp, cfg, "naive", cal, progress=False).eval()
    calib_s = time.perf_counter() - t0
    int8 = convert_cpu(qmodel)
    rep = cpu_int8_report(int8)
    sim7 = simulate_cpu_int8(qmodel)
    print(rep.summary(), f"\n(calibration {calib_s:.1f} s)", flush=True)
    fp_nchw = fp
    fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)

    rows: list[dict] = []
    base = dict(model=args.model, weight_symmetric=args.weight_symmetric, device=device, date=date, command=command, threads=args.threads,
                reduce_range=rep.reduce_range, converted_layers=len(rep.converted), kept_fp32_layers=len(rep.kept_float))

    # ---- correctness: DDIM samples with the same seeds --------------------------------------------
    spec = SamplerSpec("ddim", args.psnr_steps)
    kw = dict(num=args.psnr_samples, seed=0, spec=spec, batch_size=args.psnr_samples, progress=False)
    with torch.no_grad():
        s_fp = sample(fp_nchw, sched, **kw).images
        s_q8 = sample(qmodel, sched, **kw).images
        s_q7 = sample(sim7, sched, **kw).images
        s_i8 = sample(int8, sched, **kw).images
        # noise floor: the same fake-quant model with another thread count (fp32 accumulation order only)
        torch.set_num_threads(1 if args.threads != 1 else 2)
        s_q7b = sample(sim7, sched, **kw).images
        torch.set_num_threads(args.threads)
    quality = dict(
        psnr_int8_vs_fakequant_w8a8=float(np.mean(psnr(s_i8, s_q8))),
        psnr_int8_vs_fakequant_kernel_grid=float(np.mean(psnr(s_i8, s_q7))),
        psnr_fakequant_w8a8_vs_fp32=float(np.mean(psnr(s_q8, s_fp))),
        psnr_int8_vs_fp32=float(np.mean(psnr(s_i8, s_fp))),
        psnr_kernel_grid_other_thread_count=float(np.mean(psnr(s_q7b, s_q7))),
        psnr_samples=args.psnr_samples, psnr_sampler=f"ddim-{args.psnr_steps}",
    )
    print(json.dumps(quality, indent=1), flush=True)

    # ---- latency -----------------------------------------------------------------------------------
    with torch.no_grad():
        for b in [int(v) for v in args.batches.split(",")]:
            g = torch.Generator().manual_seed(b)
            x = torch.randn(b, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size, generator=g)
            t = torch.full((b,), 500, dtype=torch.long)
            la0 = wait_idle(args.max_load, args.wait_idle)
            variants = {
                "fp32": lambda: fp_nchw(x, t),
                "fp32_channels_last": lambda: fp_cl(x.contiguous(memory_format=torch.channels_last), t),
                "fakequant_w8a8": lambda: qmodel(x, t),
                "int8_onednn": lambda: int8(x, t),
            }
            ms = {}
            for name, fn in variants.items():
                la = load1()
                ms[name] = median_ms(fn, args.runs)
                rows.append(dict(base, batch=b, variant=name, scope="end_to_end", ms=round(ms[name], 3), load_avg_1min=la))
                print(f"batch {b:3d} {name:22s} {ms[name]:9.2f} ms   (load {la})", flush=True)
            ref = ms["fp32"]
            best_fp = min(ms["fp32"], ms["fp32_channels_last"])
            for r in rows:
                if r["batch"] == b and r["scope"] == "end_to_end":
                    r["speedup_vs_fp32"] = round(ref / r["ms"], 3)
                    r["speedup_vs_best_fp32"] = round(best_fp / r["ms"], 3)
                    r["speedup_vs_fakequant"] = round(ms["fakequant_w8a8"] / r["ms"], 3)
            kinds, worst = per_layer(qmodel, sim7, int8, x, t, args.layer_runs)
            la1 = load1()
            for k in kinds:
                for v in ("fp32", "fakequant", "int8"):
                    rows.append(dict(base, batch=b, variant=v if v != "int8" else "int8_onednn", scope=f"layers:{k['kind']}",
                                     layers=k["layers"], ms=round(k[v], 3), speedup_vs_fp32=round(k["fp32"] / k[v], 3),
                                     load_avg_1min=la1))
                print(f"batch {b:3d} {k['kind']:8s} x{k['layers']:3d}  fp32 {k['fp32']:8.2f}  fakequant {k['fakequant']:8.2f}  "
                      f"int8 {k['int8']:8.2f} ms  ({k['fp32'] / k['int8']:.2f}x)", flush=True)
            rows.append(dict(base, batch=b, variant="int8_onednn", scope="per_layer_error", **worst, load_avg_1min=la1))
            print("per-layer error:", worst, f"load before/after: {la0}/{la1}", flush=True)
    out = dict(command=command, date=date, device=device, calib_seconds=round(calib_s, 1),
               conversion=rep.to_dict(), quality=quality, rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
