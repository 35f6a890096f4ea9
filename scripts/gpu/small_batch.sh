#!/usr/bin/env bash
# Small batches and the zoo model, in one call (written in session 10, 2026-11-28; nvidia-h200-x4):
#   phase 1, in parallel: conv tuning of the small-batch shapes, one task list per GPU (TUNE0, TUNE1, TUNE2; TUNE_S
#     seconds each; scripts/gpu/tune_split.sh), and on the last GPU the google/ddpm-cifar10-32 b256 rows the matrix lacks (SIDE_ROWS: W4A8, W4A16,
#     bf16 eager, with their own bf16-compile baseline);
#   phase 2: the new tables merged into this copy's shipped table (src/diffquant/kernels/tuned/nvidia-h200.json), then
#     the small-batch rows (ROWS) on every GPU, with the merged table.
# Everything comes back as $OUT/all.tgz (logs, tune tables and rows, kernels.json, kernels_side.json); merge the tables
# here with: diffquant tune-kernels --merge-from qconv_tuned_N.json --merge-into src/diffquant/kernels/tuned/nvidia-h200.json
#   carry: .whl
#   run:   bash scripts/gpu/small_batch.sh   (env: TUNE0, TUNE1, TUNE2, TUNE_S (220), TUNE_ARGS, SIDE_ROWS, ROWS,
#          ROW_TIMEOUT_S (170), GN_ARGS: e.g. "--sweep --batch 1" runs bench_groupnorm.py on GPU 3 after the side rows,
#          during the small-batch rows, which then take GPUs 0-2)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/w; mkdir -p $W
kernel_job_env > $W/env.txt; cat $W/env.txt
TUNE_S=${TUNE_S:-220}
TUNE0=${TUNE0:-sd15-unet:1:dq-fp8}
TUNE1=${TUNE1:-ddpm-cifar10-32:64:dq-fp8,ddpm-cifar10-32:1:dq-fp8}
TUNE2=${TUNE2:-zoo:cifar10-ddpm:64:dq-fp8,zoo:cifar10-ddpm:256:dq-fp8}
SIDE_ROWS=${SIDE_ROWS:-ddpm-cifar10-32:256:bf16-compile,ddpm-cifar10-32:256:dq-w4a8,ddpm-cifar10-32:256:dq-w4a16,ddpm-cifar10-32:256:bf16-eager}
ROWS=${ROWS:-sd15-unet:1:bf16-compile,sd15-unet:1:dq-fp8-gn-qkv-te-ff,ddpm-cifar10-32:64:bf16-compile,ddpm-cifar10-32:64:dq-fp8-gn-qkv-te,ddpm-cifar10-32:1:bf16-compile,ddpm-cifar10-32:1:dq-fp8-gn-qkv-te,zoo:cifar10-ddpm:64:bf16-compile,zoo:cifar10-ddpm:64:dq-fp8-gn-qkv-te,zoo:cifar10-ddpm:256:bf16-compile,zoo:cifar10-ddpm:256:dq-fp8-gn-qkv-te}
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
[ "$N" -ge 4 ] || { echo "needs 4 GPUs; $N here"; exit 2; }
export TUNE0 TUNE1 TUNE2 TUNE_S
TUNE_SPLIT_SOURCED=1 TUNE_DIR=$W source scripts/gpu/tune_split.sh
say "GPU 3: $SIDE_ROWS${GN_ARGS:+, then bench_groupnorm.py $GN_ARGS}"
( CUDA_VISIBLE_DEVICES=3 timeout 280 python3 benchmarks/bench_kernels.py --gpus all --row-timeout-s 200 --budget-s 200 \
    --no-layer-types --only "$SIDE_ROWS" --out $W/kernels_side.json > $W/bench_side.log 2>&1; echo "bench rc=$?" >> $W/bench_side.log
  if [ -n "${GN_ARGS:-}" ]; then
    CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/bench_groupnorm.py $GN_ARGS --out $W/groupnorm.json > $W/groupnorm.log 2>&1
    echo "groupnorm rc=$?" >> $W/groupnorm.log
  fi ) &
SP=$!
for p in "${TUNE_PIDS[@]}"; do wait $p; done
for i in 0 1 2; do grep -v trying $W/tune_$i.log | tail -4; done
python3 - <<'PY'
import glob, json
from diffquant.kernels import tuning
p = "src/diffquant/kernels/tuned/nvidia-h200.json"
t = tuning.load_table(p)
for f in sorted(glob.glob("/tmp/w/qconv_tuned_*.json")):
    try:
        t = tuning.merge_tables(t, tuning.load_table(f))
        print("merged", f, len(t["configs"]), "entries")
    except (OSError, ValueError) as e:
        print("not merged", f, e)
json.dump(t, open(p, "w"), indent=1)
PY
[ -n "${GN_ARGS:-}" ] || wait $SP  # with the norm sweep, GPU 3 stays on it and the rows take GPUs 0-2
ROW_GPUS=$([ -n "${GN_ARGS:-}" ] && echo 0,1,2 || echo all)
say "rows on GPUs $ROW_GPUS: $ROWS"
timeout 230 python3 benchmarks/bench_kernels.py --gpus $ROW_GPUS --row-timeout-s ${ROW_TIMEOUT_S:-170} --budget-s 140 --no-layer-types \
  --only "$ROWS" --out $W/kernels.json > $W/bench.log 2>&1; echo "bench rc=$?" >> $W/bench.log
wait $SP
[ -f $W/groupnorm.log ] && tail -3 $W/groupnorm.log
grep -A14 "^model " $W/bench_side.log; grep -A16 "^model " $W/bench.log; grep "busy_ms" $W/bench.log | cut -c1-260
tar czf $OUT/all.tgz -C $W .
ls -la $W
say done
