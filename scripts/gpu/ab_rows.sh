#!/usr/bin/env bash
# In-model A/B rows of session 11's untimed changes, in one call on nvidia-h200-x4 (carry .whl), about 6 minutes:
#   0. GPU tests of the one-dot-per-row conv kernel (tma4dr) and the GEGLU GEMM (TESTS_K);
#   GPU 0: SD-1.5 b8 bf16-compile, then ROW as shipped (GEGLU 64x128x128, 4 warps, 2 stages: never timed in a model);
#   GPU 1: ROW with ENV1 (default DIFFQUANT_QCONV_TMA=4dr: the table's tma4d tiles run one dot per row, A tiles in
#          shared memory and the wgmma pipeline no longer serialized, benchmarks/ptxas_report.py);
#   GPU 2: ROW with ENV2 (default: session 10's GEGLU config, 128x128x128, 8 warps, 3 stages);
#   GPU 3: TUNE3 tuned with the tma4dr candidates beside gather and tma4d (TUNE_ARGS; time_call(inner=0) timing).
# Everything to $OUT: pytest_gpu.log, kernels_g{0,1,2}.json, bench_g{0,1,2}.log, qconv_tuned_3.json,
# qconv_tune_rows_3.json, tune_3.log.
#   run: bash scripts/gpu/ab_rows.sh   (env: ROW, ENV1, ENV2, TUNE3, TUNE_S (200), TUNE_ARGS, TESTS_K)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
ROW=${ROW:-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
ENV1=${ENV1:-DIFFQUANT_QCONV_TMA=4dr}
ENV2=${ENV2:-DIFFQUANT_GEGLU_CONFIG='{"BLOCK_M": 128, "num_warps": 8, "num_stages": 3}'}
TESTS_K=${TESTS_K-tma4d_rows or linear_geglu}
[ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 4 ] || { echo "needs 4 GPUs"; exit 2; }
if [ -n "$TESTS_K" ]; then
  say "GPU tests: $TESTS_K"
  timeout 150 python3 -m pytest -m gpu tests/test_kernels.py -k "$TESTS_K" -v --tb=short -p no:cacheprovider \
    > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
  grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -20
fi
export TUNE_SPLIT_SOURCED=1 TUNE3=${TUNE3-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq} TUNE_S=${TUNE_S:-200}
export TUNE_ARGS=${TUNE_ARGS:---skip-paths tma,tma4dp}
source scripts/gpu/tune_split.sh
rows() {  # rows GPU ONLY [VAR=value]
  env ${3:+"$3"} CUDA_VISIBLE_DEVICES=$1 timeout 330 python3 benchmarks/bench_kernels.py --row-timeout-s 200 \
    --budget-s 150 --no-layer-types --only "$2" --out $OUT/kernels_g$1.json > $OUT/bench_g$1.log 2>&1
  echo "bench rc=$?" >> $OUT/bench_g$1.log
}
say "rows: GPU 0 as shipped, GPU 1 $ENV1, GPU 2 $ENV2"
rows 0 "sd15-unet:8:bf16-compile,$ROW" & P0=$!
rows 1 "$ROW" "$ENV1" & P1=$!
rows 2 "$ROW" "$ENV2" & P2=$!
wait $P0 $P1 $P2
for p in "${TUNE_PIDS[@]}"; do wait $p; done
for i in 0 1 2; do echo "== GPU $i"; grep -A5 "^model " $OUT/bench_g$i.log; done
grep -v trying $OUT/tune_3.log | grep -v '^{' | tail -4
python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows_3.json 2>/dev/null | tail -20
ls -la $OUT
say done
