#!/usr/bin/env bash
# In-model A/B rows of session 11's untimed changes, in one call on nvidia-h200-x4 (carry .whl), about 8 minutes
# (timeout_s 600):
#   0. GPU tests of the one-dot-per-row conv kernel (tma4dr), the GEGLU GEMM and the norms (TESTS_K);
#   GPU 0: as shipped: SD-1.5 b8 bf16-compile and ROW (GEGLU 64x128x128, 4 warps, 2 stages: never timed in a model),
#          CIFAR b256 bf16-compile and CROW;
#   GPU 1: ROW with DIFFQUANT_QCONV_TMA=4dr (the table's tma4d tiles, one dot per row: A tiles in shared memory, the
#          wgmma pipeline no longer serialized per benchmarks/ptxas_report.py), then ROW with session 10's GEGLU config;
#   GPU 2: ROW and CROW with DIFFQUANT_GN_LOAD_STAGES=3 (the norms' pixel loops software-pipelined: asynchronous
#          copies, where the shipped loops wait for every load; the norms are 31 % of CIFAR b256's GPU time), then
#          with DIFFQUANT_GN_FOLD=1 too (the finalize step folded into apply: one launch fewer per norm);
#   GPU 3: TUNE3 tuned with the tma4dr candidates beside gather and tma4d (TUNE_ARGS).
# Everything to $OUT: pytest_gpu.log, kernels_g*.json, bench_g*.log, qconv_tuned_3.json, qconv_tune_rows_3.json,
# tune_3.log, all in $OUT/all.tgz (more than the 8 files that come back). The norm sweep with its load-stages
# variants (python3 benchmarks/bench_groupnorm.py --sweep) does not fit in this call.
#   run: bash scripts/gpu/ab_rows.sh   (env: ROW, CROW, TUNE3, TUNE_S (200), TUNE_ARGS, TESTS_K)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
ROW=${ROW:-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
CROW=${CROW:-ddpm-cifar10-32:256:dq-fp8-gn-qkv-te}
OLD_GEGLU='DIFFQUANT_GEGLU_CONFIG={"BLOCK_M": 128, "num_warps": 8, "num_stages": 3}'
TESTS_K=${TESTS_K-tma4d_rows or linear_geglu or group_norm}
[ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 4 ] || { echo "needs 4 GPUs"; exit 2; }
if [ -n "$TESTS_K" ]; then
  say "GPU tests: $TESTS_K"
  timeout 100 python3 -m pytest -m gpu tests/test_kernels.py -k "$TESTS_K" -v --tb=short -p no:cacheprovider \
    > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
  grep -E "PASSED|FAILED|ERROR|rc=" $OUT/pytest_gpu.log | head -30
fi
export TUNE_SPLIT_SOURCED=1 TUNE3=${TUNE3-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq} TUNE_S=${TUNE_S:-200}
export TUNE_ARGS=${TUNE_ARGS:---skip-paths tma,tma4dp}
source scripts/gpu/tune_split.sh
rows() {  # rows GPU TAG ONLY [VAR=value ...]   (env T: the bench's time limit, default 360 s)
  local g=$1 tag=$2 only=$3; shift 3
  env "$@" CUDA_VISIBLE_DEVICES=$g timeout ${T:-360} python3 benchmarks/bench_kernels.py --row-timeout-s 200 \
    --budget-s 240 --no-layer-types --only "$only" --out $OUT/kernels_g$g$tag.json > $OUT/bench_g$g$tag.log 2>&1
  echo "bench rc=$?" >> $OUT/bench_g$g$tag.log
}
say "rows: GPU 0 as shipped, GPU 1 4dr then the old GEGLU config, GPU 2 norm loads in 3 stages, then also folded"
rows 0 "" "sd15-unet:8:bf16-compile,$ROW,ddpm-cifar10-32:256:bf16-compile,$CROW" & P0=$!
( T=220 rows 1 a "$ROW" DIFFQUANT_QCONV_TMA=4dr; T=200 rows 1 b "$ROW" "$OLD_GEGLU" ) & P1=$!
( T=200 rows 2 a "$ROW,$CROW" DIFFQUANT_GN_LOAD_STAGES=3
  T=200 rows 2 b "$ROW,$CROW" DIFFQUANT_GN_LOAD_STAGES=3 DIFFQUANT_GN_FOLD=1 ) & P2=$!
wait $P0 $P1 $P2
for p in "${TUNE_PIDS[@]}"; do wait $p; done
for f in $OUT/bench_g*.log; do echo "== $f"; grep -A6 "^model " $f; done
grep -v trying $OUT/tune_3.log | grep -v '^{' | tail -4
python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows_3.json 2>/dev/null | tail -20
cd $OUT && tar czf all.tgz *.json *.log && find . -maxdepth 1 -type f ! -name all.tgz ! -name env.txt -delete
ls -la $OUT
say done
