"""diffquant sample MODEL|QUANTIZED_DIR --out FILE.npz [--shard-size N --out-dir DIR --resume]

Without the sharding options this samples in one go (``diffquant.sampling.sample``). With any of
``--shard-size``, ``--out-dir``, ``--resume`` or ``--compute-batch``, or under ``torchrun``, the run
is split into seeded shards written as they finish, resumable, and merged into ``--out``
(``diffquant.sampling.large.sample_sharded``): the samples are then byte-identical whatever the
batch size or number of processes, for a given ``--compute-batch`` and device type.

Several GPUs on one host::

    torchrun --nproc-per-node 2 -m diffquant.cli sample zoo:cifar10-ddpm --num-samples 10000 \\
        --shard-size 1000 --out-dir run/ --out samples.npz

(``--num-samples`` is ``--num``; torchrun's own parser would take ``--num`` for its ``--numa-binding``.)

A quantized folder on diffquant's real low-bit kernels (packed weights; Triton on the GPU)::

    diffquant sample QUANT_DIR --real int8 --compile --device cuda --out real.npz
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from diffquant.commands._common import emit_json, fail
from diffquant.commands._options import device_option, resolve_device, sampler_options


# --fp8-gemm: set_fp8_gemm's mode and the layer-name endings it leaves row-wise
FP8_GEMM_MODES = {"rowwise": ("rowwise", ()), "tensorwise": ("tensorwise", ()),
                  "tensorwise-except-qkv": ("tensorwise", ("to_qkv", "to_kv", "to_q", "to_k", "to_v"))}


@click.command("sample")
@click.argument("model")
@sampler_options(default_steps=100)
@click.option("--num", "--num-samples", "num", type=int, default=64, show_default=True,
              help="number of samples (under torchrun write --num-samples: torchrun takes --num for its --numa-binding)")
@click.option("--seed", type=int, default=0, show_default=True, help="sample i uses seed SEED+i")
@click.option("--batch-size", type=int, default=64, show_default=True, help="samples per sampling loop")
@device_option
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="samples .npz")
@click.option("--grid/--no-grid", default=True, show_default=True, help="also write a PNG grid next to the .npz")
@click.option("--shard-size", type=int, default=None,
              help="sharded run: samples per shard file (default 1000 when another sharding option is given)")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="sharded run: folder of the shard files (default: OUT without .npz + '.shards/')")
@click.option("--resume", is_flag=True, help="sharded run: keep the finished shards in --out-dir, compute the rest")
@click.option("--compute-batch", type=int, default=None,
              help="sharded run: rows per model evaluation (default 64); samples are identical for a given "
                   "compute batch and device type, whatever --batch-size")
@click.option("--cpu-int8", is_flag=True,
              help="run MODEL as real int8 on an x86 CPU through PyTorch's pt2e flow (torchao X86InductorQuantizer + "
                   "Inductor; needs torchao), calibrated first on the full-precision sampler's inputs")
@click.option("--calib-num", type=int, default=16, show_default=True,
              help="with --cpu-int8: calibration trajectories (x 10 steps of DDIM-20; consistency models: x the noise "
                   "levels of the 1/2/4-step chains)")
@click.option("--real", "real", type=click.Choice(["int8", "fp8", "w4a8", "w4a16"]), default=None,
              help="run a quantized folder on diffquant's real low-bit kernels (diffquant.convert: packed weights, "
                   "Triton kernels on the GPU, the reference ops elsewhere) instead of the fake-quant simulation")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="with --real: fused group norms, unconcatenated up blocks, stacked Q/K/V and time projections, "
                   "GEGLU in the projection's epilogue (convert's fuse_norms, fuse_qkv, fuse_temb, fuse_ff)")
@click.option("--real-attention", type=click.Choice(["float", "simulate", "fp8"]), default="float",
              show_default=True, help="with --real: the attention matmuls in float (SDPA), fake-quantized as "
                                      "calibrated, or in FP8")
@click.option("--fp8-gemm", type=click.Choice(list(FP8_GEMM_MODES)), default="rowwise", show_default=True,
              help="with --real fp8 on a GPU: cuBLAS FP8 GEMM scales (set_fp8_gemm). 'tensorwise-except-qkv' was the "
                   "fastest on an SD-1.5-sized UNet at batch 8 (1.19x over compiled bf16 against 1.17x for "
                   "'tensorwise', H200, 2026-11-28; BENCHMARKS.md, ninth measurement); not measured on the CIFAR UNets")
@click.option("--compile", "compile_", is_flag=True, help="with --real: torch.compile the converted model")
@click.option("--json", "as_json", is_flag=True)
def command(model, sampler, steps, spacing, eta, num, seed, batch_size, device, out_path, grid, shard_size, out_dir,
            resume, compute_batch, cpu_int8, calib_num, real, fuse, real_attention, fp8_gemm, compile_, as_json):
    """Sample MODEL (zoo:NAME, diffusers folder, hub id, or a quantized folder) with fixed seeds."""
    from diffquant.models.loading import load_model
    from diffquant.sampling import SamplerSpec, sample, save_samples
    from diffquant.viz import save_grid

    sharded = (shard_size is not None or out_dir is not None or resume or compute_batch is not None
               or int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if sharded and (cpu_int8 or real):
        fail(f"{'--cpu-int8' if cpu_int8 else '--real'} samples in one go: leave out --shard-size/--out-dir/--resume/"
             f"--compute-batch and torchrun")
    if cpu_int8 and real:
        fail("--cpu-int8 and --real are two different int8 paths: pick one")
    if fp8_gemm != "rowwise" and real != "fp8":
        fail(f"--fp8-gemm {fp8_gemm} applies to --real fp8 only")
    if sharded:
        return _sharded(model, sampler, steps, spacing, eta, num, seed, batch_size, device, out_path, grid,
                        shard_size, out_dir, resume, compute_batch, as_json)
    dev = resolve_device(device)
    try:
        spec = SamplerSpec(sampler, steps, spacing, eta)
        loaded = load_model(model, device=dev)
        if loaded.scheduler is None:
            fail(f"{model} has no scheduler config; cannot sample")
        net, int8_info = loaded.model, None
        if cpu_int8:
            net, int8_info = _cpu_int8(loaded, dev, calib_num)
        real_info = None
        if real:
            net, real_info = _real_kernels(loaded, real, fuse, real_attention, compile_, dev, fp8_gemm)
        t0 = time.perf_counter()
        res = sample(net, loaded.scheduler, num=num, seed=seed, spec=spec, batch_size=batch_size, device=dev)
        secs = time.perf_counter() - t0
    except (ValueError, ImportError) as e:
        fail(str(e))
    meta = {**res.meta, "model": model, "quantized": loaded.quantized, "device": str(dev)}
    if int8_info:
        meta["cpu_int8"] = int8_info
    if real_info:
        meta["real_kernels"] = real_info
    save_samples(out_path, res.images, res.seeds, meta)
    grid_path = None
    if grid:
        grid_path = str(Path(out_path).with_suffix(".png"))
        save_grid(res.images[: min(num, 100)], grid_path, nrow=10 if num >= 10 else None)
    out = {"out": out_path, "grid": grid_path, "num": num, "seconds": secs, "images_per_second": num / secs, **meta}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"{num} samples in {secs:.1f}s ({num / secs:.2f} img/s) -> {out_path}")


def _real_kernels(loaded, backend: str, fuse: bool, attention: str, compile_: bool, dev, fp8_gemm: str = "rowwise"):
    """(converted denoiser, info): the quantized model on diffquant's real low-bit modules."""
    import torch

    from diffquant.convert import convert
    from diffquant.kernels.modules import set_fp8_gemm

    if not loaded.quantized:
        fail("--real needs a quantized folder (diffquant quantize MODEL ... --out DIR), not a full-precision model")
    net = convert(loaded.model, backend, attention=attention, fuse_norms=fuse, fuse_qkv=fuse, fuse_ff=fuse,
                  fuse_temb=fuse, device=dev, inplace=True)  # the loaded fake-quant model is not used again: no copy
    rep = net._diffquant_convert_report
    if not rep.converted:
        why = next(iter(rep.kept.items()), ("", "no quantized layers"))
        fail(f"--real {backend}: no layer of this folder can run on it ({why[0]}: {why[1]})")
    click.echo(rep.summary(), err=True)
    info = {**rep.to_dict(), "fuse": fuse, "compiled": compile_}
    if fp8_gemm != "rowwise":
        mode, exclude = FP8_GEMM_MODES[fp8_gemm]
        switched = set_fp8_gemm(net, mode, exclude=exclude)
        info["fp8_gemm"] = {"mode": fp8_gemm, "layers_switched": switched}
        click.echo(f"--fp8-gemm {fp8_gemm}: {switched} GEMMs switched"
                   + ("" if switched else " (cuBLAS FP8 GEMMs run on a GPU only: none here)"), err=True)
    if compile_:
        net = torch.compile(net)
    return net, info


def _cpu_int8(loaded, dev, calib_num: int):
    """(int8 denoiser, info): calibration on the FP sampler, then diffquant.kernels.cpu_pt2e.quantize_pt2e_x86."""
    from diffquant.commands.quantize import _is_consistency_model, cm_calibration_plan
    from diffquant.kernels.cpu_pt2e import quantize_pt2e_x86
    from diffquant.recipes import CalibOptions, get_calibration
    from diffquant.sampling import SamplerSpec

    if dev.type != "cpu":
        raise ValueError(f"--cpu-int8 runs on the CPU; got --device {dev}")
    if loaded.quantized:
        raise ValueError("--cpu-int8 quantizes the full-precision model itself; pass the FP model, not a quantized folder")
    t0 = time.perf_counter()
    if _is_consistency_model(loaded.scheduler):
        spec, chains, levels = cm_calibration_plan(loaded.scheduler, "cm", None, None, None)
        opts = CalibOptions(calib_num, levels, spec, cm_chains=chains)
    else:
        opts = CalibOptions(calib_num, 10, SamplerSpec("ddim", 20))
    calib = get_calibration(loaded.model, loaded.scheduler, opts, dev, progress=False)
    t1 = time.perf_counter()
    net = quantize_pt2e_x86(loaded.model, calib)
    return net, {"calib_rows": len(calib), "calib_capture_seconds": round(t1 - t0, 2),
                 "export_calibrate_convert_compile_seconds": round(time.perf_counter() - t1, 2),
                 "flow": "torch.export + torchao X86InductorQuantizer (pt2e) + Inductor freezing",
                 "reduce_range": net.reduce_range}


def _sharded(model, sampler, steps, spacing, eta, num, seed, batch_size, device, out_path, grid, shard_size, out_dir,
             resume, compute_batch, as_json):
    from diffquant.models.loading import load_model
    from diffquant.sampling import SamplerSpec
    from diffquant.sampling.large import DEFAULT_COMPUTE_BATCH, init_distributed_from_env, sample_sharded
    from diffquant.viz import save_grid

    try:
        dist_dev = init_distributed_from_env(device)
    except (RuntimeError, ValueError) as e:
        fail(f"cannot set up torch.distributed from the torchrun environment: {e}")
    dev = dist_dev if dist_dev is not None else resolve_device(device)
    shard_size = 1000 if shard_size is None else shard_size
    compute_batch = DEFAULT_COMPUTE_BATCH if compute_batch is None else compute_batch
    if out_dir is None:
        p = Path(out_path)
        out_dir = str(p.with_name(p.stem + ".shards"))
    t0 = time.perf_counter()
    try:
        spec = SamplerSpec(sampler, steps, spacing, eta)
        loaded = load_model(model, device=dev)
        if loaded.scheduler is None:
            fail(f"{model} has no scheduler config; cannot sample")
        run = sample_sharded(loaded.model, loaded.scheduler, num=num, out_dir=out_dir, seed=seed, spec=spec,
                             shard_size=shard_size, batch_size=batch_size, compute_batch=compute_batch, device=dev,
                             out=out_path, resume=resume, model_id=model, keep_in_memory=grid,
                             extra_meta={"quantized": loaded.quantized})
        _barrier()  # every rank finished (rank 0 merged) before any tears its process group down
    except ValueError as e:
        fail(str(e))
    finally:
        _destroy_dist()
    if run.rank != 0:
        _exit_worker()
    secs = time.perf_counter() - t0
    grid_path = None
    if grid and run.images is not None:
        grid_path = str(Path(out_path).with_suffix(".png"))
        save_grid(run.images[: min(num, 100)], grid_path, nrow=10 if num >= 10 else None)
    res = {"out": out_path, "out_dir": out_dir, "grid": grid_path, "num": num, "seconds": secs,
           "sampling_seconds": run.seconds, "images_computed": run.images_computed,
           "images_per_second": run.images_per_second, "shards": run.num_shards, "shards_computed": len(run.computed),
           "shards_reused": len(run.reused), "world_size": run.world_size, "images_sha256": run.images_sha256,
           "device": str(dev), **{k: v for k, v in run.meta.items() if k not in ("images_sha256",)}}
    if as_json:
        emit_json(res)
    else:
        rate = f"{run.images_per_second:.2f} img/s" if run.images_per_second else "nothing to compute"
        click.echo(f"{num} samples ({run.num_shards} shards: {len(run.computed)} computed by rank 0, "
                   f"{len(run.reused)} reused; {run.world_size} process(es)) in {secs:.1f}s ({rate}) -> {out_path}")


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _barrier() -> None:
    if _multi_rank():
        import torch.distributed as dist

        dist.barrier()


def _exit_worker() -> None:
    """A rank other than 0 ends here, once its process group is gone: its shards are written and rank 0 has merged
    them (the barrier). It exits without the interpreter's teardown, where rank 1 aborted now and then with
    "terminate called without an active exception" (1 of 88 CPU runs after the barrier, 1 of 12 before; root cause
    not found), failing a torchrun job whose output was complete."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _destroy_dist() -> None:
    if _multi_rank():
        import torch.distributed as dist

        dist.destroy_process_group()
