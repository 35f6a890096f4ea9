# Shared by the zoo GPU jobs (sourced). Runs on the GPU machine from the repository root.
# Needs: .whl/diffusers-*.whl and .data/cifar10-jpeg-{train,test}.npz carried (see docs/zoo/README.md).
export PYTHONUNBUFFERED=1
T0=${T0:-$(date +%s)}
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed)s] $*"; }
DDPM=/tmp/ddpm

setup_env() {
  if [ ! -d /tmp/site/diffusers ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
}

# setup_torchao: the carried torchao wheel (.whl/torchao-gpu/), if any, into /tmp/site_ao on PYTHONPATH (for the
# bench's torchao rows). Call it unpiped after setup_env: a pipeline's subshell would lose the export.
setup_torchao() {
  if ls .whl/torchao-gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ao .whl/torchao-gpu/*.whl \
      && export PYTHONPATH=/tmp/site_ao:$PYTHONPATH
  fi
}

# kernel_job_env: setup_env and setup_torchao, versions and GPUs into $OUT/env.txt (printed). Unpiped, as above.
kernel_job_env() {
  setup_env > "$OUT/env.txt" 2>&1
  setup_torchao
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.device_count(), "x", torch.cuda.get_device_name())' >> "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

ddpm_alive() { [ -f $DDPM/pid ] && kill -0 "$(cat $DDPM/pid)" 2>/dev/null; }

# start_ddpm [RESUME]: the DDPM recipe as a detached process (setsid): it keeps training between
# calls while the machine stays held, saving the full state to $DDPM/state every 2 minutes and the
# compact state to $DDPM/export every 4.
start_ddpm() {
  mkdir -p $DDPM
  rm -f $DDPM/STOP
  setsid nohup python3 -m diffquant.zoo.train_ddpm --data .data/cifar10-jpeg-train.npz --run-dir $DDPM \
    --export-dir $DDPM/export --export-every-minutes 4 --save-every-minutes 2 --snapshot-steps ${SNAPSHOT_STEPS:-2000,10000} \
    ${DDPM_ARGS:---compile} --max-minutes 45 --stop-file $DDPM/STOP --resume "${1:-auto}" --log-every ${LOG_EVERY:-500} \
    >> $DDPM/train.log 2>&1 < /dev/null &
  echo $! > $DDPM/pid
  say "DDPM trainer started, pid $(cat $DDPM/pid), resume=${1:-auto}"
}

# ensure_ddpm: keep a running trainer; else resume from the local full state (same lease) or
# from a carried compact state (.gpu_carry/ddpm_export: warm restart on a fresh machine).
ensure_ddpm() {
  if ddpm_alive; then say "DDPM trainer running"; return; fi
  if [ -f $DDPM/state/state.json ]; then start_ddpm auto
  elif [ -f .gpu_carry/ddpm_export/state.json ]; then start_ddpm .gpu_carry/ddpm_export
  else say "no DDPM state: starting from scratch"; start_ddpm none; fi
}

# wait_until SECONDS: follow the DDPM log until T0+SECONDS (or the trainer exits)
wait_until() {
  while [ "$(elapsed)" -lt "$1" ]; do
    sleep 15
    if ! ddpm_alive; then say "DDPM trainer is not running"; tail -5 $DDPM/train.log; return; fi
  done
  grep '"step"' $DDPM/train.log | tail -2
}

# copy_export DEST: a consistent copy of the compact state (retries if an export is being written)
copy_export() {
  if ddpm_alive; then  # ask the trainer for a fresh export and wait for it (<= 90 s)
    touch $DDPM/EXPORT_NOW
    for i in $(seq 90); do [ -f $DDPM/EXPORT_NOW ] || break; sleep 1; done
  fi
  for i in 1 2 3 4 5 6; do
    rm -rf "$1"; mkdir -p "$1"
    s1=$(python3 -c "import json;print(json.load(open('$DDPM/export/state.json'))['step'])" 2>/dev/null)
    cp $DDPM/export/* "$1"/ 2>/dev/null
    s2=$(python3 -c "import json;print(json.load(open('$1/state.json'))['step'])" 2>/dev/null)
    if [ -n "$s1" ] && [ "$s1" = "$s2" ] && python3 -c "from diffquant.zoo.checkpoint import load_state; load_state('$1')" 2>/dev/null; then
      say "copied compact state at step $s1"; return 0
    fi
    sleep 5
  done
  say "could not copy a consistent compact state"; return 1
}

# pack_out DIR...: everything into one tar, split into 15 MiB parts under $OUT
pack_out() {
  tar cf - "$@" | split -b 15m -d - $OUT/zoo.tar.part-
  ls -la $OUT
}

# setup_cudnn_fe: the carried cudnn-frontend wheel (.gpu_carry/cudnn-fe/, see scripts/gpu/cudnn_fp8_attention.sh) into
# /tmp/site_fe, put first on PYTHONPATH; exits 2 without it. Call it unpiped (the export).
setup_cudnn_fe() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_fe \
    .gpu_carry/cudnn-fe/*.whl || { echo "no cudnn-frontend wheel in .gpu_carry/cudnn-fe"; exit 2; }
  export PYTHONPATH=/tmp/site_fe${PYTHONPATH:+:$PYTHONPATH}
}
