"""click options shared by several verbs."""
from __future__ import annotations

import click

from diffquant.sampling import SAMPLERS, SPACINGS


def sampler_options(default_steps: int | None = 100, prefix: str = "", help_prefix: str = ""):
    """--sampler/--steps/--spacing/--eta (optionally with a prefix such as 'calib-')."""

    def deco(f):
        f = click.option(f"--{prefix}eta", type=float, default=0.0, show_default=True, help=f"{help_prefix}DDIM eta (0 = deterministic).")(f)
        f = click.option(f"--{prefix}spacing", type=click.Choice(SPACINGS), default="uniform", show_default=True,
                         help=f"{help_prefix}DDIM time-step spacing.")(f)
        f = click.option(f"--{prefix}steps", type=int, default=default_steps, show_default=default_steps is not None,
                         help=f"{help_prefix}sampling steps" + ("" if default_steps is not None else " [default: set by --method/--preset]"))(f)
        f = click.option(f"--{prefix}sampler", type=click.Choice(SAMPLERS), default="ddim", show_default=True,
                         help=f"{help_prefix}sampler.")(f)
        return f

    return deco


def device_option(f):
    return click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")(f)


def resolve_device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise click.BadParameter(f"{device!r} is not a torch device ({e})", param_hint="--device")
