"""diffquant sweep SPEC.yaml|SPEC.json --out DIR"""
from __future__ import annotations

import shlex

import click

from diffquant.commands._common import emit_json, fail


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="output folder (default: sweep-NAME); finished cells cached there are skipped on a rerun")
@click.option("--device", default=None, help="torch device (default: the spec's, else cuda if available, else cpu)")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="CIFAR-10-JPEG folder for the metrics' reference/real-data floor (default: the usual places)")
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False),
              help="FID Inception-v3 weights file, for the fid/kid/pr/is metrics")
@click.option("--dry-run", is_flag=True, help="list the cells and stop")
@click.option("--report/--no-report", default=True, show_default=True, help="write report.md / report.html")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the results (rows, env) as JSON")
def command(spec_path, out_dir, device, data_dir, inception_weights, dry_run, report, progress, as_json):
    """Run a sweep (models x recipes x bits x samplers x steps x sample counts) and write one results
    table (JSON + CSV), plots and a report. See `diffquant.experiments.spec` for the spec format."""
    from diffquant.experiments.spec import load_spec
    from diffquant.experiments.sweep import plan_cells

    try:
        spec = load_spec(spec_path)
    except ValueError as e:
        fail(str(e))
    out_dir = out_dir or f"sweep-{spec.name}"
    cells = plan_cells(spec)
    if dry_run:
        rows = [{"cell": i + 1, "model": c.model, "method": c.method, "config": c.config, "sampler": c.sampler.sampler,
                 "steps": c.sampler.steps, "num_samples": c.num} for i, c in enumerate(cells)]
        if as_json:
            emit_json({"out": out_dir, "cells": rows})
        else:
            from diffquant.commands._common import format_table

            click.echo(format_table(rows))
            click.echo(f"{len(cells)} cells -> {out_dir}")
        return
    from diffquant.experiments.report import terminal_table
    from diffquant.experiments.sweep import run_sweep

    cmd = ["diffquant", "sweep", spec_path, "--out", out_dir] + (["--device", device] if device else [])
    metric_kwargs = {}
    if data_dir:
        metric_kwargs["data_dir"] = data_dir
    if inception_weights:
        metric_kwargs["inception_weights"] = inception_weights
    try:
        res = run_sweep(spec, out_dir, device=device, progress=progress, command=shlex.join(cmd), report=report,
                        metric_kwargs=metric_kwargs)
    except ValueError as e:
        fail(str(e))
    d = res.to_dict()
    if as_json:
        emit_json({"out": out_dir, "computed": res.computed, "cached": res.cached, "rows": res.rows, "env": res.env})
    else:
        click.echo(terminal_table(d))
        click.echo(f"{res.computed} cells computed, {res.cached} cached -> {out_dir}/results.json, results.csv"
                   + (", report.md, report.html" if report else ""))
