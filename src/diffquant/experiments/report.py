"""Sweep reports: ``report.md`` (Markdown + the PNGs beside it) and ``report.html`` (one
self-contained file, the PNGs embedded), rendered from a sweep folder's ``results.json``:
the results table, the plots, FP and quantized sample grids from the same seeds, model size,
cost (parameter bytes, MACs, BOPs) and what was quantized."""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from diffquant.experiments.plots import plot_metrics_vs

log = logging.getLogger(__name__)

__all__ = ["table_rows", "write_report", "terminal_table"]

RANDOM_MODELS = ("zoo:tiny-random",)


def _fmt(v: Any, floatfmt: str = ".4g") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)


def _metric_columns(rows: Sequence[dict], spec: dict) -> list[str]:
    cols = []
    for m in spec.get("metrics", []):
        cols += [k for k in dict.fromkeys(k for r in rows for k in r) if (k == m or k.startswith(m + "."))
                 and not k.endswith("_floor")]
    return cols + ["psnr_vs_fp", "ssim_vs_fp"]


def table_rows(result: dict) -> tuple[list[dict], list[str]]:
    """The rows and columns shown in the report and on the terminal."""
    rows, spec = result["rows"], result["spec"]
    cols = (["model"] if len(spec["models"]) > 1 else []) + ["method", "config", "sampler", "steps", "num_samples"]
    cols += _metric_columns(rows, spec) + ["size_MiB", "gbops", "calib_seconds", "img_per_s"]
    return [{c: r.get(c) for c in cols} for r in rows], cols


def terminal_table(result: dict) -> str:
    from diffquant.commands._common import format_table

    rows, cols = table_rows(result)
    return format_table(rows, cols, floatfmt=".4g")


# ---- blocks: ("h", level, text) ("p", text) ("table", rows, cols) ("img", relpath, alt) ("pre", text) ----
def _md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)


def _render_md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append(_md_table(b[1], b[2]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif b[0] == "pre":
            out.append("```\n" + b[1].rstrip("\n") + "\n```")
        out.append("")
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """The little Markdown used in paragraphs (**bold**, `code`) as HTML."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    t = re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', t)
    return t.replace("\n", "<br>\n")


def _render_html(blocks: list[tuple], root: Path, title: str) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
           "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
           "img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:12px}"
           "code{background:#f3f3f3;padding:0 3px}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline_md(b[1])}</p>")
        elif b[0] == "table":
            rows, cols = b[1], b[2]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>")
            out.append("</table>")
        elif b[0] == "img":
            p = root / b[1]
            if p.is_file():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif b[0] == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def _what_quantized(info: dict) -> str:
    c = info.get("counts", {})
    floats = info.get("float_layers") or []
    s = (f"{c.get('QuantConv2d', 0)} Conv2d + {c.get('QuantLinear', 0)} Linear quantized, "
         f"{c.get('QuantMatMul', 0)} attention matmuls, {c.get('split_layers', 0)} split-shortcut layers")
    if floats:
        s += f"; left in float: {', '.join(floats[:6])}{' ...' if len(floats) > 6 else ''}"
    return s


def _calib_words(c: dict) -> str:
    """The calibration set in words: time steps of one chain, or every noise level of several chains."""
    if c.get("chains"):
        return (f"{c['num_per_step']} trajectories x every noise level visited by the "
                f"{'/'.join(map(str, c['chains']))}-step {c['sampler']} chains")
    return f"{c['num_per_step']} trajectories x {c.get('num_steps')} time steps of {c['sampler']}-{c['steps']}"


def write_report(out_dir: str | Path, *, html_report: bool = True) -> Path:
    """(Re)write ``report.md`` (+ ``report.html``) and the plots of the sweep folder ``out_dir``."""
    root = Path(out_dir)
    res_path = root / "results.json"
    if not res_path.is_file():
        raise ValueError(f"{root} holds no results.json; run `diffquant sweep SPEC --out {root}` first")
    result = json.loads(res_path.read_text())
    spec, env, rows, models = result["spec"], result["env"], result["rows"], result.get("models", {})
    title = spec.get("title") or f"diffquant sweep: {spec['name']}"
    metric_cols = _metric_columns(rows, spec)

    plots = []
    for x, fname in (("weight_bits", "metric_vs_weight_bits.png"), ("act_bits", "metric_vs_act_bits.png"),
                     ("steps", "metric_vs_steps.png")):
        p = plot_metrics_vs(rows, metric_cols, x, root / "plots" / fname)
        if p is not None:
            plots.append((x, f"plots/{fname}"))

    nums = ", ".join(str(n) for n in spec["num_samples"])
    samplers = ", ".join(f"{s['sampler']}" + (f" ({s['spacing']} spacing, eta {s['eta']:g})" if s["sampler"] == "ddim" else "")
                         for s in spec["samplers"])
    blocks: list[tuple] = [("h", 1, title)]
    if any(m in RANDOM_MODELS for m in spec["models"]):
        blocks.append(("p", "**Random weights: `zoo:tiny-random` is an untrained UNet, its samples are noise and a random "
                            "denoiser is chaotic under DDIM, so these numbers show the machinery only. Re-run this sweep "
                            "on a trained model for numbers that mean something.**"))
    blocks.append(("p", (
        f"Models: {', '.join(f'`{m}`' for m in spec['models'])}. Samples per cell: {nums} (seeds {spec['seed']}.., "
        f"identical for FP and every quantized model). Sampler: {samplers}; steps: "
        f"{', '.join(map(str, spec['steps']))}. Recipes: {', '.join(r['name'] + ' (' + r['method'] + ')' for r in spec['recipes'])}; "
        f"configurations: {', '.join(spec['bits'])} (A16 = activations in floating point). Calibration: "
        f"{_calib_words(spec['calibration'])} (seeds {spec['calibration']['seed']}..).")))
    ons = env.get("computed_on") or [env]
    where = "; ".join(f"{e.get('device')} ({e.get('device_name')}, {e.get('cpu_cores')} cores available, "
                      f"{e.get('torch_threads')} torch threads), torch {e.get('torch')}, diffquant {e.get('diffquant')}, "
                      f"{e.get('date')}" for e in ons)
    blocks.append(("p", (
        f"Computed on: {where}. Compute batch {spec['compute_batch']} (samples are identical for a given compute batch "
        f"and device type). Sampling time over all cells: {env.get('sampling_seconds_total', 0):.0f} s; last run "
        f"{env.get('date')}: {result.get('computed')} cells computed, {result.get('cached')} from the cache, "
        f"{env.get('sweep_seconds', 0):.0f} s wall.")))
    if env.get("command"):
        blocks.append(("p", "Command:"))
        blocks.append(("pre", env["command"]))
    for note in spec.get("notes", []):
        blocks.append(("p", note))

    blocks.append(("h", 2, "Results"))
    trows, tcols = table_rows(result)
    blocks.append(("table", trows, tcols))
    expl = ["`psnr_vs_fp` / `ssim_vs_fp`: paired against the FP samples of the same seeds (PSNR of the mean MSE; mean "
            "SSIM). `size_MiB`: parameters at their bit-widths (quantized weights + fp16 scales/zero points; the rest "
            f"at {spec['float_bits']} bits). `gbops`: giga bit-operations per forward pass of one image (MACs x weight "
            f"bits x activation bits; float operands count {spec['float_bits']} bits); one sample costs `steps` forward "
            "passes. `calib_seconds`: the PTQ method's time (calibration capture excluded). `img_per_s`: sampling "
            "throughput of that cell on this device."]
    floors = {k: r[k] for r in rows for k in r if k.endswith("_floor") and r.get(k) is not None}
    for k, v in floors.items():
        expl.append(f"`{k[:-6]}` real-data floor (real images of the other split vs the reference, same count as the "
                    f"samples): {v:.4g} — what a perfect generator would score with this many samples.")
    if any(m.startswith("fd_cifar") for m in metric_cols):
        expl.append("`fd_cifar` is the Fréchet distance in the feature space of the project's own CIFAR-10-JPEG "
                    "classifier (`zoo:cifar10-features`); it is not Inception FID and not comparable with published FIDs.")
    for e in expl:
        blocks.append(("p", e))

    if plots:
        blocks.append(("h", 2, "Plots"))
        names = {"weight_bits": "Metrics vs weight bits (one line per activation bit-width; FP dashed)",
                 "act_bits": "Metrics vs activation bits (one line per weight bit-width; FP dashed)",
                 "steps": "Metrics vs sampling steps (one line per configuration; FP dashed)"}
        for x, rel in plots:
            blocks.append(("p", f"**{names[x]}**"))
            blocks.append(("img", rel, names[x]))

    grids = sorted((root / "grids").glob("*.png")) if (root / "grids").is_dir() else []
    if grids:
        blocks.append(("h", 2, "Samples (same seeds, FP and every configuration side by side)"))
        for g in grids:
            blocks.append(("p", f"`{g.stem}`"))
            blocks.append(("img", f"grids/{g.name}", g.stem))

    blocks.append(("h", 2, "Model size, cost and what was quantized"))
    for model_id, m in models.items():
        fp = m["fp_cost"]
        blocks.append(("p", f"`{model_id}` ({m.get('model_class', '')}, {m['params'] / 1e6:.2f}M parameters, fingerprint "
                            f"{m['fingerprint']}). Per forward pass of one image:"))
        crow = [{"config": "FP", "size_MiB": fp["param_bytes"] / 2**20, "compression": 1.0 * 2 * m["params"] / fp["param_bytes"],
                 "GMACs": fp["gmacs"], "GBOPs": fp["gbops"], "BOPs_vs_FP": 1.0, "calib_seconds": None,
                 "what was quantized": "nothing (floating point)"}]
        for name, q in m.get("configs", {}).items():
            c = q["cost"]
            crow.append({"config": name, "size_MiB": c["param_bytes"] / 2**20,
                         "compression": 2 * m["params"] / c["param_bytes"], "GMACs": c["gmacs"], "GBOPs": c["gbops"],
                         "BOPs_vs_FP": c["bops"] / fp["bops"] if fp["bops"] else None,
                         "calib_seconds": q.get("calib_seconds"), "what was quantized": _what_quantized(q)})
        blocks.append(("table", crow, list(crow[0].keys())))
        blocks.append(("p", "`compression`: versus all parameters in fp16. Per-layer tables of every configuration: "
                            "`cost/*.csv`."))
        # per-layer: the heaviest layers of the FP model, with each configuration's bits and BOPs
        top = sorted(fp["layers"], key=lambda l: -l["bops"])[:12]
        lrows = []
        for layer in top:
            r = {"layer": layer["name"], "type": layer["type"], "MMACs": layer["macs"] / 1e6,
                 "FP GBOPs": layer["bops"] / 1e9}
            for name, q in m.get("configs", {}).items():
                ql = {l["name"].replace(".processor", ""): l for l in q["cost"]["layers"]}
                hit = ql.get(layer["name"].replace(".processor", ""))
                if hit is not None:
                    bits = f"W{hit['weight_bits']}A{'x'.join(map(str, hit['act_bits']))}" if hit["weight_bits"] is not None \
                        else "A" + "x".join(map(str, hit["act_bits"]))
                    r[name] = f"{bits}: {hit['bops'] / 1e9:.3g}"
            lrows.append(r)
        if lrows:
            blocks.append(("p", "The 12 layers with the most bit-operations in floating point (GBOPs per forward; "
                                "for each configuration its bits and GBOPs):"))
            blocks.append(("table", lrows, list(dict.fromkeys(k for r in lrows for k in r))))

    blocks.append(("h", 2, "Reproduce"))
    blocks.append(("p", "The sweep spec as read (`spec.json`); `results.json` and `results.csv` hold every number above."))
    blocks.append(("pre", json.dumps(spec, indent=2)))

    md = _render_md(blocks)
    (root / "report.md").write_text(md)
    if html_report:
        (root / "report.html").write_text(_render_html(blocks, root, title))
    return root / "report.md"
