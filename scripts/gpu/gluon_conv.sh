#!/usr/bin/env bash
# The Gluon FP8 conv (diffquant/kernels/gluon_conv.py) against the Triton conv on SD-1.5 b8's 3x3 convs
# (benchmarks/bench_gluon_conv.py), then, where time is left, cuDNN's FP8 conv timed again
# (benchmarks/bench_cudnn_fp8_conv.py, without Nsight Compute).
#   carry: .gpu_carry/cudnn-fe (for the cuDNN part; see scripts/gpu/cudnn_fp8_conv.sh)
#   run:   bash scripts/gpu/gluon_conv.sh   -> $OUT/gluon_conv.json, .log (and cudnn_fp8_conv.json, .log)
#          (env: GLUON_S, the Gluon bench's budget (300); SHAPES, its --shapes; CUDNN=0 skips the cuDNN part)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
say "gluon bench"
timeout $(( ${GLUON_S:-300} + 60 )) python3 benchmarks/bench_gluon_conv.py --budget-s ${GLUON_S:-300} \
  ${SHAPES:+--shapes $SHAPES} --out $OUT/gluon_conv.json > $OUT/gluon_conv.log 2>&1
echo "gluon rc=$?"
grep -v -i warn $OUT/gluon_conv.log | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        print(line.rstrip()[:300]); continue
    r = json.loads(line)
    g = {k[6:]: (v.get("ms") if "ms" in v else v.get("error", "")[:60]) for k, v in r.items() if k.startswith("gluon_") and isinstance(v, dict)}
    print(r["cin"], r["cout"], r["hw"], "x%d" % r["calls_per_unet"], "triton", r["triton_ms"], "best", r.get("gluon_best"), r.get("gluon_best_ms"), "speedup", r.get("speedup_vs_triton"), g)
'
if [ "${CUDNN:-1}" = 1 ] && ls .gpu_carry/cudnn-fe/*.whl > /dev/null 2>&1; then
  setup_cudnn_fe
  say "cudnn bench"
  timeout 150 python3 benchmarks/bench_cudnn_fp8_conv.py --reps 20 \
    --out $OUT/cudnn_fp8_conv.json > $OUT/cudnn_fp8_conv.log 2>&1
  echo "cudnn rc=$?"; grep "per UNet" $OUT/cudnn_fp8_conv.log
fi

# NCU_CONFIGS (e.g. 128x128_w4_s3): Nsight Compute on the Triton kernel and these Gluon configs, SHAPES' first shape
if [ -n "${NCU_CONFIGS:-}" ]; then
  NCUX=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
  timeout 200 $NCUX --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section SourceCounters -f -o /tmp/ncu_gluon \
    python3 benchmarks/bench_gluon_conv.py --shapes ${SHAPES%%,*} --ncu $NCU_CONFIGS > $OUT/ncu_gluon_run.txt 2>&1
  echo "ncu rc=$?"; tail -2 $OUT/ncu_gluon_run.txt
  $NCUX --import /tmp/ncu_gluon.ncu-rep --page details > $OUT/ncu_gluon.txt 2>&1
  grep -E "^  [_a-zA-Z].*\(|Duration|Compute \(SM\) Throughput|Registers Per|Issue Slots Busy|Achieved Occupancy|Block Limit|Dynamic Shared|highest-utilized|Est. Speedup|stalled|L2 Hit|Memory Throughput" $OUT/ncu_gluon.txt | cut -c1-170 | head -80
  for k in _gconv_kernel; do
    $NCUX --import /tmp/ncu_gluon.ncu-rep -k $k --launch-count 1 --page source --print-source sass --csv > $OUT/ncu_sass_gconv.csv 2>&1
  done
fi
say done
