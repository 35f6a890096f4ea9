"""GPU job step: sample DDPM checkpoints (DDIM, quadratic spacing, eta 0) and measure fd_cifar.

    python scripts/gpu/zoo_eval.py --model final=/tmp/ddpm/state --model step2000=/tmp/ddpm/snapshots/ema-step0002000 \
        --classifier DIR --train-stats DIR/cifar10-features_train.npz --n 10000 --steps 100 --out DIR --grid final

Each model is a training state (its EMA weights, rounded to fp16 as bundled) or a bundled zoo
folder. Samples use seeds 0..n-1 (one CPU generator per sample, as diffquant.sampling does);
features in fp32. Writes OUT/<name>_stats.npz, OUT/<name>_grid.png (first 100 samples, 10x10),
OUT/eval.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffquant.evaluation.fid import FeatureStats, frechet_distance, statistics_from_features
from diffquant.zoo.bundle import classifier_features, image_grid, load_bundled_unet
from diffquant.zoo.classifier import load_classifier


def load_unet(path: str, device: str):
    p = Path(path)
    if (p / "state.json").is_file():
        from diffquant.zoo.train_ddpm import ema_unet
        from diffquant.models.configs import DDPM_SCHEDULER
        from diffusers import DDPMScheduler

        model, doc = ema_unet(p, "ema")
        with torch.no_grad():  # the bundled weights are fp16: evaluate exactly those
            for q in model.parameters():
                q.copy_(q.half().float())
        return model.to(device).eval(), DDPMScheduler(**DDPM_SCHEDULER), int(doc["step"])
    model, sched = load_bundled_unet(p)
    return model.to(device).eval(), sched, None


@torch.no_grad()
def own_ddim(model, sched, n, seed, steps, batch, device):
    """Fallback DDIM (eta 0, quadratic spacing, x0 clipped as the scheduler's clip_sample says)."""
    T = sched.config.num_train_timesteps
    acp = sched.alphas_cumprod.to(torch.float64)
    seq = (np.linspace(0, math.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
    nxt = np.concatenate([[-1], seq[:-1]])
    outs = []
    for lo in range(0, n, batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(lo, min(n, lo + batch))]
        x = torch.stack([torch.randn((3, 32, 32), generator=g) for g in gens]).to(device)
        for t, tn in zip(reversed(seq), reversed(nxt)):
            eps = model(x, torch.full((x.shape[0],), int(t), device=device)).sample.float()
            a = acp[int(t)].float().to(device)
            an = (acp[int(tn)] if tn >= 0 else torch.tensor(1.0, dtype=torch.float64)).float().to(device)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt())
            if sched.config.clip_sample:
                x0 = x0.clamp(-1, 1)
            x = an.sqrt() * x0 + (1 - an).sqrt() * eps
        outs.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


def draw(model, sched, n, seed, steps, batch, device):
    try:
        from diffquant.sampling import SamplerSpec, sample

        spec = SamplerSpec(sampler="ddim", steps=steps, spacing="quad", eta=0.0)
        return sample(model, sched, num=n, seed=seed, spec=spec, batch_size=batch, device=device, progress=False).images, "diffquant.sampling"
    except Exception as e:  # noqa: BLE001 - the package sampler missing or changed: fall back, say so
        print(f"diffquant.sampling unavailable ({type(e).__name__}: {e}); using the script's own DDIM", flush=True)
        return own_ddim(model, sched, n, seed, steps, batch, device), "scripts/gpu/zoo_eval.py:own_ddim"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH (training state or zoo folder)")
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--train-stats", required=True)
    ap.add_argument("--test-stats", default=None)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", action="append", default=[], help="NAME of a model whose first 100 samples make a grid")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clf = load_classifier(a.classifier, a.device)
    ref = FeatureStats.load(a.train_stats)
    res = {"n": a.n, "steps": a.steps, "sampler": "ddim", "spacing": "quad", "eta": 0.0, "seed": a.seed,
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", "models": {}}
    if a.test_stats:
        te = FeatureStats.load(a.test_stats)
        res["fd_floor_test_vs_train"] = frechet_distance(te.mu, te.sigma, ref.mu, ref.sigma)
    for spec in a.model:
        name, path = spec.split("=", 1)
        model, sched, step = load_unet(path, a.device)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        imgs, how = draw(model, sched, a.n, a.seed, a.steps, a.batch, a.device)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t_s = time.perf_counter() - t0
        st = statistics_from_features(classifier_features(clf, imgs, a.device))
        st.save(out / f"{name}_stats.npz")
        fd = frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)
        res["models"][name] = {"path": path, "train_step": step, "fd_cifar": fd, "sample_seconds": round(t_s, 1),
                               "sampler_impl": how}
        print(name, json.dumps(res["models"][name]), flush=True)
        if name in a.grid:
            image_grid(imgs[:100], nrow=10).save(out / f"{name}_grid.png")
        (out / "eval.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
