#!/usr/bin/env bash
# The bench matrix's missing rows in one call (scripts/gpu/tests_side_rows.sh), written in session 10 (2026-11-28):
#   GPUs 0..N-2 (ROWS): SD-1.5 b8 with every fusion (-te-ff-tw, -te-ff) against bf16 compile and torchao's fp8 and
#     int8-dynamic configs in the same run; SD-1.5 b1; the bundled zoo:cifar10-ddpm at b256 and b64;
#   the last GPU (SIDE): the GPU tests of the persistent conv kernel (tma4dp) and the tensor-wise GEMMs, then
#     google/ddpm-cifar10-32 b256 rows for W4A8, W4A16 and bf16 eager with their own bf16-compile baseline
#     ($OUT/kernels_side.json, bench_side.log).
# Everything to $OUT: pytest_gpu.log, side.log, kernels.json, bench.log, kernels_side.json, bench_side.log.
#   carry: .whl (diffusers; .whl/torchao-gpu for the torchao rows)
#   run:   bash scripts/gpu/coverage_rows.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, SIDE_ROWS, SIDE_TESTS_K)
OUT=${OUT:-/tmp/out}
SIDE_TESTS_K=${SIDE_TESTS_K:-(tma_path and tma4dp) or fuse_ff}
SIDE_ROWS=${SIDE_ROWS:-ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-w4a8,ddpm-cifar10-32:256:dq-w4a16,ddpm-cifar10-32:256:bf16-eager}
export OUT TESTS_K= SIDE_NAME=side SIDE_S=${SIDE_S:-480}
export SIDE="timeout 200 python3 -m pytest -m gpu tests/test_kernels.py -k '$SIDE_TESTS_K' -v --tb=short -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1; echo pytest rc=\$?; grep -E 'PASSED|FAILED|ERROR' $OUT/pytest_gpu.log | head -30; python3 benchmarks/bench_kernels.py --gpus all --row-timeout-s 240 --budget-s 230 --no-layer-types --only '$SIDE_ROWS' --out $OUT/kernels_side.json > $OUT/bench_side.log 2>&1; echo bench_side rc=\$?; grep -A12 '^model ' $OUT/bench_side.log"
export ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv-te-ff-tw,sd15-unet:8:torchao-fp8,sd15-unet:8:torchao-int8dyn,sd15-unet:8:dq-fp8-gn-qkv-te-ff,sd15-unet:1:bf16-compile,sd15-unet:1:dq-fp8-gn-qkv-te-ff,zoo:cifar10-ddpm:256:bf16-compile,zoo:cifar10-ddpm:256:dq-fp8-gn-qkv-te,zoo:cifar10-ddpm:256:torchao-fp8,zoo:cifar10-ddpm:64:bf16-compile,zoo:cifar10-ddpm:64:dq-fp8-gn-qkv-te,sd15-unet:8:bf16-eager}
exec bash scripts/gpu/tests_side_rows.sh
