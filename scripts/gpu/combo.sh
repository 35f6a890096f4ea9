#!/usr/bin/env bash
# Several jobs side by side on a 4-GPU machine (nvidia-h200-x4), one device call:
#   PTQ cells (scripts/gpu/ptq_cifar10.sh; queues Q0..Q3, DEADLINE_S),
#   the consistency-distillation trainer (scripts/gpu/cm_train.sh on GPU $CM_GPU; CM_FINISH=1 stops it),
#   the kernel tests + bench (scripts/gpu/kernels_test_bench.sh on GPU $K_GPU, K_TOTAL_S),
#   any other command SIDE_CMD on GPU $SIDE_GPU (bash -c, with OUT=$OUT/side),
#   issue 6's sweep (scripts/gpu/single_step.sh) on GPUs 0..SS_NGPU-1 (SS_TOTAL_S, default 540).
#   e.g. issue 6's table + the kernel bench in one call: SS_NGPU=3 K_GPU=3 K_TOTAL_S=540 bash scripts/gpu/combo.sh
# Small outputs are tarred into $OUT/misc.tar so that at most 8 files come back.
#   e.g.: Q0="fp qdiff-fast-w4a8" Q1="fp-seed2" CM_GPU=3 K_GPU=2 bash scripts/gpu/combo.sh
# carry: .whl .data/cifar10-jpeg-train.npz (for CM) .gpu_carry (resume state)
set -uo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # 4 workers + other jobs on 64 cores: no thread oversubscription
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/cm $OUT/k $OUT/side $OUT/ss
if [ -n "${CM_GPU:-}" ]; then
  (CUDA_VISIBLE_DEVICES=$CM_GPU OUT=$OUT/cm FINISH=${CM_FINISH:-0} STOP_AT=${CM_STOP_AT:-470} TEACHER_EVAL=${CM_TEACHER_EVAL:-100} \
     bash scripts/gpu/cm_train.sh > $OUT/cm/call.log 2>&1) &
fi
if [ -n "${K_GPU:-}" ]; then
  (CUDA_VISIBLE_DEVICES=$K_GPU OUT=$OUT/k TOTAL_S=${K_TOTAL_S:-360} bash scripts/gpu/kernels_test_bench.sh > $OUT/k/call.log 2>&1) &
fi
if [ -n "${SS_NGPU:-}" ]; then
  (NGPU=$SS_NGPU OUT=$OUT/ss TOTAL_S=${SS_TOTAL_S:-540} bash scripts/gpu/single_step.sh > $OUT/ss/call.log 2>&1) &
fi
if [ -n "${SIDE_CMD:-}" ]; then
  (CUDA_VISIBLE_DEVICES=${SIDE_GPU:-3} OUT=$OUT/side bash -c "$SIDE_CMD" > $OUT/side/call.log 2>&1) &
fi
if [ -n "${Q0:-}${Q1:-}${Q2:-}${Q3:-}" ]; then
  bash scripts/gpu/ptq_cifar10.sh > $OUT/ptq_call.log 2>&1
fi
wait
echo "=== PTQ"; tail -n 40 $OUT/ptq_call.log 2>/dev/null
echo "=== CM"; tail -n 25 $OUT/cm/call.log 2>/dev/null
echo "=== kernels"; tail -n 30 $OUT/k/call.log 2>/dev/null
echo "=== side"; tail -n 30 $OUT/side/call.log 2>/dev/null
echo "=== single-step sweep"; grep -v -i "warn\|torchao\|register_constant" $OUT/ss/call.log 2>/dev/null | tail -n 60
mkdir -p /tmp/cm_parts && mv $OUT/cm/cm_state.tar.part-* /tmp/cm_parts/ 2>/dev/null
(cd $OUT && tar cf /tmp/misc.tar --exclude='ptq.tar.part-*' . && find . -type f ! -name 'ptq.tar.part-*' -delete)
mv /tmp/misc.tar $OUT/ && mv /tmp/cm_parts/* $OUT/ 2>/dev/null
ls -la $OUT
