#!/bin/bash
# GPU job 3 of the zoo: train until ${TRAIN_UNTIL:-200}s, stop the DDPM trainer (it saves), then
# sample the final EMA and the early snapshot(s) (DDIM 100 steps, quadratic spacing, eta 0; 10k
# samples each) and measure fd_cifar against the bundled train statistics; 10x10 grid of the final
# model. Returns the compact state, eval.json, grids and logs as $OUT/zoo.tar.part-NN.
# carry: .whl .data (and .gpu_carry on a fresh machine)
set -u
cd "$(dirname "$0")/../.." || exit 1
source scripts/gpu/_zoo_common.sh
setup_env
ensure_ddpm
wait_until ${TRAIN_UNTIL:-200}
touch $DDPM/STOP
while ddpm_alive; do sleep 2; done
say "trainer stopped"; grep '"step"' $DDPM/train.log | tail -1
rm -rf /tmp/ret && mkdir -p /tmp/ret
copy_export /tmp/ret/ddpm_export
MODELS="--model final=$DDPM/state"
for s in ${SNAPSHOTS:-0002000}; do
  d=$DDPM/snapshots/ema-step$s; [ -d $d ] || d=.gpu_carry/snapshots/ema-step$s
  [ -d $d ] && MODELS="$MODELS --model step$((10#$s))=$d"
done
python3 scripts/gpu/zoo_eval.py $MODELS --classifier ${CLF_DIR:-src/diffquant/zoo/weights/cifar10-features} \
  --train-stats ${STATS_DIR:-src/diffquant/zoo/stats}/cifar10-features_train.npz \
  --test-stats ${STATS_DIR:-src/diffquant/zoo/stats}/cifar10-features_test.npz \
  --n ${N:-10000} --steps 100 --batch ${BATCH:-2000} --grid final --out /tmp/ret/eval 2>&1 | tee /tmp/ret/eval.log
cp $DDPM/train.log $DDPM/metrics.jsonl /tmp/ret/
cd /tmp/ret && pack_out .
say "done"
