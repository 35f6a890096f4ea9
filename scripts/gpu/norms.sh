#!/usr/bin/env bash
# The fused group norms (diffquant::group_norm_act, convert(fuse_norms=True)) on the GPU, in one call
# (scripts/gpu/tests_side_rows.sh):
#   1. their GPU tests (kernels against the float64 reference; fused blocks against diffusers' forward);
#   2. benchmarks/bench_groupnorm.py: the norm alone, Inductor vs diffquant, on the SD-1.5 b8 and CIFAR b256 shapes
#      (on the last GPU, while 3. runs on the others; one GPU: before 3.);
#   3. bench rows with and without the fused norms (ROWS), one row per GPU at a time.
# Everything to $OUT: pytest_gpu.log, groupnorm.json, groupnorm.log, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/norms.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K, GN_ARGS (--sweep),
#          GN_TIMEOUT_S (420))
OUT=${OUT:-/tmp/out}
export OUT TESTS_K=${TESTS_K:-group_norm or fused_resnet} TEST_S=150 SIDE_NAME=groupnorm SIDE_S=${GN_TIMEOUT_S:-420}
export SIDE="python3 benchmarks/bench_groupnorm.py ${GN_ARGS:-} --out $OUT/groupnorm.json"
export ROWS=${ROWS:-ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8-gn,ddpm-cifar10-32:256:dq-fp8,ddpm-cifar10-32:256:bf16-compile-gn,sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn,sd15-unet:8:dq-fp8,sd15-unet:8:bf16-compile-gn}
exec bash scripts/gpu/tests_side_rows.sh
