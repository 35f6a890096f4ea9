"""Tune the conv kernels on the layer shapes of whole models (GPU): the driver behind ``diffquant tune-kernels``.

Records every ``diffquant::qconv`` call of one eager forward pass of each (model, batch, variant), times the
candidate configs of :mod:`diffquant.kernels.tuning` (the gather kernel's and, where they can run the shape, the
two TMA kernels') on each distinct shape, largest first, and writes a tuned table that the kernels then use on the
same GPU model (``DIFFQUANT_QCONV_TUNED=table.json``, or ship it in ``diffquant/kernels/tuned/``). The table and the
per-shape rows are saved after every shape, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional, Sequence

import torch


def parse_tasks(tasks: str) -> list[tuple[str, int, str]]:
    """``model:batch:variant,...`` -> [(model, batch, variant)]; only diffquant variants (dq-*) use the conv kernels."""
    out = []
    for spec in [s.strip() for s in tasks.split(",") if s.strip()]:
        parts = spec.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise ValueError(f"task {spec!r}: expected model:batch:variant, e.g. sd15-unet:8:dq-fp8")
        if not parts[2].startswith("dq-"):
            raise ValueError(f"task {spec!r}: only diffquant variants (dq-int8, dq-fp8, dq-w4a8, dq-w4a16) use the conv "
                             "kernels")
        out.append((parts[0], int(parts[1]), parts[2]))
    if not out:
        raise ValueError("no tasks given")
    return out


def tune_models(tasks: str, out: str, rows_path: Optional[str] = None, budget_s: float = float("inf"), reps: int = 10,
                tma: bool = True, skip_paths: Sequence[str] = (), command: str = "", untuned_only: bool = False,
                shapes: Sequence[str] = (), progress: Callable[[str], None] = print) -> dict:
    """Tune on every task of ``tasks`` (see :func:`parse_tasks`); returns the table (also written to ``out``).
    ``untuned_only``: time only the shapes that no active tuned table lists for this GPU. ``shapes``: time only the
    shapes whose key contains one of these strings (e.g. ``x8x8:`` for the 8x8 inputs)."""
    specs = parse_tasks(tasks)
    if not torch.cuda.is_available():
        raise RuntimeError("tuning the conv kernels needs a CUDA GPU (they are Triton GPU kernels); none is visible")
    import triton

    from diffquant.kernels import tuning
    from diffquant.kernels.bench import build_model, inputs_for, make_variant
    from diffquant.kernels.triton_conv import qconv_triton, tma_paths
    from diffquant.models.adapter import call_model

    t0 = time.time()
    dev = torch.device("cuda")
    table = {"format": tuning.FORMAT, "device": torch.cuda.get_device_name(), "triton": triton.__version__,
             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
             "command": command or f"diffquant tune-kernels --tasks {tasks}", "configs": {}}
    all_rows: list = []
    skip = set(skip_paths)

    def paths_for(a, kw):
        return tma_paths(a[0], a[1], a[5], a[9], a[10], a[11], a[12], a[8], kw.get("pad_corr")) - skip

    def write(configs: dict, rows: list) -> None:
        timed = sorted({r["key"] for r in rows if "best_ms" in r})  # listed or not: the shapes this run measured
        with open(out, "w") as f:
            json.dump(dict(table, configs={**table["configs"], **configs}, tuned_keys=timed), f, indent=1)
        if rows_path:
            with open(rows_path, "w") as f:
                json.dump(rows, f, indent=1)

    for model_name, batch, variant in specs:
        spec = f"{model_name}:{batch}:{variant}"
        base = build_model(model_name).to(dev)
        m = make_variant(base, variant, inputs_for(base, 1, dev, torch.float32))
        x, t, c = inputs_for(base, batch, dev, torch.bfloat16)
        with torch.no_grad(), tuning.record_calls() as calls:
            call_model(m, x, t, c)
        torch.cuda.synchronize()
        progress(f"{spec}: {len(calls)} qconv calls, {len({k for k, _, _ in calls})} distinct shapes")
        counts: dict = {}  # time share of the shapes in the model: calls per key
        for k, _, _ in calls:
            counts[k] = counts.get(k, 0) + 1
        if untuned_only:  # the shapes some active table already lists keep their entries and are not timed
            calls = tuning.untuned_calls(calls, table["device"])
            progress(f"{spec}: --untuned-only: {len({k for k, _, _ in calls})} shapes without a table entry")
        if shapes:
            calls = tuning.calls_matching(calls, shapes)
            progress(f"{spec}: --shapes {','.join(shapes)}: {len({k for k, _, _ in calls})} shapes")

        def on_shape(configs, rows, spec=spec, counts=counts):
            for r in rows:
                r.update(task=spec, calls=counts.get(r["key"], 0))
            write(configs, all_rows + rows)

        incumbents = {k: tuning.lookup(k, table["device"]) for k, _, _ in calls}  # the active tables' entries
        configs, rows = tuning.tune_calls(calls, qconv_triton, reps=reps, budget_s=budget_s - (time.time() - t0),
                                          paths_for=paths_for if tma else None, progress=progress, on_shape=on_shape,
                                          incumbents={k: v for k, v in incumbents.items() if v is not None})
        on_shape(configs, rows)
        table["configs"].update(configs)
        all_rows += rows
        done = [r for r in rows if "best_ms" in r]
        h, b, cd = (sum(r[f] * r["calls"] for r in done) for f in ("heuristic_ms", "best_ms", "cudnn_bf16_ms"))
        progress(f"{spec}: sum over the model's calls: heuristic {h:.3f} ms, tuned {b:.3f} ms, cuDNN bf16 {cd:.3f} ms")
        del m, base, calls
        torch.cuda.empty_cache()
    write({}, all_rows)
    progress(f"{len(table['configs'])} tuned shapes -> {out} ({time.time() - t0:.0f} s)")
    return table


def format_rows(path: str) -> list[str]:
    """One line per tuned shape of a rows file: heuristic vs best ms, best ms per kernel, cuDNN bf16, TFLOP/s."""
    with open(path) as f:
        rows = json.load(f)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return [f'{r["key"][:52]:52s} x{r.get("calls", 0):<2d} heur {r["heuristic_ms"]:.4f} best {r["best_ms"]:.4f} '
            f'{r.get("best_ms_by_path")} cudnn {r["cudnn_bf16_ms"]:.4f} '
            f'{r["tflops_best"]:6.0f}/{r["tflops_cudnn_bf16"]:6.0f} TF {tuple((r["best"] or {}).values())}'
            for r in rows if "best_ms" in r]
