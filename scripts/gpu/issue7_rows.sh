#!/usr/bin/env bash
# Issue 7 bench rows spread over the machine's GPUs (a queue: each GPU runs one row at a time, every row in its own
# process, killed after ROW_TIMEOUT_S), and optionally conv tuning for more shapes on the last GPU at the same time.
# Everything to $OUT: kernels.json, bench.log, and with tuning qconv_tuned.json, qconv_tune_rows.json, tune.log.
#   carry: .whl (diffusers wheel; .whl/torchao-gpu for the torchao rows)
#   run:   ROWS=model:batch:variant,... bash scripts/gpu/issue7_rows.sh
#   env:   TOTAL_S (560), ROW_TIMEOUT_S (420), START_S (last row start, default TOTAL_S - 150),
#          TUNE_TASKS (model:batch:variant,...; empty: no tuning, every GPU benches), TUNE_S (200), TUNE_ARGS (more
#          tune_qconv.py options, e.g. --untuned-only or --skip-paths tma),
#          DIFFQUANT_PROFILE_TOP (kernels listed per row's profile, default here 40)
#   FIRST for session 22 (written in session 21): time the K-loop hint, PART=19 ROW=sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq-ln
#   TOTAL_S=590 bash scripts/gpu/ab_rows_1gpu.sh (SD b8 and CIFAR b256, each with bf16-compile and with
#   DIFFQUANT_KLOOP_HINT=0). Session 21 found by compiling (no GPU time left) that ptxas serialized every wgmma of most
#   4-D conv kernels (102 of the H200 table's 177 FP8 entries: SD b8 8 of 28, CIFAR b256 31 of 39; 23 after the hint,
#   all persistent-kernel entries: ptxas_table_census.json); in
#   the model the 32x32 conv1 ran 59.4 us at 56 % tensor pipe against 47.7 us / 75 % for its conv2, same kernel and
#   config (ncu_model_probe_sd8_ln_pipe.txt). SD b8 before the hint: 13.31 ms, 1.405x (bf16 18.70, same machine).
#   Then, from session 20's list below, item 1 is answered (tensor pipe 46-63 % at 64x64, 56-78 % at 32x32).
#   suggested calls for the next session (written at the end of session 20, 2026-11-29; sessions 12-20 ran on one GPU
#   as scripts/gpu/ab_rows_1gpu.sh PART=1-18, this script, the op scripts below and inline commands, see BENCHMARKS.md
#   "Kernels, tenth" to "eighteenth measurement"). The SD b8 row to beat is now dq-fp8-gn-qkv-te-ff-twq-ln (13.22 ms,
#   1.412x; 1.6x needs 11.67 ms). Profile (GPU busy 13.10 ms): attention 3.56, convs 3.42, cuBLAS GEMMs 1.83, GEGLU 1.36,
#   group norms 1.17, add_layer_norm + other 0.93, Inductor 0.70.
#   1. The conv kernels (3.42 ms). Session 20's first ncu probe (call 7, benchmarks/results/ncu_model_probe_sd8_ln.txt)
#      found 32 % of the wide kernel's stall samples at WARPGROUP.DEPBAR.LE gsb0, 0x0 (all wgmmas done after each K
#      step; A fed from registers after tl.reshape of the 4-D box). Next: the tensor pipe's utilization (the probe now
#      asks ncu for it): NCU_S=300 COUNT=20 ARGS="--variant dq-fp8-gn-qkv-te-ff-twq-ln" bash
#      scripts/gpu/ncu_model_probe.sh (carry .whl); if the pipe idles, an A operand kept in shared memory (a 4-D NVMMA
#      layout the wgmma can read, or 2-D boxes per row with the halo handled by masks) with one wgmma group in flight.
#   2. Attention (cuDNN's bf16 kernel, 3.56 ms): the Gluon kernel's 64x64 self-attention is at 606 us at best (3
#      consumers, 64-key blocks, split boxes) against cuDNN's 583; less tensor work (split boxes) made the 2-consumer
#      kernel slower there, so the bound is the overlap of softmax and wgmma, not either unit. Untried: FA3's
#      intra-warpgroup two-stage pipelining with the softmax of block j overlapping the QK^T of block j+1 (needs the
#      loop-carried async accumulator ptxas serialized in session 19, C7514), polynomial exp2 on the FMA pipe.
#      Op bench: CONFIGS="BLOCK_N=128;BLOCK_N=64,CONSUMERS=3" bash scripts/gpu/flash_attention.sh (about 60 s).
#   3. The group norms (1.17 ms: stats 0.51, apply 0.53, finalize 0.15 over 61 calls each) and the attention output's
#      e4m3 quantization before to_out (Inductor, about 0.21 ms: cuDNN writes bf16).
#   4. add_layer_norm's plan at 16x16 (6-8 % off the best of five, benchmarks/results/layernorm.json) and at 8x8
#      (slower than Inductor by about 3 us a UNet): PLANS=... bash scripts/gpu/layernorm.sh (about 60 s).
#   Measured in session 20: diffquant::add_layer_norm (-ln) replaced Inductor's LayerNorm + residual + quantize kernels
#   (op bench 0.923 -> 0.672 ms a UNet; model 13.36 -> 13.22 ms, bf16 18.67 in the same run); the flash attention's
#   split head boxes (32x32 self-attention 85.8 -> 66.7 us; 64x64 slower with 2 consumers, 606 us with 3), BENCHMARKS.md
#   "Kernels, eighteenth measurement".
#   Measured in session 19: the shipped tree again, SD b8 13.35 ms (1.392x, bf16 18.58 in the same run); the Gluon
#   flash attention (-fa) 13.81 ms (1.345x) in the same run; ping-pong, turns at the exponentials, tree reductions,
#   Q from shared memory: dropped (BENCHMARKS.md "Kernels, seventeenth measurement").
#   Measured in session 18 (no model kernel changed): the shipped tree, SD b8 13.34 ms (1.395x, bf16 18.60 in the same
#   run), CIFAR b256 6.776 ms (1.627x); cuDNN's FP8 conv slower than diffquant's and than cuDNN's bf16 conv
#   (benchmarks/bench_cudnn_fp8_conv.py); Gluon conv (A from shared memory; plain and warp-specialized) and
#   warp-specialized Gluon GEGLU at 0.86-1.11x of the Triton kernels (benchmarks/bench_gluon_conv.py,
#   bench_gluon_geglu.py).
#   Measured and kept in session 17: GEGLU's erf by polynomial with single-MUFU special functions and a TMA-stored
#   output (the GEGLU kernels 1.595 -> 1.375 ms in SD b8), the norm apply step's 32-bit offsets, 1/scale and
#   single-MUFU SiLU (0.751 -> 0.524 ms): SD b8 13.89 -> 13.44 ms (1.327 -> 1.374x, same runs), CIFAR b256 6.864 ms
#   (1.596x). Measured and dropped: shifted-sum norm statistics (0.520 -> 0.593 ms).
#   Measured and kept in session 16: conv2 with its shortcut in one kernel and the split convs' parts in one kernel
#   (SD b8 14.46 -> 13.85, CIFAR b256 7.93 -> 7.25 ms), on by default, grids under one wave sent to the composed calls.
#   Measured and dropped in session 15: DIFFQUANT_SPLIT_GEMM=scaled_mm (SD b8 15.25 against 15.06 ms). Measured and
#   kept: the wide 4-D tiles tuned into SD b8's 3x3 convs (15.06 -> 14.36 ms).
#   Measured and dropped in session 14: cuDNN's FP8 attention (no faster than its bf16 attention at head dim 40/48),
#   DIFFQUANT_GN_STATS_EPILOGUE=dot as a reason to turn DIFFQUANT_GN_CONV_STATS on (no gain).
#   Measured and dropped in session 11: FP8 attention (2x slower than cuDNN), DIFFQUANT_FP8_ACC=precise (2x cost,
#   +0.07 dB), the persistent GEGLU kernel as a default. In session 12: tma4dr as a default (no faster in the model),
#   DIFFQUANT_GN_LOAD_STAGES=3 and DIFFQUANT_GN_FOLD=1 (slower), DIFFQUANT_GN_WHOLE_MAX_HW=1024 at CIFAR b1 (2.7x
#   slower norms). In session 13: DIFFQUANT_QCONV_SPLIT_K=2 untuned (slower on SD b8 and CIFAR b1; tuned split-K
#   ships at SD b8's 8x8 level and two CIFAR b1 shapes), DIFFQUANT_GN_CONV_STATS=1 (slower, see item 1).
#   Untimed switches: DIFFQUANT_FUSE_UP=0 (A/B of the fused up blocks), DIFFQUANT_BENCH_FREEZE=1.
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-420}
START_S=${START_S:-$(( TOTAL_S - 150 ))}
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
[ -n "${ROWS:-}" ] || { echo "ROWS is empty: nothing to bench"; exit 2; }
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
BENCH_GPUS=$(python3 -c "print(','.join(map(str, range($N))) + ',')")  # a list: "0," is GPU 0 ("0" would be a count)
if [ -n "${TUNE_TASKS:-}" ]; then
  [ "$N" -ge 2 ] || { echo "tuning next to the bench needs 2 or more GPUs; $N here"; exit 2; }
  TUNE_GPU=$(( N - 1 )); BENCH_GPUS=$(python3 -c "print(','.join(map(str, range($N - 1))) + ',')")
  say "GPU $TUNE_GPU: tune $TUNE_TASKS"
  ( CUDA_VISIBLE_DEVICES=$TUNE_GPU timeout $(( ${TUNE_S:-200} + 60 )) python3 benchmarks/tune_qconv.py --tasks "$TUNE_TASKS" ${TUNE_ARGS:-} \
      --budget-s ${TUNE_S:-200} --out $OUT/qconv_tuned.json --rows $OUT/qconv_tune_rows.json > $OUT/tune.log 2>&1
    echo "tune rc=$?" >> $OUT/tune.log ) &
  TP=$!
fi
say "GPUs $BENCH_GPUS: bench $ROWS"
timeout $(( TOTAL_S - $(elapsed) - 10 )) python3 benchmarks/bench_kernels.py --gpus "$BENCH_GPUS" \
  --row-timeout-s $ROW_TIMEOUT_S --budget-s $(( START_S - $(elapsed) )) --no-layer-types --only "$ROWS" \
  --out $OUT/kernels.json > $OUT/bench.log 2>&1; echo "bench rc=$?" >> $OUT/bench.log
[ -n "${TP:-}" ] && wait $TP
grep "^{" $OUT/bench.log | cut -c1-300
grep -A40 "^model " $OUT/bench.log | head -60
if [ -f $OUT/qconv_tune_rows.json ]; then
  grep -v "trying" $OUT/tune.log | tail -8
  python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows.json
fi
ls -la $OUT
say done
