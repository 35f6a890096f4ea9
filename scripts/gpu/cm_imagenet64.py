"""GPU job (issue 6): the openai/diffusers-cd_imagenet64_l2 architecture (class-conditional UNet2DModel,
295.9M parameters, CMStochasticIterativeScheduler N=40) with random weights through
calibration over the consistency chains (class labels as conditioning) -> quantize -> save -> load -> 1-step
sample, for naive W8A8 and Q-Diffusion (``fast`` preset with few iterations, W4A8), recording wall time and peak
GPU memory per stage.

    python scripts/gpu/cm_imagenet64.py --out $OUT [--calib-num 32] [--weight-iters 20] [--act-iters 10]

(carry: .whl; run with PYTHONPATH=/tmp/site:$PWD/src after installing the wheel, as scripts/gpu/_zoo_common.sh
does.) Random weights: the images are noise; the point is that the full-size model goes through every stage on
one GPU, and how long / how much memory each stage takes. Loading the real checkpoint needs only its folder
(``diffquant quantize /path/to/diffusers-cd_imagenet64_l2 ...``: pipeline folder with unet/ and scheduler/).
Writes OUT/cm_imagenet64.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from diffquant.algorithms import naive_ptq
from diffquant.algorithms.qdiffusion import PRESETS, qdiffusion_ptq
from diffquant.calibration import capture_calibration_set
from diffquant.config import QuantConfig, QuantScheme
from diffquant.io import load_quantized, save_quantized
from diffquant.models.configs import CD_IMAGENET64_SCHEDULER, build_unet, cd_imagenet64_config, cm_scheduler
from diffquant.quantize import quant_report
from diffquant.sampling import SamplerSpec, sample


class Stages:
    def __init__(self, dev: torch.device) -> None:
        self.dev, self.rows = dev, {}

    def run(self, name: str, fn):
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        rec = {"seconds": round(time.perf_counter() - t0, 2)}
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            rec["allocated_gib_after"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        self.rows[name] = rec
        logging.info("%s: %s", name, rec)
        return out


def dir_mib(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-num", type=int, default=32, help="trajectories per noise level")
    ap.add_argument("--chains", default="1,2", help="calibrate over the noise levels of these chains")
    ap.add_argument("--weight-iters", type=int, default=20)
    ap.add_argument("--act-iters", type=int, default=10)
    ap.add_argument("--num", type=int, default=16, help="1-step samples drawn from each loaded model")
    ap.add_argument("--work", default="/tmp/cm_in64")
    ap.add_argument("--base-channels", type=int, default=192, help="192 = the real width (smoke tests: 32)")
    ap.add_argument("--sample-size", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    st = Stages(dev)
    chains = tuple(int(c) for c in args.chains.split(","))
    labels = [(7 * i) % 1000 for i in range(args.num)]
    result = {"model": "openai/diffusers-cd_imagenet64_l2 layout (models.configs.cd_imagenet64_config), random weights",
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "args": vars(args)}

    conf = cd_imagenet64_config(args.base_channels, args.sample_size)
    result["unet_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in conf.items()}
    model = st.run("build_fp32", lambda: build_unet(conf, seed=0).to(dev).eval())
    result["parameters"] = sum(p.numel() for p in model.parameters())
    sched = cm_scheduler(CD_IMAGENET64_SCHEDULER)
    st.run("fp_sample_1step", lambda: sample(model, sched, num=args.num, seed=0, spec=SamplerSpec("cm", 1),
                                             class_labels=labels, batch_size=args.num, progress=False))
    cal = st.run("calibration_capture", lambda: capture_calibration_set(
        model, sched, num_per_step=args.calib_num, spec=SamplerSpec("cm", max(chains)), cm_chains=chains,
        batch_size=32, device=dev, progress=False))
    result["calibration"] = {"rows": len(cal), "levels": cal.meta["levels"], "cond": sorted(cal.cond),
                             "distinct_labels": int(cal.cond["class_labels"].unique().numel())}

    runs = {
        "naive_w8a8": (QuantConfig(weight=QuantScheme(8, granularity="per_channel"), act=QuantScheme(8), softmax_bits=8),
                       lambda cfg: naive_ptq(model, cfg, cal, device=dev, batch_size=32, progress=False)),
        "qdiffusion_fast_w4a8": (
            QuantConfig(weight=QuantScheme(4, granularity="per_channel", estimator="lp"),
                        act=QuantScheme(8, estimator="lp"), softmax_bits=8),
            lambda cfg: qdiffusion_ptq(model, cfg, cal, device=dev, progress=False,
                                       recon=dataclasses.replace(PRESETS["fast"], weight_iters=args.weight_iters,
                                                                 act_iters=args.act_iters, batch_size=16))),
    }
    for name, (cfg, fn) in runs.items():
        try:
            q = st.run(f"{name}/quantize", lambda: fn(cfg))
            folder = work / name
            st.run(f"{name}/save", lambda q=q, folder=folder: save_quantized(q, folder, sched))
            rep = quant_report(q)
            del q
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            loaded = st.run(f"{name}/load", lambda: load_quantized(folder, device=dev))
            res = st.run(f"{name}/sample_1step", lambda loaded=loaded: sample(
                loaded.model, loaded.scheduler, num=args.num, seed=0, spec=SamplerSpec("cm", 1), class_labels=labels,
                batch_size=args.num, device=dev, progress=False, return_float=True))
            result[name] = {"config": cfg.describe(), "checkpoint_mib": dir_mib(folder),
                            "fp16_mib": round(rep.fp16_bytes / 2**20, 1), "samples_shape": list(res.images.shape),
                            "finite": bool(torch.isfinite(res.float_images).all()),
                            "sample_std": round(float(res.float_images.std()), 4)}
            del loaded
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - record and go on to the next method
            logging.exception("%s failed", name)
            result[name] = {"error": f"{type(e).__name__}: {e}"}
    result["stages"] = st.rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cm_imagenet64.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["stages"]))


if __name__ == "__main__":
    main()
