#!/usr/bin/env bash
# Why the bench's torchao rows never finish (benchmarks/torchao_probe.py) on GPUs 0 and 1, while GPUs 2.. run the
# bench rows in ROWS (optional). Everything to $OUT: probe_<variant>.log (with Dynamo's recompile / graph-break
# log and, on a stall, every thread's Python stack), kernels.json, bench.log.
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for torchao)
#   run:   PROBE_MODEL=ddpm-cifar10-32 PROBE_BATCH=256 DUMP_AFTER=150 ROWS=... bash scripts/gpu/torchao_probe.sh
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
kernel_job_env
PIDS=""
g=0
for v in torchao-fp8 torchao-int8dyn; do
  ( CUDA_VISIBLE_DEVICES=$g TORCH_LOGS=recompiles,graph_breaks timeout $(( ${DUMP_AFTER:-150} + 120 )) python3 benchmarks/torchao_probe.py \
      --model ${PROBE_MODEL:-ddpm-cifar10-32} --batch ${PROBE_BATCH:-256} --variant $v --dump-after ${DUMP_AFTER:-150} \
      > $OUT/probe_$v.log 2>&1; echo "probe rc=$?" >> $OUT/probe_$v.log ) &
  PIDS="$PIDS $!"; g=$(( g + 1 ))
done
if [ -n "${ROWS:-}" ]; then
  N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  GPUS=$(python3 -c "print(','.join(map(str, range(2, $N))))")
  say "rows on GPUs $GPUS: $ROWS"
  timeout ${ROWS_S:-300} python3 benchmarks/bench_kernels.py --gpus "$GPUS" --row-timeout-s ${ROW_TIMEOUT_S:-200} \
    --no-layer-types --only "$ROWS" --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
  grep -A12 "^model " $OUT/bench.log | head -14; grep "busy_ms" $OUT/bench.log
fi
wait $PIDS
for v in torchao-fp8 torchao-int8dyn; do
  echo "== $v"; grep "^{" $OUT/probe_$v.log | cut -c1-600
  grep -c "Recompiling\|recompil" $OUT/probe_$v.log; grep -m5 -i "graph break" $OUT/probe_$v.log | cut -c1-300
  grep -A30 "Thread\|Current thread" $OUT/probe_$v.log | grep -v "^$" | head -45
  tail -3 $OUT/probe_$v.log | cut -c1-300
done
ls -la $OUT
say done
