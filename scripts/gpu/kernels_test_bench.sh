#!/usr/bin/env bash
# Issue 7 (real low-bit kernels) on one GPU (nvidia-h100-x1 or nvidia-h200): GPU kernel tests, then the
# kernel benchmark, each guarded (a failure in one does not lose the other), everything to $OUT.
# Carry: .whl (diffusers wheel; .whl/torchao-gpu/ holds the torchao wheel for the torchao variants).
#   run: bash scripts/gpu/kernels_test_bench.sh        (TOTAL_S=360 caps it: ~6 minutes)
# Env: TOTAL_S (whole-script seconds, default 360), TEST_S (test cap, default 150; SKIP_TESTS=1 skips them),
#      CUDA_VISIBLE_DEVICES (which GPU; default 0), BENCH_ARGS (extra args for benchmarks/bench_kernels.py,
#      e.g. "--only sd15-unet:8:dq-int8 --no-layer-types").
# $OUT: env.txt, pytest_gpu.log, pytest_gpu.xml, kernels.json (rows written as they finish), bench.log
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-360}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# not piped: a pipeline would run setup_env in a subshell and lose its PYTHONPATH
setup_env > "$OUT/env.txt" 2>&1
setup_torchao
{
  echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES TOTAL_S=$TOTAL_S"
  nvidia-smi -i "${CUDA_VISIBLE_DEVICES%%,*}" --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import torchao; print("torchao", torchao.__version__)' 2>&1 | tail -1
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  say "GPU tests"
  timeout ${TEST_S:-150} python3 -m pytest -m gpu tests/test_kernels.py -v --tb=short -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_gpu.log"
  tail -25 "$OUT/pytest_gpu.log"
fi

LEFT=$(( TOTAL_S - $(elapsed) - 15 ))
BUDGET=$(( LEFT > 120 ? LEFT - 100 : 20 ))
say "bench: hard limit ${LEFT}s, no new row after ${BUDGET}s"
timeout $LEFT python3 benchmarks/bench_kernels.py --budget-s $BUDGET --out "$OUT/kernels.json" ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
grep -v -i "warn\|dynamo\|originates\|upsampling.py\|is_torch_version\|^$\|should be kept in float32" "$OUT/bench.log" | tail -40
python3 - <<'PY'
import json, os
try:
    r = json.load(open(os.environ.get("OUT", "/tmp/out") + "/kernels.json"))
except Exception as e:
    print("no kernels.json:", e); raise SystemExit
print("device", r["device"], "torchao", r.get("torchao"))
for row in r["rows"]:
    print(f'{row["model"]:18s} b{row["batch"]:<4d} {row["variant"]:16s} ms={row.get("ms")} x={row.get("speedup_vs_bf16_compiled")} '
          f'wB={row.get("weight_bytes")} graph={row.get("cuda_graph")} first={row.get("first_call_s")} {row.get("error", "")[:160]}')
for r2 in r["per_layer_type"]:
    print(f'  {r2["model"]:18s} b{r2["batch"]:<4d} {r2["variant"]:12s} {r2["layer_type"]:8s} {r2["ms_sum"]:.3f} ms ({r2["layers"]})')
for kb in r.get("kernel_breakdown", []):
    print(f'  {kb["model"]:18s} b{kb["batch"]:<4d} {kb["variant"]:16s} busy={kb["busy_ms"]} ms', kb["kernel_ms"])
print("skipped", len(r["skipped"]), "notes", r["notes"])
PY
say done
