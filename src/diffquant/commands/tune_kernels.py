"""diffquant tune-kernels: per-shape block configs (and gather / TMA kernel) for this GPU, as a tuned table."""
from __future__ import annotations

import click

from diffquant.commands._common import fail


@click.command("tune-kernels")
@click.option("--tasks", default="sd15-unet:8:dq-fp8", show_default=True,
              help="comma list of model:batch:variant; models: sd15-unet, ddpm-cifar10-32, zoo:<name>; variants: "
                   "dq-int8, dq-fp8, dq-w4a8, dq-w4a16")
@click.option("--out", "out_path", default="qconv_tuned.json", show_default=True,
              help="the tuned table (use it with DIFFQUANT_QCONV_TUNED=PATH)")
@click.option("--rows", "rows_path", default=None, help="also write one diagnostic row per shape (JSON)")
@click.option("--budget-s", default=float("inf"), type=float, help="tune no new shape after this many seconds")
@click.option("--reps", default=10, show_default=True, help="timed calls per candidate (median)")
@click.option("--no-tma", is_flag=True, help="time the gather kernel's candidates only")
@click.option("--skip-paths", default="", help="comma list of TMA kernels not to try (tma, tma4d, tma4dp, tma4dr)")
@click.option("--untuned-only", is_flag=True,
              help="time only the shapes that no active tuned table (shipped or DIFFQUANT_QCONV_TUNED) lists")
@click.option("--shapes", default="",
              help="comma list: time only the shapes whose key contains one of these (e.g. x8x8:,x16x16:)")
@click.option("--show-rows", default=None, help="print the summary of a rows file and exit (no GPU needed)")
@click.option("--merge-into", default=None,
              help="afterwards, merge the new table into this one (same GPU model; written in place)")
@click.option("--merge-from", default=None,
              help="with --merge-into: merge this existing table instead of tuning (no GPU needed)")
def command(tasks, out_path, rows_path, budget_s, reps, no_tma, skip_paths, untuned_only, shapes, show_rows,
            merge_into, merge_from):
    """Time the conv kernels' candidate configs on every layer shape of the given models and write the fastest per
    shape; the kernels then use the table on the same GPU model."""
    from diffquant.kernels.tune_models import format_rows, tune_models

    if show_rows:
        try:
            click.echo("\n".join(format_rows(show_rows)))
        except (OSError, ValueError, KeyError) as e:
            fail(f"cannot read tune rows from {show_rows}: {e}")
        return
    if merge_from and not merge_into:
        fail("--merge-from needs --merge-into (the table to merge it into)")
    if merge_from:
        _merge(merge_from, merge_into)
        return
    from diffquant.kernels.tuning import PATHS

    tma_paths = [p for p in PATHS if p != "gather"]
    skip = [p for p in skip_paths.split(",") if p]
    bad = [p for p in skip if p not in tma_paths]
    if bad:
        fail(f"--skip-paths {','.join(bad)}: allowed: {', '.join(tma_paths)}")
    try:
        tune_models(tasks, out_path, rows_path, budget_s, reps, tma=not no_tma, skip_paths=skip,
                    untuned_only=untuned_only, shapes=[p for p in shapes.split(",") if p],
                    progress=lambda s: click.echo(s, err=True))
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    if merge_into:
        _merge(out_path, merge_into)


def _merge(new_path: str, base_path: str) -> None:
    import json

    from diffquant.kernels.tuning import load_table, merge_tables

    try:
        merged = merge_tables(load_table(base_path), load_table(new_path))
    except (OSError, ValueError) as e:
        fail(f"cannot merge {new_path} into {base_path}: {e}")
    with open(base_path, "w") as f:
        json.dump(merged, f, indent=1)
    click.echo(f"{base_path}: {len(merged['configs'])} shapes after merging {new_path}", err=True)
