#!/usr/bin/env bash
# Issue 6's table on one GPU: the sweep benchmarks/single_step.yaml (39 cells, cached: a rerun on the same machine
# continues), then the report, plots and results packed into $OUT.
#   carry: .whl (diffusers wheel); until zoo:cifar10-cm is bundled, it is bundled here first from the carry state that
#   scripts/gpu/cm_train.sh left on this machine (/tmp/cm_ret/carry) or from .gpu_carry/cm/cm_state.tar.part-* (carry
#   .gpu_carry), and returned as $OUT/cifar10-cm-bundle.tar.
#   run:   bash scripts/gpu/single_step.sh
set -uo pipefail
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/single_step}
ZW=src/diffquant/zoo/weights/cifar10-cm
if [ ! -f $ZW/model.safetensors ]; then  # bundle zoo:cifar10-cm from the CD trainer's carry state first
  CARRY=${CARRY:-/tmp/cm_ret/carry}      # what scripts/gpu/cm_train.sh left on this (warm) machine
  if [ ! -f $CARRY/state.json ] && ls .gpu_carry/cm/cm_state.tar.part-* >/dev/null 2>&1; then
    rm -rf /tmp/cm_in && mkdir -p /tmp/cm_in && cat .gpu_carry/cm/cm_state.tar.part-* | tar xf - -C /tmp/cm_in
    CARRY=/tmp/cm_in/carry
  fi
  [ -f $CARRY/state.json ] || { echo "no zoo:cifar10-cm and no CM carry state (run scripts/gpu/cm_train.sh first)"; exit 1; }
  python3 -m diffquant.cli train cm-bundle $CARRY $ZW || exit 1
  tar cf $OUT/cifar10-cm-bundle.tar -C src/diffquant/zoo/weights cifar10-cm  # commit it: the zoo model
fi
timeout ${TOTAL_S:-560} python3 -m diffquant.cli sweep benchmarks/single_step.yaml --out $W --device cuda --no-progress
echo "sweep rc=$?"
(cd $W && tar cf $OUT/single_step_report.tar --exclude='cache' .) && ls -la $OUT
