"""Tune the conv kernels' block shapes (and kernel: gather or TMA) on the layer shapes of whole models (GPU).

Same as ``diffquant tune-kernels`` (the driver is :mod:`diffquant.kernels.tune_models`):

    python benchmarks/tune_qconv.py --tasks sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8 --out qconv_tuned.json
    DIFFQUANT_QCONV_TUNED=qconv_tuned.json python benchmarks/bench_kernels.py ...

``--shortcut`` tunes ``diffquant::qconv_sc`` (a ResNet block's conv2 with its 1x1 shortcut) instead.
``--rows`` gets one diagnostic row per shape: heuristic vs best ms, the best ms of each kernel (the TMA kernels'
candidates compete where they can run the shape; ``--no-tma``: they do not), and cuDNN's bf16 conv of the same shape.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8",
                    help="comma list of model:batch:variant (variants dq-int8, dq-fp8, dq-w4a8, dq-w4a16)")
    ap.add_argument("--out", default="qconv_tuned.json")
    ap.add_argument("--rows", default=None, help="write the per-shape diagnostic rows here (JSON)")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="tune no new shape after this many seconds")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-tma", action="store_true", help="time the gather kernel's candidates only")
    ap.add_argument("--skip-paths", default="", help="comma list of TMA kernels not to try (tma, tma4d, tma4dp, tma4dr)")
    ap.add_argument("--untuned-only", action="store_true",
                    help="time only the shapes that no active tuned table (shipped or DIFFQUANT_QCONV_TUNED) lists")
    ap.add_argument("--shapes", default="",
                    help="comma list: time only the shapes whose key contains one of these (e.g. x8x8:,x16x16:)")
    ap.add_argument("--shortcut", action="store_true",
                    help="tune diffquant::qconv_sc instead (each ResNet block's conv2 with its 1x1 shortcut, "
                         "and a split conv's two parts); --budget-s, --reps, --out, --rows, --untuned-only and "
                         "--shapes apply, the other options not")
    ap.add_argument("--print-rows", metavar="ROWS_JSON", help="print the summary of a --rows file and exit (no GPU)")
    args = ap.parse_args()
    from diffquant.kernels.tune_models import format_rows, tune_models

    if args.print_rows:
        try:
            print("\n".join(format_rows(args.print_rows)))
        except (OSError, ValueError) as e:
            print(f"no tune rows in {args.print_rows}: {e}")
        return
    try:
        if args.shortcut:
            from diffquant.kernels.tune_models import tune_shortcut_convs

            tune_shortcut_convs(args.tasks, args.out, args.rows, args.budget_s, args.reps,
                                command=shlex.join(["python", *sys.argv]), progress=lambda s: print(s, flush=True),
                                untuned_only=args.untuned_only, shapes=[p for p in args.shapes.split(",") if p])
            return
        tune_models(args.tasks, args.out, args.rows, args.budget_s, args.reps, tma=not args.no_tma,
                    skip_paths=[p for p in args.skip_paths.split(",") if p], command=shlex.join(["python", *sys.argv]),
                    untuned_only=args.untuned_only, shapes=[p for p in args.shapes.split(",") if p],
                    progress=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
