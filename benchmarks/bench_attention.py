"""diffquant's FP8 attention alone on the GPU, on the SD-1.5 UNet's attention shapes (batch 8, 64x64 latents, 8
heads; self-attention at each level and cross-attention on 77 text tokens): the Triton kernel
(``diffquant::fp8_attention_fp8`` on e4m3 Q, K, V; bf16 and e4m3 output) under a few block configs (the default
first), the whole op with its Q/K/V quantization compiled, and bf16 ``F.scaled_dot_product_attention`` through
cuDNN (what the compiled bf16 and FP8 models run now) and FlashAttention-2 (``sdpa_bf16_ms``: the faster). Per
shape: ms of each, the error of the FP8 output against float attention, and
``exp_bound_ms``: a calculation, not a measurement (B x H x Sq x Sk exponentials at the 3.9e12 special-function
operations per second that the FlashAttention-3 paper gives for the H100 SXM5). The summary weighs each shape by
its calls in one UNet call.

    python benchmarks/bench_attention.py [--out benchmarks/results/attention.json] [--reps 50]
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (label, calls per UNet call, B, H, Sq, Sk, D): SD-1.5, batch 8, 64x64 latents; 5 transformer blocks at each of
# the 64x64, 32x32 and 16x16 levels (2 down, 3 up), 1 in the mid block at 8x8
SHAPES = [("64x64 self", 5, 8, 8, 4096, 4096, 40), ("64x64 cross", 5, 8, 8, 4096, 77, 40),
          ("32x32 self", 5, 8, 8, 1024, 1024, 80), ("32x32 cross", 5, 8, 8, 1024, 77, 80),
          ("16x16 self", 5, 8, 8, 256, 256, 160), ("16x16 cross", 5, 8, 8, 256, 77, 160),
          ("8x8 self", 1, 8, 8, 64, 64, 160), ("8x8 cross", 1, 8, 8, 64, 77, 160)]
CONFIGS = [None, dict(BLOCK_M=128, num_warps=8, num_stages=3), dict(BLOCK_M=128, num_warps=4, num_stages=3),
           dict(BLOCK_M=64, num_warps=4, num_stages=3), dict(BLOCK_M=64, num_warps=8, num_stages=2)]
SFU_PER_S = 3.9e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    from diffquant.kernels.bench import time_call, write_gpu_result
    from diffquant.kernels.ops import ATTN_BLOCK_N, fp8_attention
    from diffquant.kernels.reference import fp8_attention_quantize
    from diffquant.kernels.triton_attention import fp8_attention_triton, pick_attn_config

    rows = []
    for label, calls, b, h, sq, sk, d in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for s in (sq, sk, sk))
        scale = d ** -0.5
        q8, k8, v8, s_q, s_k, s_v = fp8_attention_quantize(q, k, v)
        v8 = v8.transpose(-1, -2).contiguous().transpose(-1, -2)  # keys contiguous, as the op hands it over
        o_scale = torch.tensor([0.01], device="cuda")
        row = {"shape": label, "calls_per_unet": calls, "B": b, "H": h, "Sq": sq, "Sk": sk, "D": d,
               "exp_bound_ms": round(b * h * sq * sk / SFU_PER_S * 1e3, 5)}
        with torch.no_grad():
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            # cuDNN's kernel is what the compiled bf16 SD-1.5 model ran (its profile); FlashAttention-2 beside it
            for bname, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                def sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v)
                try:
                    row[f"sdpa_{bname}_ms"] = round(time_call(sdpa, reps=a.reps)[0], 5)
                except RuntimeError as e:  # no such kernel for this shape / build
                    row[f"sdpa_{bname}_error"] = str(e).splitlines()[0][:200]
            sdpa_ms = [row[k] for k in ("sdpa_cudnn_ms", "sdpa_flash_ms") if k in row]
            if sdpa_ms:
                row["sdpa_bf16_ms"] = min(sdpa_ms)
            op = torch.compile(partial(fp8_attention, sm_scale=scale), dynamic=True)
            got = op(q, k, v)
            row["fp8_op_compiled_rel_err"] = round(float((got.float() - exact).norm() / exact.norm()), 5)
            row["fp8_op_compiled_ms"] = round(time_call(lambda: op(q, k, v), reps=a.reps)[0], 5)
            for cfg in CONFIGS:
                name = "kernel_default" if cfg is None else "kernel_" + "_".join(str(x) for x in cfg.values())
                try:
                    got = fp8_attention_triton(q8, k8, v8, s_q, s_k, s_v, scale, torch.bfloat16,
                                               block_n=ATTN_BLOCK_N, config=cfg)
                    row[name + "_rel_err"] = round(float((got.float() - exact).norm() / exact.norm()), 5)
                    row[name + "_ms"] = round(time_call(lambda cfg=cfg: fp8_attention_triton(
                        q8, k8, v8, s_q, s_k, s_v, scale, torch.bfloat16, block_n=ATTN_BLOCK_N, config=cfg),
                        reps=a.reps)[0], 5)
                except Exception as e:  # out of resources: not a config for this GPU
                    row[name + "_error"] = str(e).splitlines()[0][:200]
            row["kernel_e4m3_out_ms"] = round(time_call(lambda: fp8_attention_triton(
                q8, k8, v8, s_q, s_k, s_v, scale, torch.float8_e4m3fn, block_n=ATTN_BLOCK_N, out_scale=o_scale),
                reps=a.reps)[0], 5)
        row["default_config"] = pick_attn_config(sq, max(32, 1 << (d - 1).bit_length()))
        kern = [v for key, v in row.items() if key.startswith("kernel_") and key.endswith("_ms")
                and key != "kernel_e4m3_out_ms"]
        if kern:
            row["best_kernel_ms"] = min(kern)
            if "sdpa_bf16_ms" in row:
                row["speedup_vs_sdpa_bf16"] = round(row["sdpa_bf16_ms"] / row["best_kernel_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] * r["calls_per_unet"] for r in rows if k in r), 4)
             for k in ("sdpa_bf16_ms", "kernel_default_ms", "best_kernel_ms", "fp8_op_compiled_ms", "exp_bound_ms")}
    print("per UNet call (ms):", json.dumps(total))
    write_gpu_result(a.out, rows, per_unet_call=total)


if __name__ == "__main__":
    main()
