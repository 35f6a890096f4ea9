#!/usr/bin/env bash
# Nsight Compute on the kernels of one eager forward of a converted model (scripts/gpu/ncu_model_probe.py; default
# SD-1.5 b8 dq-fp8-gn-qkv-te-ff-twq), in the model's own shapes and tuned configs: speed of light, occupancy, launch
# statistics, warp stalls and where they are sampled (SourceCounters), per launch of the kernels that KERNELS matches.
# Clocks left alone (--clock-control none, as the device notes ask). Report to $OUT/ncu_model.txt (the digest printed), and
# each SOURCE_KERNELS kernel's first launch as SASS with its stall samples to $OUT/ncu_sass_<kernel>.csv.
#   carry: .whl/diffusers-0.42.1-py3-none-any.whl
#   run:   bash scripts/gpu/ncu_model_probe.sh   (env: KERNELS, an ncu -k expression, default the qconv kernels;
#          COUNT, launches profiled (40); ARGS, ncu_model_probe.py's options)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
setup_env
NCU=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section SourceCounters --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active"
timeout ${NCU_S:-420} $NCU --clock-control none --profile-from-start off $SECTIONS -k "${KERNELS:-regex:_qconv}" \
  --launch-count ${COUNT:-40} -f -o /tmp/ncu_model python3 scripts/gpu/ncu_model_probe.py ${ARGS:-} \
  > $OUT/ncu_model_run.txt 2>&1
echo "ncu rc=$?"; tail -3 $OUT/ncu_model_run.txt
$NCU --import /tmp/ncu_model.ncu-rep --page details > $OUT/ncu_model.txt 2>&1
grep -E "^  [_a-z].*\(|Duration|pipe_|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|Grid Size|Block Size|Dynamic Shared" \
  $OUT/ncu_model.txt | head -500
# per-instruction view (SASS with its stall samples) of the first launch of each kernel in SOURCE_KERNELS
for k in ${SOURCE_KERNELS:-_qconv_tma4d_sc_wide_kernel _qconv_tma4d_wide_kernel}; do
  $NCU --import /tmp/ncu_model.ncu-rep -k "$k" --launch-count 1 --page source --print-source sass --csv \
    > $OUT/ncu_sass_$k.csv 2>&1
  echo "$k: $(wc -l < $OUT/ncu_sass_$k.csv) lines of SASS"; head -2 $OUT/ncu_sass_$k.csv | cut -c1-600
done
