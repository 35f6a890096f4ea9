#!/usr/bin/env bash
# Issue 5's PTQ table on a 4-GPU machine (kind nvidia-h200-x4): one worker per GPU runs its queue of
# cells (benchmarks/ptq_cifar10.py cell ...) until the deadline, then the rows are collected and the
# state that a fresh machine needs to go on (rows, timings, per-unit reconstruction checkpoints,
# packed quantized checkpoints, calibration sets of unfinished cells) is packed into $OUT.
# Resumes from /tmp/ptq on a warm machine, else from .gpu_carry/ptq/ptq.tar.part-* (carry .gpu_carry).
#   run: Q0="fp qdiff-fast-w4a8" Q1="..." Q2="..." Q3="..." DEADLINE_S=540 bash scripts/gpu/ptq_cifar10.sh
#   or:  QUEUE="cell cell ..." DEADLINE_S=540 bash scripts/gpu/ptq_cifar10.sh  (one worker per GPU, shared queue)
# carry: .whl .gpu_carry
set -uo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # 4 workers + other jobs on 64 cores: no thread oversubscription
source scripts/gpu/_zoo_common.sh
setup_env
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/ptq
DEADLINE_S=${DEADLINE_S:-540}
if [ ! -d $W ] && ls .gpu_carry/ptq/ptq.tar.part-* >/dev/null 2>&1; then
  mkdir -p $W && cat .gpu_carry/ptq/ptq.tar.part-* | tar xf - -C $W && say "restored $(du -sh $W | cut -f1) from .gpu_carry"
fi
mkdir -p $W/logs
NG=$(nvidia-smi -L | wc -l)
if [ -n "${QUEUE:-}" ]; then  # one shared, ordered queue: a worker per GPU claims the next free cell
  say "shared queue on $NG GPUs: $QUEUE"
  for g in $(seq 0 $(( NG - 1 ))); do
    (CUDA_VISIBLE_DEVICES=$g timeout $(( DEADLINE_S - $(elapsed) )) python3 benchmarks/ptq_cifar10.py worker $QUEUE \
        --work $W --device cuda >> $W/logs/gpu$g.log 2>&1; echo "GPU $g rc=$?" >> $W/logs/gpu$g.log) &
    sleep 2  # claims in GPU order
  done
fi
for g in 0 1 2 3 4 5 6 7; do
  var=Q$g; cells=${!var:-}
  [ -z "$cells" ] && continue
  [ "$g" -ge "$NG" ] && { say "no GPU $g for: $cells"; continue; }
  say "GPU $g: $cells"
  (CUDA_VISIBLE_DEVICES=$g timeout $(( DEADLINE_S - $(elapsed) )) python3 benchmarks/ptq_cifar10.py cell $cells \
      --work $W --device cuda >> $W/logs/gpu$g.log 2>&1; echo "GPU $g rc=$?" >> $W/logs/gpu$g.log) &
done
wait
for g in 0 1 2 3 4 5 6 7; do [ -f $W/logs/gpu$g.log ] && { echo "--- gpu$g"; grep -v Warning $W/logs/gpu$g.log | grep -v "shard .* done" | tail -n 8 | cut -c1-400; }; done
python3 benchmarks/ptq_cifar10.py collect --work $W --out $OUT/ptq_cifar10.json
python3 - <<'PY'
import os, tarfile, json
from pathlib import Path
W, OUT = Path("/tmp/ptq"), Path(os.environ.get("OUT", "/tmp/out"))
files, budget = [], 44 << 20
def add(p):
    global budget
    p = Path(p)
    if p.is_file() and p.stat().st_size <= budget:
        files.append(p); budget -= p.stat().st_size
for p in sorted(W.rglob("*")):
    if p.is_file() and (p.suffix == ".json" or p.parent.name == "logs"):
        add(p)
unfinished = [c for c in (W / "cells").iterdir() if (c / "recon").is_dir() and not (c / "model" / "diffquant.json").is_file()] if (W / "cells").is_dir() else []
for c in unfinished:
    add(c / "recon" / "state.safetensors")
if unfinished:
    for p in (W / "calib").glob("*.safetensors"):
        add(p)
for p in sorted((W / "cells").glob("*/model/*")):  # checkpoints of cells whose sampling is not finished
    if not (p.parent.parent / "row.json").is_file():
        add(p)
with tarfile.open("/tmp/ptq_pack.tar", "w") as t:
    for p in files:
        t.add(p, arcname=str(p.relative_to(W)))
print("packed", len(files), "files,", (44 << 20) - budget, "bytes; unfinished recon:", [c.name for c in unfinished])
PY
split -b 15m -d /tmp/ptq_pack.tar $OUT/ptq.tar.part-
ls -la $OUT
