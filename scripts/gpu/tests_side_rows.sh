#!/usr/bin/env bash
# One GPU call in three parts (the shape of norms.sh and fused_ff.sh, which set its variables):
#   1. GPU tests: pytest -m gpu tests/test_kernels.py -k "$TESTS_K" (TEST_S seconds at most; none if TESTS_K is empty);
#   2. SIDE, a command run on the last GPU (with one GPU: before 3.), its output in $OUT/$SIDE_NAME.log;
#   3. bench rows (ROWS) on the other GPUs, one row per GPU at a time.
# Everything to $OUT: pytest_gpu.log, $SIDE_NAME.log (+ what SIDE writes), kernels.json, bench.log.
#   env: TESTS_K, TEST_S (200), SIDE, SIDE_NAME (side), SIDE_S (420), ROWS, TOTAL_S (560), ROW_TIMEOUT_S (300),
#        ROW_GPUS (the rows' GPUs; default all but the last, where SIDE runs: a SIDE that spreads over more GPUs sets
#        its own CUDA_VISIBLE_DEVICES and leaves them out of ROW_GPUS)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-300}
SIDE_NAME=${SIDE_NAME:-side}
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
if [ -n "${TESTS_K:-}" ]; then
  say "GPU tests: $TESTS_K"
  timeout ${TEST_S:-200} python3 -m pytest -m gpu tests/test_kernels.py -k "$TESTS_K" -v --tb=short \
    -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
  grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -40
fi
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
ROW_GPUS_SET=${ROW_GPUS:-}
ROW_GPUS=all
if [ "$N" -ge 2 ]; then
  ROW_GPUS=${ROW_GPUS_SET:-$(python3 -c "print(','.join(map(str, range($N - 1))))")}
  say "$SIDE_NAME on GPU $(( N - 1 ))"
  ( CUDA_VISIBLE_DEVICES=$(( N - 1 )) timeout ${SIDE_S:-420} bash -c "$SIDE" > $OUT/$SIDE_NAME.log 2>&1
    echo "$SIDE_NAME rc=$?" >> $OUT/$SIDE_NAME.log ) &
  GP=$!
else
  say "$SIDE_NAME"
  timeout 200 bash -c "$SIDE" > $OUT/$SIDE_NAME.log 2>&1; echo "$SIDE_NAME rc=$?" >> $OUT/$SIDE_NAME.log
fi
say "rows on GPUs $ROW_GPUS: $ROWS"
timeout $(( TOTAL_S - $(elapsed) - 10 )) python3 benchmarks/bench_kernels.py --gpus "$ROW_GPUS" \
  --row-timeout-s $ROW_TIMEOUT_S --budget-s $(( TOTAL_S - $(elapsed) - 150 )) --no-layer-types --only "$ROWS" \
  --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
[ -n "${GP:-}" ] && wait $GP
grep -v "^{\"shape.*default" $OUT/$SIDE_NAME.log | tail -14 | cut -c1-400
grep "^{" $OUT/bench.log | cut -c1-300; grep -A20 "^model " $OUT/bench.log | head -40
ls -la $OUT
say done
