"""diffquant sample MODEL|QUANTIZED_DIR --out FILE.npz"""
from __future__ import annotations

import time
from pathlib import Path

import click

from diffquant.commands._common import emit_json, fail
from diffquant.commands._options import device_option, resolve_device, sampler_options


@click.command("sample")
@click.argument("model")
@sampler_options(default_steps=100)
@click.option("--num", type=int, default=64, show_default=True, help="number of samples")
@click.option("--seed", type=int, default=0, show_default=True, help="sample i uses seed SEED+i")
@click.option("--batch-size", type=int, default=64, show_default=True)
@device_option
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="samples .npz")
@click.option("--grid/--no-grid", default=True, show_default=True, help="also write a PNG grid next to the .npz")
@click.option("--json", "as_json", is_flag=True)
def command(model, sampler, steps, spacing, eta, num, seed, batch_size, device, out_path, grid, as_json):
    """Sample MODEL (zoo:NAME, diffusers folder, hub id, or a quantized folder) with fixed seeds."""
    from diffquant.models.loading import load_model
    from diffquant.sampling import SamplerSpec, sample, save_samples
    from diffquant.viz import save_grid

    dev = resolve_device(device)
    try:
        spec = SamplerSpec(sampler, steps, spacing, eta)
        loaded = load_model(model, device=dev)
        if loaded.scheduler is None:
            fail(f"{model} has no scheduler config; cannot sample")
        t0 = time.perf_counter()
        res = sample(loaded.model, loaded.scheduler, num=num, seed=seed, spec=spec, batch_size=batch_size, device=dev)
        secs = time.perf_counter() - t0
    except ValueError as e:
        fail(str(e))
    meta = {**res.meta, "model": model, "quantized": loaded.quantized, "device": str(dev)}
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
