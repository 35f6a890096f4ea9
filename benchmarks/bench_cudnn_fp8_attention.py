"""cuDNN's FP8 fused attention (the cudnn-frontend ``sdpa_fp8`` graph: e4m3 Q, K, V and output, per-tensor scales)
on the SD-1.5 UNet's attention shapes (:data:`bench_attention.SHAPES`), against bf16
``F.scaled_dot_product_attention`` through cuDNN on the same inputs: the exploratory measurement of the one path
to attention faster than cuDNN's bf16 kernel that needs no new kernel (issue 7; attention is 3.55 of SD-1.5 b8's
15.2 busy ms, and diffquant's Triton FP8 kernel is 2x slower than cuDNN's bf16).

cuDNN's FP8 attention takes head dims that are multiples of 16, so SD-1.5's 40 runs zero-padded to 48 (Q, K and V
padded; the padded output columns are dropped); 80 and 160 run as they are. Per shape: whether cuDNN builds the
graph (or its error), ms of the FP8 graph alone (``diffquant::cudnn_fp8_sdpa`` on e4m3 codes) and of the whole
``fp8_attention(backend="cudnn")`` compiled (quantization and padding included), ms of bf16 SDPA, and each one's
relative error against float attention. Needs a Hopper GPU and the
``nvidia-cudnn-frontend`` wheel (``.gpu_carry/cudnn-fe``; ``scripts/gpu/cudnn_fp8_attention.sh`` installs it).

    python benchmarks/bench_cudnn_fp8_attention.py [--out benchmarks/results/cudnn_fp8_attention.json] [--reps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cudnn_fp8_attention.json")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        raise SystemExit("bench_cudnn_fp8_attention.py needs a CUDA GPU")
    try:
        import cudnn
    except ImportError as e:
        raise SystemExit(f"bench_cudnn_fp8_attention.py needs the nvidia-cudnn-frontend wheel ({e})") from None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention import SHAPES

    from diffquant.kernels.bench import time_call, write_gpu_result

    from functools import partial

    from diffquant.kernels import cudnn_attention as ca
    from diffquant.kernels import ops

    rows = []
    for label, calls, b, h, sq, sk, d in SHAPES:
        dp = ca.padded_head_dim(d)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for s in (sq, sk, sk))
        scale = d ** -0.5
        row = {"shape": label, "calls_per_unet": calls, "B": b, "H": h, "Sq": sq, "Sk": sk, "D": d, "D_run": dp}
        with torch.no_grad():
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            # the kernel alone: e4m3 codes of the padded inputs, stored [B, S, H, D] as a projection writes them
            codes, descales = [], []
            for t in (q, k, v):
                s = (t.abs().amax().float() / ca.E4M3_MAX).reshape(1)
                padded = F.pad(t, (0, dp - d)).transpose(1, 2).contiguous().transpose(1, 2)
                codes.append((padded.float() / s).to(torch.float8_e4m3fn))
                descales.append(s)
            scale_o = 1.0 / descales[2]
            try:
                def kernel():
                    return ops.cudnn_fp8_sdpa(*codes, *descales, scale_o, scale)
                got = kernel()[..., :d].float() * descales[2]
                row["fp8_rel_err"] = round(float((got - exact).norm() / exact.norm()), 5)
                ms, captured = time_call(kernel, reps=a.reps)
                row["fp8_ms"], row["fp8_graph_captured"] = round(ms, 5), captured
                op = torch.compile(partial(ops.fp8_attention, sm_scale=scale, backend="cudnn"))
                got = op(q, k, v)
                row["fp8_op_compiled_rel_err"] = round(float((got.float() - exact).norm() / exact.norm()), 5)
                row["fp8_op_compiled_ms"] = round(time_call(lambda: op(q, k, v), reps=a.reps)[0], 5)
            except Exception as e:  # no engine for this shape on this cuDNN, or the frontend refuses it
                row["fp8_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

            def sdpa():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            row["bf16_rel_err"] = round(float((sdpa().float() - exact).norm() / exact.norm()), 5)
            row["sdpa_cudnn_bf16_ms"] = round(time_call(sdpa, reps=a.reps)[0], 5)
        if "fp8_ms" in row:
            row["speedup_vs_bf16"] = round(row["sdpa_cudnn_bf16_ms"] / row["fp8_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] * r["calls_per_unet"] for r in rows if k in r), 4)
             for k in ("sdpa_cudnn_bf16_ms", "fp8_ms", "fp8_op_compiled_ms")}
    total["shapes_without_fp8"] = [r["shape"] for r in rows if "fp8_ms" not in r]
    print("per UNet call (ms):", json.dumps(total))
    write_gpu_result(a.out, rows, cudnn=torch.backends.cudnn.version(),
                     cudnn_frontend=getattr(cudnn, "__version__", None), per_unet_call=total)


if __name__ == "__main__":
    main()
