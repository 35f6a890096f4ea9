#!/usr/bin/env bash
# Issue 7 on nvidia-h200-x2: two jobs at once, one per GPU, everything to $OUT (two tarballs + the key JSONs).
#   GPU 0: tune the conv kernels on TUNE_TASKS (gather and TMA candidates per shape; TUNE_S caps), then the bench
#          rows BENCH0 with that table.
#   GPU 1: the bench rows BENCH1 with the shipped table (the other variants: torchao, int8, 4-bit weights).
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for torchao rows)
#   run:   bash scripts/gpu/issue7_x2.sh    (env: TOTAL_S (540), TUNE_TASKS, TUNE_S (170), BENCH0, BENCH1, TESTS_K,
#          ROW_TIMEOUT_S (240: every bench row in its own process, killed after that; 0: one process per GPU))
#   (session 7 ran it three times; its commands are in BENCHMARKS.md, "Kernels, fifth measurement". For the next
#   measurements see scripts/gpu/norms.sh and scripts/gpu/issue7_rows.sh, which spread rows over every GPU.)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-540}
kernel_job_env
TUNE_TASKS=${TUNE_TASKS:-sd15-unet:8:dq-fp8,ddpm-cifar10-32:256:dq-fp8}
BENCH0=${BENCH0:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8,sd15-unet:8:dq-fp8-fp8attn,ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-fp8}
BENCH1=${BENCH1:-sd15-unet:8:bf16-compile,sd15-unet:8:torchao-fp8,sd15-unet:8:torchao-int8dyn,sd15-unet:8:dq-int8,sd15-unet:8:dq-w4a8,sd15-unet:8:dq-w4a16}

job0() {
  local D=$OUT/gpu0; mkdir -p $D; export CUDA_VISIBLE_DEVICES=0
  if [ -n "${TESTS_K:-}" ]; then
    timeout ${TEST_S:-90} python3 -m pytest -m gpu tests/test_kernels.py -k "$TESTS_K" -v --tb=short -p no:cacheprovider \
      > $D/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $D/pytest_gpu.log
  fi
  # a TMA kernel whose GPU test did not pass (or did not run) is not tuned: a stalled candidate would stall the tuner
  local skip=""
  for p in tma tma4d; do
    grep -q "test_gpu_tma_path_matches_reference\[.*-$p\] PASSED" $D/pytest_gpu.log 2>/dev/null && \
      ! grep -q "test_gpu_tma_path_matches_reference\[.*-$p\] FAILED" $D/pytest_gpu.log || skip="$skip,$p"
  done
  echo "TMA kernels left out of tuning: ${skip:-none}" | tee -a $D/tune.log
  if [ "$TUNE_TASKS" != none ]; then
    timeout $(( ${TUNE_S:-170} + 60 )) python3 benchmarks/tune_qconv.py --tasks "$TUNE_TASKS" --budget-s ${TUNE_S:-170} --skip-paths "${skip#,}" \
      --out $D/qconv_tuned.json --rows $D/qconv_tune_rows.json >> $D/tune.log 2>&1; echo "tune rc=$?" >> $D/tune.log
    [ -f $D/qconv_tuned.json ] && export DIFFQUANT_QCONV_TUNED=$D/qconv_tuned.json
  fi
  local left=$(( TOTAL_S - $(elapsed) - 15 ))
  timeout $left python3 benchmarks/bench_kernels.py --budget-s $(( left > 130 ? left - 110 : 20 )) --out $D/kernels.json \
    --no-layer-types --row-timeout-s ${ROW_TIMEOUT_S:-240} --only "$BENCH0" > $D/bench.log 2>&1; echo "bench rc=$?" >> $D/bench.log
}
job1() {
  local D=$OUT/gpu1; mkdir -p $D; export CUDA_VISIBLE_DEVICES=1
  local left=$(( TOTAL_S - $(elapsed) - 15 ))
  timeout $left python3 benchmarks/bench_kernels.py --budget-s $(( left > 130 ? left - 110 : 20 )) --out $D/kernels.json \
    --no-layer-types --row-timeout-s ${ROW_TIMEOUT_S:-240} --only "$BENCH1" > $D/bench.log 2>&1; echo "bench rc=$?" >> $D/bench.log
}
say "GPU0: tune $TUNE_TASKS, bench $BENCH0"; say "GPU1: bench $BENCH1"
job0 & P0=$!
job1 & P1=$!
wait $P0 $P1
say "both done"
for g in 0 1; do
  D=$OUT/gpu$g
  echo "== GPU $g"; grep -E "PASSED|FAILED|ERROR|rc=" $D/pytest_gpu.log 2>/dev/null | head -20
  grep -v "skipped (" $D/tune.log 2>/dev/null | grep -v "^{" | tail -6
  grep "^{" $D/bench.log | cut -c1-330; grep "busy_ms\|rc=" $D/bench.log | tail -8
done
python3 benchmarks/tune_qconv.py --print-rows $OUT/gpu0/qconv_tune_rows.json
# at most 8 files come back: the key JSONs plus one tarball of the logs
for g in 0 1; do
  for f in kernels.json qconv_tuned.json qconv_tune_rows.json; do [ -f $OUT/gpu$g/$f ] && cp $OUT/gpu$g/$f $OUT/g${g}_$f; done
done
tar czf $OUT/logs.tgz -C $OUT env.txt gpu0 gpu1 && rm -rf $OUT/gpu0 $OUT/gpu1 $OUT/env.txt
ls -la $OUT
say done
