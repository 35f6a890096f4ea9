#!/usr/bin/env bash
# Nsight Compute on SD-1.5 b8's 64x64-level GEGLU GEMM (diffquant's Triton kernel against cuBLAS's FP8 GEMM) and
# group-norm kernels: speed of light, occupancy, warp stalls, memory (scripts/gpu/ncu_probe.py launches them).
# Clocks left alone (--clock-control none, as the device notes ask). Reports to $OUT/ncu_*.txt.
#   run: bash scripts/gpu/ncu_probe.sh   (env: NCU_CONFIGS, the GEGLU configs as JSON)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
DEFAULT_CFG='[{}, {"num_stages": 3}]'
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats"
timeout 400 $NCU --clock-control none $SECTIONS -k 'regex:_linear_geglu|nvjet|_gn_|sm90' --launch-skip 0 --launch-count 12 \
  python3 scripts/gpu/ncu_probe.py --geglu-configs "${NCU_CONFIGS:-$DEFAULT_CFG}" > $OUT/ncu_report.txt 2> $OUT/ncu_err.txt
echo "ncu rc=$?"
tail -5 $OUT/ncu_err.txt
grep -E "^  [_a-z].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Issue Slots Busy|No Eligible|Stall|L2 Cache Throughput|L1/TEX Cache Throughput|Executed Ipc A" $OUT/ncu_report.txt | head -150
