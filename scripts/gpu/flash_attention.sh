#!/usr/bin/env bash
# diffquant's Gluon bf16 flash attention (src/diffquant/kernels/gluon_attention.py) against cuDNN's bf16 SDPA on
# SD-1.5 b8's attention shapes (benchmarks/bench_flash_attention.py; it fails on an output error above 3x cuDNN's),
# then, if TESTS_K is set, the GPU tests it selects. A kernel that deadlocks is killed by the timeout (FA_S, 240 s).
#   run: bash scripts/gpu/flash_attention.sh   -> $OUT/flash_attention.json, .log, pytest_gpu.log
#   env: BENCH (1; 0 skips the bench), SHAPES, CONFIGS (the bench's --shapes / --configs), TESTS_K (pytest -k of tests/test_kernels.py), TEST_S (150)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
if [ "${BENCH:-1}" = 1 ]; then
  say "flash attention bench"
  timeout ${FA_S:-240} python3 benchmarks/bench_flash_attention.py ${SHAPES:+--shapes "$SHAPES"} \
    ${CONFIGS:+--configs "$CONFIGS"} --out $OUT/flash_attention.json > $OUT/flash_attention.log 2>&1
  echo "bench rc=$?"
  grep -v -i warn $OUT/flash_attention.log | tail -14 | cut -c1-1200
fi
# NCU=1: Nsight Compute on the default config (or CONFIGS) and cuDNN's kernel, SHAPES' first shape; the Gluon
# kernel's SASS with its stall samples to $OUT/ncu_sass_fa.csv
if [ "${NCU:-0}" = 1 ]; then
  NCUX=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  timeout ${NCU_S:-200} $NCUX --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats \
    --section InstructionStats --section SourceCounters --metrics sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active \
    -f -o /tmp/ncu_fa python3 benchmarks/bench_flash_attention.py --ncu --shapes "${SHAPES%%,*}" \
    ${CONFIGS:+--configs "$CONFIGS"} > $OUT/ncu_fa_run.txt 2>&1
  echo "ncu rc=$?"; tail -2 $OUT/ncu_fa_run.txt
  $NCUX --import /tmp/ncu_fa.ncu-rep --page details > $OUT/ncu_fa.txt 2>&1
  grep -E "^  [_a-zA-Z].*\(|Duration|SM Frequency|Compute \(SM\) Throughput|Registers Per|Issue Slots Busy|Executed Ipc A|highest-utilized|stalled|Warp Cycles Per Issued|pipe_|No Eligible" \
    $OUT/ncu_fa.txt | cut -c1-170 | head -80
  $NCUX --import /tmp/ncu_fa.ncu-rep -k _fa_kernel --launch-count 1 --page source --print-source sass --csv \
    > $OUT/ncu_sass_fa.csv 2>&1
fi
if [ -n "${TESTS_K:-}" ]; then
  say "gpu tests: $TESTS_K"
  timeout ${TEST_S:-150} python3 -m pytest -q -m gpu tests/test_kernels.py -k "$TESTS_K" -x > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$?"; tail -15 $OUT/pytest_gpu.log
fi
say done
