"""Issue 7 memory target on any machine (CPU is enough): the bytes the weights of each deployment variant take.

    python benchmarks/weight_bytes.py [--models sd15-unet,ddpm-cifar10-32,zoo:cifar10-ddpm]
                                      [--out benchmarks/results/weight_bytes.json]

Each model is built as in ``diffquant bench`` (``diffquant.kernels.bench``: random weights for the SD-1.5-sized
UNet and google/ddpm-cifar10-32's config), each diffquant variant calibrated on one batch and converted to its
real low-bit modules (``convert``: packed int8 / int4 / FP8 weights + scales, as they sit in GPU memory), and
``kernels.bench.weight_bytes`` counts what is stored: parameters plus the low-bit layers' buffers. The ratio is
to the same model in bf16. The issue's target: W4 weights take <= 0.3x of the bf16 bytes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15-unet,ddpm-cifar10-32,zoo:cifar10-ddpm")
    ap.add_argument("--variants", default="dq-int8,dq-fp8,dq-w4a8,dq-w4a16")
    ap.add_argument("--out", default="benchmarks/results/weight_bytes.json")
    a = ap.parse_args()
    from diffquant.kernels.bench import build_model, inputs_for, make_variant, weight_bytes

    res = {"command": shlex.join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": []}
    for name in filter(None, a.models.split(",")):
        base = build_model(name).float()
        bf16_bytes = sum(p.numel() for p in base.parameters()) * 2
        res["rows"].append({"model": name, "variant": "bf16", "weight_bytes": bf16_bytes, "ratio_vs_bf16": 1.0})
        print(json.dumps(res["rows"][-1]), flush=True)
        calib = inputs_for(base, 1, "cpu", torch.float32)
        for v in filter(None, a.variants.split(",")):
            t = time.perf_counter()
            m = make_variant(base, v, calib)
            rep = getattr(m, "_diffquant_convert_report", None)
            wb = weight_bytes(m)
            res["rows"].append({"model": name, "variant": v, "weight_bytes": wb, "ratio_vs_bf16": round(wb / bf16_bytes, 4),
                                "converted_layers": len(rep.converted) if rep else None,
                                "kept_layers": dict(rep.kept) if rep else None, "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps({k: v for k, v in res["rows"][-1].items() if k != "kept_layers"}), flush=True)
            del m
        del base
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
