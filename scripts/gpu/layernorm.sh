#!/usr/bin/env bash
# diffquant::add_layer_norm's Triton kernel against Inductor's kernel for the same unfused steps, on SD-1.5 b8's
# transformer-block norms (benchmarks/bench_layernorm.py; it fails if h or more than 0.1 % of the e4m3 codes differ),
# then, if TESTS_K is set, the GPU tests it selects.
#   carry: .whl (the diffusers wheel, for the tests)
#   run: bash scripts/gpu/layernorm.sh   -> $OUT/layernorm.json, layernorm.log, pytest_gpu.log
#   env: BENCH (1; 0 skips the bench), PLANS (the bench's --plans), TESTS_K (pytest -k of tests/test_kernels.py),
#        TEST_S (200)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
setup_env
if [ "${BENCH:-1}" = 1 ]; then
  say "layernorm bench"
  timeout ${LN_S:-240} python3 benchmarks/bench_layernorm.py ${PLANS:+--plans "$PLANS"} --out $OUT/layernorm.json \
    > $OUT/layernorm.log 2>&1
  echo "bench rc=$?"
  grep -v -i warn $OUT/layernorm.log | tail -12 | cut -c1-900
fi
if [ -n "${TESTS_K:-}" ]; then
  say "gpu tests: $TESTS_K"
  timeout ${TEST_S:-200} python3 -m pytest -q -m gpu tests/test_kernels.py -k "$TESTS_K" -x > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$?"; tail -15 $OUT/pytest_gpu.log
fi
say done
