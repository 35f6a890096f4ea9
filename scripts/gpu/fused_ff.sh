#!/usr/bin/env bash
# diffquant::linear_geglu (convert(fuse_ff=True)) and the persistent conv kernel (path tma4dp) on the GPU, in one call:
#   1. their GPU tests (TESTS_K);
#   2. benchmarks/bench_geglu.py: the fused op alone against _scaled_mm + Inductor's GEGLU on the SD-1.5 b8 shapes
#      (on the last GPU, while 3. runs on the others);
#   3. bench rows with and without the fused feed-forward (-ff) and with cuBLAS's tensor-wise FP8 GEMMs (-tw), one row
#      per GPU at a time (ROWS).
# Everything to $OUT: pytest_gpu.log, geglu.json, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/fused_ff.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-300}
ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv,sd15-unet:8:dq-fp8-gn-qkv-ff,sd15-unet:8:dq-fp8-gn-qkv-tw,sd15-unet:8:dq-fp8-gn-qkv-ff-tw}
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
say "GPU tests"
timeout 200 python3 -m pytest -m gpu tests/test_kernels.py -k "${TESTS_K:-linear_geglu or tma_path}" -v --tb=short \
  -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -40
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
ROW_GPUS=all
if [ "$N" -ge 2 ]; then
  ROW_GPUS=$(python3 -c "print(','.join(map(str, range($N - 1))))")
  say "GEGLU alone on GPU $(( N - 1 ))"
  ( CUDA_VISIBLE_DEVICES=$(( N - 1 )) timeout 300 python3 benchmarks/bench_geglu.py --out $OUT/geglu.json \
      > $OUT/geglu.log 2>&1; echo "geglu rc=$?" >> $OUT/geglu.log ) &
  GP=$!
else
  timeout 200 python3 benchmarks/bench_geglu.py --out $OUT/geglu.json > $OUT/geglu.log 2>&1; echo "geglu rc=$?" >> $OUT/geglu.log
fi
say "rows on GPUs $ROW_GPUS: $ROWS"
timeout $(( TOTAL_S - $(elapsed) - 10 )) python3 benchmarks/bench_kernels.py --gpus "$ROW_GPUS" \
  --row-timeout-s $ROW_TIMEOUT_S --budget-s $(( TOTAL_S - $(elapsed) - 150 )) --no-layer-types --only "$ROWS" \
  --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
[ -n "${GP:-}" ] && wait $GP
cut -c1-400 $OUT/geglu.log | tail -8
grep "^{" $OUT/bench.log | cut -c1-300; grep -A20 "^model " $OUT/bench.log | head -30
ls -la $OUT
say done
