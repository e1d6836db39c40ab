#!/usr/bin/env bash
# The GPU figures of the README's performance section, in one run (~6 min on an H100 after start-up):
# throughput and MFU of the pretraining and fine-tuning steps (CIFAR-size preset, fp32 + bf16; ViT-S 18x2 / 36x1,
# bf16), the layers compiled as a loop vs unrolled, and parallel vs sequential inference latency at batch 1-8.
#
#     OUT=bench/results/<gpu> bash bench/gpu_check.sh
#
# Each command writes its rows to $OUT as JSON and its printout to $OUT/*.txt; a command that fails or runs past
# its time limit does not stop the others.
set -u
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # one process per command; leave GPU memory to XLA's allocator

run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: python bench/throughput.py $*" | tee "$OUT/$name.txt"
  timeout "$limit" python bench/throughput.py "$@" --json "$OUT/$name.json" 2>&1 | grep -v -i warning | tee -a "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/device.txt"

run cifar_b1024 120 --preset cifar --batch 1024
run cifar_b1024_loop 50 --preset cifar --batch 1024 --no-finetune --model unroll_layers=false
run cifar_b128 50 --preset cifar --batch 128 --no-finetune
run vits18x2_b128 70 --preset vit_s18x2 --batch 128 --dtypes bfloat16 --no-finetune
run vits36x1_b128 70 --preset vit_s36x1 --batch 128 --dtypes bfloat16 --no-finetune
run latency 110 --latency
