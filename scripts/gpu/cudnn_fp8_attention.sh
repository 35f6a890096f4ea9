#!/usr/bin/env bash
# cuDNN's FP8 fused attention (cudnn-frontend's sdpa_fp8 graph) against bf16 SDPA on SD-1.5 b8's attention shapes:
# benchmarks/bench_cudnn_fp8_attention.py, one GPU, about 1 minute. Written in session 13 (2026-11-29); ran in session
# 14 (47 s): no faster than bf16 SDPA (BENCHMARKS.md "Kernels, twelfth measurement").
#   carry: .gpu_carry/cudnn-fe only (the cudnn-frontend wheel for Python 3.12, 11.6 MB; fetched with
#          python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .gpu_carry/cudnn-fe
#          nvidia-cudnn-frontend==1.32.0). Not in .whl: the tracked tree (48.8 MB) plus .whl plus this wheel would
#          pass the 64 MiB a call may carry. No diffusers needed.
#   run:   bash scripts/gpu/cudnn_fp8_attention.sh   -> $OUT/cudnn_fp8_attention.json, $OUT/cudnn_fp8_attention.log
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
setup_cudnn_fe
python3 -c 'import cudnn, torch; print("cudnn-frontend", getattr(cudnn, "__version__", "?"), "cuDNN", torch.backends.cudnn.version())'
timeout ${BENCH_S:-400} python3 benchmarks/bench_cudnn_fp8_attention.py --out $OUT/cudnn_fp8_attention.json \
  > $OUT/cudnn_fp8_attention.log 2>&1
echo "bench rc=$?"
tail -12 $OUT/cudnn_fp8_attention.log | cut -c1-400
