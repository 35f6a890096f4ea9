#!/usr/bin/env bash
# Session 11's short closing call (one H200, about 4 minutes; carry .whl): the GPU tests of what changed after the
# session's first calls (the precise-accumulation test's fixed wrapper, the GEGLU GEMM's new default configs,
# time_call's inner repeats), then SD-1.5 b8 rows with the new GEGLU defaults (bf16-compile and the best variant,
# one after the other on GPU 0).
# Everything to $OUT: pytest_gpu.log, kernels.json, bench.log.
#   run: bash scripts/gpu/geglu_defaults.sh   (env: ROWS, TEST_S (100))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
say "GPU tests"
timeout ${TEST_S:-100} python3 -m pytest -m gpu tests/test_kernels.py -k "precise or linear_geglu or time_call" -v \
  --tb=short -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -20
say "rows: $ROWS"
timeout 300 python3 benchmarks/bench_kernels.py --gpus 1 --row-timeout-s 160 --budget-s 130 --no-layer-types \
  --only "$ROWS" --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
grep -A6 "^model " $OUT/bench.log
say done
