#!/usr/bin/env bash
# Issue 6's table on one GPU or spread over all GPUs of the machine (NGPU=1 forces one): the sweep benchmarks/single_step.yaml (39 cells, cached: a rerun on the same machine
# continues), then the report, plots and results packed into $OUT.
#   carry: .whl (diffusers wheel); until zoo:cifar10-cm is bundled, it is bundled here first from the carry state that
#   scripts/gpu/cm_train.sh left on this machine (/tmp/cm_ret/carry) or from .gpu_carry/cm/cm_state.tar.part-* (carry
#   .gpu_carry), and returned as $OUT/cifar10-cm-bundle.tar.
#   run:   bash scripts/gpu/single_step.sh      (env: SPEC, W (work folder), NGPU, TOTAL_S (560), DEVICE (cuda),
#          CELLS_FROM: a folder of finished cell records (cache/cells/*.json of an earlier call's
#          single_step_report.tar, carried in e.g. .gpu_carry/ss_cells) to continue from on a fresh machine)
#   39 cells take more than one 10-minute call on 2 GPUs (2026-11-28: 34 in the first call, the other 5 and the
#   table in a second NGPU=1 call with CELLS_FROM=.gpu_carry/ss_cells)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/single_step}
SPEC=${SPEC:-benchmarks/single_step.yaml}
ZW=src/diffquant/zoo/weights/cifar10-cm
if [ ! -f $ZW/model.safetensors ] && grep -q "zoo:cifar10-cm" $SPEC; then  # bundle zoo:cifar10-cm from the CD trainer's carry state first
  CARRY=${CARRY:-/tmp/cm_ret/carry}      # what scripts/gpu/cm_train.sh left on this (warm) machine
  if [ ! -f $CARRY/state.json ] && ls .gpu_carry/cm/cm_state.tar.part-* >/dev/null 2>&1; then
    rm -rf /tmp/cm_in && mkdir -p /tmp/cm_in && cat .gpu_carry/cm/cm_state.tar.part-* | tar xf - -C /tmp/cm_in
    CARRY=/tmp/cm_in/carry
  fi
  [ -f $CARRY/state.json ] || { echo "no zoo:cifar10-cm and no CM carry state (run scripts/gpu/cm_train.sh first)"; exit 1; }
  python3 -m diffquant.cli train cm-bundle $CARRY $ZW || exit 1
  tar cf $OUT/cifar10-cm-bundle.tar -C src/diffquant/zoo/weights cifar10-cm  # commit it: the zoo model
fi
if [ -n "${CELLS_FROM:-}" ]; then  # continue from the finished cells of an earlier call
  mkdir -p $W/cache/cells && cp "$CELLS_FROM"/*.json $W/cache/cells/ && say "$(ls $W/cache/cells | wc -l) cell records from $CELLS_FROM"
fi
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NGPU" -gt 1 ]; then
  # several GPUs: (1) FP cells + the calibration set + the first naive configuration on GPU 0; (2) the other
  # (recipe, bits) groups spread over the GPUs as partial specs whose out folders share $W/cache (their keys do not
  # depend on the spec's name or on the other cells); (3) the full spec once more in $W: every cell is cached, so it
  # only writes the table, plots, grids and report.
  mkdir -p $W/cache /tmp/ss_parts
  python3 - "$SPEC" "$NGPU" /tmp/ss_parts <<'PY' || exit 1
import json, sys, yaml
spec = yaml.safe_load(open(sys.argv[1])); ngpu = int(sys.argv[2]); out = sys.argv[3]
bits = spec["bits"]; recipes = spec["recipes"]
first = dict(spec, name=spec["name"] + "-p0", recipes=[recipes[0]], bits=[bits[0]])
json.dump(first, open(f"{out}/first.json", "w"))
groups = [(r, b) for r in recipes for b in bits if (r is not recipes[0] or b != bits[0])]
cost = lambda r: 10 if r.get("method") == "qdiffusion" else 1
load = [0] * ngpu; plan = [[] for _ in range(ngpu)]
for r, b in sorted(groups, key=lambda g: -cost(g[0])):
    g = load.index(min(load)); load[g] += cost(r); plan[g].append((r, b))
for g, items in enumerate(plan):
    names = []
    for r in recipes:
        bs = [b for rr, b in items if rr is r]
        if bs:
            json.dump(dict(spec, name=f"{spec['name']}-g{g}-{r['name']}", recipes=[r], bits=bs),
                      open(f"{out}/g{g}-{r['name']}.json", "w")); names.append(f"{r['name']}:{','.join(bs)}")
    print(f"GPU {g}:", " | ".join(names))
PY
  # one process per GPU: split the CPU threads (4 processes x all cores each made the parts crawl, 2026-11-28)
  export OMP_NUM_THREADS=$(( $(nproc) / NGPU > 1 ? $(nproc) / NGPU : 1 ))
  left() { echo $(( ${TOTAL_S:-560} - $(elapsed) - ${FINAL_S:-90} )); }  # keep FINAL_S for the table and report
  say "sweep part 0 (FP + calibration + first naive configuration) on GPU 0, $OMP_NUM_THREADS threads per process"
  CUDA_VISIBLE_DEVICES=0 timeout $(left) python3 -m diffquant.cli -v sweep /tmp/ss_parts/first.json --out $W \
    --device ${DEVICE:-cuda} --no-progress --no-report > $W/log.first.txt 2>&1
  rc=$?; say "part 0 rc=$rc"; grep "cells computed" $W/log.first.txt
  for g in $(seq 0 $((NGPU - 1))); do
    (for f in /tmp/ss_parts/g$g-*.json; do
       [ -f "$f" ] || continue
       n=$(basename $f .json); d=$W.$n; mkdir -p $d; ln -sfn $W/cache $d/cache
       [ "$(left)" -gt 20 ] || { say "$n: no time left"; continue; }
       CUDA_VISIBLE_DEVICES=$g timeout $(left) python3 -m diffquant.cli -v sweep $f --out $d \
         --device ${DEVICE:-cuda} --no-progress --no-report > $W/log.$n.txt 2>&1
       rc=$?; say "$n rc=$rc"; grep "cells computed" $W/log.$n.txt
     done) &
  done
  wait
  say "parts done; the full spec (cached) for the table and report"
fi
timeout $(( ${TOTAL_S:-560} - $(elapsed) > 60 ? ${TOTAL_S:-560} - $(elapsed) : 60 )) python3 -m diffquant.cli -v sweep $SPEC \
  --out $W --device ${DEVICE:-cuda} --no-progress
echo "sweep rc=$?"
# FD noise of FP: the FP model at the first step count on a second seed set (seeds 10000..19999), next to the sweep's seeds 0..9999
if [ ! -f $W/fp_seed2.json ] && [ "$(elapsed)" -lt "$(( ${TOTAL_S:-560} - 30 ))" ]; then
  read -r MODEL N SAMPLER STEPS < <(python3 -c "
import yaml, sys; s = yaml.safe_load(open(sys.argv[1])); n = s['num_samples']; st = s['steps']
print(s['models'][0], n[0] if isinstance(n, list) else n, s['samplers'][0]['sampler'], st[0] if isinstance(st, list) else st)" $SPEC)
  timeout 90 python3 -m diffquant.cli sample $MODEL --sampler $SAMPLER --steps $STEPS --num $N --seed 10000 \
    --out /tmp/fp_seed2.npz --device ${DEVICE:-cuda} > /dev/null 2>&1 \
    && timeout 90 python3 -m diffquant.cli evaluate /tmp/fp_seed2.npz --metrics fd_cifar --json > $W/fp_seed2.json 2>/dev/null \
    && echo "FP $SAMPLER-$STEPS, seeds 10000..: $(cat $W/fp_seed2.json | head -c 300)"
fi
# the finished cells' records (cache/cells, small) come back too: a run cut short still returns what it measured
(cd $W && tar cf $OUT/single_step_report.tar --exclude='cache/samples' --exclude='cache/quantized' --exclude='cache/calib' .) \
  && ls -la $OUT
