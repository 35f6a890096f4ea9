#!/usr/bin/env bash
# The FP8 attention kernel after session 10's rewrite (log2-domain softmax, row sums on the tensor cores, key mask
# only for ragged key counts), in one call (scripts/gpu/tests_side_rows.sh):
#   1. its GPU tests (TESTS_K);
#   2. on the last GPU: benchmarks/bench_attention.py, the kernel under a few configs against bf16 SDPA on SD-1.5's
#      attention shapes ($OUT/attention.json), then benchmarks/bench_geglu.py with its new candidates (two programs
#      per SM, the persistent kernel; $OUT/geglu.json);
#   3. SD-1.5 b8 rows with every fusion, float attention against FP8 attention, and tensor-wise GEMMs except Q/K/V
#      (-twq), on the other GPUs (ROWS).
# Everything to $OUT: pytest_gpu.log, attention.log, attention.json, geglu.json, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/attention.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K)
OUT=${OUT:-/tmp/out}
export OUT TESTS_K=${TESTS_K-fp8_attention or linear_geglu} TEST_S=150 SIDE_NAME=attention SIDE_S=400
export SIDE="python3 benchmarks/bench_attention.py --out $OUT/attention.json; python3 benchmarks/bench_geglu.py --out $OUT/geglu.json"
export ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv-te-ff-tw,sd15-unet:8:dq-fp8-fp8attn-gn-qkv-te-ff-tw,sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
exec bash scripts/gpu/tests_side_rows.sh
