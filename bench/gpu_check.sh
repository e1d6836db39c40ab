#!/usr/bin/env bash
# Every GPU figure of the README in one run (<= 8 min wall on one GPU, each command under its own time limit):
#
#   - the dense matmul peak, JAX and torch (random 8192^3, bf16 and f32);
#   - our pretraining and fine-tuning steps (bench/gpu_bench.py jax): ViT-B 18x2 224 px bf16 (8192 k-means codes)
#     and the CIFAR preset, batch sweep, fused vs explicit attention, remat saving matmuls, unrolled layers,
#     attention-only vs full fine-tuning memory, float32;
#   - XLA flag variants (latency-hiding scheduler, no Triton GEMM, no command buffers) of the two pretraining steps;
#   - timm peers (bench/gpu_bench.py torch): vit_base_patch16_18x2_224 and a CIFAR-shaped VisionTransformer with
#     ParallelThingsBlock, supervised step, bf16 autocast, torch.compile, AdamW, same batch;
#   - a time breakdown of the ViT-B step (bench/profile_step.py);
#   - $OUT/summary.json (rows {step, preset, dtype, batch, images_per_sec, mfu, peak_tflops}; timm rows have
#     "peer": "timm"), $OUT/targets.json and $OUT/table.md (the README's GPU table).
#
#     OUT=bench/results/h200 bash bench/gpu_check.sh
#     python bench/gpu_bench.py summary --out bench/results/h200 --readme README.md    # then: the README table
#
# SSLVIT_BENCH_TINY=1 runs the same pipeline with tiny shapes (a CPU is enough; the figures mean nothing) and
# triples the time limits. Runs from the checkout (no install); needs jax (+ CUDA plugin), flax, optax, numpy,
# omegaconf, einops, torch, timm; not TensorFlow, TF datasets or Hydra.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, not an install (a bare GPU host)
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
rm -f "$OUT/rows.jsonl"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # one process per command; leave GPU memory to XLA's allocator
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/sslvit_jax_cache}  # a rerun compiles faster
missing=$(python -c "import importlib.util as u; print(' '.join(m for m in ('jax', 'flax', 'optax', 'numpy',
'omegaconf', 'einops', 'torch', 'timm') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "error: bench/gpu_check.sh needs these Python packages: $missing (pip install $missing)" >&2
  exit 2
fi
SCALE=1
[ "${SSLVIT_BENCH_TINY:-0}" != "0" ] && SCALE=3
T0=$SECONDS

lim() { echo $(($1 * SCALE)); }
log() { grep --line-buffered -v -i -E "warning|^\s*warnings.warn" | tee -a "$OUT/log.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())"
  python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | log
python -c "import jax; d = jax.devices()[0]; print(f'{d.device_kind} ({jax.default_backend()}), jax {jax.__version__}')
" 2>/dev/null > "$OUT/device.txt"

run_jax() {  # run_jax VARIANT LIMIT_S START_BUDGET_S XLA_FLAGS [ROWS...]
  local variant=$1 limit budget=$3 flags=$4; limit=$(lim "$2"); shift 4
  echo "== jax $variant (XLA_FLAGS='$flags', limit ${limit}s)" | log
  XLA_FLAGS="$flags" timeout "$limit" python bench/gpu_bench.py jax --out "$OUT" --variant "$variant" \
    --budget-s "$(lim "$budget")" ${1:+--rows "$@"} 2>&1 | log
}

run_jax default 200 150 ""
run_jax xla_latency_hiding_scheduler 45 12 "--xla_gpu_enable_latency_hiding_scheduler=true"
run_jax xla_no_triton_gemm 45 12 "--xla_gpu_enable_triton_gemm=false"
run_jax xla_no_command_buffer 45 12 "--xla_gpu_enable_command_buffer="

echo "== torch / timm (limit $(lim 95)s)" | log
JAX_PLATFORMS=cpu timeout "$(lim 95)" python bench/gpu_bench.py torch --out "$OUT" --budget-s "$(lim 50)" 2>&1 | log

echo "== profile of the ViT-B pretraining step (limit $(lim 45)s)" | log
if [ "${SSLVIT_BENCH_TINY:-0}" != "0" ]; then PROFILE_ARGS=(--preset cifar --batch 8 --vocab 16 --steps 2 --model
  dim=64 depth=2 heads=2 mlp_dim=128); else PROFILE_ARGS=(--preset vit_b18x2 --batch 128 --vocab 8192 --steps 3); fi
timeout "$(lim 45)" python bench/profile_step.py "${PROFILE_ARGS[@]}" --dtype bfloat16 \
  --json "$OUT/profile_vit_b18x2_bf16.json" 2>&1 | log

python bench/gpu_bench.py summary --out "$OUT" 2>&1 | log
echo "gpu_check wall time: $((SECONDS - T0)) s" | log
