#!/usr/bin/env bash
# Issue 4 on a GPU machine with 2 GPUs (kind nvidia-h200-x2): N samples of zoo:cifar10-ddpm
# (DDIM 100 steps, uniform spacing) + fd_cifar in one command on 1 GPU, then the same run under
# torchrun on 2 GPUs; compares the sample bytes and the throughput. Carry: .whl (diffusers wheel)
# and .data (packed CIFAR-10-JPEG test split, for the real-data floor).
#   run: bash scripts/gpu/issue4_scale.sh   (writes $OUT/issue4_*.json and logs)
set -uo pipefail
source scripts/gpu/_zoo_common.sh
setup_env
N=${N:-10000}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="zoo:cifar10-ddpm --sampler ddim --steps 100 --spacing uniform --num-samples $N --seed 0 --shard-size 1000 --batch-size 1000 --compute-batch 500 --no-grid --json"
say "1 GPU: sample $N"
python3 -m diffquant.cli sample $COMMON --device cuda --out /tmp/s1.npz --out-dir /tmp/s1.shards > "$OUT/issue4_sample_1gpu.json" || exit 1
say "1 GPU: fd_cifar"
python3 -m diffquant.cli evaluate /tmp/s1.npz --metrics fd_cifar --device cuda --json > "$OUT/issue4_fd_1gpu.json" || exit 1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  say "2 GPUs (torchrun): sample $N"
  torchrun --standalone --nproc_per_node=2 -m diffquant.cli sample $COMMON --out /tmp/s2.npz --out-dir /tmp/s2.shards \
    > "$OUT/issue4_sample_2gpu.json" || exit 1
  python3 - <<'PY' | tee "$OUT/issue4_compare.json"
import json, numpy as np
a, b = np.load("/tmp/s1.npz"), np.load("/tmp/s2.npz")
print(json.dumps({"images_identical": bool(np.array_equal(a["images"], b["images"])),
                  "seeds_identical": bool(np.array_equal(a["seeds"], b["seeds"])), "n": int(a["images"].shape[0])}))
PY
fi
say done
