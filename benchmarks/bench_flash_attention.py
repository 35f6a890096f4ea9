"""diffquant's bf16 flash attention (the Gluon kernel of ``diffquant::flash_attention``, for Hopper) against bf16
``F.scaled_dot_product_attention`` through cuDNN (what the compiled bf16 and diffquant SD-1.5 models run) on the
SD-1.5 UNet's attention shapes at batch 8 (``bench_attention.SHAPES``). Q, K and V are column slices of one stacked
[B, S, 3 x H x D] projection output (self-attention) or of a [B, Sq, H x D] and a stacked [B, 77, 2 x H x D] one
(cross-attention), as in the model; SDPA gets the same views. Per shape: ms of each (median, CUDA graphs), the
kernel under a few configs (the default first), the max abs error of both against fp32 attention, and the
exponential bound (a calculation: B x H x Sq x Sk exponentials at 3.9e12 a second). The summary weighs each shape
by its calls in one UNet call. Exits non-zero if the kernel's error exceeds 3x SDPA's plus 1e-3 anywhere.

    python benchmarks/bench_flash_attention.py [--out benchmarks/results/flash_attention.json] [--reps 50]
        [--shapes "64x64 self,32x32 self"] [--configs "BLOCK_N=128,STAGES=2;BLOCK_N=64,STAGES=3"]
    ncu ... --profile-from-start off python benchmarks/bench_flash_attention.py --ncu --shapes "64x64 self"
        (one launch of each config and one of cuDNN's kernel per shape inside the profiler range; nothing timed)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import SFU_PER_S, SHAPES  # noqa: E402

CONFIGS = "BLOCK_N=128;BLOCK_N=128,STAGES=2;BLOCK_N=64"


def _configs(text: str) -> list:
    out = []
    for part in filter(None, text.split(";")):
        out.append({k: int(v) for k, v in (kv.split("=") for kv in part.split(","))})
    return out


def _inputs(b: int, h: int, sq: int, sk: int, d: int, cross: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    c = h * d
    if not cross:
        qkv = torch.randn(b, sq, 3 * c, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = qkv.split(c, dim=-1)
    else:
        q = torch.randn(b, sq, c, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = torch.randn(b, sk, 2 * c, device="cuda", generator=g, dtype=torch.bfloat16).split(c, dim=-1)
    return [x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/flash_attention.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", default="", help="comma-separated shape labels (default: all)")
    ap.add_argument("--configs", default=CONFIGS, help="';'-separated kernel configs, 'K=V,K=V' each")
    ap.add_argument("--ncu", action="store_true", help="launch each config once inside a profiler range, no timing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_flash_attention.py needs a CUDA GPU")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffquant.kernels.bench import finish_op_bench, time_call
    from diffquant.kernels.gluon_attention import MAX_HEAD_DIM, flash_attention_gluon, unavailable

    why = unavailable(torch.device("cuda"))
    if why:
        raise SystemExit(f"the Gluon flash attention cannot run here: {why}")
    wanted = set(filter(None, a.shapes.split(",")))
    rows, bad = [], []
    for label, calls, b, h, sq, sk, d in SHAPES:
        if wanted and label not in wanted:
            continue
        q, k, v = _inputs(b, h, sq, sk, d, cross="cross" in label)
        scale = d ** -0.5
        if a.ncu:
            for cfg in _configs(a.configs):
                flash_attention_gluon(q, k, v, scale, config=cfg)  # compiled outside the range
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            for cfg in _configs(a.configs):
                flash_attention_gluon(q, k, v, scale, config=cfg)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, scale=scale)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            continue
        row = {"shape": label, "calls_per_unet": calls, "B": b, "H": h, "Sq": sq, "Sk": sk, "D": d,
               "exp_bound_ms": round(b * h * sq * sk / SFU_PER_S * 1e3, 5)}
        with torch.no_grad():
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)

            def sdpa():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            row["sdpa_cudnn_err"] = round(float((sdpa().float() - exact).abs().max()), 5)
            row["sdpa_cudnn_ms"] = round(time_call(sdpa, reps=a.reps)[0], 5)
            for i, cfg in enumerate(_configs(a.configs)):
                if d > MAX_HEAD_DIM:  # diffquant::flash_attention runs SDPA there
                    row["kernel_skipped"] = f"head dim {d} > {MAX_HEAD_DIM}"
                    break
                name = "kernel_" + "_".join(f"{k_}{v_}" for k_, v_ in cfg.items())
                try:
                    got = flash_attention_gluon(q, k, v, scale, config=cfg)
                    err = float((got.float() - exact).abs().max())
                    row[name + "_err"] = round(err, 5)
                    if not err <= 3 * row["sdpa_cudnn_err"] + 1e-3:
                        bad.append(f"{label} {name}: max abs error {err:.4g} (cuDNN {row['sdpa_cudnn_err']:.4g})")
                    row[name + "_ms"] = round(time_call(lambda cfg=cfg: flash_attention_gluon(q, k, v, scale, config=cfg),
                                                        reps=a.reps)[0], 5)
                    if i == 0:
                        row["kernel_default_ms"] = row[name + "_ms"]
                except Exception as e:  # out of resources: not a config for this GPU
                    row[name + "_error"] = str(e).splitlines()[0][:300]
                    if i == 0:
                        bad.append(f"{label}: the default config failed: {row[name + '_error']}")
        kern = [v_ for key, v_ in row.items() if key.startswith("kernel_") and key.endswith("_ms")]
        if kern:
            row["best_kernel_ms"] = min(kern)
            row["speedup_vs_cudnn"] = round(row["sdpa_cudnn_ms"] / row["best_kernel_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.ncu:
        return
    total = {k: round(sum(r[k] * r["calls_per_unet"] for r in rows if k in r), 4)
             for k in ("sdpa_cudnn_ms", "kernel_default_ms", "best_kernel_ms", "exp_bound_ms")}
    total["sdpa_cudnn_ms_kernel_shapes"] = round(sum(r["sdpa_cudnn_ms"] * r["calls_per_unet"] for r in rows
                                                    if "kernel_default_ms" in r), 4)
    finish_op_bench(a.out, rows, total, bad)


if __name__ == "__main__":
    main()
