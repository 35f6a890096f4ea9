#!/usr/bin/env bash
# diffquant::linear_geglu (convert(fuse_ff=True)) and the persistent conv kernel (path tma4dp) on the GPU, in one call
# (scripts/gpu/tests_side_rows.sh):
#   1. their GPU tests (TESTS_K);
#   2. benchmarks/bench_geglu.py: the fused op alone against _scaled_mm + Inductor's GEGLU on the SD-1.5 b8 shapes
#      (on the last GPU, while 3. runs on the others);
#   3. bench rows with and without the fused feed-forward (-ff), the stacked time projections (-te) and cuBLAS's
#      tensor-wise FP8 GEMMs (-tw), one row per GPU at a time (ROWS).
# Everything to $OUT: pytest_gpu.log, geglu.json, geglu.log, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/fused_ff.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K)
OUT=${OUT:-/tmp/out}
export OUT TESTS_K=${TESTS_K:-linear_geglu or tma_path or fuse_ff} TEST_S=240 SIDE_NAME=geglu SIDE_S=300
export SIDE="python3 benchmarks/bench_geglu.py --out $OUT/geglu.json"
export ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv,sd15-unet:8:dq-fp8-gn-qkv-ff,sd15-unet:8:dq-fp8-gn-qkv-te,sd15-unet:8:dq-fp8-gn-qkv-tw,ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn-qkv-te}
exec bash scripts/gpu/tests_side_rows.sh
