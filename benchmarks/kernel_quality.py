"""Issue 7 quality check (GPU): images sampled with the real low-bit kernels vs the fake-quant simulation.

    python benchmarks/kernel_quality.py [--n 500] [--steps 20] [--backends int8,int8:conv_out,fp8,w4a8,w4a16]
                                        [--out benchmarks/results/kernel_quality.json]

A backend ``NAME[:PATTERN][+fp8attn][+dyntensor|+dyntoken][+gn][+qkv]``: ``+gn`` runs the ResNet blocks' norms + SiLU as
``diffquant::group_norm_act``, which writes the convs' quantized input (``convert(..., fuse_norms=True)``); ``+qkv``
stacks each attention block's Q/K/V into one GEMM (``fuse_qkv=True``; with ``+gn`` the attention input norm runs
into it too);
``+fp8attn`` also converts the attention blocks to FP8
(``convert(..., attention="fp8")``; the fake-quant model keeps float attention, so real vs fake then includes
the FP8 attention's error); ``+dyntensor`` / ``+dyntoken`` convert FP8 layers with dynamic activation scales per call
/ per token (``convert(..., fp8_dynamic=...)``; real vs fake then includes the change from the calibrated static
scales). Runs on the CPU too (the reference ops), slowly.

For each backend: zoo:cifar10-ddpm quantized with ``config_for_backend(backend)`` (min-max ranges from a DDIM
calibration set; ``NAME:PATTERN`` leaves matching layers in float), sampled with DDIM from the same seeds three
ways in fp32 I/O: the full-precision model, the calibrated fake-quant model, and that model after
``convert(backend)`` (real packed weights and kernels). Reports PSNR/SSIM of real vs fake (the issue's >= 40 dB
check for INT8), real vs FP and fake vs FP, what was converted, and the wall time of each sampling run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--backends", default="int8,int8:conv_out,fp8,fp8:conv_out,w4a8,w4a16")
    ap.add_argument("--calib-per-step", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/kernel_quality.json")
    a = ap.parse_args()
    from diffquant.convert import config_for_backend, convert
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.models.loading import load_model
    from diffquant.recipes import CalibOptions, get_calibration, run_ptq
    from diffquant.sampling.large import sample_fixed
    from diffquant.sampling.samplers import SamplerSpec

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model("zoo:cifar10-ddpm", device=dev)
    spec = SamplerSpec("ddim", a.steps)

    def draw(m):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x = sample_fixed(m, lm.scheduler, start=0, stop=a.n, spec=spec, batch_size=a.batch, compute_batch=a.batch,
                         device=dev)[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return x, time.perf_counter() - t

    fp, fp_s = draw(lm.model)
    calib = get_calibration(lm.model, lm.scheduler, CalibOptions(a.calib_per_step, a.steps, spec), dev, progress=False)
    res = {"command": shlex.join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "model": "zoo:cifar10-ddpm", "n": a.n, "sampler": f"ddim-{a.steps}", "fp_seconds": round(fp_s, 2),
           "calib_rows": len(calib), "rows": []}
    for b in filter(None, a.backends.split(",")):
        base, *flags = b.split("+")
        attention = "fp8" if "fp8attn" in flags else "float"
        dynamic = "token" if "dyntoken" in flags else "tensor" if "dyntensor" in flags else False
        name, *keep = base.split(":")
        fuse_norms, fuse_qkv = "gn" in flags, "qkv" in flags
        row = {"backend": name, "keep_float": keep, "attention": attention, "fp8_dynamic": dynamic,
               "fuse_norms": fuse_norms, "fuse_qkv": fuse_qkv}
        try:
            q = run_ptq(lm.model, config_for_backend(name, keep_float=keep), "naive", calib, device=dev, progress=False)
            fake, fake_s = draw(q)
            real_m = convert(q, name, attention=attention, unsupported="simulate", fp8_dynamic=dynamic,
                             fuse_norms=fuse_norms, fuse_qkv=fuse_qkv)
            rep = real_m._diffquant_convert_report
            real, real_s = draw(real_m)
            rf, ff, rfp = paired_fidelity(fake, real), paired_fidelity(fp, fake), paired_fidelity(fp, real)
            row.update({
                "psnr_real_vs_fake": round(rf["psnr"]["mean"], 2), "psnr_real_vs_fake_min": round(rf["psnr"]["min"], 2)
                if "min" in rf["psnr"] else None, "ssim_real_vs_fake": round(rf["ssim"]["mean"], 4),
                "psnr_fake_vs_fp": round(ff["psnr"]["mean"], 2), "psnr_real_vs_fp": round(rfp["psnr"]["mean"], 2),
                "max_abs_pixel_diff_real_vs_fake": int(abs(real.astype("int16") - fake.astype("int16")).max()),
                "converted": len(rep.converted), "kept": rep.kept, "fake_seconds": round(fake_s, 2),
                "real_seconds": round(real_s, 2)})
            del q, real_m
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
