#!/usr/bin/env bash
# cuDNN's FP8 conv against diffquant's Triton conv and cuDNN's bf16 conv on SD-1.5 b8's 3x3 convs
# (benchmarks/bench_cudnn_fp8_conv.py), then Nsight Compute on NCU_SHAPES' kernels (both FP8 convs, one launch each).
#   carry: .gpu_carry/cudnn-fe only (the nvidia-cudnn-frontend 1.32.0 wheel for Python 3.12, 11.6 MB; see
#          scripts/gpu/cudnn_fp8_attention.sh for the download). No diffusers needed.
#   run:   bash scripts/gpu/cudnn_fp8_conv.sh   -> $OUT/cudnn_fp8_conv.json, .log, ncu_conv.txt (env: NCU_SHAPES,
#          indices into the script's SHAPES, default 0,5,11,14; NCU=0 skips Nsight Compute)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
setup_cudnn_fe
python3 -c 'import cudnn, torch, triton; print("cudnn-frontend", getattr(cudnn, "__version__", "?"), "cuDNN", torch.backends.cudnn.version(), "triton", triton.__version__)'
say "bench"
timeout ${BENCH_S:-300} python3 benchmarks/bench_cudnn_fp8_conv.py --out $OUT/cudnn_fp8_conv.json \
  > $OUT/cudnn_fp8_conv.log 2>&1
echo "bench rc=$?"
grep -v Warning $OUT/cudnn_fp8_conv.log | tail -20 | cut -c1-700
if [ "${NCU:-1}" = 1 ]; then
  say "ncu"
  NCUX=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats --section MemoryWorkloadAnalysis"
  timeout ${NCU_S:-200} $NCUX --clock-control none --profile-from-start off $SECTIONS \
    --launch-count 40 \
    python3 benchmarks/bench_cudnn_fp8_conv.py --ncu --shapes ${NCU_SHAPES:-0,5,11,14} > $OUT/ncu_conv.txt 2>&1
  echo "ncu rc=$?"
  grep -E "^  [_a-zA-Z].*\(|Duration|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|Grid Size|Block Size|Dynamic Shared" \
    $OUT/ncu_conv.txt | cut -c1-160 | head -300
fi
say done
