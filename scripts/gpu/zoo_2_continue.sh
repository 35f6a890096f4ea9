#!/bin/bash
# GPU job 2 of the zoo: keep the DDPM trainer going (resume it if the machine is fresh: from the
# carried compact state .gpu_carry/ddpm_export, a warm restart), follow it until ${STOP_AT:-560}s,
# return the compact state + logs as $OUT/zoo.tar.part-NN.
# carry: .whl .data (and .gpu_carry on a fresh machine)
set -u
cd "$(dirname "$0")/../.." || exit 1
source scripts/gpu/_zoo_common.sh
setup_env
ensure_ddpm
wait_until ${STOP_AT:-560}
rm -rf /tmp/ret && mkdir -p /tmp/ret
copy_export /tmp/ret/ddpm_export
cp $DDPM/train.log $DDPM/metrics.jsonl /tmp/ret/
cd /tmp/ret && pack_out .
say "done"
