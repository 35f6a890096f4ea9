"""The ``diffquant`` command line: thin verbs over the library.

Each verb lives in its own module under :mod:`diffquant.commands` and exposes a
``click`` command named ``command``; this file only collects them, so that verbs
can be added without editing a shared file.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

import click

from diffquant import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffquant")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Quantize diffusion models and measure what it costs and buys."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # diffusers imports torchao where it is installed (the [test] and [cpu-int8] extras), and torchao then warns
        # about its CUDA extensions and Triton on a CPU machine, torch about torchao's enum registrations, and
        # diffusers about loading torchao-pickled checkpoints (diffquant loads safetensors only): noise before every
        # command's output that says nothing about diffquant's work (shown again with -v)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao")


def _register() -> None:
    import diffquant.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        cmd = getattr(module, "command", None)
        if not isinstance(cmd, click.Command):
            raise RuntimeError(f"diffquant.commands.{info.name} defines no click command named 'command'")
        cli.add_command(cmd)


_register()


def main() -> None:  # console-script entry point
    cli(prog_name="diffquant")


if __name__ == "__main__":
    main()
