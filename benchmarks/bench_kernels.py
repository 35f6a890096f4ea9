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

from diffquant.kernels.bench import Task, run_tasks, run_tasks_isolated, visible_gpus


def default_tasks(compile: bool = True) -> list[Task]:
    """The issue's target rows first (each variant compiled once, ~45-85 s per compiled SD-1.5 row on
    an H200), then torchao, the uncompiled bf16 rows (cheap), 4-bit weights, and the other batches."""
    T = lambda m, b, v: Task(m, b, v, compile)  # noqa: E731
    sd, cf = "sd15-unet", "ddpm-cifar10-32"
    tasks = [T(sd, 8, v) for v in ("bf16-compile", "dq-fp8", "dq-fp8-fp8attn", "dq-int8")]
    tasks += [T(cf, 256, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    tasks += [T(m, b, v) for m, b in ((sd, 8), (cf, 256)) for v in ("torchao-fp8", "torchao-int8dyn")]
    tasks += [T(sd, 8, "bf16-eager"), T(cf, 256, "bf16-eager")]
    tasks += [T(m, b, v) for m, b in ((sd, 8), (cf, 256)) for v in ("dq-w4a8", "dq-w4a16")]
    tasks += [T(sd, 1, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    tasks += [T("zoo:cifar10-ddpm", 256, v) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    tasks += [T(cf, b, v) for b in (64, 1) for v in ("bf16-compile", "dq-fp8", "dq-int8")]
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-layer-types", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel-class GPU time of each row")
    ap.add_argument("--only", default="", help="comma list of model:batch:variant to run instead of the default list")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--row-timeout-s", type=float, default=0,
                    help="run every row in its own process, killed after this many seconds (0: all rows in this process)")
    ap.add_argument("--gpus", default="", help="run rows in parallel, one per GPU: 'all', a count N or indices '0,2' "
                    "(each row in its own process)")
    a = ap.parse_args()
    tasks = default_tasks()
    if a.only:
        tasks = []
        for spec in filter(None, (v.strip() for v in a.only.split(","))):
            m, b, v = spec.rsplit(":", 2)
            tasks.append(Task(m, int(b), v))
    if a.row_timeout_s > 0 or a.gpus:
        res = run_tasks_isolated(tasks, a.row_timeout_s or None, budget_s=a.budget_s, reps=a.reps, out_path=a.out,
                                 layer_types=not a.no_layer_types, profile=not a.no_profile,
                                 gpus=visible_gpus(a.gpus) if a.gpus else None)
    else:
        res = run_tasks(tasks, budget_s=a.budget_s, reps=a.reps, out_path=a.out, layer_types=not a.no_layer_types,
                        profile=not a.no_profile)
    from diffquant.commands._common import format_table

    print(format_table(res["rows"], ["model", "batch", "variant", "ms", "speedup_vs_bf16_compiled", "weight_bytes",
                                     "cuda_graph", "first_call_s", "error"]))
    if res["per_layer_type"]:
        print(format_table(res["per_layer_type"]))
    for kb in res.get("kernel_breakdown", []):
        print(kb["model"], kb["batch"], kb["variant"], "busy_ms", kb["busy_ms"], kb["kernel_ms"])
    print("skipped:", len(res["skipped"]), "wall_s:", res["wall_s"])


if __name__ == "__main__":
    main()
