#!/usr/bin/env bash
# What DIFFQUANT_FP8_ACC=precise (FP8 products promoted into the fp32 accumulator every 64; written in session 10,
# 2026-11-28) costs and buys, in one call (nvidia-h200-x4, carry .whl; kernel_quality samples the bundled zoo model):
#   GPU 0: the GPU tests of the knob (pytest -k precise), then image quality, real vs fake-quant FP8, in each mode
#          (benchmarks/kernel_quality.py --backends fp8,fp8:conv_out; $OUT/quality_fast.json, quality_precise.json);
#   GPUs 1-3: bench rows in each mode (ROWS; $OUT/kernels_fast.json, kernels_precise.json), one mode after the other.
#   run: bash scripts/gpu/fp8_precise.sh   (env: ROWS, N (1000 samples))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
kernel_job_env
ROWS=${ROWS:-ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn-qkv-te,sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv-te-ff-tw}
( export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 -m pytest -m gpu tests/test_kernels.py -k precise -v --tb=short -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$?" >> $OUT/pytest_gpu.log
  for mode in fast precise; do
    DIFFQUANT_FP8_ACC=$mode timeout 150 python3 benchmarks/kernel_quality.py --n ${N:-1000} --backends fp8,fp8:conv_out \
      --out $OUT/quality_$mode.json > $OUT/quality_$mode.log 2>&1; echo "quality $mode rc=$?" >> $OUT/quality_$mode.log
  done ) &
QP=$!
for mode in fast precise; do
  say "rows ($mode) on GPUs 1-3: $ROWS"
  DIFFQUANT_FP8_ACC=$mode timeout 250 python3 benchmarks/bench_kernels.py --gpus 1,2,3 --row-timeout-s 200 --budget-s 150 \
    --no-layer-types --only "$ROWS" --out $OUT/kernels_$mode.json > $OUT/bench_$mode.log 2>&1; echo "bench rc=$?" >> $OUT/bench_$mode.log
done
wait $QP
grep -E "PASSED|FAILED|rc=" $OUT/pytest_gpu.log | head -12
for mode in fast precise; do echo "== $mode"; grep -A8 "^model " $OUT/bench_$mode.log; tail -3 $OUT/quality_$mode.log; done
ls -la $OUT
say done
