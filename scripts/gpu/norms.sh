#!/usr/bin/env bash
# The fused group norms (diffquant::group_norm_act, convert(fuse_norms=True)) on the GPU, in one call:
#   1. their GPU tests (kernels against the float64 reference; fused blocks against diffusers' forward);
#   2. benchmarks/bench_groupnorm.py: the norm alone, Inductor vs diffquant, on the SD-1.5 b8 and CIFAR b256 shapes
#      (on the last GPU, while 3. runs on the others; one GPU: before 3.);
#   3. bench rows with and without the fused norms (ROWS), one row per GPU at a time.
# Everything to $OUT: pytest_gpu.log, groupnorm.json, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/norms.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K, GN_ARGS (--sweep),
#          GN_TIMEOUT_S (420))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-300}
ROWS=${ROWS:-ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn,ddpm-cifar10-32:256:dq-fp8,ddpm-cifar10-32:256:bf16-compile-gn,sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn,sd15-unet:8:dq-fp8,sd15-unet:8:bf16-compile-gn}
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
say "GPU tests"
timeout 150 python3 -m pytest -m gpu tests/test_kernels.py -k "${TESTS_K:-group_norm or fused_resnet}" -v --tb=short \
  -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -20
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
ROW_GPUS=all
if [ "$N" -ge 2 ]; then  # the norm alone on the last GPU while the rows run on the others
  ROW_GPUS=$(python3 -c "print(','.join(map(str, range($N - 1))))")
  say "norm alone on GPU $(( N - 1 ))"
  ( CUDA_VISIBLE_DEVICES=$(( N - 1 )) timeout ${GN_TIMEOUT_S:-420} python3 benchmarks/bench_groupnorm.py ${GN_ARGS:-} --out $OUT/groupnorm.json \
      > $OUT/groupnorm.log 2>&1; echo "groupnorm rc=$?" >> $OUT/groupnorm.log ) &
  GP=$!
else
  say "norm alone"
  timeout 200 python3 benchmarks/bench_groupnorm.py ${GN_ARGS:-} --out $OUT/groupnorm.json > $OUT/groupnorm.log 2>&1
  echo "groupnorm rc=$?" >> $OUT/groupnorm.log
fi
say "rows on GPUs $ROW_GPUS: $ROWS"
timeout $(( TOTAL_S - $(elapsed) - 10 )) python3 benchmarks/bench_kernels.py --gpus "$ROW_GPUS" \
  --row-timeout-s $ROW_TIMEOUT_S --budget-s $(( TOTAL_S - $(elapsed) - 150 )) --no-layer-types --only "$ROWS" \
  --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
[ -n "${GP:-}" ] && wait $GP
grep -v "^{\"shape.*default" $OUT/groupnorm.log | tail -14 | cut -c1-300
grep "^{" $OUT/bench.log | cut -c1-300; grep -A20 "^model " $OUT/bench.log | head -40
ls -la $OUT
say done
