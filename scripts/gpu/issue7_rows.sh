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
#   suggested calls for the next session (written at the end of session 11, 2026-11-28; session 10's list ran, see
#   BENCHMARKS.md "Kernels, ninth measurement"):
#   0. bash scripts/gpu/ab_rows.sh (nvidia-h200-x4, carry .whl, about 8 min): GPU tests of the one-dot-per-row conv
#      kernel (tma4dr, written after session 11's device time: A tiles stay in shared memory, wgmma not serialized
#      per ptxas), GEGLU and the norms; SD-1.5 b8 -twq and CIFAR b256 as shipped, with DIFFQUANT_QCONV_TMA=4dr (the
#      table's tma4d tiles, one dot per row), with session 10's GEGLU config, and with DIFFQUANT_GN_LOAD_STAGES=3
#      (pipelined norm loads); SD b8 re-tuned on GPU 3 with tma4dr candidates, then the norm sweep. Merge
#      qconv_tuned_3.json (in all.tgz); keep the faster GEGLU config and norm stages as the defaults.
#   0b. CIFAR b1 re-tuned with time_call(inner=0) (the batch-1 tables were chosen among times flattened by the
#      launch latency): TUNE0=ddpm-cifar10-32:1:dq-fp8 bash scripts/gpu/tune_split.sh, rows after the merge, with
#      and without DIFFQUANT_GN_WHOLE_MAX_HW=1024 (one launch a norm instead of three: CIFAR b1's norms took 0.39 ms
#      against 0.24 for all of bf16-compile's fused elementwise work, session 11 call 3's profile).
#   1. re-tune the other batch-1 tasks with inner timing and time their rows:
#        TUNE0=sd15-unet:1:dq-fp8 TUNE1=zoo:cifar10-ddpm:1:dq-fp8 ROWS=sd15-unet:1:bf16-compile,
#        sd15-unet:1:dq-fp8-gn-qkv-te-ff-twq,ddpm-cifar10-32:1:bf16-compile,ddpm-cifar10-32:1:dq-fp8-gn-qkv-te,
#        zoo:cifar10-ddpm:1:bf16-compile,zoo:cifar10-ddpm:1:dq-fp8-gn-qkv-te GN_ARGS="--sweep --batch 1"
#        bash scripts/gpu/small_batch.sh (no --untuned-only: every shape again)
#   2. the 12 INT8 CIFAR b256 shapes still untuned, spread over GPUs:
#        TUNE0=ddpm-cifar10-32:256:dq-int8 TUNE1=... TUNE_ARGS=--untuned-only bash scripts/gpu/tune_split.sh
#      then ROWS=ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-int8-gn-qkv-te.
#   Measured and dropped in session 11: FP8 attention (2x slower than cuDNN), DIFFQUANT_FP8_ACC=precise (2x cost,
#   +0.07 dB), the persistent GEGLU kernel as a default.
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
