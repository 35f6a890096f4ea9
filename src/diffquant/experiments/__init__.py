"""Experiments: sweeps over models x recipes x bit-widths x samplers x steps, with cached cells,
one results table (JSON + CSV), plots and self-contained reports.

* :mod:`~diffquant.experiments.spec` — :class:`SweepSpec` (YAML/JSON) and :func:`load_spec`.
* :mod:`~diffquant.experiments.sweep` — :func:`run_sweep`.
* :mod:`~diffquant.experiments.plots` — metric vs weight bits / activation bits / steps.
* :mod:`~diffquant.experiments.report` — ``report.md`` + ``report.html``.
"""
from diffquant.experiments.spec import SweepSpec, load_spec

__all__ = ["SweepSpec", "load_spec", "run_sweep", "write_report"]


def __getattr__(name):  # heavy modules on first use
    if name == "run_sweep":
        from diffquant.experiments.sweep import run_sweep

        return run_sweep
    if name == "write_report":
        from diffquant.experiments.report import write_report

        return write_report
    raise AttributeError(name)
