"""Probe (GPU): the TMA conv kernels against the gather kernel and cuDNN bf16 on a few UNet shapes.

    PYTHONPATH=src python benchmarks/qconv_tma_probe.py [--out probe.json] [--paths tma,tma4d]

FP8 W8A8, bf16 output, per shape: gather kernel (its config: tuned table or heuristic), each TMA kernel (padded
copy: ``tma``; 4-D boxes: ``tma4d``) with a few configs (each output checked against the gather kernel's), cuDNN's
bf16 conv; CUDA-graph replay, median of 20.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (N, C, H, W, Cout, k)
    (8, 320, 64, 64, 320, 3), (256, 128, 32, 32, 128, 3), (8, 1280, 16, 16, 1280, 3), (256, 256, 16, 16, 256, 3),
    (8, 640, 32, 32, 640, 3), (8, 1280, 8, 8, 1280, 3), (8, 320, 64, 64, 320, 1),
]
CONFIGS = [(128, 128, 128, 4, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--paths", default="tma,tma4d", help="the TMA kernels to time")
    args = ap.parse_args()
    from diffquant.kernels.bench import time_call
    from diffquant.kernels.triton_conv import qconv_triton
    from diffquant.kernels import tuning

    dev = torch.device("cuda")
    rows = []
    t0 = time.time()
    for n, c, h, w, co, k in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.randn(n, c, h, w, device=dev, generator=g) * 2).to(torch.float8_e4m3fn) \
            .contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(co, k, k, c, device=dev, generator=g) * 0.5).to(torch.float8_e4m3fn)
        ws = torch.rand(co, device=dev, generator=g) * 0.01 + 1e-3
        asc = torch.tensor([0.05], device=dev)
        bias = torch.randn(co, device=dev, generator=g)
        p = k // 2
        call = lambda: qconv_triton(x, wt, ws, asc, None, None, bias, None, 0, [1, 1], [p, p], [1, 1], False,  # noqa: E731
                                    torch.bfloat16)
        with torch.no_grad():
            os.environ["DIFFQUANT_QCONV_TMA"] = "0"
            ref = call().float()
            gather_ms = time_call(call, warmup=2, reps=args.reps)[0]
            os.environ["DIFFQUANT_QCONV_TMA"] = "1"
            row = {"shape": [n, c, h, w, co, k], "gather_ms": round(gather_ms, 5), "tma": []}
            for path, (bm, bn, bk, nw, ns) in [(pa, c_) for pa in args.paths.split(",") if pa for c_ in CONFIGS]:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, path=path)
                entry = {"path": path, "config": [bm, bn, bk, nw, ns]}
                try:
                    with tuning.forced_config(cfg):
                        out = call().float()
                        err = float((out - ref).norm() / ref.norm())
                        ms = time_call(call, warmup=2, reps=args.reps)[0] if err < 1e-2 else None
                    entry.update(ms=ms and round(ms, 5), rel_err=err)
                except Exception as e:
                    entry["error"] = str(e).splitlines()[0][:200]
                row["tma"].append(entry)
            os.environ["DIFFQUANT_QCONV_TMA"] = "0"
            xb = torch.randn(n, c, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            wb = torch.randn(co, c, k, k, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            row["cudnn_bf16_ms"] = round(time_call(lambda: F.conv2d(xb, wb, None, 1, p), warmup=2, reps=args.reps)[0], 5)
        flops = 2.0 * n * h * w * co * c * k * k
        row["tflops"] = {"gather": round(flops / gather_ms / 1e9), "cudnn_bf16": round(flops / row["cudnn_bf16_ms"] / 1e9)}
        for path in {t["path"] for t in row["tma"]}:
            best = min((t["ms"] for t in row["tma"] if t["path"] == path and t.get("ms")), default=None)
            row["tflops"][f"{path}_best"] = best and round(flops / best / 1e9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "PYTHONPATH=src python benchmarks/qconv_tma_probe.py", "rows": rows, "wall_s": round(time.time() - t0, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
