#!/usr/bin/env bash
# The warp-specialized Gluon GEGLU kernel against the Triton GEGLU kernel on SD-1.5 b8's feed-forward shapes
# (benchmarks/bench_gluon_geglu.py). A kernel that deadlocks is killed by the timeout (GG_S, 150 s).
#   run: bash scripts/gpu/gluon_geglu.sh   -> $OUT/gluon_geglu.json, .log   (env: CONFIGS, its --configs)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
say "gluon geglu bench"
timeout ${GG_S:-150} python3 benchmarks/bench_gluon_geglu.py ${CONFIGS:+--configs $CONFIGS} --out $OUT/gluon_geglu.json \
  > $OUT/gluon_geglu.log 2>&1
echo "bench rc=$?"
grep -v -i warn $OUT/gluon_geglu.log | tail -12 | cut -c1-900
say done
