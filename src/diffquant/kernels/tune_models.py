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


def _table_header(command: str) -> dict:
    """A tuned table of this GPU, without configs yet."""
    import triton

    from diffquant.kernels import tuning

    return {"format": tuning.FORMAT, "device": torch.cuda.get_device_name(), "triton": triton.__version__,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": command, "configs": {}}


def _record_task(model_name: str, batch: int, variant: str, dev: torch.device, recorder) -> tuple[list, dict]:
    """One eager forward pass of the task's model variant inside ``recorder()`` (a recording context of
    :mod:`.tuning`): the recorded calls and the number of calls per key."""
    from diffquant.kernels.bench import build_model, inputs_for, make_variant
    from diffquant.models.adapter import call_model

    base = build_model(model_name).to(dev)
    m = make_variant(base, variant, inputs_for(base, 1, dev, torch.float32))
    x, t, c = inputs_for(base, batch, dev, torch.bfloat16)
    with torch.no_grad(), recorder() as calls:
        call_model(m, x, t, c)
    torch.cuda.synchronize()
    counts: dict = {}  # time share of the shapes in the model: calls per key
    for call in calls:
        counts[call[0]] = counts.get(call[0], 0) + 1
    del m, base
    torch.cuda.empty_cache()
    return calls, counts


def tune_models(tasks: str, out: str, rows_path: Optional[str] = None, budget_s: float = float("inf"), reps: int = 10,
                tma: bool = True, skip_paths: Sequence[str] = (), command: str = "", untuned_only: bool = False,
                shapes: Sequence[str] = (), progress: Callable[[str], None] = print) -> dict:
    """Tune on every task of ``tasks`` (see :func:`parse_tasks`); returns the table (also written to ``out``).
    ``untuned_only``: time only the shapes that no active tuned table lists for this GPU. ``shapes``: time only the
    shapes whose key contains one of these strings (e.g. ``x8x8:`` for the 8x8 inputs)."""
    specs = parse_tasks(tasks)
    if not torch.cuda.is_available():
        raise RuntimeError("tuning the conv kernels needs a CUDA GPU (they are Triton GPU kernels); none is visible")
    from diffquant.kernels import tuning
    from diffquant.kernels.triton_conv import qconv_triton, tma_paths

    t0 = time.time()
    dev = torch.device("cuda")
    table = _table_header(command or f"diffquant tune-kernels --tasks {tasks}")
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
        calls, counts = _record_task(model_name, batch, variant, dev, tuning.record_calls)
        progress(f"{spec}: {len(calls)} qconv calls, {len(counts)} distinct shapes")
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
        del calls
        torch.cuda.empty_cache()
    write({}, all_rows)
    progress(f"{len(table['configs'])} tuned shapes -> {out} ({time.time() - t0:.0f} s)")
    return table


def format_rows(path: str) -> list[str]:
    """One line per tuned shape of a rows file: heuristic vs best ms, best ms per kernel, cuDNN bf16, TFLOP/s; for
    the shortcut tuner's rows (:func:`tune_sc_calls`), the composed calls vs the default vs the best config."""
    with open(path) as f:
        rows = json.load(f)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return [f'{r["key"][:60]:60s} x{r.get("calls", 0):<2d} composed {r["composed_ms"]:.4f} default '
            f'{r["default_ms"]:.4f} best {r["best_ms"]:.4f} {tuple((r["best"] or {}).values())}'
            if "composed_ms" in r else
            f'{r["key"][:52]:52s} x{r.get("calls", 0):<2d} heur {r["heuristic_ms"]:.4f} best {r["best_ms"]:.4f} '
            f'{r.get("best_ms_by_path")} cudnn {r["cudnn_bf16_ms"]:.4f} '
            f'{r["tflops_best"]:6.0f}/{r["tflops_cudnn_bf16"]:6.0f} TF {tuple((r["best"] or {}).values())}'
            for r in rows if "best_ms" in r]


def sc_candidates(cout: int, ck: int, pixels: int) -> list[dict]:
    """Block configs for the shortcut kernel (``diffquant::qconv_sc``): the 4-D kernel's candidates, wide tiles
    included, without split-K, which it does not have."""
    from diffquant.kernels import tuning

    keep = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "BLOCK_N2")
    out: list = []
    for cfg in tuning.candidates(1, False, cout, ck, path="tma4d", m=pixels, taps=9):
        if "SPLIT_K" in cfg:
            continue
        cfg = {k: cfg[k] for k in keep if k in cfg}
        if cfg not in out:
            out.append(cfg)
    return out


def tune_sc_calls(calls: list, sc_fn, composed_fn, time_fn, default_fn, budget_s: float = float("inf"),
                  progress: Callable[[str], None] = print, counts: Optional[dict] = None) -> tuple[dict, list]:
    """Time the shortcut kernel's candidates (:func:`sc_candidates`, each forced) on each distinct recorded
    ``diffquant::qconv_sc`` call ``(key, args)``, largest first, against its default config (``default_fn(args)``,
    what :func:`.triton_conv.sc_config` picks) and the composed qconv calls it replaces (``composed_fn``). Returns
    the table configs, one per timed shape: the kernel's fastest config (``"path": "tma4d"``; a candidate only where it
    beats the default by more than 3 %), or ``{"path": "composed"}`` where the composed calls were faster; and one row per shape. A candidate whose output is more
    than 1 % from the composed calls' is skipped."""
    from diffquant.kernels import tuning

    distinct: dict = {}
    for key, args in calls:
        distinct.setdefault(key, args)

    def flops(args):
        x, w, sc_x = args[0], args[1], args[5]
        px = x.shape[0] * x.shape[2] * x.shape[3]
        return 2.0 * px * w.shape[0] * (w.shape[1] * w.shape[2] * w.shape[3] + sum(t.shape[1] for t in sc_x))

    configs: dict = {}
    rows: list = []
    t0 = time.time()
    for key, args in sorted(distinct.items(), key=lambda kv: -flops(kv[1])):
        if time.time() - t0 > budget_s:
            rows.append({"key": key, "skipped": "budget"})
            continue
        x, w, sc_x = args[0], args[1], args[5]
        with torch.no_grad():
            ref = composed_fn(*args).float()
            composed_ms = time_fn(lambda: composed_fn(*args))
            default = default_fn(args)
            with tuning.forced_config(default):
                default_ms = time_fn(lambda: sc_fn(*args))
            best, best_ms, timed, failed = None, default_ms, [], 0
            pixels = x.shape[0] * x.shape[2] * x.shape[3]
            ck = w.shape[1] * w.shape[2] * w.shape[3] + sum(t.shape[1] for t in sc_x)
            for cfg in sc_candidates(w.shape[0], ck, pixels):
                progress(f"  {key} trying {tuple(cfg.values())}")
                try:
                    with tuning.forced_config(cfg):
                        err = float((sc_fn(*args).float() - ref).norm() / ref.norm().clamp_min(1e-12))
                        if not err < 1e-2:
                            raise RuntimeError(f"output {err:.3g} from the composed calls'")
                        ms = time_fn(lambda: sc_fn(*args))
                except Exception as e:  # out of resources, wrong result
                    failed += 1
                    progress(f"  {key} {tuple(cfg.values())}: skipped ({str(e).splitlines()[0][:120]})")
                    continue
                timed.append([*cfg.values(), round(ms, 5)])
                if ms < best_ms:
                    best, best_ms = cfg, ms
        # the kernel's config: a candidate only where it beats the default by more than 3 %
        fused, fused_ms = (best, best_ms) if best is not None and best_ms < 0.97 * default_ms else (default, default_ms)
        # every timed shape gets an entry, the kernel or the composed calls, whichever was faster: without one, the
        # call would follow sc_composed_reason's untimed rule (whether its tiles fill one wave)
        configs[key] = dict(tuning.SC_COMPOSED) if composed_ms < fused_ms else dict(fused, path="tma4d")
        rows.append(dict(key=key, calls=(counts or {}).get(key, 0), composed_ms=round(composed_ms, 5),
                         default_ms=round(default_ms, 5), default=default, best_ms=round(best_ms, 5),
                         best=best or default, tried=len(timed), failed=failed, candidates_ms=timed))
        progress(f"{key}: composed {composed_ms:.4f} ms, default {default_ms:.4f}, best {best_ms:.4f} "
                 f"{tuple((best or default).values())}")
    return configs, rows


def tune_shortcut_convs(tasks: str, out: str, rows_path: Optional[str] = None, budget_s: float = float("inf"),
                        reps: int = 10, command: str = "", progress: Callable[[str], None] = print,
                        untuned_only: bool = False, shapes: Sequence[str] = ()) -> dict:
    """Tune ``diffquant::qconv_sc`` (conv2 with its shortcut, ``DIFFQUANT_SC_FUSE=1``, and the split convs' two
    parts, ``DIFFQUANT_SPLIT_FUSE=1``) on the ResNet blocks of each task (GPU): records one eager forward pass with
    both switches on, then :func:`tune_sc_calls`; ``untuned_only``: only the shapes no active table lists;
    ``shapes``: only those whose key contains one of these strings. Writes a table
    (``diffquant tune-kernels --merge-from`` merges it) and the rows; returns the table."""
    import os

    specs = parse_tasks(tasks)
    if not torch.cuda.is_available():
        raise RuntimeError("tuning the shortcut kernel needs a CUDA GPU; none is visible")
    from diffquant.kernels import ops, tuning
    from diffquant.kernels.bench import time_call
    from diffquant.kernels.triton_conv import qconv_sc_triton, sc_config

    switches = ("DIFFQUANT_SC_FUSE", "DIFFQUANT_SPLIT_FUSE")
    prev = {k: os.environ.get(k) for k in switches}
    os.environ.update({k: "1" for k in switches})
    t0 = time.time()
    dev = torch.device("cuda")
    table = _table_header(command or f"tune_shortcut_convs({tasks!r})")
    all_rows: list = []
    try:
        for model_name, batch, variant in specs:
            spec = f"{model_name}:{batch}:{variant}"
            calls, counts = _record_task(model_name, batch, variant, dev, tuning.record_sc_calls)
            progress(f"{spec}: {len(calls)} qconv_sc calls, {len(counts)} distinct shapes")
            if untuned_only:
                calls = tuning.untuned_calls(calls, table["device"])
                progress(f"{spec}: --untuned-only: {len({c[0] for c in calls})} shapes without a table entry")
            if shapes:
                calls = tuning.calls_matching(calls, shapes)
                progress(f"{spec}: --shapes {','.join(shapes)}: {len({c[0] for c in calls})} shapes")
            configs, rows = tune_sc_calls(
                calls, qconv_sc_triton, ops.qconv_sc_composed,
                lambda fn: time_call(fn, warmup=2, reps=reps, inner=0)[0],
                lambda a: sc_config(a[0], a[1], a[10], a[11], a[5]), budget_s=budget_s - (time.time() - t0),
                progress=progress, counts=counts)
            for r in rows:
                r["task"] = spec
            table["configs"].update(configs)
            table.setdefault("tuned_keys", []).extend(configs)
            all_rows += rows
            del calls
            torch.cuda.empty_cache()
    finally:
        for k, v in prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    if rows_path:
        with open(rows_path, "w") as f:
            json.dump(all_rows, f, indent=1)
    done = [r for r in all_rows if "best_ms" in r]
    sums = [sum(r[k] * r["calls"] for r in done) for k in ("composed_ms", "default_ms", "best_ms")]
    progress("sum over the calls: composed %.3f ms, default %.3f, tuned %.3f; %d tuned shapes -> %s (%.0f s)"
             % (*sums, len(table["configs"]), out, time.time() - t0))
    return table
