"""One eager forward of a converted model under Nsight Compute (``scripts/gpu/ncu_model_probe.sh``): the model is
built, converted and run twice outside the profiled range (Triton compiles, tuned tables load), then once between
``torch.cuda.profiler.start()`` and ``stop()``, so that ``ncu --profile-from-start off`` sees only that forward's
kernels, in the model's own shapes and tuned configs.

    python3 scripts/gpu/ncu_model_probe.py [--model sd15-unet] [--batch 8] [--variant dq-fp8-gn-qkv-te-ff-twq]
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15-unet")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variant", default="dq-fp8-gn-qkv-te-ff-twq")
    a = ap.parse_args()
    from diffquant.kernels.bench import build_model, inputs_for, make_variant
    from diffquant.models.adapter import call_model

    dev = torch.device("cuda")
    base = build_model(a.model).to(dev)
    calib = inputs_for(base, 1, dev, torch.float32)
    x, t, c = inputs_for(base, a.batch, dev, torch.bfloat16)
    m = make_variant(base, a.variant, calib, run_inputs=(x, t, c))
    del base
    with torch.no_grad():
        for _ in range(2):
            call_model(m, x, t, c)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call_model(m, x, t, c)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("ncu_model_probe done", flush=True)


if __name__ == "__main__":
    main()
