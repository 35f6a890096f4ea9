#!/usr/bin/env bash
# Issue 7 bench rows spread over the machine's GPUs (a queue: each GPU runs one row at a time, every row in its own
# process, killed after ROW_TIMEOUT_S), and optionally conv tuning for more shapes on the last GPU at the same time.
# Everything to $OUT: kernels.json, bench.log, and with tuning qconv_tuned.json, qconv_tune_rows.json, tune.log.
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for the torchao rows)
#   run:   ROWS=model:batch:variant,... bash scripts/gpu/issue7_rows.sh
#   env:   TOTAL_S (560), ROW_TIMEOUT_S (420), START_S (last row start, default TOTAL_S - 150),
#          TUNE_TASKS (model:batch:variant,...; empty: no tuning, every GPU benches), TUNE_S (200), TUNE_ARGS (more
#          tune_qconv.py options, e.g. --untuned-only or --skip-paths tma),
#          DIFFQUANT_PROFILE_TOP (kernels listed per row's profile, default here 40)
#   suggested calls for the next session (nvidia-h200-x4; written at the end of session 9, 2026-11-28):
#   0. bash scripts/gpu/fused_ff.sh: the GPU tests of session 9's untimed kernels (diffquant::linear_geglu, the
#      persistent conv kernel tma4dp), the GEGLU op alone (bench_geglu.py) and SD-1.5 b8 rows with and without
#      convert(fuse_ff=True) (variant dq-fp8-gn-qkv-ff).
#   1. SD-1.5 b8 against torchao in the same run (the torchao rows now compile with Inductor's defaults; CIFAR's took
#      29-40 s), while GPU 3 re-tunes the CIFAR b256 FP8 shapes with the persistent 4-D TMA kernel as a candidate
#      (path tma4dp; if call 0's -ff row wins, use dq-fp8-gn-qkv-ff in the rows):
#        TUNE_TASKS=ddpm-cifar10-32:256:dq-fp8 TUNE_S=380 ROWS=sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv,sd15-unet:8:torchao-fp8,sd15-unet:8:torchao-int8dyn bash scripts/gpu/issue7_rows.sh
#      merge: diffquant tune-kernels --merge-from OUT/qconv_tuned.json --merge-into src/diffquant/kernels/tuned/nvidia-h200.json
#   2. the same for SD b8 FP8 (TUNE_TASKS=sd15-unet:8:dq-fp8) with ROWS=ddpm-cifar10-32:256:bf16-compile,
#      ddpm-cifar10-32:256:dq-fp8-gn-qkv (what the call-1 table is worth), and the 17 INT8 CIFAR shapes the last
#      tuning had no time for (TUNE_TASKS=ddpm-cifar10-32:256:dq-int8 TUNE_ARGS=--untuned-only).
#   3. small batches (0.51-0.87x of bf16, untuned): DIFFQUANT_QCONV_BORROW=1 rows at ddpm-cifar10-32:1/64 and
#      sd15-unet:1, then TUNE_TASKS=sd15-unet:1:dq-fp8,ddpm-cifar10-32:64:dq-fp8,ddpm-cifar10-32:1:dq-fp8.
#   4. the bench's zoo:cifar10-ddpm rows (the issue names that model too; none measured yet) and dq-w4a8 at b256.
#   Untimed switches: DIFFQUANT_FUSE_UP=0 (A/B of the fused up blocks), DIFFQUANT_BENCH_FREEZE=1.
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
  ( CUDA_VISIBLE_DEVICES=$TUNE_GPU timeout $(( ${TUNE_S:-200} + 60 )) python3 benchmarks/tune_qconv.py --tasks "$TUNE_TASKS" ${TUNE_ARGS:-} \
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
