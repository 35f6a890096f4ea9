"""``diffquant::add_layer_norm`` (the Triton kernel of :mod:`diffquant.kernels.triton_layernorm`) against what
Inductor generates for the same unfused steps, on SD-1.5 b8's transformer-block LayerNorms.

The unfused steps are the converted model's: a tensor-wise FP8 output projection leaves ``y`` in bf16 with its
per-channel scales and bias still to apply (``(y.float() * scale + bias).to(bf16)``), the block adds the residual,
``F.layer_norm`` runs in bf16 and the next Linear quantizes its input to e4m3 (``clamp(n / s)``). ``torch.compile``
fuses them into one kernel, as it does in the model. Two cases a shape: ``norm1`` (the block's first norm: the input
alone, nothing written but the e4m3 output) and ``norm23`` (the second and third: projection output, residual, the
new residual written). Per case: ms of each (median, CUDA graphs, ``time_call``), bytes moved (a calculation from the
shapes), the kernel under a few plans, and the agreement of each with the reference (the eager model's rounding;
the kernel must give its ``h`` bit for bit and at most 0.1 % other e4m3 codes; Inductor's kernel, which skips the
intermediate bf16 roundings, is only reported). The summary weighs each case by its calls in one UNet call.

    python benchmarks/bench_layernorm.py [--out benchmarks/results/layernorm.json] [--reps 100]
        [--plans "BLOCK_M=32,num_warps=8;BLOCK_M=16,num_warps=4"]
"""
from __future__ import annotations

import argparse
import json

import torch

# (label, calls per UNet call at batch 8, tokens, channels): SD-1.5's transformer blocks at 64x64 latents (2 down +
# 3 up blocks a level at 64, 32 and 16; 1 mid block at 8)
SHAPES = (("64x64", 5, 8 * 4096, 320), ("32x32", 5, 8 * 1024, 640), ("16x16", 5, 8 * 256, 1280),
          ("8x8", 1, 8 * 64, 1280))
CASES = {"norm1": 1, "norm23": 2}  # calls a block


def _plans(text: str) -> list:
    out = [None]  # the default plan (ln_plan)
    for part in filter(None, text.split(";")):
        out.append({k: int(v) for k, v in (kv.split("=") for kv in part.split(","))})
    return out


def unfused(y, ys, yb, r, w, b, eps, s):
    """The converted model's steps (what Inductor compiles)."""
    if ys is not None:
        y = (y.float() * ys + yb).to(torch.bfloat16)
    h = y + r if r is not None else y
    n = torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, eps)
    q = torch.clamp(n.float() / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    return (h if r is not None else None), q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/layernorm.json")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--plans", default="BLOCK_M=16,num_warps=4;BLOCK_M=8,num_warps=4;BLOCK_M=4,num_warps=4;"
                                       "BLOCK_M=2,num_warps=2;BLOCK_M=8,num_warps=2")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_layernorm.py needs a CUDA GPU")
    from diffquant.kernels.bench import finish_op_bench, time_call
    from diffquant.kernels.ops import add_layer_norm
    from diffquant.kernels.reference import add_layer_norm_reference
    from diffquant.kernels.triton_layernorm import add_layer_norm_triton, ln_plan

    compiled = torch.compile(unfused, dynamic=False)
    rows, bad = [], []
    for label, blocks, t, c in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        y = torch.randn(t, c, device="cuda", generator=g).bfloat16() * 4
        r = torch.randn(t, c, device="cuda", generator=g).bfloat16() * 8
        ys = torch.rand(c, device="cuda", generator=g) * 0.02 + 0.01
        yb = torch.randn(c, device="cuda", generator=g) * 0.1
        w = torch.rand(c, device="cuda", generator=g).bfloat16() + 0.5
        b = (torch.randn(c, device="cuda", generator=g) * 0.1).bfloat16()
        s = torch.tensor([0.02], device="cuda")
        for case, per_block in CASES.items():
            args = (y, ys, yb, r) if case == "norm23" else (y, None, None, None)
            per_elem = 2 + 1 + (2 + 2 if case == "norm23" else 0)  # y read, e4m3 written (+ residual read, h written)
            row = {"shape": label, "case": case, "tokens": t, "channels": c, "calls_per_unet": blocks * per_block,
                   "bytes": t * c * per_elem, "default_plan": ln_plan(c)}
            with torch.no_grad():
                h0, q0 = add_layer_norm_reference(*args, w, b, 1e-5, s, torch.float8_e4m3fn)
                h1, q1 = add_layer_norm(*args, w, b, 1e-5, s, torch.float8_e4m3fn)
                hi, qi = compiled(*args, w, b, 1e-5, s)
                if not torch.equal(h0, h1):
                    bad.append(f"{label} {case}: h differs from the reference's")
                frac = float((q0.view(torch.uint8) != q1.view(torch.uint8)).float().mean())
                row["e4m3_codes_differ_from_reference"] = round(frac, 6)
                if frac > 1e-3:
                    bad.append(f"{label} {case}: {frac:.2%} of the e4m3 codes differ from the reference's")
                # Inductor's kernel skips the intermediate bf16 roundings of the eager model (the reference's)
                row["inductor_e4m3_codes_differ_from_reference"] = round(
                    float((q0.view(torch.uint8) != qi.view(torch.uint8)).float().mean()), 6)
                if hi is not None:
                    row["inductor_h_max_diff"] = float((hi.float() - h0.float()).abs().max())
                row["inductor_ms"] = round(time_call(lambda: compiled(*args, w, b, 1e-5, s), reps=a.reps, inner=0)[0], 5)
                best = None
                for plan in _plans(a.plans):
                    name = "kernel_" + ("default" if plan is None else "_".join(f"{k}{v}" for k, v in plan.items()))
                    try:
                        ms = time_call(lambda plan=plan: add_layer_norm_triton(*args, w, b, 1e-5, s, torch.float8_e4m3fn,
                                                                               plan=plan), reps=a.reps, inner=0)[0]
                    except Exception as e:  # out of resources
                        row[name + "_error"] = str(e).splitlines()[0][:200]
                        continue
                    row[name + "_ms"] = round(ms, 5)
                    best = ms if best is None else min(best, ms)
                row["kernel_ms"] = row.get("kernel_default_ms")
                row["best_kernel_ms"] = round(best, 5) if best is not None else None
                for k in ("inductor", "kernel", "best_kernel"):
                    if row.get(f"{k}_ms"):
                        row[f"{k}_TB_s"] = round(row["bytes"] / row[f"{k}_ms"] / 1e9, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] * r["calls_per_unet"] for r in rows if r.get(k)), 4)
             for k in ("inductor_ms", "kernel_ms", "best_kernel_ms")}
    finish_op_bench(a.out, rows, total, bad)


if __name__ == "__main__":
    main()
