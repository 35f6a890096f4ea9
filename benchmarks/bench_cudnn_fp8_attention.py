"""cuDNN's FP8 fused attention (the cudnn-frontend ``sdpa_fp8`` graph: e4m3 Q, K, V and output, per-tensor scales)
on the SD-1.5 UNet's attention shapes (:data:`bench_attention.SHAPES`), against bf16
``F.scaled_dot_product_attention`` through cuDNN on the same inputs: the exploratory measurement of the one path
to attention faster than cuDNN's bf16 kernel that needs no new kernel (issue 7; attention is 3.55 of SD-1.5 b8's
15.2 busy ms, and diffquant's Triton FP8 kernel is 2x slower than cuDNN's bf16).

cuDNN's FP8 attention takes head dims that are multiples of 16, so SD-1.5's 40 runs zero-padded to 48 (Q, K and V
padded; the padded output columns are dropped); 80 and 160 run as they are. Per shape: whether cuDNN builds the
graph (or its error), ms of the FP8 graph (padding copies not included) and of bf16 SDPA, and the relative error
of the dequantized FP8 output against float attention on the same dequantized inputs. Needs a Hopper GPU and the
``nvidia-cudnn-frontend`` wheel (``.gpu_carry/cudnn-fe``; ``scripts/gpu/cudnn_fp8_attention.sh`` installs it).

    python benchmarks/bench_cudnn_fp8_attention.py [--out benchmarks/results/cudnn_fp8_attention.json] [--reps 50]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

E4M3_MAX = 448.0


def _pad_heads(t, d_pad: int):
    """[B, H, S, D] -> [B, H, S, d_pad] zero-padded, stored [B, S, H, d_pad] (the layout of a projection's output)."""
    import torch

    b, h, s, d = t.shape
    out = torch.zeros(b, s, h, d_pad, dtype=t.dtype, device=t.device)
    out[..., :d] = t.transpose(1, 2)
    return out.transpose(1, 2)


def _quantize(t):
    """Per-tensor e4m3: (codes, descale) with t ~= codes * descale."""
    import torch

    descale = (t.abs().amax().float() / E4M3_MAX).clamp_min(1e-12)
    return (t.float() / descale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), descale.reshape(1, 1, 1, 1)


class CudnnFp8Attention:
    """One cuDNN FP8 SDPA graph for fixed shapes and strides (built once; :meth:`__call__` runs it)."""

    def __init__(self, cudnn, handle, q8, k8, v8, o8, attn_scale: float):
        import torch

        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        tq, tk, tv = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                      for n, t in (("q", q8), ("k", k8), ("v", v8)))
        scalars = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                          descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                          scale_o=scalars[5], generate_stats=False, attn_scale=attn_scale,
                                          use_causal_mask=False)
        o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.handle = g, handle
        self.tensors = dict(q=tq, k=tk, v=tv, o=o, amax_s=amax_s, amax_o=amax_o,
                            **dict(zip(("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"),
                                       scalars)))
        self.workspace = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=q8.device)

    def __call__(self, values: dict) -> None:
        self.graph.execute({self.tensors[k]: v for k, v in values.items()}, self.workspace, handle=self.handle)


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

    from diffquant.kernels.bench import time_call

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    rows = []
    for label, calls, b, h, sq, sk, d in SHAPES:
        d_pad = -(-d // 16) * 16
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for s in (sq, sk, sk))
        scale = d ** -0.5
        row = {"shape": label, "calls_per_unet": calls, "B": b, "H": h, "Sq": sq, "Sk": sk, "D": d, "D_run": d_pad}
        with torch.no_grad():
            (q8, dq), (k8, dk), (v8, dv) = (_quantize(_pad_heads(t, d_pad)) for t in (q, k, v))
            deq = [t8.float() * s for t8, s in ((q8, dq), (k8, dk), (v8, dv))]
            exact = F.scaled_dot_product_attention(*[t[..., :d] for t in deq], scale=scale)
            o8 = torch.empty_like(q8)
            scale_o = (E4M3_MAX / deq[2].abs().amax()).reshape(1, 1, 1, 1)  # |O| <= max |V|
            one = torch.ones(1, 1, 1, 1, device="cuda")
            values = dict(q=q8, k=k8, v=v8, o=o8, descale_q=dq, descale_k=dk, descale_v=dv,
                          descale_s=one / E4M3_MAX, scale_s=one * E4M3_MAX, scale_o=scale_o,
                          amax_s=torch.empty_like(one), amax_o=torch.empty_like(one))
            try:
                attn = CudnnFp8Attention(cudnn, handle, q8, k8, v8, o8, scale)
                attn(values)
                torch.cuda.synchronize()
                got = o8.float()[..., :d] / scale_o
                row["fp8_rel_err"] = round(float((got - exact).norm() / exact.norm()), 5)
                row["fp8_ms"], row["fp8_graph_captured"] = time_call(lambda: attn(values), reps=a.reps)
                row["fp8_ms"] = round(row["fp8_ms"], 5)
            except Exception as e:  # no engine for this shape on this cuDNN, or the frontend refuses it
                row["fp8_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

            def sdpa():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            ref = sdpa().float()
            row["bf16_rel_err"] = round(float((ref - F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), scale=scale)).norm() / exact.norm()), 5)
            row["sdpa_cudnn_bf16_ms"] = round(time_call(sdpa, reps=a.reps)[0], 5)
        if "fp8_ms" in row:
            row["speedup_vs_bf16"] = round(row["sdpa_cudnn_bf16_ms"] / row["fp8_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] * r["calls_per_unet"] for r in rows if k in r), 4)
             for k in ("sdpa_cudnn_bf16_ms", "fp8_ms")}
    total["shapes_without_fp8"] = [r["shape"] for r in rows if "fp8_ms" not in r]
    print("per UNet call (ms):", json.dumps(total))
    res = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "cudnn_frontend": getattr(cudnn, "__version__", None),
           "rows": rows, "per_unet_call": total}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
