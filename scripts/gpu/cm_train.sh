#!/bin/bash
# GPU job (issue 6): one chunk of consistency distillation of zoo:cifar10-cm from zoo:cifar10-ddpm
# (diffquant.zoo.train_cm), then a quick evaluation. Fits one <=10-minute device call: training stops cleanly at
# TRAIN_END seconds after the script started, saves, evaluates and packs by ~8 minutes.
#
#   carry: .whl .data .gpu_carry            (.gpu_carry/cm/ = the previous chunk's $OUT files; absent = start)
#   bash scripts/gpu/cm_train.sh                         # 1 GPU
#   NPROC=2 bash scripts/gpu/cm_train.sh                 # 2 GPUs of one host (torchrun, DDP)
#
# Resume order: /tmp/cm/state (same machine still held: exact), else .gpu_carry/cm/cm_state.tar.part-* or
# .gpu_carry/cm/carry/ (a fresh machine: the carry state), else from the teacher's weights.
# Env: NPROC (1), TRAIN_END (420 s), BATCH (256, global), INIT_STEPS (1000), LR (2e-4), COMPILE (0),
#      EVAL_N (2000), TEACHER_EVAL (100: teacher DDIM steps on the same seeds for comparison; 0 = skip), EXTRA.
# Writes to $OUT: cm_state.tar.part-NN (<=15 MiB each; tar of carry/ + metrics.jsonl + train.log), cm_eval.json,
# cm_grid.png (1/2/4-step samples). For the next chunk copy all of $OUT's cm_state.tar.part-* into .gpu_carry/cm/.
set -u
cd "$(dirname "$0")/../.." || exit 1
source scripts/gpu/_zoo_common.sh
setup_env
NPROC=${NPROC:-1}
TRAIN_END=${TRAIN_END:-420}
RUN=/tmp/cm
mkdir -p $RUN

RESUME=none
if [ -f $RUN/state/state.json ]; then
  RESUME=auto
elif ls .gpu_carry/cm/cm_state.tar.part-* >/dev/null 2>&1; then
  rm -rf /tmp/cm_in && mkdir -p /tmp/cm_in
  cat .gpu_carry/cm/cm_state.tar.part-* | tar xf - -C /tmp/cm_in || exit 1
  RESUME=/tmp/cm_in/carry
  cp /tmp/cm_in/metrics.jsonl /tmp/cm_in/train.log $RUN/ 2>/dev/null
elif [ -f .gpu_carry/cm/carry/state.json ]; then
  RESUME=.gpu_carry/cm/carry
fi
say "resume: $RESUME; $NPROC process(es)"

MAXMIN=$(python3 -c "print(round(max(0.5, ($TRAIN_END - $(elapsed)) / 60), 2))")
ARGS="--data .data/cifar10-jpeg-train.npz --run-dir $RUN --carry-dir $RUN/carry --resume $RESUME \
  --max-minutes $MAXMIN --batch-size ${BATCH:-256} --init-steps ${INIT_STEPS:-1000} --lr ${LR:-2e-4} \
  --log-every ${LOG_EVERY:-200} --save-every-minutes 100 --json ${EXTRA:-}"
[ "${COMPILE:-0}" = 1 ] && ARGS="$ARGS --compile"
say "training for up to $MAXMIN min"
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc-per-node $NPROC -m diffquant.zoo.train_cm $ARGS 2>&1 | tee -a $RUN/train.log | grep -v '^\s*$' | tail -40
else
  python3 -m diffquant.zoo.train_cm $ARGS 2>&1 | tee -a $RUN/train.log | grep -v '^\s*$' | tail -40
fi
[ -f $RUN/carry/state.json ] || { say "no carry state written"; exit 1; }
say "training done"

python3 scripts/gpu/cm_eval.py --state $RUN/carry --n ${EVAL_N:-2000} --steps 1,2,4 \
  --teacher-steps ${TEACHER_EVAL:-100} --out $OUT 2>&1 | tail -3
say "evaluation done"

tar cf - -C $RUN carry metrics.jsonl train.log | split -b 15m -d - $OUT/cm_state.tar.part-
ls -la $OUT
say "done"
