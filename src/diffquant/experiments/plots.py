"""Sweep plots (matplotlib, Agg backend): a metric against weight bits, activation bits or sampling
steps, one line per configuration, the full-precision reference drawn in each panel."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["AXES", "metric_label", "plot_metrics_vs"]

AXES = {"weight_bits": "weight bits", "act_bits": "activation bits", "steps": "sampling steps"}
LOWER_IS_BETTER = ("fd", "fid", "kid", "mse")


def metric_label(metric: str) -> str:
    better = "lower" if any(metric.startswith(p) for p in LOWER_IS_BETTER) else "higher"
    name = {"psnr_vs_fp": "PSNR vs FP, dB (FP: ∞)", "ssim_vs_fp": "SSIM vs FP"}.get(metric, metric)
    return f"{name} ({better} is better)"


def _num(v: Any) -> Optional[float]:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _bits_tick(b: int) -> str:
    return "16 (fp)" if b >= 16 else str(b)


def plot_metrics_vs(rows: Sequence[dict], metrics: Sequence[str], x: str, path: str | Path,
                    title: Optional[str] = None) -> Optional[Path]:
    """One figure: a row of panels per metric; panels split by what is held fixed (sampler, steps or
    bits, sample count); lines per configuration; FP as a dashed reference (a line over steps).
    Returns the path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in AXES:
        raise ValueError(f"x={x!r}; allowed: {', '.join(AXES)}")
    metrics = [m for m in metrics if any(_num(r.get(m)) is not None for r in rows)]
    if not metrics:
        return None
    multi_model = len({r["model"] for r in rows}) > 1
    q_rows = [r for r in rows if r["method"] != "fp"]
    fp_rows = [r for r in rows if r["method"] == "fp"]

    if x == "steps":
        panel_of = lambda r: (r["sampler"], r["num_samples"])  # noqa: E731
        line_of = lambda r: (r["model"], r["method"], r["config"])  # noqa: E731
        panel_title = lambda p: f"{p[0]}, n={p[1]}"  # noqa: E731
    else:
        other = "act_bits" if x == "weight_bits" else "weight_bits"
        panel_of = lambda r: (r["sampler"], r["steps"], r["num_samples"])  # noqa: E731
        line_of = lambda r: (r["model"], r["method"], r[other])  # noqa: E731
        panel_title = lambda p: f"{p[0]} {p[1]} steps, n={p[2]}"  # noqa: E731
    panels = list(dict.fromkeys(panel_of(r) for r in q_rows))
    if not panels:
        return None
    ncols = len(panels)
    fig, axes = plt.subplots(len(metrics), ncols, figsize=(max(4.6 * ncols, 6.0), 3.4 * len(metrics) + 0.8),
                             squeeze=False)
    xs_all = sorted({int(r[x]) for r in q_rows} | ({int(r[x]) for r in fp_rows} if x == "steps" else set()))
    pos = {v: i for i, v in enumerate(xs_all)} if x != "steps" else {v: v for v in xs_all}
    cmap = plt.get_cmap("tab10")
    line_keys = list(dict.fromkeys(line_of(r) for r in q_rows))
    colors = {k: cmap(i % 10) for i, k in enumerate(line_keys)}

    def line_name(k) -> str:
        model, method, v = k
        if x == "steps":
            s = v
        else:
            s = f"{'A' if x == 'weight_bits' else 'W'}{int(v)}"
        if method != "naive" or len({lk[1] for lk in line_keys}) > 1:
            s = f"{method} {s}"
        return f"{model} {s}" if multi_model else s

    handles: dict[str, Any] = {}
    for i, metric in enumerate(metrics):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            for k in line_keys:
                pts = sorted((pos[int(r[x])], _num(r.get(metric))) for r in q_rows
                             if panel_of(r) == panel and line_of(r) == k and _num(r.get(metric)) is not None)
                if pts:
                    (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[k], lw=1.6, ms=5)
                    handles.setdefault(line_name(k), h)
            # the full-precision reference
            models = {r["model"] for r in q_rows if panel_of(r) == panel}
            for model in sorted(models):
                suffix = f" ({model})" if multi_model else ""
                if metric == "psnr_vs_fp":
                    continue  # FP vs itself: identical images, PSNR is infinite
                if x == "steps":
                    pts = sorted((int(r["steps"]), _num(r.get(metric))) for r in fp_rows
                                 if r["model"] == model and (r["sampler"], r["num_samples"]) == panel
                                 and _num(r.get(metric)) is not None)
                    if pts:
                        (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="black", lw=1.4, ms=5)
                        handles.setdefault("FP" + suffix, h)
                else:
                    vals = [_num(r.get(metric)) for r in fp_rows if r["model"] == model
                            and (r["sampler"], r["steps"], r["num_samples"]) == panel]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        h = ax.axhline(vals[0], color="black", ls="--", lw=1.4)
                        handles.setdefault("FP" + suffix, h)
                floors = [_num(r.get(f"{metric}_floor")) for r in rows if r["model"] == model]
                floors = [f for f in floors if f is not None]
                if floors and x != "steps":
                    h = ax.axhline(floors[0], color="grey", ls=":", lw=1.2)
                    handles.setdefault("real-data floor (same n)", h)
            ys = [v for line in ax.get_lines() for v in line.get_ydata()]
            if ys:  # reference lines (axhline) do not take part in autoscaling: make room for them
                lo, hi = min(ys), max(ys)
                pad = 0.06 * (hi - lo) if hi > lo else 0.05 * (abs(hi) or 1.0)
                ax.set_ylim(lo - pad, hi + pad)
            if x != "steps":
                ax.set_xticks(range(len(xs_all)))
                ax.set_xticklabels([_bits_tick(v) for v in xs_all])
            else:
                ax.set_xticks(xs_all)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(panel_title(panel), fontsize=10)
            if i == len(metrics) - 1:
                ax.set_xlabel(AXES[x])
            if j == 0:
                ax.set_ylabel(metric_label(metric), fontsize=9)
    fig.suptitle(title or f"metrics vs {AXES[x]}", fontsize=11)
    ncol = min(len(handles), 6)
    nrows_legend = math.ceil(len(handles) / max(ncol, 1))
    bottom = (0.15 + 0.2 * nrows_legend) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
