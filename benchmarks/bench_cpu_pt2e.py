"""CPU int8 through PyTorch's own PTQ stack (issue 7, item 3): torchao's pt2e flow with the X86 Inductor quantizer.

    pip install torchao            # the optional extra diffquant[cpu-int8] (part of [test])
    python benchmarks/bench_cpu_pt2e.py --batches 2,16 --runs 7 --out benchmarks/results/cpu_pt2e.json

:func:`diffquant.kernels.cpu_pt2e.quantize_pt2e_x86` on zoo:cifar10-ddpm: the UNet is exported (torch.export),
prepared with ``X86InductorQuantizer`` (static per-tensor uint8 activations, per-channel int8 weights: the
classic PyTorch PTQ recipe), calibrated on
diffquant's time-step-aware calibration set (inputs of the FP DDIM sampler), converted, and compiled by Inductor
with freezing (int8 weights prepacked, quantize/dequantize fused into oneDNN int8 convolutions and linears).
Timed against fp32 eager and fp32 compiled (freezing too), median of ``--runs`` forward passes per batch size.
Quality: relative L2 error of the predicted noise against fp32 on 32 rows of the calibration set, next to diffquant's
own fake-quant model of the same scheme (``config_for_backend('int8')``), and PSNR of DDIM samples vs fp32.
``--reduce-range``: 7-bit activations (``auto``, the default: where the CPU lacks VNNI, see
:func:`diffquant.kernels.cpu_pt2e.cpu_has_vnni`); ``--also-full-range`` adds the error of a compiled full-range model
(what a CPU without VNNI computes without the reduced range).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def _median_ms(fn, args, runs: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(*args)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(*args)
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,16", help="2..63 (the export's range)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-num", type=int, default=16, help="calibration trajectories (x 10 time steps)")
    ap.add_argument("--psnr-samples", type=int, default=8)
    ap.add_argument("--psnr-steps", type=int, default=10)
    ap.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                    help="7-bit activations: auto (where the CPU lacks VNNI), on, off")
    ap.add_argument("--also-full-range", action="store_true",
                    help="also build a compiled model with full-range activations and report its error")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch._inductor.config as icfg

    from diffquant.kernels.cpu_pt2e import _Eps, cpu_has_vnni, quantize_pt2e_x86, torchao_available

    if not torchao_available():
        raise SystemExit("this benchmark needs torchao (pip install torchao)")

    from diffquant.convert import config_for_backend
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.models.loading import load_model
    from diffquant.quantize import calibrate, quantize
    from diffquant.recipes import CalibOptions, get_calibration
    from diffquant.sampling.large import sample_fixed
    from diffquant.sampling.samplers import SamplerSpec

    torch.set_num_threads(a.threads)
    lm = load_model("zoo:cifar10-ddpm")
    fp = lm.model.eval()
    spec = SamplerSpec("ddim", 20)
    cal = get_calibration(fp, lm.scheduler, CalibOptions(a.calib_num, 10, spec), progress=False)
    n_cal = len(cal)
    hold = cal.subset(min(32, n_cal // 4), seed=1)
    xs_h, ts_h = hold.xs.float(), hold.ts.float()

    rr = {"auto": None, "on": True, "off": False}[a.reduce_range]
    t0 = time.perf_counter()
    q_c = quantize_pt2e_x86(fp, cal, compile=True, reduce_range=rr)  # export, prepare, calibrate, convert, compile
    q_s = time.perf_counter() - t0
    converted = quantize_pt2e_x86(fp, cal, compile=False, reduce_range=q_c.reduce_range)  # without Inductor
    full = quantize_pt2e_x86(fp, cal, compile=True, reduce_range=False) if a.also_full_range else None

    # diffquant's fake-quant model of the same scheme, calibrated on the same data
    dq = quantize(fp, config_for_backend("int8"))
    with torch.no_grad(), calibrate(dq):
        for i in range(0, n_cal, 32):
            dq(cal.xs[i:i + 32].float(), cal.ts[i:i + 32].float())

    ex = (cal.xs[:2].float(), cal.ts[:2].float())
    with torch.no_grad():
        t0 = time.perf_counter()
        with icfg.patch(freezing=True):
            fp_c = torch.compile(_Eps(fp, False))
            fp_c(*ex)
        fp_compile_s = time.perf_counter() - t0
        ref = _Eps(fp, False)(xs_h, ts_h)
        err = {"pt2e_int8_compiled": _rel(q_c(xs_h, ts_h), ref), "pt2e_int8_uncompiled": _rel(converted(xs_h, ts_h), ref),
               "diffquant_fake_int8": _rel(_Eps(dq, False)(xs_h, ts_h), ref)}
        err["pt2e_vs_diffquant_fake"] = _rel(q_c(xs_h, ts_h), _Eps(dq, False)(xs_h, ts_h))
        err["pt2e_compiled_vs_uncompiled"] = _rel(q_c(xs_h, ts_h), converted(xs_h, ts_h))
        if full is not None:
            err["pt2e_int8_compiled_full_range"] = _rel(full(xs_h, ts_h), ref)

    def fp_compiled(*args):
        with icfg.patch(freezing=True):
            return fp_c(*args)

    rows = []
    for b in [int(v) for v in a.batches.split(",")]:
        x = torch.randn(b, 3, 32, 32)
        t = torch.full((b,), 500.0)
        row = {"batch": b, "fp32_eager_ms": _median_ms(_Eps(fp, False), (x, t), a.runs),
               "fp32_compiled_ms": _median_ms(fp_compiled, (x, t), a.runs),
               "pt2e_int8_compiled_ms": _median_ms(q_c, (x, t), a.runs),
               "diffquant_fake_int8_ms": _median_ms(_Eps(dq, False), (x, t), a.runs)}
        row["int8_speedup_vs_fp32_compiled"] = row["fp32_compiled_ms"] / row["pt2e_int8_compiled_ms"]
        row["int8_speedup_vs_fp32_eager"] = row["fp32_eager_ms"] / row["pt2e_int8_compiled_ms"]
        row["load_avg"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)

    n, steps = a.psnr_samples, a.psnr_steps
    draw = lambda m: sample_fixed(m, lm.scheduler, start=0, stop=n, spec=SamplerSpec("ddim", steps), batch_size=n,
                                  compute_batch=n)[0]
    with torch.no_grad():
        imgs_fp = draw(fp)
        psnr = {"pt2e_int8": paired_fidelity(imgs_fp, draw(q_c))["psnr"]["mean"],
                "diffquant_fake_int8": paired_fidelity(imgs_fp, draw(dq))["psnr"]["mean"]}
    res = {"command": shlex.join(["python", *sys.argv]),
           "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_vnni": cpu_has_vnni(),
           "reduce_range": q_c.reduce_range,
           "torch": torch.__version__, "torchao": __import__("torchao").__version__, "threads": a.threads,
           "model": "zoo:cifar10-ddpm", "calib_rows": n_cal, "compile_s": {"fp32": round(fp_compile_s, 1), "pt2e_int8_export_calibrate_convert_compile": round(q_s, 1)},
           "rel_error_of_eps_vs_fp32": err, "psnr_vs_fp32": psnr,
           "psnr_protocol": f"{n} seeds, DDIM {steps}", "rows": rows}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
