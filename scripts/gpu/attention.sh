#!/usr/bin/env bash
# The FP8 attention kernel after session 10's rewrite (log2-domain softmax, row sums on the tensor cores, key mask
# only for ragged key counts), in one call (scripts/gpu/tests_side_rows.sh):
#   1. its GPU tests (TESTS_K);
#   2. GPU 3: benchmarks/bench_attention.py, the kernel under a few configs against bf16 SDPA (cuDNN and
#      FlashAttention-2) on SD-1.5's attention shapes ($OUT/attention.json); GPU 2 at the same time:
#      benchmarks/bench_geglu.py with its new candidates (two programs per SM, the persistent kernel; geglu.json);
#   3. GPUs 0-1: SD-1.5 b8 rows with every fusion, float attention against FP8 attention, and tensor-wise GEMMs
#      except Q/K/V (-twq) (ROWS).
# Everything to $OUT: pytest_gpu.log, attention.log, attention.json, geglu.log, geglu.json, kernels.json, bench.log.
#   carry: .whl
#   run:   bash scripts/gpu/attention.sh   (env: TOTAL_S (560), ROW_TIMEOUT_S (300), ROWS, TESTS_K)
OUT=${OUT:-/tmp/out}
export OUT TESTS_K=${TESTS_K-fp8_attention or linear_geglu} TEST_S=150 SIDE_NAME=attention SIDE_S=400 ROW_GPUS=0,1
export SIDE="CUDA_VISIBLE_DEVICES=2 python3 benchmarks/bench_geglu.py --out $OUT/geglu.json > $OUT/geglu.log 2>&1 &
python3 benchmarks/bench_attention.py --out $OUT/attention.json; wait"
export ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8-gn-qkv-te-ff-tw,sd15-unet:8:dq-fp8-fp8attn-gn-qkv-te-ff-tw,sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
exec bash scripts/gpu/tests_side_rows.sh
