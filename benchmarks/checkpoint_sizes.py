"""Checkpoint sizes: fp16 safetensors vs diffquant packed checkpoints at W8/W4/W3/W2 (per-channel).

Sizes do not depend on the weight values, so random weights of the real configurations are used.
Prints a table and writes benchmarks/results/checkpoint_sizes.json.

    python benchmarks/checkpoint_sizes.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffquant.commands._common import format_table
from diffquant.config import QuantConfig, QuantScheme
from diffquant.io import save_quantized
from diffquant.models.configs import DDPM_CIFAR10_32, ZOO_CIFAR10_DDPM, build_unet
from diffquant.quantize import quantize

MODELS = {"google/ddpm-cifar10-32 config": DDPM_CIFAR10_32, "zoo:cifar10-ddpm config": ZOO_CIFAR10_DDPM}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_sizes.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, cfg in MODELS.items():
            model = build_unet(cfg).eval()
            fp16 = Path(d) / "fp16.safetensors"
            save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(fp16))
            fp16_bytes = fp16.stat().st_size
            rows.append({"model": name, "variant": "fp16", "bytes": fp16_bytes, "ratio_vs_fp16": 1.0})
            for bits in (8, 4, 3, 2):
                q = quantize(model, QuantConfig(weight=QuantScheme(bits, granularity="per_channel"), act=None))
                out = Path(d) / f"w{bits}"
                save_quantized(q, out)
                b = (out / "model.safetensors").stat().st_size
                rows.append({"model": name, "variant": f"W{bits} packed", "bytes": b, "ratio_vs_fp16": b / fp16_bytes})
    print(format_table(rows, floatfmt=".3f"))
    res = {"command": "python benchmarks/checkpoint_sizes.py", "device": platform.machine() + " CPU",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
