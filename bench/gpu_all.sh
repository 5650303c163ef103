#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one command, on a CUDA machine with requirements.txt installed:
#   bash bench/gpu_all.sh [LOG_DIR]          (PYTHON=.venv/bin/python to pick the interpreter; about 12 minutes on an H100)
# Each benchmark runs in its own process (a crash or an out-of-memory in one leaves the others'
# figures), under a time limit, and writes its log to LOG_DIR (default bench/out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-bench/out/gpu}
mkdir -p "$logs"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

run() {  # run NAME LIMIT_S ARGS...: one benchmark, its output shown and kept in $logs/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: python -m $*"
  timeout "$limit" "$python" -m "$@" 2>&1 | tee "$logs/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
"$python" -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$logs/gpu.txt" || exit 1
run graphs_check 100 bench.graphs_check
run train_sd15 150 bench.train_speed --arch sd15
run blend_sd15 240 bench.blend_speed --arch sd15
run train_sdxl_low_memory 200 bench.train_speed --arch sdxl --low-memory --rounds 2
run train_sd15_low_memory 120 bench.train_speed --arch sd15 --low-memory --rounds 2
