"""Which elementwise kernels does torch.compile (Inductor) generate around diffquant's low-bit layers? (CPU)

Compiles a scaled-down SD-1.5-layout UNet (same block types, channels 32/64/128/128, 16x16 latents, 64-dim
context) in bf16 channels-last on the CPU, once as is and once converted to a diffquant backend (reference ops on
the CPU: the graph and its fusion decisions are the ones a GPU build sees up to codegen), and lists the fused
kernels Inductor generated. The quantize step of an activation shows in a kernel's name as ``_to_copy_clamp_div``;
a kernel with that and no norm / activation / add in its name is a quantization pass of its own:

    python benchmarks/fusion_census.py --backend fp8 --out benchmarks/results/fusion_census.json
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import time

import torch

SMALL_SD = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
PRODUCERS = ("norm", "silu", "gelu", "add", "mul", "cat", "exp", "index")


def kernels(model, inputs) -> list[str]:
    from torch._inductor.utils import run_and_get_code

    from diffquant.models.adapter import call_model

    cm = torch.compile(model)
    with torch.no_grad():
        _, codes = run_and_get_code(lambda: call_model(cm, *inputs))
    return sorted(set(re.findall(r"\b(cpp_fused_[A-Za-z0-9_]+) = async_compile", "\n".join(codes))))


def classify(name: str) -> str:
    body = name[len("cpp_fused_"):]
    if "_to_copy" in body and "clamp" in body and "div" in body:
        return "quantize fused into a producer" if any(p in body for p in PRODUCERS) else "quantize pass of its own"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="fp8", help="diffquant backend (int8, fp8, w4a8, w4a16)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from diffusers import UNet2DConditionModel

    from diffquant.kernels.bench import _quantized, inputs_for

    torch.manual_seed(0)
    base = UNet2DConditionModel(**SMALL_SD).eval()
    inputs = inputs_for(base, a.batch, "cpu", torch.bfloat16)
    res = {"command": f"python benchmarks/fusion_census.py --backend {a.backend} --batch {a.batch}",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "device": "cpu", "config": SMALL_SD}
    for label, model in (("bf16", copy.deepcopy(base)),
                         (a.backend, _quantized(base, a.backend, inputs_for(base, 1, "cpu", torch.float32)))):
        t0 = time.time()
        names = kernels(model.to(torch.bfloat16).to(memory_format=torch.channels_last).eval(), inputs)
        classes: dict = {}
        for n in names:
            classes.setdefault(classify(n), []).append(n)
        res[label] = {"kernels": len(names), "compile_s": round(time.time() - t0, 1),
                      "by_class": {k: len(v) for k, v in classes.items()},
                      "own_quantize_passes": sorted(classes.get("quantize pass of its own", [])), "names": names}
        print(label, res[label]["kernels"], "kernels", res[label]["by_class"], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    for n in res[a.backend]["own_quantize_passes"]:
        print("  own pass:", n)


if __name__ == "__main__":
    main()
