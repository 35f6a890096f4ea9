#!/usr/bin/env bash
# One x4 call: issue-5 planning numbers (GPU 0) beside issue-7 kernel tests + bench (GPU 1).
#   run: bash scripts/gpu/call_a.sh      carry: .whl
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/recon $OUT/kern
nvidia-smi -L
(CUDA_VISIBLE_DEVICES=0 OUT=$OUT/recon bash scripts/gpu/recon_speed.sh > $OUT/recon/log.txt 2>&1) &
(CUDA_VISIBLE_DEVICES=1 OUT=$OUT/kern bash scripts/gpu/kernels_test_bench.sh > $OUT/kern/log.txt 2>&1) &
wait
tail -n 30 $OUT/recon/log.txt
tail -n 50 $OUT/kern/log.txt
