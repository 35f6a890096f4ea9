"""cuDNN's FP8 convolution (cudnn-frontend's ``conv_fprop`` on e4m3 image and filter, fp32 compute, the per-channel
dequantization scale and the bias as pointwise epilogue ops, bf16 out) against diffquant's Triton conv
(``diffquant::qconv`` with the shipped tuned table) and cuDNN's bf16 conv (``F.conv2d``), on SD-1.5 b8's 3x3 convs
(stride 1, padding 1, channels-last). Per shape: ms (median of CUDA-event samples, CUDA graphs where they capture),
TFLOP/s, the cuDNN engine chosen, and the relative L2 difference of the FP8 outputs from each other.

Why: SD-1.5 b8's converted convs (3.46 ms of its 13.25 busy ms, H200, 2026-11-29) keep the tensor cores under half
busy (Nsight Compute, ``benchmarks/results/ncu_conv.txt``), and they are the largest part of the UNet outside
attention. If cuDNN's FP8 conv were faster it could serve the plain convs. It is not (BENCHMARKS.md, "Kernels,
sixteenth measurement": slower than diffquant's kernels and than cuDNN's own bf16 conv).

    python benchmarks/bench_cudnn_fp8_conv.py [--out benchmarks/results/cudnn_fp8_conv.json] [--ncu]

``--ncu``: run each shape's kernels once between ``torch.cuda.profiler.start()`` and ``stop()`` (no timing), for
``ncu --profile-from-start off``. Needs a GPU of compute capability 9.0+, Triton and the ``nvidia-cudnn-frontend``
package (``import cudnn``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

# (batch, in channels, out channels, height = width, calls per UNet): SD-1.5's 3x3 stride-1 convs at batch 8
SHAPES = ((8, 320, 320, 64, 7), (8, 640, 320, 64, 2), (8, 960, 320, 64, 1), (8, 640, 640, 64, 1),
          (8, 320, 640, 32, 1), (8, 640, 640, 32, 6), (8, 960, 640, 32, 1), (8, 1280, 640, 32, 1),
          (8, 1920, 640, 32, 1), (8, 1280, 1280, 32, 1), (8, 640, 1280, 16, 1), (8, 1280, 1280, 16, 7),
          (8, 1920, 1280, 16, 1), (8, 2560, 1280, 16, 2), (8, 1280, 1280, 8, 11), (8, 2560, 1280, 8, 3))


def cudnn_graph(x, w, out, handle, epilogue: bool = True):
    """The cuDNN graph of an FP8 conv: conv_fprop(x, w) x scale[channel] + bias[channel] to ``out``'s dtype."""
    import cudnn
    import torch

    fp32, e4m3 = cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    dt = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float32: fp32}[out.dtype]
    g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    n, c, h, wd = x.shape
    k = w.shape[0]
    tx = g.tensor(name="x", dim=[n, c, h, wd], stride=list(x.stride()), data_type=e4m3)
    tw = g.tensor(name="w", dim=[k, c, w.shape[2], w.shape[3]], stride=list(w.stride()), data_type=e4m3)
    y = g.conv_fprop(image=tx, weight=tw, padding=[1, 1], stride=[1, 1], dilation=[1, 1], compute_data_type=fp32,
                     name="conv")
    ts = tb = None
    if epilogue:
        ts = g.tensor(name="scale", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=fp32)
        tb = g.tensor(name="bias", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=fp32)
        y = g.add(a=g.mul(a=y, b=ts, compute_data_type=fp32, name="dequant"), b=tb, compute_data_type=fp32,
                  name="bias")
    y.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(dt)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.HEURISTICS_CHOICE)
    return g, dict(x=tx, w=tw, y=y, scale=ts, bias=tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cudnn_fp8_conv.json")
    ap.add_argument("--ncu", action="store_true", help="each kernel once inside the profiler range; no timing")
    ap.add_argument("--shapes", default="", help="indices into SHAPES, comma-separated (default: all)")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    import cudnn
    import torch
    import torch.nn.functional as F

    from diffquant.kernels import ops
    from diffquant.kernels.bench import time_call, write_gpu_result

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    cl = torch.channels_last
    g0 = torch.Generator(device="cuda").manual_seed(0)
    picked = [SHAPES[int(i)] for i in a.shapes.split(",")] if a.shapes else list(SHAPES)
    rows = []
    for nb, c, k, hw, calls in picked:
        flop = 2.0 * nb * hw * hw * k * c * 9
        xf = torch.randn(nb, c, hw, hw, device="cuda", generator=g0).contiguous(memory_format=cl)
        wf = torch.randn(k, c, 3, 3, device="cuda", generator=g0).contiguous(memory_format=cl) * 0.05
        ws = wf.abs().amax((1, 2, 3)) / 448
        sa = (xf.abs().amax() / 448).reshape(1)
        x8 = (xf / sa).to(torch.float8_e4m3fn)
        w8 = (wf / ws.view(-1, 1, 1, 1)).to(torch.float8_e4m3fn).contiguous(memory_format=cl)
        bias = torch.randn(k, device="cuda", generator=g0)
        w_krsc = w8.permute(0, 2, 3, 1).contiguous()  # diffquant's weight layout [cout, kh, kw, cin]
        xb, wb, bb = xf.bfloat16(), wf.bfloat16().contiguous(memory_format=cl), bias.bfloat16()
        row = {"batch": nb, "cin": c, "cout": k, "hw": hw, "calls_per_unet": calls, "gflop": round(flop / 1e9, 2)}
        one = [1, 1]
        fns = {"bf16_cudnn": lambda: F.conv2d(xb, wb, bb, padding=1),
               "fp8_diffquant": lambda: ops.qconv(x8, w_krsc, ws, sa, None, None, bias, None, 0, one, one, one, False,
                                                  torch.bfloat16)}
        y_dq = fns["fp8_diffquant"]()
        fns["bf16_cudnn"]()
        try:
            out = torch.empty(nb, k, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
            g, t = cudnn_graph(x8, w8, out, handle)
            wsp = torch.empty(max(1, g.get_workspace_size()), device="cuda", dtype=torch.uint8)
            scale = (ws * sa).reshape(1, k, 1, 1).contiguous()
            b4 = bias.reshape(1, k, 1, 1).contiguous()
            feed = {t["x"]: x8, t["w"]: w8, t["y"]: out, t["scale"]: scale, t["bias"]: b4}

            def run_cudnn():  # on the current stream: the side stream of time_call's warm-up, or its capture
                cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                g.execute(feed, wsp, handle=handle)
                return out

            fns["fp8_cudnn"] = run_cudnn
            run_cudnn()
            torch.cuda.synchronize()
            row["cudnn_rel_l2_vs_diffquant"] = round(float((out.float() - y_dq.float()).norm()
                                                           / y_dq.float().norm()), 5)
            try:
                row["cudnn_engine"] = g.get_plan_name_at_index(0)
            except Exception as e:  # noqa: BLE001 - the name is informative only
                row["cudnn_engine"] = f"? ({type(e).__name__})"
        except Exception as e:  # noqa: BLE001 - recorded: cuDNN refusing a graph is a result here
            row["fp8_cudnn_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
        if a.ncu:  # compiled and built above; now each kernel once inside the profiled range
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            continue
        for name, fn in fns.items():
            try:
                ms, graphed = time_call(fn, reps=a.reps)
                row[f"{name}_ms"] = round(ms, 4)
                row[f"{name}_tflops"] = round(flop / ms / 1e9, 1)
                row[f"{name}_graph"] = graphed
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if not a.ncu:
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.ncu:
        print("ncu pass done")
        return
    tot = {n: sum(r.get(f"{n}_ms", float("nan")) * r["calls_per_unet"] for r in rows)
           for n in ("bf16_cudnn", "fp8_diffquant", "fp8_cudnn")}
    print("per UNet (calls weighted), ms:", {n: round(v, 3) for n, v in tot.items()})
    write_gpu_result(a.out, rows, per_unet_ms={n: round(v, 3) for n, v in tot.items()},
                     cudnn_frontend=getattr(cudnn, "__version__", "?"), cudnn=torch.backends.cudnn.version(),
                     argv=sys.argv[1:], when=time.strftime("%Y-%m-%d %H:%M"))


if __name__ == "__main__":
    main()
