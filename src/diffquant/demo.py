"""The main job on the bundled default model: full precision vs naive W8A8 vs naive W4A8, same
seeds, small enough for a CPU in a few minutes. Writes a report folder (grids, JSON, Markdown)."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from diffquant.commands._common import format_table

log = logging.getLogger(__name__)

VARIANTS = (("FP", 16, 16), ("W8A8", 8, 8), ("W4A8", 4, 8))


def default_model() -> str:
    from diffquant import zoo

    return "zoo:cifar10-ddpm" if "cifar10-ddpm" in zoo.available() else "zoo:tiny-random"


def run_demo(out_dir: str | Path = "diffquant-demo", *, model: Optional[str] = None, num: int = 64, steps: int = 20,
             calib_num: int = 32, calib_st: int = 10, seed: int = 0, device: Any = "cpu",
             progress: bool = True) -> dict[str, Any]:
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.models.loading import load_model
    from diffquant.quantize import quant_report
    from diffquant.recipes import CalibOptions, build_config, get_calibration, run_ptq
    from diffquant.sampling import SamplerSpec, sample, save_samples
    from diffquant.viz import save_grid, save_side_by_side

    model = model or default_model()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    loaded = load_model(model, device=device)
    spec = SamplerSpec("ddim", steps, "uniform", 0.0)
    t0 = time.perf_counter()
    calib = get_calibration(loaded.model, loaded.scheduler,
                            CalibOptions(calib_num, calib_st, spec, batch_size=calib_num), device, progress=progress)
    capture_s = time.perf_counter() - t0

    rows, panels, fp_images = [], [], None
    for name, wb, ab in VARIANTS:
        t0 = time.perf_counter()
        if name == "FP":
            m, calib_s, size = loaded.model, 0.0, None
        else:
            cfg = build_config(wb, ab)
            m = run_ptq(loaded.model, cfg, "naive", calib, device=device, progress=progress)
            calib_s = time.perf_counter() - t0
            size = quant_report(m).quantized_bytes
        t1 = time.perf_counter()
        res = sample(m, loaded.scheduler, num=num, seed=seed, spec=spec, batch_size=num, device=device, progress=progress)
        sample_s = time.perf_counter() - t1
        save_samples(out / f"samples_{name}.npz", res.images, res.seeds, {**res.meta, "model": model, "variant": name})
        save_grid(res.images, out / f"grid_{name}.png", nrow=8, scale=2)
        panels.append((name, res.images))
        if name == "FP":
            fp_images = res.images
            size = quant_report(m).fp16_bytes
            fid = None
        else:
            fid = paired_fidelity(fp_images, res.images)
        rows.append({
            "variant": name, "weight_bits": wb, "act_bits": ab, "size_MiB": size / 2**20,
            "calib_s": calib_s, "sample_s": sample_s,
            "psnr_vs_fp": None if fid is None else fid["psnr_of_mean_mse"],
            "ssim_vs_fp": None if fid is None else fid["ssim"]["mean"],
        })
        log.info("demo: %s done", name)
    save_side_by_side(panels, out / "side_by_side.png", nrow=8)
    env = {"model": model, "num": num, "sampler": spec.to_dict(), "calib_rows": len(calib), "capture_s": capture_s,
           "device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "date": _dt.date.today().isoformat()}
    result = {"env": env, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows, floatfmt=".3g")
    md = [f"# diffquant demo: {model}", "",
          f"FP vs naive PTQ, {num} samples, DDIM {steps} steps, identical seeds {seed}..{seed + num - 1}; "
          f"calibration: {len(calib)} inputs ({calib_num} trajectories x {calib_st} steps), "
          f"device {env['device']} ({env['cpu']}, {env['threads']} threads), {env['date']}.", "",
          "```", table, "```", "", "![side by side](side_by_side.png)", ""]
    if model == "zoo:tiny-random":
        md.insert(2, "**zoo:tiny-random has random weights: its samples are noise, and random denoisers are chaotic "
                     "under DDIM, so PSNR vs FP is low for every variant. It stands in until a trained model is bundled.**\n")
    (out / "report.md").write_text("\n".join(md))
    result["table"] = table
    return result
