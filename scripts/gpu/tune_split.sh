#!/usr/bin/env bash
# Conv tuning spread over GPUs: GPU i tunes the task list TUNEi (i = 0..7; empty or unset: GPU i idles) for TUNE_S
# seconds, all in parallel; each writes $TUNE_DIR/qconv_tuned_i.json (written after every shape, so a run cut short
# keeps what it timed), qconv_tune_rows_i.json and tune_i.log. Sourced by small_batch.sh, or run alone:
#   carry: .whl
#   run:   TUNE0=sd15-unet:8:dq-fp8-gn-qkv-te-ff-tw TUNE1=ddpm-cifar10-32:1:dq-fp8 TUNE_ARGS=--untuned-only bash scripts/gpu/tune_split.sh
#   env:   TUNE_S (220), TUNE_ARGS (more tune_qconv.py options), TUNE_DIR ($OUT)
# Merge here: diffquant tune-kernels --merge-from qconv_tuned_i.json --merge-into src/diffquant/kernels/tuned/nvidia-h200.json
set -uo pipefail
if [ -z "${TUNE_SPLIT_SOURCED:-}" ]; then
  source scripts/gpu/_zoo_common.sh
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  kernel_job_env
fi
TUNE_DIR=${TUNE_DIR:-$OUT}; mkdir -p "$TUNE_DIR"
TUNE_S=${TUNE_S:-220}
TUNE_PIDS=()
for i in 0 1 2 3 4 5 6 7; do
  eval "T=\${TUNE$i:-}"
  [ -n "$T" ] || continue
  say "GPU $i: tune $T"
  ( CUDA_VISIBLE_DEVICES=$i timeout $(( TUNE_S + 70 )) python3 benchmarks/tune_qconv.py --tasks "$T" --budget-s $TUNE_S \
      ${TUNE_ARGS:-} --out $TUNE_DIR/qconv_tuned_$i.json --rows $TUNE_DIR/qconv_tune_rows_$i.json > $TUNE_DIR/tune_$i.log 2>&1
    echo "tune rc=$?" >> $TUNE_DIR/tune_$i.log ) &
  TUNE_PIDS+=($!)
done
if [ -z "${TUNE_SPLIT_SOURCED:-}" ]; then
  for p in "${TUNE_PIDS[@]}"; do wait $p; done
  for f in $TUNE_DIR/tune_*.log; do grep -v trying $f | grep -v '^{' | tail -5; done
  ls -la $TUNE_DIR
  say done
fi
