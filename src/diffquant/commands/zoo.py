"""diffquant zoo: list bundled models."""
from __future__ import annotations

import click

from diffquant.commands._common import emit_json, format_table


@click.command("zoo")
@click.option("--json", "as_json", is_flag=True)
def command(as_json):
    """List the bundled models usable as zoo:NAME."""
    from diffquant import zoo

    rows = []
    for name in zoo.available():
        zm = zoo.load(name)
        rows.append({"name": f"zoo:{name}", "kind": zm.kind,
                     "params_M": round(sum(p.numel() for p in zm.model.parameters()) / 1e6, 2),
                     "note": (zm.card.get("summary") or zm.card.get("note") or zm.card.get("description") or "")[:90]})
    if as_json:
        emit_json(rows)
    else:
        click.echo(format_table(rows))
