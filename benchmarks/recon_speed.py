"""Speed of the Q-Diffusion block loop and of fake-quant sampling on one GPU (planning numbers).

    python benchmarks/recon_speed.py --device cuda --out /tmp/recon_speed.json

Measures: calibration capture (64 x 20 from DDIM 100), the block loop over all units of
zoo:cifar10-ddpm W4A8 with a few iterations per unit (CUDA graphs on and off; seconds per
iteration per unit), and DDIM-100 sampling throughput of the FP and the fake-quant model.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--weight-iters", type=int, default=300)
    ap.add_argument("--act-iters", type=int, default=150)
    ap.add_argument("--samples", type=int, default=1000)
    a = ap.parse_args()
    from diffquant.algorithms.qdiffusion import ReconConfig, qdiffusion_ptq
    from diffquant.models.loading import load_model
    from diffquant.recipes import CalibOptions, build_config, get_calibration
    from diffquant.sampling.large import sample_fixed
    from diffquant.sampling.samplers import SamplerSpec

    dev = torch.device(a.device)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    lm = load_model("zoo:cifar10-ddpm", device=dev)
    spec = SamplerSpec("ddim", 100)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t = time.perf_counter()
    calib = get_calibration(lm.model, lm.scheduler, CalibOptions(64, 20, spec, batch_size=256), dev, progress=False)
    sync()
    res["capture_64x20_s"] = time.perf_counter() - t
    cfg = build_config(4, 8, weight_estimator="lp", act_estimator="lp")
    for graphs, bs in ((True, 32), (True, 64), (False, 32)):
        wi, ai = (a.weight_iters, a.act_iters) if graphs else (a.weight_iters // 3, a.act_iters // 3)
        rc = ReconConfig(weight_iters=wi, act_iters=ai, batch_size=bs, cuda_graphs=graphs)
        torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
        t = time.perf_counter()
        q = qdiffusion_ptq(lm.model, cfg, calib, recon=rc, device=dev, progress=False)
        sync()
        total = time.perf_counter() - t
        key = f"recon_graphs{int(graphs)}_bs{bs}"
        res[key] = {"total_s": total, "weight_iters": wi, "act_iters": ai,
                    "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
        print(key, json.dumps(res[key]), flush=True)
    for name, model in (("fp", lm.model), ("w4a8_fakequant", q)):
        for cb in (250, 500):
            sample_fixed(model, lm.scheduler, start=0, stop=cb, spec=SamplerSpec("ddim", 5), batch_size=cb, compute_batch=cb, device=dev)
            sync()
            t = time.perf_counter()
            sample_fixed(model, lm.scheduler, start=0, stop=a.samples, spec=spec, batch_size=cb, compute_batch=cb, device=dev)
            sync()
            dt = time.perf_counter() - t
            res[f"sample_{name}_cb{cb}_img_per_s"] = a.samples / dt
            print(name, cb, a.samples / dt, flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
