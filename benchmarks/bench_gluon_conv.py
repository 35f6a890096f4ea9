"""The Gluon FP8 conv (``diffquant/kernels/gluon_conv.py``: the A tile read by the tensor cores from shared memory,
async wgmma) against diffquant's Triton conv (``diffquant::qconv`` with the shipped tuned table; its 4-D TMA
kernels copy A into registers) on SD-1.5 b8's 3x3 convs: per shape the Gluon kernel over a few configs, its
best, the Triton kernel's ms, TFLOP/s, and the relative L2 difference of the two bf16 outputs.

    python benchmarks/bench_gluon_conv.py [--out benchmarks/results/gluon_conv.json] [--shapes 0,5]

Needs a GPU of compute capability 9.0 and Triton with Gluon (3.6 on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

# SD-1.5 b8's 3x3 stride-1 convs, (batch, in channels, out channels, height = width, calls per UNet); this script's
# folder is on sys.path when it runs
from bench_cudnn_fp8_conv import SHAPES

CONFIGS = ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "STAGES": 4},
           {"BLOCK_M": 256, "BLOCK_N": 128, "num_warps": 8, "STAGES": 4},
           # the warp-specialized kernel: STAGES buffers for each of its two consumers
           {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 2, "ws": True},
           {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 3, "ws": True},
           {"BLOCK_M": 64, "BLOCK_N": 256, "STAGES": 2, "ws": True},
           {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "ws": True})


def config_name(cfg: dict) -> str:
    """128x128_w4_s4 (num_warps 4, 4 stages), or 128x128_ws_s4 for the warp-specialized kernel."""
    return "{}x{}_{}_s{}".format(cfg["BLOCK_M"], cfg["BLOCK_N"], "ws" if cfg.get("ws") else f"w{cfg['num_warps']}",
                                 cfg["STAGES"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gluon_conv.json")
    ap.add_argument("--shapes", default="", help="indices into SHAPES, comma-separated (default: all)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting shapes after this many seconds")
    ap.add_argument("--ncu", default="", help="config names (as printed, e.g. 128x128_w4_s3), comma-separated: run "
                    "the Triton kernel and these once per shape inside the profiler range (for ncu "
                    "--profile-from-start off), no timing")
    a = ap.parse_args()
    import torch

    from diffquant.kernels import ops
    from diffquant.kernels.bench import time_call, write_gpu_result
    from diffquant.kernels.gluon_conv import gconv

    t0 = time.time()
    cl = torch.channels_last
    g0 = torch.Generator(device="cuda").manual_seed(0)
    picked = [SHAPES[int(i)] for i in a.shapes.split(",")] if a.shapes else list(SHAPES)
    rows = []
    for nb, c, k, hw, calls in picked:
        if time.time() - t0 > a.budget_s:
            print("budget spent: stopping before", (nb, c, k, hw), flush=True)
            break
        flop = 2.0 * nb * hw * hw * k * c * 9
        xf = torch.randn(nb, c, hw, hw, device="cuda", generator=g0).contiguous(memory_format=cl)
        wf = torch.randn(k, 3, 3, c, device="cuda", generator=g0) * 0.05
        ws = wf.abs().amax((1, 2, 3)) / 448
        sa = (xf.abs().amax() / 448).reshape(1)
        x8 = (xf / sa).to(torch.float8_e4m3fn)
        w8 = (wf / ws.view(-1, 1, 1, 1)).to(torch.float8_e4m3fn).contiguous()
        bias = torch.randn(k, device="cuda", generator=g0)
        one = [1, 1]
        tri = lambda: ops.qconv(x8, w8, ws, sa, None, None, bias, None, 0, one, one, one, False,  # noqa: E731
                                torch.bfloat16)
        want = tri().float()
        if a.ncu:
            fns = [tri] + [lambda cfg=cfg: gconv(x8, w8, ws, sa, bias, one, cfg) for cfg in CONFIGS
                           if config_name(cfg) in a.ncu.split(",")]
            for fn in fns:  # compiled outside the range
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            for fn in fns:
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            continue
        row = {"batch": nb, "cin": c, "cout": k, "hw": hw, "calls_per_unet": calls, "gflop": round(flop / 1e9, 2)}
        ms, _ = time_call(tri, reps=a.reps)
        row["triton_ms"] = round(ms, 4)
        row["triton_tflops"] = round(flop / ms / 1e9, 1)
        best = None
        for cfg in CONFIGS:
            name = config_name(cfg)
            try:
                got = gconv(x8, w8, ws, sa, bias, one, cfg).float()
                torch.cuda.synchronize()
                err = float((got - want).norm() / want.norm())
                ok = bool(torch.isfinite(got).all()) and err < 1e-2
                gms, _ = time_call(lambda: gconv(x8, w8, ws, sa, bias, one, cfg), reps=a.reps)
                row[f"gluon_{name}"] = {"ms": round(gms, 4), "rel_l2_vs_triton": round(err, 6), "ok": ok}
                if ok and (best is None or gms < best[1]):
                    best = (name, gms)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or run is a result here
                row[f"gluon_{name}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if best is not None:
            row["gluon_best"] = best[0]
            row["gluon_best_ms"] = round(best[1], 4)
            row["gluon_best_tflops"] = round(flop / best[1] / 1e9, 1)
            row["speedup_vs_triton"] = round(ms / best[1], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.ncu:
        print("ncu pass done")
        return
    tot_t = sum(r["triton_ms"] * r["calls_per_unet"] for r in rows)
    tot_g = sum(min(r.get("gluon_best_ms", r["triton_ms"]), r["triton_ms"]) * r["calls_per_unet"] for r in rows)
    print(f"per UNet (calls weighted, these shapes): triton {tot_t:.3f} ms, best of both {tot_g:.3f} ms", flush=True)
    write_gpu_result(a.out, rows, per_unet_triton_ms=round(tot_t, 3), per_unet_best_of_both_ms=round(tot_g, 3),
                     configs=list(CONFIGS), argv=sys.argv[1:])


if __name__ == "__main__":
    main()
