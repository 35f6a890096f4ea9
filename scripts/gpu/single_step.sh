#!/usr/bin/env bash
# Issue 6's table on one GPU: the sweep benchmarks/single_step.yaml (39 cells, cached: a rerun on the same machine
# continues), then the report, plots and results packed into $OUT.
#   carry: .whl (diffusers wheel) and, until zoo:cifar10-cm is bundled, nothing else: the sweep needs the model.
#   run:   bash scripts/gpu/single_step.sh
set -uo pipefail
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/single_step}
timeout ${TOTAL_S:-560} python3 -m diffquant.cli sweep benchmarks/single_step.yaml --out $W --device cuda --no-progress
echo "sweep rc=$?"
(cd $W && tar cf $OUT/single_step_report.tar --exclude='cache' .) && ls -la $OUT
