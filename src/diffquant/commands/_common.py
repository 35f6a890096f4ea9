"""Helpers shared by the CLI verbs."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

import click


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=_default))


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def format_table(rows: Sequence[dict], columns: Iterable[str] | None = None, floatfmt: str = ".4g") -> str:
    """Plain-text table of dict rows (used by every verb that prints numbers)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def fail(message: str) -> None:
    """Exit with a clean error message (no traceback) for user errors."""
    raise click.ClickException(message)


def echo_err(message: str) -> None:
    click.echo(message, err=True)
    sys.stderr.flush()
