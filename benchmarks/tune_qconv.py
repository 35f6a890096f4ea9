"""Tune the implicit-GEMM conv kernel's block shapes on the layer shapes of whole models (GPU).

Records every ``diffquant::qconv`` call of one eager forward pass of each (model, batch, variant),
times the candidate configs of :mod:`diffquant.kernels.tuning` on each distinct shape (largest first)
and writes a tuned table that the kernel then uses on the same GPU model:

    python benchmarks/tune_qconv.py --tasks sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8 --out qconv_tuned.json
    DIFFQUANT_QCONV_TUNED=qconv_tuned.json python benchmarks/bench_kernels.py ...

``--rows`` gets one diagnostic row per shape: heuristic vs best ms, the best ms of each kernel (the TMA kernels'
candidates compete where they can run the shape; ``--no-tma``: they do not), and cuDNN's bf16 conv of the same shape.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def print_rows(path: str) -> None:
    """One line per tuned shape of a ``--rows`` file: heuristic vs best ms, best ms per kernel, cuDNN bf16, TFLOP/s."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"no tune rows in {path}: {e}")
        return
    rows = rows["rows"] if isinstance(rows, dict) else rows
    for r in rows:
        if "best_ms" in r:
            print(f'{r["key"][:52]:52s} x{r.get("calls", 0):<2d} heur {r["heuristic_ms"]:.4f} best {r["best_ms"]:.4f} '
                  f'{r.get("best_ms_by_path")} cudnn {r["cudnn_bf16_ms"]:.4f} '
                  f'{r["tflops_best"]:6.0f}/{r["tflops_cudnn_bf16"]:6.0f} TF {tuple((r["best"] or {}).values())}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8",
                    help="comma list of model:batch:variant (variants dq-int8, dq-fp8, dq-w4a8, dq-w4a16)")
    ap.add_argument("--out", default="qconv_tuned.json")
    ap.add_argument("--rows", default=None, help="write the per-shape diagnostic rows here (JSON)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="tune no new shape after this many seconds")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-tma", action="store_true", help="time the gather kernel's candidates only")
    ap.add_argument("--skip-paths", default="", help="comma list of TMA kernels not to try (tma, tma4d)")
    ap.add_argument("--print-rows", metavar="ROWS_JSON", help="print the summary of a --rows file and exit (no GPU)")
    args = ap.parse_args()
    if args.print_rows:
        print_rows(args.print_rows)
        return
    if not torch.cuda.is_available():
        raise SystemExit("tune_qconv needs a CUDA GPU (the Triton kernel)")
    import triton

    from diffquant.kernels import tuning
    from diffquant.kernels.bench import build_model, inputs_for, make_variant
    from diffquant.kernels.triton_conv import qconv_triton, tma_paths
    from diffquant.models.adapter import call_model

    t0 = time.time()
    dev = torch.device("cuda")
    table = {"format": tuning.FORMAT, "device": torch.cuda.get_device_name(), "triton": triton.__version__,
             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/tune_qconv.py "
             f"--tasks {args.tasks}", "configs": {}}
    all_rows: list = []
    for spec in [s for s in args.tasks.split(",") if s]:
        model_name, batch, variant = spec.split(":")
        if not variant.startswith("dq-"):
            raise SystemExit(f"{spec}: only diffquant variants (dq-*) use the conv kernel")
        base = build_model(model_name).to(dev)
        m = make_variant(base, variant, inputs_for(base, 1, dev, torch.float32))
        x, t, c = inputs_for(base, int(batch), dev, torch.bfloat16)
        with torch.no_grad(), tuning.record_calls() as calls:
            call_model(m, x, t, c)
        torch.cuda.synchronize()
        print(f"{spec}: {len(calls)} qconv calls, {len({k for k, _, _ in calls})} distinct shapes", flush=True)
        left = args.budget_s - (time.time() - t0)
        skip = {p for p in args.skip_paths.split(",") if p}

        def paths_for(a, kw, skip=skip):
            return tma_paths(a[0], a[1], a[5], a[9], a[10], a[11], a[12], a[8], kw.get("pad_corr")) - skip
        counts: dict = {}  # time share of the shapes in the model: calls per key
        for k, _, _ in calls:
            counts[k] = counts.get(k, 0) + 1

        def save(configs, rows, spec=spec, counts=counts):  # after every shape: a run cut short keeps what it measured
            for r in rows:
                r.update(task=spec, calls=counts.get(r["key"], 0))
            with open(args.out, "w") as f:
                json.dump(dict(table, configs={**table["configs"], **configs}), f, indent=1)
            if args.rows:
                with open(args.rows, "w") as f:
                    json.dump(all_rows + rows, f, indent=1)

        configs, rows = tuning.tune_calls(calls, qconv_triton, reps=args.reps, budget_s=left,
                                          paths_for=None if args.no_tma else paths_for,
                                          progress=lambda s: print(s, flush=True), on_shape=save)
        for r in rows:
            r.update(task=spec, calls=counts.get(r["key"], 0))
        table["configs"].update(configs)
        all_rows += rows
        done = [r for r in rows if "best_ms" in r]
        h = sum(r["heuristic_ms"] * r["calls"] for r in done)
        b = sum(r["best_ms"] * r["calls"] for r in done)
        cd = sum(r["cudnn_bf16_ms"] * r["calls"] for r in done)
        print(f"{spec}: sum over the model's calls: heuristic {h:.3f} ms, tuned {b:.3f} ms, cuDNN bf16 {cd:.3f} ms",
              flush=True)
        del m, base, calls
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
        if args.rows:
            with open(args.rows, "w") as f:
                json.dump(all_rows, f, indent=1)
    print(f"{len(table['configs'])} tuned shapes -> {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
