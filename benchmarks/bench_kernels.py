"""Low-bit kernel benchmark (GPU): end-to-end latency of bf16 eager / torch.compile, torchao
int8-dynamic / fp8 and diffquant W8A8 INT8, W8A8 FP8, W4A8, W4A16, plus per-layer-type sums,
on the SD-1.5-sized UNet and the CIFAR UNets. Rows go to benchmarks/results/kernels.json.

    python benchmarks/bench_kernels.py [--budget-s 300] [--out benchmarks/results/kernels.json]

Same as ``diffquant bench``; the order below puts the issue's targets first (SD-1.5 UNet at batch 8,
google/ddpm-cifar10-32 at batch 256), then the remaining variants and batch sizes, so that a run
cut short by its time budget still has them.
"""
from __future__ import annotations

import argparse

from diffquant.kernels.bench import Task, run_tasks


def default_tasks(compile: bool = True) -> list[Task]:
    T = lambda m, b, v: Task(m, b, v, compile)  # noqa: E731
    first = [T("sd15-unet", 8, v) for v in ("bf16-compile", "dq-fp8", "dq-int8", "bf16-eager")]
    first += [T("ddpm-cifar10-32", 256, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    second = [T("sd15-unet", 8, v) for v in ("dq-w4a8", "dq-w4a16", "torchao-fp8", "torchao-int8dyn")]
    second += [T("ddpm-cifar10-32", 256, v) for v in ("bf16-eager", "dq-w4a8", "dq-w4a16", "torchao-fp8", "torchao-int8dyn")]
    third = [T("sd15-unet", 1, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    third += [T("zoo:cifar10-ddpm", 256, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    third += [T("ddpm-cifar10-32", b, v) for b in (64, 1) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    return first + second + third


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-layer-types", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    a = ap.parse_args()
    res = run_tasks(default_tasks(), budget_s=a.budget_s, reps=a.reps, out_path=a.out, layer_types=not a.no_layer_types)
    from diffquant.commands._common import format_table

    print(format_table(res["rows"], ["model", "batch", "variant", "ms", "speedup_vs_bf16_compiled", "weight_bytes",
                                     "cuda_graph", "first_call_s", "error"]))
    if res["per_layer_type"]:
        print(format_table(res["per_layer_type"]))
    print("skipped:", len(res["skipped"]), "wall_s:", res["wall_s"])


if __name__ == "__main__":
    main()
