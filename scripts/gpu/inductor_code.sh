#!/usr/bin/env bash
# The generated code behind the bench's profile: each row of ROWS compiled once in its own process (one GPU per row
# when there are enough GPUs), with Inductor's output code logged (TORCH_LOGS=output_code) and the profile listing
# PROFILE_TOP kernels. What comes back, per row i: row_i.json (the bench row and its kernel list) and
# code_i.log.gz (every generated Triton kernel's source, by the names the profile shows). Use it to see what the
# extra fused elementwise time of dq-fp8 over bf16-compile is made of. Read it anywhere with
#   python benchmarks/inductor_kernels.py row_1.json code_1.log.gz [--grep group_norm]
#   carry: .whl
#   run:   bash scripts/gpu/inductor_code.sh   (env: ROWS, default sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8;
#          TOTAL_S (420); PROFILE_TOP (400))
set -uo pipefail
source scripts/gpu/_zoo_common.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-420}
ROWS=${ROWS:-sd15-unet:8:bf16-compile,sd15-unet:8:dq-fp8}
kernel_job_env
N=${GPUS_N:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}  # GPUS_N: for a dry run without a GPU
[ "$N" -ge 1 ] || { echo "no GPU visible"; exit 2; }
IFS=, read -ra R <<< "$ROWS"
run_row() {  # run_row INDEX GPU SPEC
  CUDA_VISIBLE_DEVICES=$2 TORCH_LOGS=output_code DIFFQUANT_PROFILE_TOP=${PROFILE_TOP:-400} \
    timeout $(( TOTAL_S - $(elapsed) - 15 )) python3 -m diffquant.kernels.bench --one "$3" --out $OUT/row_$1.json \
    --no-layer-types > $OUT/code_$1.log 2>&1
  echo "row $1 ($3) rc=$?" | tee -a $OUT/code_$1.log
  gzip -f $OUT/code_$1.log
}
pids=()
for i in "${!R[@]}"; do
  if [ "$N" -gt "$i" ]; then run_row $i $i "${R[$i]}" & pids+=($!)
  else wait "${pids[@]}"; pids=(); run_row $i $(( i % N )) "${R[$i]}"; fi
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
python3 - "$OUT" <<'EOF'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/row_*.json")):
    d = json.load(open(f))
    for r in d["rows"]:
        print(f, r.get("variant"), r.get("ms"), r.get("error", ""))
    for kb in d.get("kernel_breakdown", []):
        print("  ", kb["variant"], "busy", kb["busy_ms"], kb["kernel_ms"], len(kb["top_kernels"]), "kernels listed")
EOF
ls -la $OUT
say done
