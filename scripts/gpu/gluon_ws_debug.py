"""One small call of each warp-specialized Gluon kernel (conv, GEGLU), for compute-sanitizer
(``scripts/gpu/gluon_ws_debug.sh``), against the same call without warp specialization. With one buffer ring shared
by both consumers they gave wrong outputs and launch failures (session 18, calls 7-9); one ring each fixed that."""
from __future__ import annotations

import argparse
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["conv", "geglu"])
    ap.add_argument("--stages", type=int, default=2)
    a = ap.parse_args()
    import torch

    g0 = torch.Generator(device="cuda").manual_seed(0)
    if a.which == "conv":
        from diffquant.kernels.gluon_conv import gconv

        x = (torch.randn(1, 320, 16, 64, device="cuda", generator=g0) * 4).to(torch.float8_e4m3fn).contiguous(
            memory_format=torch.channels_last)
        w = (torch.randn(320, 3, 3, 320, device="cuda", generator=g0)).to(torch.float8_e4m3fn)
        ws, sa = torch.rand(320, device="cuda") * 0.01, torch.ones(1, device="cuda")
        y = gconv(x, w, ws, sa, None, [1, 1], {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": a.stages, "ws": True})
        ref = gconv(x, w, ws, sa, None, [1, 1], {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4})
    else:
        from diffquant.kernels.gluon_geglu import linear_geglu_gluon
        from diffquant.kernels.triton_geglu import linear_geglu_triton

        xq = torch.randn(1024, 320, device="cuda", generator=g0).to(torch.float8_e4m3fn)
        wq = torch.randn(2 * 1280, 320, device="cuda", generator=g0).to(torch.float8_e4m3fn)
        ws, sa, so = torch.rand(2560, device="cuda") * 0.01, torch.ones(1, device="cuda"), torch.ones(1, device="cuda")
        y = linear_geglu_gluon(xq, wq, ws, sa, None, so, {"STAGES": a.stages})
        ref = linear_geglu_triton(xq, wq, ws, sa, None, so, torch.float8_e4m3fn)
    torch.cuda.synchronize()
    print(a.which, "stages", a.stages, "max |diff|", float((y.float() - ref.float()).abs().max()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
