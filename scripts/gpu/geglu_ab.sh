#!/usr/bin/env bash
# In-model A/B of the GEGLU GEMM's block config (BENCHMARKS.md "Kernels, ninth measurement": the persistent kernel won
# the op benchmark at K = 320 and lost inside SD-1.5), with the batch-1 conv shapes re-tuned beside it. One call on
# nvidia-h200-x4 (carry .whl), about 5 minutes:
#   GPU 0: SD-1.5 b8 bf16-compile, then dq-fp8-gn-qkv-te-ff-twq with the shipped GEGLU default;
#   GPU 1: the same -twq row with DIFFQUANT_GEGLU_CONFIG=$OLD (session 10's default: 128x128x128, 8 warps, 3 stages);
#   GPU 2: the same row with DIFFQUANT_GEGLU_CONFIG=$PERSISTENT;
#   GPU 3: TUNE3 re-tuned with time_call(inner=0) (every shape, not only untuned ones; default: CIFAR b1).
# Everything to $OUT: kernels_g{0,1,2}.json, bench_g{0,1,2}.log, qconv_tuned_3.json, qconv_tune_rows_3.json, tune_3.log.
#   run: bash scripts/gpu/geglu_ab.sh   (env: ROW, OLD, PERSISTENT, TUNE3, TUNE_S (200))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
ROW=${ROW:-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
OLD=${OLD:-'{"BLOCK_M": 128, "num_warps": 8, "num_stages": 3}'}
PERSISTENT=${PERSISTENT:-'{"BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "persistent": true}'}
[ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 4 ] || { echo "needs 4 GPUs"; exit 2; }
export TUNE_SPLIT_SOURCED=1 TUNE3=${TUNE3-ddpm-cifar10-32:1:dq-fp8} TUNE_S=${TUNE_S:-200} TUNE_ARGS=${TUNE_ARGS:-}
source scripts/gpu/tune_split.sh
rows() {  # rows() GPU ONLY [GEGLU config]
  CUDA_VISIBLE_DEVICES=$1 DIFFQUANT_GEGLU_CONFIG=${3:-} timeout 330 python3 benchmarks/bench_kernels.py \
    --row-timeout-s 200 --budget-s 150 --no-layer-types --only "$2" --out $OUT/kernels_g$1.json > $OUT/bench_g$1.log 2>&1
  echo "bench rc=$?" >> $OUT/bench_g$1.log
}
say "rows: GPU 0 default, GPU 1 $OLD, GPU 2 $PERSISTENT"
rows 0 "sd15-unet:8:bf16-compile,$ROW" & P0=$!
rows 1 "$ROW" "$OLD" & P1=$!
rows 2 "$ROW" "$PERSISTENT" & P2=$!
wait $P0 $P1 $P2
for p in "${TUNE_PIDS[@]}"; do wait $p; done
for i in 0 1 2; do echo "== GPU $i"; grep -A5 "^model " $OUT/bench_g$i.log; done
grep -v trying $OUT/tune_3.log | grep -v '^{' | tail -4
ls -la $OUT
say done
