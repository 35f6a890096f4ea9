#!/usr/bin/env bash
# Issue 7 on one GPU: (1) the two kernel tests fixed on 2026-11-28 (TESTS_K selects, TEST_S caps), (2) tune the conv
# kernel's block shapes on the layer shapes of TUNE_TASKS (benchmarks/tune_qconv.py, TUNE_S caps) and (3) the kernel
# benchmark rows BENCH_ONLY with that table (DIFFQUANT_QCONV_TUNED), everything to $OUT.
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for torchao rows)
#   run:   bash scripts/gpu/tune_bench.sh      (env: TOTAL_S (520), TUNE_TASKS, TUNE_S (170), BENCH_ONLY, TESTS_K)
#   The tuner times the gather kernel's and both TMA kernels' candidates per shape (tma4d: not yet run on a GPU);
#   DIFFQUANT_QCONV_TMA=1 / 4d forces one TMA kernel wherever it can run.
#   PROBE=1 first runs benchmarks/qconv_tma_probe.py (the padded-copy TMA kernel vs the gather kernel vs cuDNN bf16).
#   On two GPUs, scripts/gpu/issue7_x2.sh does tuning and bench rows side by side (its header: the suggested call).
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-520}
kernel_job_env
if [ "${PROBE:-0}" = 1 ]; then  # the TMA conv path vs the gather kernel vs cuDNN bf16 on seven UNet shapes (~1 min)
  say "TMA probe"
  timeout ${PROBE_S:-120} python3 benchmarks/qconv_tma_probe.py --out "$OUT/probe.json" > "$OUT/probe.log" 2>&1
  echo "probe rc=$?" >> "$OUT/probe.log"; grep -v -i warn "$OUT/probe.log" | cut -c1-400 | tail -9
fi
if [ -n "${TESTS_K:-}" ]; then
  say "GPU tests -k '$TESTS_K'"
  timeout ${TEST_S:-60} python3 -m pytest -m gpu tests/test_kernels.py -k "$TESTS_K" -v --tb=short -p no:cacheprovider \
    > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_gpu.log"; grep -E "PASSED|FAILED|ERROR|^E |rc=" "$OUT/pytest_gpu.log" | head -30
fi
TUNE_TASKS=${TUNE_TASKS:-sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8}
if [ "$TUNE_TASKS" = none ]; then say "no tuning: the shipped tables apply"; else
say "tuning $TUNE_TASKS"
timeout $(( ${TUNE_S:-170} + 60 )) python3 benchmarks/tune_qconv.py --tasks "$TUNE_TASKS" --budget-s ${TUNE_S:-170} \
  --out "$OUT/qconv_tuned.json" --rows "$OUT/qconv_tune_rows.json" > "$OUT/tune.log" 2>&1
echo "tune rc=$?" >> "$OUT/tune.log"
grep -v "skipped (" "$OUT/tune.log" | grep -v "^{" | tail -8
python3 benchmarks/tune_qconv.py --print-rows "$OUT/qconv_tune_rows.json"
[ -f "$OUT/qconv_tuned.json" ] && export DIFFQUANT_QCONV_TUNED="$OUT/qconv_tuned.json"
fi
LEFT=$(( TOTAL_S - $(elapsed) - 10 ))
BUDGET=$(( LEFT > 120 ? LEFT - 90 : 20 ))
say "bench with the tuned table: hard limit ${LEFT}s, no new row after ${BUDGET}s"
timeout $LEFT python3 benchmarks/bench_kernels.py --budget-s $BUDGET --out "$OUT/kernels.json" --no-layer-types \
  --only "${BENCH_ONLY:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8}" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
grep "^{" "$OUT/bench.log" | cut -c1-400
grep "busy_ms\|rc=" "$OUT/bench.log" | tail -6
say done
