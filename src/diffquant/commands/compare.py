"""``diffquant compare A.npz B.npz``: paired fidelity (MSE/PSNR/SSIM) of two sample sets made with the same seeds."""
from __future__ import annotations

from pathlib import Path

import click

from diffquant.commands._common import emit_json, fail, format_table


@click.command("compare")
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--per-image", is_flag=True, help="Include per-image MSE/PSNR/SSIM in the JSON output.")
def command(a: Path, b: Path, as_json: bool, per_image: bool) -> None:
    """MSE, PSNR and SSIM between image i of A and image i of B (e.g. full precision vs quantized,
    sampled from identical seeds). Refuses sets with different seeds or shapes.

    PSNR is in dB with peak 255; its summary is over the pairs that differ (identical pairs have
    infinite PSNR, are counted separately, and appear as null in JSON)."""
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.evaluation.suite import json_safe
    from diffquant.sampling.io import load_samples

    try:
        ia, sa, ma = load_samples(a)
        ib, sb, mb = load_samples(b)
        res = paired_fidelity(ia, ib, sa, sb, per_image=per_image)
    except ValueError as e:
        fail(str(e))
        return
    if as_json:
        out = {"a": str(a), "b": str(b), **res}
        if per_image:
            out["seeds"] = sa
        emit_json(json_safe(out))
        return
    click.echo(f"{a} vs {b}: {res['n']} image pairs, {ia.shape[1]}x{ia.shape[2]}x{ia.shape[3]}")
    rows = [
        {"metric": "mse", **res["mse"]},
        {"metric": "psnr_db", **res["psnr"]},
        {"metric": "ssim", **res["ssim"]},
    ]
    click.echo(format_table(rows, ["metric", "mean", "std", "min", "max"]))
    click.echo(f"PSNR of the mean MSE: {res['psnr_of_mean_mse']:.4g} dB; identical pairs: {res['psnr_identical']}")
