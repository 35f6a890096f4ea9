"""``diffquant evaluate SAMPLES.npz --metrics fd_cifar[,kid_cifar,pr_cifar,is_cifar,fid,kid,pr,is]``"""
from __future__ import annotations

import math
from pathlib import Path

import click

from diffquant.commands._common import echo_err, emit_json, fail, format_table


@click.command("evaluate")
@click.argument("samples", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--metrics", "metrics", default="fd_cifar", show_default=True,
              help="Comma-separated: fd_cifar, kid_cifar, pr_cifar, is_cifar (zoo feature network); "
                   "fid, kid, pr, is (FID Inception-v3, needs --inception-weights).")
@click.option("--ref", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="CIFAR-10-JPEG split to compare against.")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (read with "
                   "torch.load(weights_only=True), SHA-256 checked) or a .safetensors conversion. Never downloaded.")
@click.option("--no-verify-inception", is_flag=True, help="Skip the SHA-256 check of --inception-weights.")
@click.option("--fid-ref-stats", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reference statistics .npz (mu, sigma) for fid, instead of computing them from --ref.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with CIFAR-10-JPEG train/test (.zip, packed .npz or image folders); default: "
                   "$DIFFQUANT_CIFAR10_DIR, ./.data, ./data/cifar10-jpeg, ../shared/data/cifar10-jpeg.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache for features of real images (default $DIFFQUANT_CACHE or ~/.cache/diffquant).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache.")
@click.option("--no-floor", is_flag=True, help="Skip the real-data floor of Fréchet metrics.")
@click.option("--resize", type=click.Choice(["error", "bilinear"]), default="error", show_default=True,
              help="Samples whose size differs from the feature network's input: refuse, or resize bilinearly.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Feature-extraction batch size.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--fd-method", type=click.Choice(["sqrtm", "eigh"]), default="sqrtm", show_default=True,
              help="Matrix square root of Fréchet metrics: scipy sqrtm (pytorch-fid's) or symmetric eigendecompositions "
                   "(same value up to rounding, usually faster for 2048-d FID on a CPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of KID subsets, PR and floor subsampling.")
@click.option("--stats-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also save the samples' feature statistics as DIR/<space>.npz.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def command(samples: Path, metrics: str, ref: str, inception_weights: Path | None, no_verify_inception: bool,
            fid_ref_stats: Path | None, data_dir: Path | None, cache_dir: Path | None, no_cache: bool,
            no_floor: bool, resize: str, batch_size: int | None, device: str, kid_subsets: int,
            kid_subset_size: int, fd_method: str, seed: int, stats_out: Path | None, as_json: bool, no_progress: bool) -> None:
    """Image-quality metrics of a sample set (.npz from `diffquant sample`).

    fd_cifar is the Fréchet distance in the zoo CIFAR-10-JPEG classifier's feature space (not FID);
    its real-data floor is the FD of as many real images of the other split (test images for
    --ref train) against the same reference: what a perfect generator would score."""
    import torch

    from diffquant.evaluation.suite import METRICS, evaluate_images, json_safe, parse_metrics
    from diffquant.sampling.io import load_samples

    try:
        names = parse_metrics(metrics)
        try:
            torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"invalid --device {device!r}: {e}") from e
        needs_inception = any(METRICS[m].space == "inception" for m in names)
        if needs_inception and inception_weights is None:
            raise ValueError(
                "metrics " + ", ".join(m for m in names if METRICS[m].space == "inception")
                + " need the FID Inception weights: pass --inception-weights PATH (pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth); diffquant never downloads them")
        images, seeds, meta = load_samples(samples)
        results = evaluate_images(
            images, names, ref=ref, device=device, batch_size=batch_size, inception_weights=inception_weights,
            verify_inception=not no_verify_inception, fid_ref_stats=fid_ref_stats, data_dir=data_dir,
            cache=False if no_cache else cache_dir, floor=not no_floor, resize=resize, kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size, seed=seed, fd_method=fd_method, stats_out=stats_out, progress=not no_progress,
        )
    except ValueError as e:
        fail(str(e))
        return

    n, h, w, c = images.shape
    if as_json:
        emit_json(json_safe({
            "samples": str(samples),
            "n": int(n),
            "image_shape": [int(h), int(w), int(c)],
            "ref": ref,
            "meta": meta,
            "metrics": {r.metric: r.to_dict() for r in results},
        }))
        return
    rows = []
    for r in results:
        rows.append({
            "metric": r.metric,
            "value": r.value,
            "std": r.std,
            "floor": r.floor,
            "reference": r.reference,
        })
    click.echo(f"{samples}: {n} samples, {h}x{w}x{c}" + (f", model {meta['model']}" if "model" in meta else ""))
    click.echo(format_table(rows, ["metric", "value", "std", "floor", "reference"]))
    for r in results:
        if r.floor_note:
            echo_err(f"{r.metric} floor: {r.floor_note}")
        if r.value is not None and not math.isfinite(r.value):
            echo_err(f"{r.metric}: value is not finite")
