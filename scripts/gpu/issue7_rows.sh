#!/usr/bin/env bash
# Issue 7 bench rows spread over the machine's GPUs (a queue: each GPU runs one row at a time, every row in its own
# process, killed after ROW_TIMEOUT_S), and optionally conv tuning for more shapes on the last GPU at the same time.
# Everything to $OUT: kernels.json, bench.log, and with tuning qconv_tuned.json, qconv_tune_rows.json, tune.log.
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for the torchao rows)
#   run:   ROWS=model:batch:variant,... bash scripts/gpu/issue7_rows.sh
#   env:   TOTAL_S (560), ROW_TIMEOUT_S (420), START_S (last row start, default TOTAL_S - 150),
#          TUNE_TASKS (model:batch:variant,...; empty: no tuning, every GPU benches), TUNE_S (200),
#          DIFFQUANT_PROFILE_TOP (kernels listed per row's profile, default here 40)
#   suggested calls for the next session (nvidia-h200-x4; written at the end of session 8, 2026-11-28):
#   1. GPU tests of the session-8 code (fused up blocks, stacked Q/K/V), then the rows that say what they are worth
#      (GPU 3 tunes the INT8 shapes meanwhile):
#        TESTS_K="group_norm or fused_resnet or fuse_qkv" bash scripts/gpu/norms.sh   with
#        ROWS=ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn,ddpm-cifar10-32:256:dq-fp8-gn-qkv,sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn,sd15-unet:8:dq-fp8-gn-qkv
#      (an A/B of the up-block / output-norm changes: the same dq-fp8-gn rows with DIFFQUANT_FUSE_UP=0 in a later call)
#      and GN_ARGS=--sweep (it now times the one-launch norm kernel, "whole", on images up to 32x32); if it wins,
#      rows with DIFFQUANT_GN_WHOLE_MAX_HW=256 (or the size the sweep says) and then make it the default
#   2. Inductor freezing, and the nearest tuned conv config for untuned batches:
#        DIFFQUANT_BENCH_FREEZE=1 ROWS=ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn-qkv,sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv bash scripts/gpu/issue7_rows.sh
#        DIFFQUANT_QCONV_BORROW=1 ROWS=ddpm-cifar10-32:1:bf16-compile,ddpm-cifar10-32:1:dq-fp8-gn,ddpm-cifar10-32:64:bf16-compile,ddpm-cifar10-32:64:dq-fp8-gn,sd15-unet:1:bf16-compile,sd15-unet:1:dq-fp8-gn bash scripts/gpu/issue7_rows.sh
#   3. INT8 tuning: TUNE_TASKS=ddpm-cifar10-32:256:dq-int8,sd15-unet:8:dq-int8 TUNE_S=240 ROWS=... (merge the
#      result with diffquant tune-kernels --merge-from OUT/qconv_tuned.json --merge-into
#      src/diffquant/kernels/tuned/nvidia-h200.json).
#   4. Tables for the small batches (0.51-0.87x of bf16 there, untuned): TUNE_TASKS=sd15-unet:1:dq-fp8,
#      ddpm-cifar10-32:64:dq-fp8,ddpm-cifar10-32:1:dq-fp8, merged the same way.
#   The torchao rows gave no result within 300 s in every call so far (torchao 0.16, which skipped its C++ extensions
#   on torch 2.11) and each held a GPU for the whole timeout; .whl/torchao-gpu now carries 0.17.0 (built for torch
#   >= 2.11). Try one (sd15-unet:8:torchao-fp8) on its own GPU first; a timeout now names the phase it reached.
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-420}
START_S=${START_S:-$(( TOTAL_S - 150 ))}
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
[ -n "${ROWS:-}" ] || { echo "ROWS is empty: nothing to bench"; exit 2; }
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
BENCH_GPUS=$(python3 -c "print(','.join(map(str, range($N))))")
if [ -n "${TUNE_TASKS:-}" ]; then
  [ "$N" -ge 2 ] || { echo "tuning next to the bench needs 2 or more GPUs; $N here"; exit 2; }
  TUNE_GPU=$(( N - 1 )); BENCH_GPUS=$(python3 -c "print(','.join(map(str, range($N - 1))))")
  say "GPU $TUNE_GPU: tune $TUNE_TASKS"
  ( CUDA_VISIBLE_DEVICES=$TUNE_GPU timeout $(( ${TUNE_S:-200} + 60 )) python3 benchmarks/tune_qconv.py --tasks "$TUNE_TASKS" \
      --budget-s ${TUNE_S:-200} --out $OUT/qconv_tuned.json --rows $OUT/qconv_tune_rows.json > $OUT/tune.log 2>&1
    echo "tune rc=$?" >> $OUT/tune.log ) &
  TP=$!
fi
say "GPUs $BENCH_GPUS: bench $ROWS"
timeout $(( TOTAL_S - $(elapsed) - 10 )) python3 benchmarks/bench_kernels.py --gpus "$BENCH_GPUS" \
  --row-timeout-s $ROW_TIMEOUT_S --budget-s $(( START_S - $(elapsed) )) --no-layer-types --only "$ROWS" \
  --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
[ -n "${TP:-}" ] && wait $TP
grep "^{" $OUT/bench.log | cut -c1-300
grep -A40 "^model " $OUT/bench.log | head -60
if [ -f $OUT/qconv_tune_rows.json ]; then
  grep -v "trying" $OUT/tune.log | tail -8
  python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows.json
fi
ls -la $OUT
say done
