"""diffquant report SWEEP_DIR"""
from __future__ import annotations

import json
from pathlib import Path

import click

from diffquant.commands._common import emit_json, fail


@click.command("report")
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--html/--no-html", "html_report", default=True, show_default=True,
              help="also write report.html (self-contained, images embedded)")
@click.option("--json", "as_json", is_flag=True, help="print the results rows as JSON")
def command(sweep_dir, html_report, as_json):
    """(Re)write the report of a sweep folder (report.md, report.html, plots) from its results.json,
    and print its table."""
    from diffquant.experiments.report import terminal_table, write_report

    try:
        path = write_report(sweep_dir, html_report=html_report)
    except ValueError as e:
        fail(str(e))
    result = json.loads((Path(sweep_dir) / "results.json").read_text())
    if as_json:
        emit_json({"report": str(path), "rows": result["rows"]})
    else:
        click.echo(terminal_table(result))
        click.echo(f"report: {path}" + (f", {Path(sweep_dir) / 'report.html'}" if html_report else ""))
