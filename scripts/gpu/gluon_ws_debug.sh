#!/usr/bin/env bash
# One small call of each warp-specialized Gluon kernel (scripts/gpu/gluon_ws_debug.py), plain and under
# compute-sanitizer (NOCS=1: plain only), its largest difference from the kernel without warp specialization.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
CS=$(which compute-sanitizer 2>/dev/null || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
echo "compute-sanitizer: ${CS:-none}"
IFS=, read -ra JOB_LIST <<< "${JOBS:-conv --stages 2,conv --stages 3,geglu --stages 2,geglu --stages 3}"
for job in "${JOB_LIST[@]}"; do
  echo "== $job (plain)"; timeout 40 python3 scripts/gpu/gluon_ws_debug.py $job 2>&1 | grep -v -i warn | tail -3
  if [ -n "$CS" ] && [ "${NOCS:-0}" != 1 ]; then
    echo "== $job (compute-sanitizer)"
    timeout 90 $CS --tool memcheck --print-limit 4 python3 scripts/gpu/gluon_ws_debug.py $job > $OUT/cs_${job// /_}.txt 2>&1
    grep -v -i "warn" $OUT/cs_${job// /_}.txt | grep -E "=====|Error|error|at 0x|diff" | head -16 | cut -c1-220
  fi
done
