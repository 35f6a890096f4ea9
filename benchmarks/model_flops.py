"""FLOPs of one forward pass of a bench model, per layer kind, counted on PyTorch's meta device (no GPU, no weights
in memory): 2 x output elements x (input channels x kernel area) for every nn.Conv2d, 2 x output elements x input
features for every nn.Linear. With a kernel profile's ms per class (``kernels.json``'s ``kernel_breakdown``) it gives
the TFLOP/s each class reaches. Attention's own matmuls (Q·Kᵀ, P·V) are not modules and are not counted.

    python benchmarks/model_flops.py [--model sd15-unet] [--batch 8] [--out benchmarks/results/model_flops.json]

Kinds: ``conv3x3`` (every k x k conv but the ResNet shortcuts), ``conv1x1``, ``shortcut`` (ResNet blocks'
``conv_shortcut``), ``attn_proj`` (attention's Q/K/V/out), ``ff`` (feed-forward), ``linear`` (the rest).
"""
from __future__ import annotations

import argparse
import collections
import json
import time


def kind_of(name: str, mod) -> str:
    import torch.nn as nn

    if isinstance(mod, nn.Conv2d):
        if "shortcut" in name:
            return "shortcut"
        return "conv1x1" if mod.kernel_size == (1, 1) else "conv3x3"
    if ".ff." in name or name.startswith("ff."):
        return "ff"
    if ".attn" in name or name.startswith("attn"):
        return "attn_proj"
    return "linear"


def count(model_name: str, batch: int) -> dict:
    """{"gflop": {kind: GFLOP}, "layers": {kind: count}, "total_gflop": ...} of one forward pass at ``batch``."""
    import torch
    import torch.nn as nn

    from diffquant.kernels.bench import build_model, inputs_for
    from diffquant.models.adapter import call_model

    with torch.device("meta"):
        model = build_model(model_name)
    x, t, c = inputs_for(model, batch, "cpu", torch.float32)
    x, t = x.to("meta"), t.to("meta")
    c = {k: v.to("meta") for k, v in c.items()}
    flops: dict = collections.Counter()
    layers: dict = collections.Counter()

    def hook(mod, inp, out, name):
        per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] \
            if isinstance(mod, nn.Conv2d) else mod.in_features
        k = kind_of(name, mod)
        flops[k] += 2 * out.numel() * per_out
        layers[k] += 1

    handles = [m.register_forward_hook(lambda mod, i, o, name=n: hook(mod, i, o, name))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            call_model(model, x, t, c)
    finally:
        for h in handles:
            h.remove()
    gflop = {k: round(v / 1e9, 2) for k, v in sorted(flops.items())}
    return {"model": model_name, "batch": batch, "gflop": gflop, "layers": dict(sorted(layers.items())),
            "total_gflop": round(sum(flops.values()) / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15-unet")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="", help="write the counts here (JSON) as well")
    a = ap.parse_args()
    res = count(a.model, a.batch)
    res.update(command=f"python benchmarks/model_flops.py --model {a.model} --batch {a.batch}",
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
