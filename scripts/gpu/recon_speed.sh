#!/usr/bin/env bash
# Planning numbers for issue 5 on one GPU: block-loop speed (CUDA graphs on/off, batch 32/64)
# and fake-quant sampling throughput. Carry: .whl.   run: bash scripts/gpu/recon_speed.sh
set -uo pipefail
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -m gpu tests/test_qdiffusion_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/recon_speed.py --device cuda --out "$OUT/recon_speed.json" 2>&1 | tee "$OUT/recon_speed.log"
