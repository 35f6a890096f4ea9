#!/usr/bin/env bash
# ab_rows.sh's A/B rows on one GPU (nvidia-h200; the x4 kind was not lent in session 12), in three calls of about
# 9 minutes each (carry .whl, timeout_s 600). Every row runs in its own bench process with its own environment.
#   PART=1: GPU tests (tma4dr, GEGLU, norms); SD-1.5 b8 bf16-compile and ROW as shipped; ROW with
#           DIFFQUANT_QCONV_TMA=4dr (the table's tma4d tiles, one dot per row); ROW with DIFFQUANT_GN_LOAD_STAGES=3.
#   PART=2: SD b8 re-tuned with the tma4dr candidates beside gather and tma4d (TUNE_S seconds), merged into the
#           shipped table on the device (the merged table comes back as nvidia-h200.merged.json); ROW with it; ROW
#           with the norm stages and the folded finalize; ROW with session 10's GEGLU config.
#   PART=3: CIFAR b256 bf16-compile and CROW as shipped, with the norm stages, with the stages and the fold; then
#           CIFAR b1 bf16-compile and dq-fp8-gn-qkv-te with and without DIFFQUANT_GN_WHOLE_MAX_HW=1024.
#   PART=4 (written after session 12's device time; ran in session 13): split-K (SPLIT_K on tma / tma4d configs, for layers
#           with few output tiles): GPU tests; SD b8's 3x3 convs of 8x8 and 16x16 inputs re-tuned with every kernel
#           and the split-K candidates (TUNE_S), merged on the device (back as nvidia-h200.merged.json); ROW as
#           shipped, with DIFFQUANT_QCONV_SPLIT_K=2 (untuned splits) and with the merged table, in one call.
#   PART=5 (ran in session 13 for CIFAR b1; TUNE_ARGS: more tune_qconv.py options): split-K at batch 1, where every layer has few tiles: SMALL (default SD-1.5 b1) re-tuned,
#           all shapes, split candidates included (TUNE_S), merged on the device; its bf16-compile row, the row as
#           shipped, with DIFFQUANT_QCONV_SPLIT_K=2 and with the merged table. E.g.
#           SMALL=ddpm-cifar10-32:1:dq-fp8-gn-qkv-te for the CIFAR DDPM.
#   PART=6 (session 13, after the split-K calls): the conv1 -> norm2 row statistics (DIFFQUANT_GN_CONV_STATS=1;
#           diffquant::qconv_stats / group_norm_act_stats): their GPU tests; CROW as shipped and with the switch; ROW
#           with the switch (its as-shipped row: PART=4's, 15.27 ms) where the call's time allows. Ran in session 13
#           with TOTAL_S=320 (the budget's end): slower (8.41 against 7.86 ms). Since then also the epilogue with
#           its sums on the tensor cores (DIFFQUANT_GN_STATS_EPILOGUE=dot; 42 warp shuffles against 202 on CIFAR's
#           tile, sm_90 compile) on CIFAR b256 and SD b8. Ran in session 14 with TOTAL_S=560: the dot epilogue
#           no slower and no faster than shipped (CIFAR b256 7.955 against 7.936 ms; SD b8 15.27).
#   PART=7 (written in session 13 after the device time; not run): SD b8 with FP8 attention through cuDNN's fused
#           kernel (dq-fp8-fp8attn-gn-qkv-te-ff-twq, DIFFQUANT_FP8_ATTN_BACKEND=cudnn) beside ROW as shipped, after
#           its GPU tests. Carry .whl/diffusers-0.42.1-py3-none-any.whl and .gpu_carry/cudnn-fe. Meant for after
#           scripts/gpu/cudnn_fp8_attention.sh showed the kernel faster than bf16 SDPA; session 14 found it no faster
#           (BENCHMARKS.md "Kernels, twelfth measurement"), so the row was not run (its GPU tests ran inline).
#   PART=8 (written in session 14 after its device time; run in session 15: slower): the up blocks' split 1x1 shortcuts as one cuBLAS
#           FP8 GEMM per part (DIFFQUANT_SPLIT_GEMM=scaled_mm; the qconv kernel is 2-3x slower than cuDNN's bf16 1x1
#           conv on these short-K shapes): its GPU tests and the GEGLU GPU tests (new 128x64 default), then ROW and
#           CROW as shipped and with the switch. Carry .whl/diffusers-0.42.1-py3-none-any.whl.
#   PART=9 (written in session 14 after its device time; run in session 15: SD b8 15.06 -> 14.63 ms): wide 4-D conv tiles (BLOCK_N2: 320 or 160
#           output channels a program, tuning.CANDIDATES_WIDE) for SD b8's 320- and 640-channel 3x3 convs: their GPU
#           tests, those shapes re-tuned with tma4d (wide tiles included), tma4dr and gather competing (TUNE_S, 200),
#           merged on the device, ROW with the merged table. Carry .whl/diffusers-0.42.1-py3-none-any.whl.
#   PART=10 (written in session 15 after its device time; ran in session 16: SD b8 14.46 -> 14.19 / 14.16 ms): conv2 with its 1x1 shortcut in one kernel
#           (diffquant::qconv_sc, DIFFQUANT_SC_FUSE=1) and the split convs' two parts in one kernel
#           (DIFFQUANT_SPLIT_FUSE=1): their GPU tests, then ROW as shipped, with both switches, and with the first
#           only (last: skipped if the call runs out; session 15's call 1 spent 115 s on tests and 167 s on the
#           first, cold-compile SD row). Carry .whl/diffusers-0.42.1-py3-none-any.whl.
#   PART=11 (written in session 15; ran in session 16: 14.12 ms, one entry): the shortcut kernel tuned on ROW's ResNet blocks with both switches
#           (tune_qconv.py --shortcut, TUNE_S, 150), merged on the device, ROW with both switches. Same carry.
#   PART=12 (written in session 15; ran in session 16: 7.93 -> 7.68 ms): CROW as shipped and with both switches (about 4 min).
#   PART=13 (written in session 15; ran in session 16: 5.46 -> 5.215 ms with the entries, 5.69 with the switches): SD-1.5 b1 as shipped, with session 15's pending wide-tile entries
#           merged (benchmarks/results/qconv_tuned_sd_b1_wide_pending.json; the merged table comes back), and with
#           both fusion switches too. Commit the merge only if faster. Same carry; about 7 min.
#   PART=14 (session 16): both fusions on by default (DIFFQUANT_SC_FUSE, DIFFQUANT_SPLIT_FUSE), the op sending grids
#           smaller than one wave to the composed calls (sc_composed_reason), split convs' first parts read in place;
#           the shortcut tuner's one SD b8 entry and SD b1's wide-tile entries merged: ROW, SD-1.5 b1, CROW, the
#           qconv_sc GPU tests, ROW's bf16-compile partner (last: skipped if the call runs out). Ran in session 16
#           with TOTAL_S=545: SD b8 13.85, SD b1 5.28, CIFAR b256 7.25 ms, the test passed, the bf16 row skipped.
#   PART=15 (written in session 16 after its device time; not yet run): same-run bases and the composed calls'
#           order fix (ops.qconv_sc_composed): ROW with its bf16-compile partner, SD-1.5 b1 (should match the
#           unfused 5.215 ms), CROW with its bf16-compile partner (about 8 min cold).
#   PART=16 (session 17): the GEGLU kernel's output as one TMA store a tile (default now; "tma_out": false gives
#           session 16's per-element stores): the GEGLU and qconv_sc GPU tests, bench_geglu.py (op A/B), ROW with
#           its bf16-compile partner (same-run basis), ROW with the per-element stores. Same carry.
#   PART=17 (session 17): GEGLU's erf by polynomial (default for e4m3/16-bit outputs; "gelu": "erf" for libdevice),
#           the norm kernels' 32-bit offsets within an image and multiply by 1/scale: their GPU tests,
#           bench_geglu.py, ROW as it is now, ROW with bench_geglu's best config over the four shapes (weighted by
#           calls per UNet, 5/5/5/1) where that is not the default, CROW with its bf16-compile partner. Same carry.
#   PART=18 (session 17, last call): the norm statistics from shifted sums (no Welford), SiLU and GEGLU's special
#           functions as single MUFU instructions (fast_ex2 / fast_rcp / fast_rsqrt), GEGLU's Phi folded: the
#           norm and GEGLU GPU tests, then ROW and CROW each with its bf16-compile partner (same-run bases).
#   PART=19 (written in session 21, not yet run): the K-loop hint (DIFFQUANT_KLOOP_HINT, default 1: the conv and
#           GEGLU loops tell the compiler they are never empty, which ends ptxas's serialized wgmmas in the convs
#           without a residual add, benchmarks/results/ptxas_table_census.json): the conv GPU tests, then ROW with
#           its bf16-compile partner, ROW with DIFFQUANT_KLOOP_HINT=0, CROW with its partner and with the hint off.
#           Run with ROW=sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq-ln TOTAL_S=590. Same carry.
# Everything to $OUT/all.tgz (logs and JSON rows), plus the merged table in parts 2, 4, 5, 9 and 11.
#   run: PART=1 bash scripts/gpu/ab_rows_1gpu.sh   (env: ROW, CROW, SMALL, TUNE_S, AB_ENV, TOTAL_S (570), EXTRA (env for
#        every row, e.g. DIFFQUANT_GN_LOAD_STAGES=3 once it wins))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFQUANT_PROFILE_TOP=${DIFFQUANT_PROFILE_TOP:-40}
kernel_job_env
PART=${PART:-1}
TOTAL_S=${TOTAL_S:-570}
ROW=${ROW:-sd15-unet:8:dq-fp8-gn-qkv-te-ff-twq}
CROW=${CROW:-ddpm-cifar10-32:256:dq-fp8-gn-qkv-te}
OLD_GEGLU='DIFFQUANT_GEGLU_CONFIG={"BLOCK_M": 128, "num_warps": 8, "num_stages": 3}'
STAGES=DIFFQUANT_GN_LOAD_STAGES=3
read -r -a EXTRA_ENV <<< "${EXTRA:-}"
rows() {  # rows TAG ONLY [VAR=value ...]: one bench process, skipped when fewer than 60 s of the call are left
  local tag=$1 only=$2; shift 2
  local left=$(( TOTAL_S - $(elapsed) - 5 ))
  if [ $left -lt 60 ]; then say "skip $tag ($only $*): ${left}s left"; return; fi
  say "rows $tag: $only $*"
  env "${EXTRA_ENV[@]}" "$@" timeout $left python3 benchmarks/bench_kernels.py --row-timeout-s $(( left - 10 )) \
    --no-layer-types --only "$only" --out $OUT/kernels_$tag.json > $OUT/bench_$tag.log 2>&1
  echo "bench rc=$?" >> $OUT/bench_$tag.log
  grep -A4 "^model " $OUT/bench_$tag.log | grep -v "^model \|^--" | cut -c1-150
}
gpu_tests() {  # gpu_tests SECONDS "-k expression": the GPU tests of tests/test_kernels.py that match, to
  # $OUT/pytest_gpu.log; prints the outcome lines (every PASSED one unless QUIET=1, then their count)
  timeout "$1" python3 -m pytest -m gpu tests/test_kernels.py -k "$2" -v --tb=short -p no:cacheprovider \
    > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest_gpu.log
  if [ "${QUIET:-0}" = 1 ]; then
    grep -E "FAILED|ERROR|SKIPPED|rc=|Error" $OUT/pytest_gpu.log | head -20; grep -c PASSED $OUT/pytest_gpu.log
  else
    grep -E "PASSED|FAILED|ERROR|SKIPPED|rc=|Error" $OUT/pytest_gpu.log | head -30
  fi
}
bench_geglu() {  # benchmarks/bench_geglu.py to $OUT/geglu.json; prints each shape's ms per config
  say "bench_geglu"
  timeout 150 python3 benchmarks/bench_geglu.py --out $OUT/geglu.json > $OUT/bench_geglu.log 2>&1
  echo "bench_geglu rc=$?" >> $OUT/bench_geglu.log; tail -1 $OUT/bench_geglu.log
  python3 -c "import json,sys; [print(r['shape'], {k[6:-3]: v for k, v in r.items() if k.startswith('fused_') and k.endswith('_ms')}, 'bf16', r['bf16_compiled_ms'], 'unfused', r['fp8_unfused_compiled_ms']) for r in json.load(open(sys.argv[1]))['rows']]" $OUT/geglu.json
}
tune_merge_rows() {  # TASK SECONDS [tune_qconv.py options]: tune (split-K candidates included), the task's row as
  # shipped (WITH_BF16=1: and its bf16-compile partner), with AB_ENV (default DIFFQUANT_QCONV_SPLIT_K=2: every tma /
  # tma4d entry of a layer with few tiles split in two, untuned), the tuned shapes merged into the shipped table on
  # the device, the row again
  local task=$1 secs=$2; shift 2
  say "tune $task $*"
  timeout $(( secs + 70 )) python3 benchmarks/tune_qconv.py --tasks "$task" --budget-s $secs "$@" \
    --out $OUT/qconv_tuned.json --rows $OUT/qconv_tune_rows.json > $OUT/tune.log 2>&1
  echo "tune rc=$?" >> $OUT/tune.log
  grep -v trying $OUT/tune.log | grep -v '^{' | tail -4
  python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows.json 2>/dev/null | tail -16
  if [ "${WITH_BF16:-1}" = 1 ]; then rows ship "${task%:*}:bf16-compile,$task"; else rows ship "$task"; fi
  local ab=${AB_ENV-DIFFQUANT_QCONV_SPLIT_K=2}
  [ -n "$ab" ] && rows ab "$task" $ab
  local t=src/diffquant/kernels/tuned/nvidia-h200.json
  if [ -s $OUT/qconv_tuned.json ]; then
    python3 -m diffquant.cli tune-kernels --merge-from $OUT/qconv_tuned.json --merge-into $t && cp $t $OUT/nvidia-h200.merged.json
    rows splitk "$task"
  fi
}
case $PART in
1)
  say "GPU tests"
  gpu_tests 110 "tma4d_rows or linear_geglu or group_norm"
  rows ship "sd15-unet:8:bf16-compile,$ROW"
  rows 4dr "$ROW" DIFFQUANT_QCONV_TMA=4dr
  rows stages "$ROW" $STAGES
  ;;
2)
  say "tune $ROW with tma4dr candidates"
  timeout $(( ${TUNE_S:-200} + 70 )) python3 benchmarks/tune_qconv.py --tasks "$ROW" --budget-s ${TUNE_S:-200} \
    --skip-paths tma,tma4dp --out $OUT/qconv_tuned.json --rows $OUT/qconv_tune_rows.json > $OUT/tune.log 2>&1
  echo "tune rc=$?" >> $OUT/tune.log
  grep -v trying $OUT/tune.log | grep -v '^{' | tail -4
  python3 benchmarks/tune_qconv.py --print-rows $OUT/qconv_tune_rows.json 2>/dev/null | tail -24
  T=src/diffquant/kernels/tuned/nvidia-h200.json
  if [ -s $OUT/qconv_tuned.json ]; then
    python3 -m diffquant.cli tune-kernels --merge-from $OUT/qconv_tuned.json --merge-into $T && cp $T $OUT/nvidia-h200.merged.json
    rows tuned "$ROW"
  fi
  rows fold "$ROW" $STAGES DIFFQUANT_GN_FOLD=1
  rows geglu "$ROW" "$OLD_GEGLU"
  ;;
3)
  rows cship "ddpm-cifar10-32:256:bf16-compile,$CROW"
  rows cstages "$CROW" $STAGES
  rows cfold "$CROW" $STAGES DIFFQUANT_GN_FOLD=1
  rows b1 "ddpm-cifar10-32:1:bf16-compile,ddpm-cifar10-32:1:dq-fp8-gn-qkv-te"
  rows b1whole "ddpm-cifar10-32:1:dq-fp8-gn-qkv-te" DIFFQUANT_GN_WHOLE_MAX_HW=1024
  ;;
4)
  if [ "${TESTS:-1}" = 1 ]; then
    say "GPU tests: split-K"
    QUIET=1 gpu_tests 150 "split_k or tma_path_matches"
  fi
  # the 3x3 convs of 8x8 and 16x16 inputs only (7 shapes): the tuner goes by FLOPs, largest first, and the budget
  # would run out on the 1x1s before the 8x8 convs (0.68 ms of the model, the lowest FLOPs)
  # (no bf16-compile row: the call would run past 9.5 minutes; session 12's read 18.81 ms). Session 13's first call
  # (the default SHAPES) reached only the four 16x16 shapes in 150 s; its second ran TESTS=0 AB_ENV=
  # SHAPES=x8x8:o1280:k3x3 TUNE_S=100.
  WITH_BF16=0 tune_merge_rows "$ROW" ${TUNE_S:-150} --shapes ${SHAPES:-x8x8:o1280:k3x3,x16x16:o1280:k3x3}
  ;;
5)
  read -r -a TUNE_EXTRA <<< "${TUNE_ARGS:-}"  # e.g. TUNE_ARGS="--shapes x8x8:,x4x4:,k1x1"
  tune_merge_rows "${SMALL:-sd15-unet:1:dq-fp8-gn-qkv-te-ff}" ${TUNE_S:-220} "${TUNE_EXTRA[@]}"
  ;;
6)
  say "GPU tests: conv row statistics into the norm"
  gpu_tests 120 "conv_row_stats"
  rows cship "$CROW"
  rows cstats "$CROW" DIFFQUANT_GN_CONV_STATS=1
  rows cstatsdot "$CROW" DIFFQUANT_GN_CONV_STATS=1 DIFFQUANT_GN_STATS_EPILOGUE=dot
  rows sstatsdot "$ROW" DIFFQUANT_GN_CONV_STATS=1 DIFFQUANT_GN_STATS_EPILOGUE=dot
  ;;
7)
  # carry .whl/diffusers-0.42.1-py3-none-any.whl and .gpu_carry/cudnn-fe (not all of .whl: 64 MiB)
  setup_cudnn_fe
  say "GPU tests: cuDNN FP8 attention"
  gpu_tests 120 "cudnn_fp8"
  rows ship "$ROW"
  rows cudnnattn "${ROW/dq-fp8-gn/dq-fp8-fp8attn-gn}" DIFFQUANT_FP8_ATTN_BACKEND=cudnn
  ;;
8)
  say "GPU tests: split shortcuts as cuBLAS GEMMs, GEGLU"
  gpu_tests 150 "split_gemm or linear_geglu"
  rows ship "$ROW"
  rows splitgemm "$ROW" DIFFQUANT_SPLIT_GEMM=scaled_mm
  rows cship "$CROW"
  rows csplitgemm "$CROW" DIFFQUANT_SPLIT_GEMM=scaled_mm
  ;;
9)
  say "GPU tests: wide 4-D conv tiles"
  gpu_tests 150 "wide_tiles"
  WITH_BF16=0 AB_ENV= tune_merge_rows "$ROW" ${TUNE_S:-200} --shapes x64x64:o320:k3x3,x32x32:o640:k3x3 \
    --skip-paths tma,tma4dp
  ;;
10)
  say "GPU tests: conv2 with its shortcut (diffquant::qconv_sc)"
  gpu_tests 150 "qconv_sc"
  rows ship "$ROW"
  rows scsplit "$ROW" DIFFQUANT_SC_FUSE=1 DIFFQUANT_SPLIT_FUSE=1
  rows scfuse "$ROW" DIFFQUANT_SC_FUSE=1
  ;;
12)
  rows cship "$CROW"
  rows cscsplit "$CROW" DIFFQUANT_SC_FUSE=1 DIFFQUANT_SPLIT_FUSE=1
  ;;
11)
  say "tune the shortcut kernel: $ROW"
  timeout $(( ${TUNE_S:-150} + 90 )) python3 benchmarks/tune_qconv.py --shortcut --tasks "$ROW" --budget-s ${TUNE_S:-150} \
    --out $OUT/qconv_sc_tuned.json --rows $OUT/qconv_sc_tune_rows.json > $OUT/tune_sc.log 2>&1
  echo "tune rc=$?" >> $OUT/tune_sc.log
  grep -v trying $OUT/tune_sc.log | tail -30
  t=src/diffquant/kernels/tuned/nvidia-h200.json
  if [ -s $OUT/qconv_sc_tuned.json ]; then
    python3 -m diffquant.cli tune-kernels --merge-from $OUT/qconv_sc_tuned.json --merge-into $t && \
      cp $t $OUT/nvidia-h200.merged.json
    rows sctuned "$ROW" DIFFQUANT_SC_FUSE=1 DIFFQUANT_SPLIT_FUSE=1
  fi
  ;;
13)
  T=src/diffquant/kernels/tuned/nvidia-h200.json
  rows b1ship "sd15-unet:1:dq-fp8-gn-qkv-te-ff"
  python3 -m diffquant.cli tune-kernels --merge-from benchmarks/results/qconv_tuned_sd_b1_wide_pending.json \
    --merge-into $T && cp $T $OUT/nvidia-h200.merged.json
  rows b1wide "sd15-unet:1:dq-fp8-gn-qkv-te-ff"
  rows b1fuse "sd15-unet:1:dq-fp8-gn-qkv-te-ff" DIFFQUANT_SC_FUSE=1 DIFFQUANT_SPLIT_FUSE=1
  ;;
14)
  rows def "$ROW"
  rows b1def "sd15-unet:1:dq-fp8-gn-qkv-te-ff"
  rows cdef "$CROW"
  say "GPU tests: conv2 with its shortcut (diffquant::qconv_sc), its routing"
  gpu_tests 170 "qconv_sc"
  rows bf16 "${ROW%:*}:bf16-compile"
  ;;
15)
  rows sd8 "${ROW%:*}:bf16-compile,$ROW"
  rows sd1 "sd15-unet:1:dq-fp8-gn-qkv-te-ff"
  rows c256 "${CROW%:*}:bf16-compile,$CROW"
  ;;
16)
  say "GPU tests"
  gpu_tests 170 "linear_geglu or qconv_sc"
  bench_geglu
  rows sd8 "${ROW%:*}:bf16-compile,$ROW"
  rows sd8old "$ROW" 'DIFFQUANT_GEGLU_CONFIG={"tma_out": false}'
  ;;
17)
  say "GPU tests"
  gpu_tests 170 "linear_geglu or group_norm or fused_resnet_norms or row_stats"
  bench_geglu
  BEST=$(python3 benchmarks/bench_geglu.py --best-of $OUT/geglu.json 2>/dev/null)
  say "best GEGLU override: ${BEST:-none (the default)}"
  rows sd8 "$ROW"
  [ -n "$BEST" ] && rows sd8best "$ROW" "DIFFQUANT_GEGLU_CONFIG=$BEST"
  rows c256 "${CROW%:*}:bf16-compile,$CROW"
  ;;
18)
  say "GPU tests"
  QUIET=1 gpu_tests 150 "linear_geglu or group_norm or fused_resnet_norms or row_stats"
  rows sd8 "${ROW%:*}:bf16-compile,$ROW"
  rows c256 "${CROW%:*}:bf16-compile,$CROW"
  ;;
19)
  say "GPU tests"
  QUIET=1 gpu_tests 120 "kernel_matches_reference or tma or wide or shortcut or split_k or linear_geglu"
  rows sd8 "${ROW%:*}:bf16-compile,$ROW"
  rows sd8nohint "$ROW" DIFFQUANT_KLOOP_HINT=0
  rows c256 "${CROW%:*}:bf16-compile,$CROW"
  rows c256nohint "$CROW" DIFFQUANT_KLOOP_HINT=0
  ;;
*) echo "PART must be 1 to 19"; exit 2 ;;
esac
cd $OUT && tar czf all.tgz *.json *.log && find . -maxdepth 1 -type f ! -name all.tgz ! -name env.txt \
  ! -name nvidia-h200.merged.json -delete
ls -la $OUT
say done
