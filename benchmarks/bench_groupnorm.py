"""GroupNorm + SiLU (+ the consumer's FP8 input quantization) alone, on the GPU: diffquant::group_norm_act against
what torch.compile makes of the same ops, on channels-last bf16 activations of the SD-1.5 (batch 8) and CIFAR
(batch 256) UNets' norm shapes. Each row: Inductor's ms and diffquant's, for bf16 output and for e4m3 output, and
the GB/s of diffquant's kernels (two reads of the input, one write); for the up blocks' concatenations also the
two-tensor form (diffquant::group_norm_act_dual against Inductor's cat + norm + both quantizations).

    python benchmarks/bench_groupnorm.py [--out benchmarks/results/groupnorm.json] [--sweep] [--batch N]

--sweep adds, per shape, each kernel timed alone (statistics, finalize, apply with e4m3 output) under the default
launch plan and under variants of it (programs per SM, pixel rows per step, warps, the finalize's groups per
program as before session 10), the one-launch kernel ("whole": its default plan for images of up to 1,024 pixels
or 16,384 pixels in all; with 1 and 2 groups per program on every shape), and a bf16 copy of the input as the
bandwidth roof.
--batch N runs every shape at batch N instead of the UNets' (1: the small-batch case, where the three launches of
the segmented kernels cost more than their work).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

# (label, N, C, H, W, groups): the norms of a ResNet block's conv1 / conv2 inputs and of the up blocks' concatenations
SHAPES = [
    ("sd15 64x64 c320", 8, 320, 64, 64, 32), ("sd15 64x64 c640 (cat)", 8, 640, 64, 64, 32),
    ("sd15 32x32 c640", 8, 640, 32, 32, 32), ("sd15 32x32 c1280 (cat)", 8, 1280, 32, 32, 32),
    ("sd15 16x16 c1280", 8, 1280, 16, 16, 32), ("sd15 16x16 c2560 (cat)", 8, 2560, 16, 16, 32),
    ("sd15 8x8 c1280", 8, 1280, 8, 8, 32),
    ("cifar 32x32 c128", 256, 128, 32, 32, 32), ("cifar 32x32 c384 (cat)", 256, 384, 32, 32, 32),
    ("cifar 16x16 c256", 256, 256, 16, 16, 32), ("cifar 8x8 c256", 256, 256, 8, 8, 32),
]
# the concatenations' first parts (h; the rest is the skip): the up blocks' ResNet inputs, also timed as two tensors
DUAL_C1 = {"sd15 64x64 c640 (cat)": 320, "sd15 32x32 c1280 (cat)": 640, "sd15 16x16 c2560 (cat)": 1280,
           "cifar 32x32 c384 (cat)": 256}


def _tensors(n: int, c: int, h: int, w: int) -> tuple:
    """A channels-last bf16 input, a per-(image, channel) addend, the affine weight and bias, an FP8 output scale."""
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    t = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    wt = torch.rand(c, device="cuda", dtype=torch.bfloat16) + 0.5
    b = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    return x, t, wt, b, torch.tensor([0.02], device="cuda")


def main() -> None:
    from functools import partial

    from diffquant.kernels.bench import time_call, write_gpu_result

    # several calls per timed sample where one is short (batch 1: a norm of a few microseconds is otherwise timed
    # with the graph launch's latency; the sweep of session 10 read 10-16 us for every kernel, a copy included)
    time_call = partial(time_call, inner=0)
    from diffquant.kernels.ops import group_norm_act
    from diffquant.kernels.reference import quantize_act_fp8

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/groupnorm.json")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--batch", type=int, default=None, help="every shape at this batch size")
    a = ap.parse_args()
    shapes = SHAPES if a.batch is None else [(label, a.batch, *rest) for label, _n, *rest in SHAPES]
    if not torch.cuda.is_available():
        raise SystemExit("bench_groupnorm.py needs a CUDA GPU")
    rows = []
    for label, n, c, h, w, groups in shapes:
        x, t, wt, b, s = _tensors(n, c, h, w)

        def ind_bf16(x=x, t=t, wt=wt, b=b, groups=groups):
            return F.silu(F.group_norm(x + t[:, :, None, None], groups, wt, b, 1e-5))

        def ind_fp8(x=x, t=t, wt=wt, b=b, groups=groups, s=s):
            return quantize_act_fp8(F.silu(F.group_norm(x + t[:, :, None, None], groups, wt, b, 1e-5)), s)

        row = {"shape": label, "n": n, "c": c, "h": h, "w": w, "groups": groups}
        with torch.no_grad():
            for name, fn in (("inductor_bf16", torch.compile(ind_bf16)), ("inductor_fp8", torch.compile(ind_fp8)),
                             ("diffquant_bf16", lambda: group_norm_act(x, None, t, wt, b, groups, 1e-5, True, None,
                                                                       torch.bfloat16)),
                             ("diffquant_fp8", lambda: group_norm_act(x, None, t, wt, b, groups, 1e-5, True, s,
                                                                      torch.float8_e4m3fn))):
                row[name + "_ms"] = round(time_call(fn, reps=a.reps)[0], 5)
        for out in ("bf16", "fp8"):
            moved = x.numel() * (2 + 2 + (2 if out == "bf16" else 1))
            row[f"diffquant_{out}_GBps"] = round(moved / row[f"diffquant_{out}_ms"] / 1e6, 1)
            row[f"speedup_{out}"] = round(row[f"inductor_{out}_ms"] / row[f"diffquant_{out}_ms"], 3)
        if label in DUAL_C1:
            row.update(_dual(x, wt, b, s, groups, DUAL_C1[label], a.reps, time_call))
        rows.append(row)
        print(json.dumps(row))
    sweep = _sweep(shapes, a.reps, time_call) if a.sweep else []
    res = write_gpu_result(a.out, rows, sweep=sweep, sum_inductor_fp8_ms=round(sum(r["inductor_fp8_ms"] for r in rows), 4),
                           sum_diffquant_fp8_ms=round(sum(r["diffquant_fp8_ms"] for r in rows), 4))
    print("sum over shapes, fp8 out: inductor", res["sum_inductor_fp8_ms"], "ms, diffquant", res["sum_diffquant_fp8_ms"], "ms")


def _dual(x, wt, b, s, groups, c1, reps, time_call) -> dict:
    """An up block's ResNet input: the norm of cat(h, skip) into conv1 and, from the same read, the concatenation
    quantized for the split shortcut conv (diffquant::group_norm_act_dual, h and skip read in place) against
    Inductor's compile of the concatenation, the norm and both quantizations. ``dual_mixed_ms``: the launch plan
    chosen without regard to C1 (channel chunks straddle h and skip: two masked loads per element), where it
    differs from the default one."""
    from diffquant.kernels.ops import group_norm_act_dual
    from diffquant.kernels.reference import quantize_act_fp8
    from diffquant.kernels.triton_norm import group_norm_act_triton, norm_plan

    h, skip = x[:, :c1].contiguous(memory_format=torch.channels_last), x[:, c1:].contiguous(memory_format=torch.channels_last)
    s2 = torch.full((x.shape[1],), 0.03, device=x.device)
    fp8 = torch.float8_e4m3fn

    def ind(h=h, skip=skip):
        cat = torch.cat([h, skip], 1)
        return quantize_act_fp8(F.silu(F.group_norm(cat, groups, wt, b, 1e-5)), s), quantize_act_fp8(cat, s2[None, :, None, None])

    out = {"c1": c1}
    with torch.no_grad():
        out["dual_inductor_ms"] = round(time_call(torch.compile(ind), reps=reps)[0], 5)
        out["dual_ms"] = round(time_call(lambda: group_norm_act_dual(h, skip, wt, b, groups, 1e-5, True, s, fp8, None, 0,
                                                                     0, 0, s2, fp8, None, 0, 0, 0), reps=reps)[0], 5)
        n, c, hh, ww = x.shape
        plain, aware = norm_plan(n, c, hh * ww, x.device), norm_plan(n, c, hh * ww, x.device, c1=c1)
        if plain != aware:
            out["dual_mixed_ms"] = round(time_call(lambda: group_norm_act_triton(
                h, skip, None, wt, b, groups, 1e-5, True, s, fp8, plan=plain, raw=(s2, fp8, None, 0, 0, 0)),
                reps=reps)[0], 5)
    out["dual_speedup"] = round(out["dual_inductor_ms"] / out["dual_ms"], 3)
    return out


def _sweep(shapes, reps, time_call) -> list:
    import triton

    from diffquant.kernels.triton_conv import _num_sms
    from diffquant.kernels.triton_norm import group_norm_act_triton, norm_plan, whole_plan

    sms = _num_sms(torch.device("cuda"))
    out = []
    for label, n, c, h, w, groups in shapes:
        x, t, wt, b, s = _tensors(n, c, h, w)
        base = norm_plan(n, c, h * w, x.device)
        block_cg = max(2, triton.next_power_of_2(c // groups))
        old_block_g = max(1, min(triton.next_power_of_2(groups), 256 // block_cg))  # the finalize before session 10
        variants = {"default": {}, "programs 2/SM": {"programs": 2 * sms}, "programs 8/SM": {"programs": 8 * sms},
                    "rows x0.5": {"block_p": max(16, base["block_p"] // 2)}, "rows x2": {"block_p": base["block_p"] * 2},
                    "8 warps": {"warps": 8}, "chunk 64": {"block_c": min(64, base["block_c"])},
                    "loads 2 stages": {"stages": 2}, "loads 3 stages": {"stages": 3},
                    "finalize folded into apply": {"fold": True},
                    "folded, loads 3 stages": {"fold": True, "stages": 3},
                    f"finalize {old_block_g} groups/program": {"block_g": old_block_g}}
        row = {"shape": label, "copy_ms": round(time_call(lambda: x.clone(), reps=reps)[0], 5)}
        row["copy_GBps"] = round(2 * x.numel() * 2 / row["copy_ms"] / 1e6, 1)
        # the one-launch kernel (whole groups of whole images per program): its default plan where images are small,
        # one and two groups a program everywhere (more programs, shorter rows per load)
        wholes = ((("whole", None),) if h * w <= 1024 or n * h * w <= 16384 else ()) + (
            ("whole 1 group", 1), ("whole 2 groups", 2))
        for wname, gpp in wholes:
            plan = whole_plan(c, h * w, groups, gpp=gpp)
            with torch.no_grad():
                ms = time_call(lambda: group_norm_act_triton(x, None, t, wt, b, groups, 1e-5, True, s,
                                                             torch.float8_e4m3fn, plan=plan), reps=reps)[0]
            row[wname] = {"plan": plan, "all": round(ms, 5)}
        for name, kw in variants.items():
            block_g = kw.pop("block_g", None)
            plan = norm_plan(n, c, h * w, x.device, **kw)
            if block_g is not None:
                plan = dict(plan, block_g=block_g)
            r = {"plan": plan}
            with torch.no_grad():
                for stages in (("stats",), ("finalize",), ("apply",), ("stats", "finalize", "apply")):
                    ms = time_call(lambda: group_norm_act_triton(x, None, t, wt, b, groups, 1e-5, True, s,
                                                                 torch.float8_e4m3fn, plan=plan, stages=stages),
                                   reps=reps)[0]
                    r["+".join(stages) if len(stages) < 3 else "all"] = round(ms, 5)
            r["stats_GBps"] = round(x.numel() * 2 / r["stats"] / 1e6, 1)
            r["apply_GBps"] = round(x.numel() * 3 / r["apply"] / 1e6, 1)
            row[name] = r
        out.append(row)
        print(json.dumps(row))
    return out


if __name__ == "__main__":
    main()
