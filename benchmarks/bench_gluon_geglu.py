"""The warp-specialized Gluon GEGLU kernel (``diffquant/kernels/gluon_geglu.py``: persistent, a TMA producer warp,
two consumer warp groups taking tiles in turn) against diffquant's Triton GEGLU kernel (``linear_geglu_triton``,
default config) on SD-1.5 b8's four feed-forward shapes: ms of each (CUDA graphs), the Gluon kernel over a few
configs, and how far its e4m3 output is from the Triton kernel's (share of codes that differ; relative L2 of the
decoded values).

    python benchmarks/bench_gluon_geglu.py [--out benchmarks/results/gluon_geglu.json]

Needs a GPU of compute capability 9.0 and Triton with Gluon (3.6 on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import sys

# (label, tokens M, width K, I, GEGLUs per UNet call): GEGLU.proj is K -> 2I; SD-1.5 at batch 8, 64x64 latents
SHAPES = [("64x64 c320", 8 * 4096, 320, 1280, 5), ("32x32 c640", 8 * 1024, 640, 2560, 5),
          ("16x16 c1280", 8 * 256, 1280, 5120, 5), ("8x8 c1280", 8 * 64, 1280, 5120, 1)]
CONFIGS = ({}, {"STAGES": 3}, {"BLOCK_M": 64, "STAGES": 4})  # STAGES: buffers for each of the two consumers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gluon_geglu.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--configs", default="", help="indices into CONFIGS (default: all)")
    a = ap.parse_args()
    import torch

    from diffquant.kernels.bench import time_call, write_gpu_result
    from diffquant.kernels.gluon_geglu import linear_geglu_gluon
    from diffquant.kernels.reference import quantize_act_fp8
    from diffquant.kernels.triton_geglu import linear_geglu_triton

    configs = [CONFIGS[int(i)] for i in a.configs.split(",")] if a.configs else list(CONFIGS)
    g0 = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, m, k, i, calls in SHAPES:
        x = torch.randn(m, k, device="cuda", generator=g0, dtype=torch.bfloat16)
        sa = (x.float().abs().amax() / 448).reshape(1)
        xq = quantize_act_fp8(x, sa)
        w = torch.randn(2 * i, k, device="cuda", generator=g0) * 0.05
        ws = w.abs().amax(1) / 448
        wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
        b = torch.randn(2 * i, device="cuda", generator=g0) * 0.1
        so = torch.tensor([0.02], device="cuda")
        tri = lambda: linear_geglu_triton(xq, wq, ws, sa, b, so, torch.float8_e4m3fn)  # noqa: E731
        want = tri()
        ms, _ = time_call(tri, reps=a.reps)
        row = {"shape": label, "M": m, "K": k, "I": i, "calls_per_unet": calls, "triton_ms": round(ms, 4)}
        best = None
        for cfg in configs:
            name = json.dumps(cfg, sort_keys=True)
            try:
                got = linear_geglu_gluon(xq, wq, ws, sa, b, so, cfg)
                torch.cuda.synchronize()
                differ = float((got.view(torch.uint8) != want.view(torch.uint8)).float().mean())
                rel = float((got.float() - want.float()).norm() / want.float().norm())
                ok = bool(torch.isfinite(got.float()).all()) and rel < 2e-2
                gms, _ = time_call(lambda: linear_geglu_gluon(xq, wq, ws, sa, b, so, cfg), reps=a.reps)
                row[f"gluon {name}"] = {"ms": round(gms, 4), "codes_differ": round(differ, 6), "rel_l2": round(rel, 6),
                                        "ok": ok}
                if ok and (best is None or gms < best[1]):
                    best = (name, gms)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or run is a result here
                row[f"gluon {name}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if best:
            row.update(gluon_best=best[0], gluon_best_ms=round(best[1], 4), speedup_vs_triton=round(ms / best[1], 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    tt = sum(r["triton_ms"] * r["calls_per_unet"] for r in rows)
    tg = sum(min(r.get("gluon_best_ms", r["triton_ms"]), r["triton_ms"]) * r["calls_per_unet"] for r in rows)
    print(f"per UNet (GEGLUs per level): triton {tt:.3f} ms, best of both {tg:.3f} ms", flush=True)
    write_gpu_result(a.out, rows, per_unet_triton_ms=round(tt, 3), per_unet_best_of_both_ms=round(tg, 3),
                     configs=configs, argv=sys.argv[1:])


if __name__ == "__main__":
    main()
