"""Kernels of SD-1.5 b8's 64x64 level, each launched a few times, for Nsight Compute (``scripts/gpu/ncu_probe.sh``):
diffquant::linear_geglu (default config and overrides), the bare FP8 GEMM of the same shape through
torch._scaled_mm (cuBLAS), and diffquant::group_norm_act's three kernels (64x64, 320 channels, e4m3 out).

    python3 scripts/gpu/ncu_probe.py [--geglu-configs '[{}, {"num_stages": 3}]']
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geglu-configs", default='[{}, {"num_stages": 3}]')
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    from diffquant.kernels import ops
    from diffquant.kernels.reference import quantize_act_fp8
    from diffquant.kernels.triton_geglu import linear_geglu_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, i = 8 * 4096, 320, 1280
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    sa = (x.float().abs().amax() / 448).reshape(1)
    xq = quantize_act_fp8(x, sa)
    w = torch.randn(2 * i, k, device="cuda", generator=g) * 0.05
    ws = w.abs().amax(1) / 448
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    b = torch.randn(2 * i, device="cuda", generator=g)
    so = torch.tensor([0.01], device="cuda")
    for cfg in json.loads(a.geglu_configs):
        for _ in range(a.reps):
            linear_geglu_triton(xq, wq, ws, sa, b, so, torch.float8_e4m3fn, config=cfg)
    one = torch.ones(1, 1, device="cuda")
    for _ in range(a.reps):  # cuBLAS: the same GEMM to bf16, then to e4m3 with an output scale
        torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    # group norm + SiLU + e4m3, 64x64, 320 channels, batch 8, channels-last
    h = torch.randn(8, 320, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)
    gw = torch.randn(320, device="cuda", generator=g)
    gb = torch.randn(320, device="cuda", generator=g)
    for _ in range(a.reps):
        ops.group_norm_act(h, None, None, gw, gb, 32, 1e-5, True, so, torch.float8_e4m3fn)
    torch.cuda.synchronize()
    print("ncu_probe done")


if __name__ == "__main__":
    main()
