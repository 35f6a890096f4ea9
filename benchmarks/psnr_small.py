"""Small CPU check: PSNR vs FP of a few quantized variants of zoo:cifar10-ddpm (same seeds).

    python benchmarks/psnr_small.py --n 32 --steps 20 naive:4:32 naive:4:32:fl8 ckpt:/path/to/quantized_folder

Variants: ``naive:W:A`` (round-to-nearest, Lp range search), ``naive:W:A:fl8`` (the same with conv_in/conv_out at
8 bits), ``backend:NAME[:OPT...]`` (the configuration the real kernels run, ``config_for_backend(NAME)`` with
NAME in int8/fp8/w4a8/w4a16, min-max ranges; OPT: ``skip=PATTERN`` leaves matching layers in float, ``wonly`` drops
the activation quantizers, ``aonly`` the weight quantizers), ``ckpt:FOLDER`` (a saved quantized checkpoint).
DDIM with uniform spacing, fixed compute batch = n.
A planning tool (seconds to minutes on a CPU), not a substitute for the 10k-sample table.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.io import load_quantized
    from diffquant.models.loading import load_model
    from diffquant.recipes import build_config, run_ptq
    from diffquant.sampling.large import sample_fixed
    from diffquant.sampling.samplers import SamplerSpec

    torch.set_num_threads(a.threads)
    lm = load_model("zoo:cifar10-ddpm")
    spec = SamplerSpec("ddim", a.steps)

    def draw(m):
        return sample_fixed(m, lm.scheduler, start=0, stop=a.n, spec=spec, batch_size=a.n, compute_batch=a.n)[0]

    fp = draw(lm.model)
    rows = []
    for v in a.variants:
        t = time.perf_counter()
        parts = v.split(":")
        if parts[0] == "ckpt":
            q = load_quantized(v[5:]).model
        elif parts[0] == "naive" and len(parts) in (3, 4):
            fl = 8 if len(parts) == 4 and parts[3] == "fl8" else None
            cfg = build_config(int(parts[1]), int(parts[2]), weight_estimator="lp", act_estimator="lp", first_last_bits=fl)
            calib = None
            if cfg.act is not None:
                from diffquant.recipes import CalibOptions, get_calibration

                calib = get_calibration(lm.model, lm.scheduler, CalibOptions(8, 10, spec), progress=False)
            q = run_ptq(lm.model, cfg, "naive", calib, progress=False)
        elif parts[0] == "backend":
            from diffquant.config import LayerOverride
            from diffquant.convert import config_for_backend
            from diffquant.recipes import CalibOptions, get_calibration

            cfg = config_for_backend(parts[1])
            for opt in parts[2:]:
                if opt.startswith("skip="):
                    cfg = cfg.replace(overrides=cfg.overrides + (LayerOverride(opt[5:], skip=True),))
                elif opt == "wonly":
                    cfg = cfg.replace(act=None)
                elif opt == "aonly":
                    cfg = cfg.replace(weight=None)
                else:
                    raise SystemExit(f"bad option {opt!r} in {v!r}; use skip=PATTERN, wonly or aonly")
            calib = None
            if cfg.act is not None:
                calib = get_calibration(lm.model, lm.scheduler, CalibOptions(8, 10, spec), progress=False)
            q = run_ptq(lm.model, cfg, "naive", calib, progress=False)
        else:
            raise SystemExit(f"bad variant {v!r}; use naive:W:A[:fl8], backend:NAME[:OPT...] or ckpt:FOLDER")
        r = paired_fidelity(fp, draw(q))
        rows.append({"variant": v, "psnr_vs_fp": round(r["psnr"]["mean"], 2), "ssim": round(r["ssim"]["mean"], 4),
                     "n": a.n, "ddim_steps": a.steps, "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
