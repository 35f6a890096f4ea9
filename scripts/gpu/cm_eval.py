"""GPU job step (issue 6): quick evaluation of a consistency-distillation state.

    python scripts/gpu/cm_eval.py --state /tmp/cm/carry --n 2000 --steps 1,2,4 --out $OUT [--teacher-steps 100]

Samples n images (seeds 0..n-1, diffquant.sampling's cm path, the EMA weights rounded to fp16 as they would be
bundled) at each step count (and, for a full state, the raw non-EMA student at 1 step); fd_cifar of each against the bundled
CIFAR-10-JPEG train statistics; optionally the teacher (zoo:cifar10-ddpm, DDIM quad, eta 0) on the same n seeds,
so that the values compare at equal n (FD from 2k samples is biased upwards against the 10k numbers).
Writes OUT/cm_eval.json and OUT/cm_grid.png (the first 100 samples at each step count, side by side).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from diffquant.zoo.bundle import image_grid
from diffquant.zoo.train_cm import cm_unet, quick_eval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True, help="CD state folder (full or carry)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--teacher-steps", type=int, default=0, help="also the teacher at DDIM-K (0: skip)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # sampling in fp32, as the CPU would
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    t0 = time.perf_counter()
    model, sched, doc = cm_unet(args.state, "ema")
    res = quick_eval(model, sched, n=args.n, steps=steps, device=dev)
    result = {"state_step": doc["step"], "phase": doc.get("phase"), "images_seen": doc.get("images_seen"),
              "n": args.n, "seeds": f"0..{args.n - 1}", "fd_cifar_ema": res["fd_cifar"],
              "sample_seconds": res["seconds"], "history_tail": doc.get("history_tail", [])[-5:],
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    if doc.get("kind") == "full":  # the raw (non-EMA) student too
        raw, _, _ = cm_unet(args.state, "model")
        result["fd_cifar_model_1step"] = quick_eval(raw, sched, n=args.n, steps=(1,), device=dev)["fd_cifar"]["1"]
    if args.teacher_steps:
        from diffquant.evaluation.features import reference_stats
        from diffquant.evaluation.fid import frechet_distance, statistics_from_features
        from diffquant import zoo
        from diffquant.models.loading import load_model
        from diffquant.sampling import SamplerSpec, sample
        from diffquant.zoo.bundle import classifier_features

        t = load_model("zoo:cifar10-ddpm", device=dev)
        ts = time.perf_counter()
        imgs = sample(t.model, t.scheduler, num=args.n, seed=0, batch_size=500, device=dev, progress=False,
                      spec=SamplerSpec("ddim", args.teacher_steps, "quad", 0.0)).images
        feat = zoo.load("cifar10-features", device=dev).model
        st = statistics_from_features(classifier_features(feat, imgs, dev))
        ref = reference_stats("cifar10-features", "train")
        result["teacher"] = {"sampler": f"ddim-{args.teacher_steps} quad eta 0",
                             "fd_cifar": float(frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)),
                             "seconds": round(time.perf_counter() - ts, 1)}
    grids = [np.asarray(image_grid(res["grids"][str(k)], nrow=10)) for k in steps]
    sep = np.full((grids[0].shape[0], 8, 3), 255, np.uint8)
    row = np.concatenate([x for g in grids for x in (g, sep)][:-1], axis=1)
    from PIL import Image

    Image.fromarray(row).save(out / "cm_grid.png")
    result["grid"] = f"cm_grid.png: first 100 samples (10x10) at {steps} steps, left to right"
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "cm_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history_tail"}))


if __name__ == "__main__":
    main()
