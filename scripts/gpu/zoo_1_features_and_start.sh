#!/bin/bash
# GPU job 1 of the zoo (see docs/zoo/README.md): train the fd_cifar feature network, compute the
# CIFAR-10-JPEG reference statistics, start the DDPM trainer (detached), follow it until
# ${STOP_AT:-530}s, return everything as $OUT/zoo.tar.part-NN.
# carry: .whl .data
set -u
cd "$(dirname "$0")/../.." || exit 1
source scripts/gpu/_zoo_common.sh
setup_env
mkdir -p /tmp/zoo /tmp/ret
say "classifier"
python3 -m diffquant.zoo.classifier --train .data/cifar10-jpeg-train.npz --test .data/cifar10-jpeg-test.npz \
  --out /tmp/zoo/cifar10-features --epochs ${EPOCHS:-70} ${CLF_ARGS:-} 2>&1 | grep -v '^$' | tee /tmp/zoo/classifier.log | tail -n 40
say "reference statistics"
python3 scripts/gpu/zoo_stats.py --classifier /tmp/zoo/cifar10-features --train .data/cifar10-jpeg-train.npz \
  --test .data/cifar10-jpeg-test.npz --out /tmp/zoo/stats 2>&1 | tee /tmp/zoo/stats.log
ensure_ddpm
wait_until ${STOP_AT:-530}
copy_export /tmp/ret/ddpm_export
mkdir -p /tmp/ret/snapshots && cp -r $DDPM/snapshots/ema-step0002000 /tmp/ret/snapshots/ 2>/dev/null
cp -r /tmp/zoo/cifar10-features /tmp/zoo/stats /tmp/zoo/*.log $DDPM/train.log $DDPM/metrics.jsonl /tmp/ret/
cd /tmp/ret && pack_out .
say "done"
