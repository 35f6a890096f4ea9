"""diffquant bench: GPU latency of real low-bit models (diffquant INT8/FP8/W4A8/W4A16) against bf16."""
from __future__ import annotations

import click

from diffquant.commands._common import emit_json, fail, format_table


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


@click.command("bench")
@click.option("--models", default="sd15-unet,ddpm-cifar10-32", show_default=True,
              help="comma list of: sd15-unet, ddpm-cifar10-32, zoo:cifar10-ddpm")
@click.option("--batches", default="", help="per model, e.g. 'sd15-unet=1,8;ddpm-cifar10-32=1,64,256' "
              "(default: sd15-unet 8,1; CIFAR models 256,64,1)")
@click.option("--variants", default="bf16-eager,bf16-compile,dq-fp8,dq-fp8-gn,dq-int8,dq-w4a8,dq-w4a16,torchao-int8dyn,"
              "torchao-fp8", show_default=True,
              help="comma list; dq-fp8 and dq-int8 take the suffixes -gn (fused norms) and -gn-qkv (also stacked "
                   "Q/K/V), and the other suffixes of the variants listed in diffquant.kernels.bench.VARIANTS, e.g. "
                   "-fa (attention through diffquant's bf16 flash-attention kernel: dq-fp8-gn-qkv-te-ff-twq-fa), "
                   "-ln (the transformer blocks' LayerNorms as diffquant::add_layer_norm: dq-fp8-gn-qkv-te-ff-twq-ln, "
                   "the fastest SD-1.5 b8 row); "
                   "bf16-compile-gn: bf16 with diffquant's norm kernels")
@click.option("--no-compile", is_flag=True, help="time every variant eagerly (CUDA graphs still used)")
@click.option("--reps", default=30, show_default=True, help="timed calls per row (median reported)")
@click.option("--budget-s", default=1e9, type=float, help="start no new row after this many seconds")
@click.option("--no-layer-types", is_flag=True, help="skip the per-layer-type timing")
@click.option("--row-timeout-s", default=0.0, type=float,
              help="run every row in its own process, killed after this many seconds (0: one process)")
@click.option("--gpus", default="", help="run rows in parallel, one per GPU: 'all', a count N, or indices '0,2' "
              "(each row in its own process, as with --row-timeout-s)")
@click.option("--out", "out_path", default="benchmarks/results/kernels.json", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def command(models, batches, variants, no_compile, reps, budget_s, no_layer_types, row_timeout_s, gpus, out_path,
            as_json):
    """Time bf16 (eager, torch.compile), torchao and diffquant low-bit variants end to end and per layer type."""
    import torch

    from diffquant.kernels.bench import MODELS, VARIANTS, plan, run_tasks, run_tasks_isolated, visible_gpus

    if not torch.cuda.is_available():
        fail("diffquant bench needs a CUDA GPU (the low-bit kernels are GPU kernels); none is visible")
    try:
        gpu_ids = visible_gpus(gpus) if gpus else None
    except ValueError as e:
        fail(str(e))
    ms = _csv(models)
    vs = _csv(variants)
    for m in ms:
        if m not in MODELS:
            fail(f"model {m!r}; allowed: {', '.join(MODELS)}")
    for v in vs:
        if v not in VARIANTS:
            fail(f"variant {v!r}; allowed: {', '.join(VARIANTS)}")
    bmap = {m: ([8, 1] if m == "sd15-unet" else [256, 64, 1]) for m in ms}
    for part in filter(None, batches.split(";")):
        name, _, bs = part.partition("=")
        if name.strip() not in bmap:
            fail(f"--batches names model {name!r}, which is not in --models")
        bmap[name.strip()] = [int(b) for b in _csv(bs)]
    tasks = plan(ms, bmap, vs, compile=not no_compile)
    if row_timeout_s > 0 or gpu_ids:
        res = run_tasks_isolated(tasks, row_timeout_s or None, budget_s=budget_s, reps=reps, out_path=out_path,
                                 layer_types=not no_layer_types, progress=lambda s: click.echo(s, err=True),
                                 gpus=gpu_ids)
    else:
        res = run_tasks(tasks, budget_s=budget_s, reps=reps, out_path=out_path, layer_types=not no_layer_types,
                        progress=lambda s: click.echo(s, err=True))
    if as_json:
        emit_json(res)
    else:
        cols = ["model", "batch", "variant", "ms", "speedup_vs_bf16_compiled", "weight_bytes", "cuda_graph", "error"]
        click.echo(format_table(res["rows"], cols))
        if res["per_layer_type"]:
            click.echo(format_table(res["per_layer_type"]))
