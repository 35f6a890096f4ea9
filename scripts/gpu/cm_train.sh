#!/bin/bash
# GPU job (issue 6): consistency distillation of zoo:cifar10-cm from zoo:cifar10-ddpm (diffquant.zoo.train_cm)
# as a detached trainer that keeps training between calls while the machine stays held (as the DDPM zoo jobs
# did), plus a quick evaluation of its current EMA weights. One call fits one <=10-minute device command.
#
#   carry: .whl .data            (+ .gpu_carry only for a warm restart on a fresh machine, see below)
#   bash scripts/gpu/cm_train.sh                  # start (or follow) the trainer until STOP_AT s, evaluate, return
#   NPROC=2 bash scripts/gpu/cm_train.sh          # the trainer on 2 GPUs (torchrun, DDP); only when it starts
#   FINISH=1 bash scripts/gpu/cm_train.sh         # last call: follow until STOP_AT, stop the trainer, evaluate
#
# The trainer: /tmp/cm (full fp32 state every 2 min -> exact resume on the same machine if it dies), --max-minutes
# ${MAX_MINUTES:-28} (a lease lasts <= 30 min), stop file /tmp/cm/STOP. Each call asks it for a fresh carry state
# (the EMA in fp16: what gets bundled) and returns it.
# Start order: trainer running -> follow; /tmp/cm/state -> resume exactly; .gpu_carry/cm/cm_state.tar.part-* ->
# warm restart from that EMA (fresh machine; mind the 64 MiB working-tree limit: repo ~36 MiB + diffusers wheel
# 6 MiB + 17 MiB of state leave room only for DATA=.data/cifar10-jpeg-test.npz, not the 14.5 MiB train split);
# FROM_ZOO=1 -> warm restart from the bundled zoo:cifar10-cm (with the same STUDENT); else from the teacher's weights.
# Env: NPROC (1), STOP_AT (470 s after the script started), BATCH (256, global), INIT_STEPS (1000), LR (2e-4),
#      COMPILE (0), DATA (.data/cifar10-jpeg-train.npz), EVAL_N (2000), TEACHER_EVAL (100: the teacher's DDIM-100
#      on the same seeds; 0 = skip), EXTRA (more `diffquant train cm` options).
# Writes to $OUT: cm_state.tar.part-NN (15 MiB parts of a tar of carry/ + metrics.jsonl + the log's tail; about
# 17 MiB in all), cm_eval.json, cm_grid.png (1/2/4-step samples side by side).
set -u
cd "$(dirname "$0")/../.." || exit 1
source scripts/gpu/_zoo_common.sh
setup_env
RUN=/tmp/cm
NPROC=${NPROC:-1}
mkdir -p $RUN

cm_alive() { [ -f $RUN/pid ] && kill -0 "$(cat $RUN/pid)" 2>/dev/null; }

start_cm() {  # start_cm RESUME
  rm -f $RUN/STOP $RUN/EXPORT_NOW
  local ARGS="--data ${DATA:-.data/cifar10-jpeg-train.npz} --run-dir $RUN --carry-dir $RUN/carry --resume $1 \
    --max-minutes ${MAX_MINUTES:-28} --stop-file $RUN/STOP --batch-size ${BATCH:-256} --init-steps ${INIT_STEPS:-1000} \
    --lr ${LR:-2e-4} --log-every ${LOG_EVERY:-200} --save-every-minutes 2 --json ${EXTRA:-}"
  [ "${COMPILE:-0}" = 1 ] && ARGS="$ARGS --compile"
  # a narrower student (JSON without spaces), e.g. STUDENT='{"block_out_channels":[32,64,64,64],"norm_num_groups":16}'
  [ -n "${STUDENT:-}" ] && ARGS="$ARGS --init random --student $STUDENT"
  if [ "$NPROC" -gt 1 ]; then
    setsid nohup torchrun --standalone --nproc-per-node $NPROC -m diffquant.zoo.train_cm $ARGS \
      >> $RUN/train.log 2>&1 < /dev/null &
  else
    setsid nohup python3 -m diffquant.zoo.train_cm $ARGS >> $RUN/train.log 2>&1 < /dev/null &
  fi
  echo $! > $RUN/pid
  say "CM trainer started (pid $(cat $RUN/pid), $NPROC process(es), resume=$1)"
}

if cm_alive; then
  say "CM trainer running"
elif [ -f $RUN/state/state.json ]; then
  start_cm auto
elif ls .gpu_carry/cm/cm_state.tar.part-* >/dev/null 2>&1; then
  rm -rf /tmp/cm_in && mkdir -p /tmp/cm_in
  cat .gpu_carry/cm/cm_state.tar.part-* | tar xf - -C /tmp/cm_in || exit 1
  cp /tmp/cm_in/metrics.jsonl $RUN/ 2>/dev/null
  start_cm /tmp/cm_in/carry
elif [ "${FROM_ZOO:-0}" = 1 ] && [ -f src/diffquant/zoo/weights/cifar10-cm/model.safetensors ]; then
  # more training for the bundled zoo:cifar10-cm: warm restart from its fp16 EMA (give the same STUDENT)
  say "warm restart from the bundled zoo:cifar10-cm"
  start_cm src/diffquant/zoo/weights/cifar10-cm
else
  say "no CM state: starting from the teacher's weights"
  start_cm none
fi

while [ "$(elapsed)" -lt "${STOP_AT:-470}" ]; do
  sleep 10
  cm_alive || { say "CM trainer is not running"; break; }
done
grep '"step"' $RUN/train.log | tail -3

if [ "${FINISH:-0}" = 1 ] && cm_alive; then
  touch $RUN/STOP
  for i in $(seq 120); do cm_alive || break; sleep 1; done
  say "trainer stopped"
elif cm_alive; then  # ask for a fresh carry state (written after the current step)
  touch $RUN/EXPORT_NOW
  for i in $(seq 90); do [ -f $RUN/EXPORT_NOW ] || break; sleep 1; done
fi
[ -f $RUN/carry/state.json ] || { say "no carry state"; tail -30 $RUN/train.log; exit 1; }
rm -rf /tmp/cm_ret && mkdir -p /tmp/cm_ret
cp -r $RUN/carry /tmp/cm_ret/ && cp $RUN/metrics.jsonl /tmp/cm_ret/ 2>/dev/null
tail -200 $RUN/train.log > /tmp/cm_ret/train.log.tail
python3 -c "from diffquant.zoo.checkpoint import load_state; print('carry state at step', load_state('/tmp/cm_ret/carry')[1]['step'])" || exit 1

python3 scripts/gpu/cm_eval.py --state /tmp/cm_ret/carry --n ${EVAL_N:-2000} --steps 1,2,4 \
  --teacher-steps ${TEACHER_EVAL:-100} --out $OUT 2>&1 | tail -2
tar cf - -C /tmp/cm_ret . | split -b 15m -d - $OUT/cm_state.tar.part-
ls -la $OUT
say "done (trainer $(cm_alive && echo still running || echo stopped))"
