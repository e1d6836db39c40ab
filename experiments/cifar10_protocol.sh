#!/usr/bin/env bash
# Small-scale CIFAR-10 protocol for the paper's three findings, sized for a 2-core CPU in < 55 minutes.
#
#   export TFDS_DATA_DIR=/path/to/tensorflow_datasets   # holding cifar10 (tfds downloads it when online)
#   bash experiments/cifar10_protocol.sh                 # -> outputs/protocol/{pretrain,finetune,probe,report}
#
# A. pretraining, 200 steps x 64 images, seed 0: 4x2 hmlp, 8x1 hmlp (same parameters), 4x2 linear, 4x2 conv
# B. fine-tuning, 100 steps x 64 images: from each pretraining run (full), from scratch (4x2, 8x1), attn_only from
#    4x2 hmlp at 32 px, full + attn_only from 4x2 hmlp at 40 px (changed resolution)
# C. linear probes (+ k-NN) of the three 4x2 stem runs and of random-init encoders of the same architectures
# then, while time is left: fine-tuning seeds 1 and 2 of the key comparisons, the changed resolution, an
# interleaved parallel-vs-sequential throughput benchmark; and report.py. Measured: 46.6 min (docs/protocol.md).
#
# The encoder is smaller than the `tiny` preset (dim 64 instead of 192) because the CPU budget is ~45 minutes for
# 29 runs; experiments/cifar10_protocol_gpu.sh is the same protocol at GPU scale. Every run goes through a time
# guard: it starts only if its estimated duration fits BUDGET_S (seconds since the script started) and is killed
# at HARD_S, so the script never overruns; skipped runs are logged as SKIP.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/protocol}
BUDGET_S=${BUDGET_S:-3000}   # 50 min: a run starts only if elapsed + its estimate fits
HARD_S=${HARD_S:-3180}       # 53 min: any run still going is killed (report.py needs < 1 min)
PT_STEPS=${PT_STEPS:-200}
FT_STEPS=${FT_STEPS:-100}
RES=${RES:-40}               # changed fine-tuning resolution (GPU version: 48)

# dim 64, 2 heads of 32, mlp 256: 4 layers x 2 branches vs 8 layers x 1 branch = the same 0.43M parameters.
MODEL="model.dim=64 model.heads=2 model.mlp_dim=256"
PAR="model.depth=4 model.num_parallel_branches=2"
SEQ="model.depth=8 model.num_parallel_branches=1"
COMMON="progress=false log_every=10 ckpt_every=100000 data.shuffle_buffer=10000"
PT="python pretrain.py $COMMON $MODEL batch_size=64 steps=$PT_STEPS optim.warmup_steps=20 eval_batches=8 \
    mask=block mask_ratio=0.4 target=kmeans target.vocab_size=256 target.num_samples=20000 seed=0"
# Same optimiser for pretrained and from-scratch runs: no layer decay (0.65 per layer would give an 8-layer model
# much smaller early-layer learning rates than a 4-layer one, which biases parallel vs sequential).
FT="python finetune.py $COMMON batch_size=64 steps=$FT_STEPS optim.warmup_steps=10 optim.layer_decay=null \
    finetune.drop_path=0.0 finetune.crop_scale=\"[0.25,1.0]\" data.test_split=\"'test[:2000]'\""
PROBE="python linear_probe.py progress=false data.train_split=\"'train[:5000]'\" data.test_split=\"'test[:2000]'\""

mkdir -p "$OUT"
LOG="$OUT/protocol.log"
START=${PROTOCOL_START:-$(date +%s)}   # PROTOCOL_START=<epoch s>: continue a stopped run
echo "protocol start $(date -Is) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"

# run <estimate_s> <output dir> <command...>: skipped if it would not fit the budget, or already done.
run() {
  local est=$1 dir=$2; shift 2
  local now=$(( $(date +%s) - START ))
  if [ -f "$dir/results.json" ]; then echo "[$now s] DONE already: $dir" | tee -a "$LOG"; return 0; fi
  if [ $(( now + est )) -gt "$BUDGET_S" ]; then
    echo "[$now s] SKIP (estimate ${est}s does not fit ${BUDGET_S}s): $dir" | tee -a "$LOG"; return 0
  fi
  rm -rf "$dir"   # a previous killed attempt
  echo "[$now s] START $dir: $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout $(( HARD_S - now )) bash -c "$* hydra.run.dir=$dir" >"$dir.out" 2>&1
  local rc=$? t=$(( $(date +%s) - t0 ))
  echo "[$(( $(date +%s) - START )) s] END rc=$rc ${t}s $dir" | tee -a "$LOG"
}

P=$OUT/pretrain; F=$OUT/finetune; L=$OUT/probe
mkdir -p "$P" "$F" "$L"
TOK="target.path=$P/hmlp_4x2/tokenizer.npz"   # one k-means codebook for all pretraining runs

# --- A. pretraining (the first run fits the tokenizer, the others reuse it)
run 260 "$P/hmlp_4x2"   "$PT stem=hmlp   $PAR"
run 230 "$P/hmlp_8x1"   "$PT stem=hmlp   $SEQ $TOK"
run 230 "$P/linear_4x2" "$PT stem=linear $PAR $TOK"
run 230 "$P/conv_4x2"   "$PT stem=conv   $PAR $TOK"

# --- B1. parallel vs sequential: pretrained and from scratch
run 160 "$F/hmlp_4x2_full_s0"    "$FT run=$P/hmlp_4x2 finetune.mode=full seed=0"
run 160 "$F/hmlp_8x1_full_s0"    "$FT run=$P/hmlp_8x1 finetune.mode=full seed=0"
run 160 "$F/scratch_4x2_full_s0" "$FT run=null model=tiny stem=hmlp $MODEL $PAR finetune.mode=full seed=0"
run 160 "$F/scratch_8x1_full_s0" "$FT run=null model=tiny stem=hmlp $MODEL $SEQ finetune.mode=full seed=0"
# --- B2. attention-only at the pretraining resolution
run 150 "$F/hmlp_4x2_attn_only_s0" "$FT run=$P/hmlp_4x2 finetune.mode=attn_only seed=0"

# --- C. linear probes: the three stems and random-init encoders of the same architectures
for s in hmlp linear conv; do
  run 100 "$L/${s}_4x2"        "$PROBE run=$P/${s}_4x2 seed=0"
  run 100 "$L/${s}_4x2_random" "$PROBE run=$P/${s}_4x2 random_init=true seed=0"
done
# --- B3. fine-tuning the linear- and conv-stem runs
run 160 "$F/linear_4x2_full_s0" "$FT run=$P/linear_4x2 finetune.mode=full seed=0"
run 160 "$F/conv_4x2_full_s0"   "$FT run=$P/conv_4x2 finetune.mode=full seed=0"

# --- seed 1 of the key comparison (noise estimate), then the changed resolution, then seed 1 of 8x1
run 160 "$F/hmlp_4x2_full_s1"    "$FT run=$P/hmlp_4x2 finetune.mode=full seed=1"
run 160 "$F/scratch_4x2_full_s1" "$FT run=null model=tiny stem=hmlp $MODEL $PAR finetune.mode=full seed=1"
run 260 "$F/hmlp_4x2_full_${RES}px_s0"      "$FT run=$P/hmlp_4x2 finetune.mode=full finetune.image_size=$RES seed=0"
run 240 "$F/hmlp_4x2_attn_only_${RES}px_s0" "$FT run=$P/hmlp_4x2 finetune.mode=attn_only finetune.image_size=$RES seed=0"
run 160 "$F/hmlp_8x1_full_s1"    "$FT run=$P/hmlp_8x1 finetune.mode=full seed=1"
run 160 "$F/scratch_8x1_full_s1" "$FT run=null model=tiny stem=hmlp $MODEL $SEQ finetune.mode=full seed=1"

# --- while time is left: parallel vs sequential throughput measured interleaved (same load for both), and a
#     third fine-tuning seed of the key comparisons
run 180 "$OUT/throughput" "python experiments/throughput_par_seq.py --json $OUT/throughput/results.json && echo"
run 160 "$F/hmlp_4x2_attn_only_s1" "$FT run=$P/hmlp_4x2 finetune.mode=attn_only seed=1"
run 160 "$F/hmlp_4x2_full_s2"    "$FT run=$P/hmlp_4x2 finetune.mode=full seed=2"
run 160 "$F/scratch_4x2_full_s2" "$FT run=null model=tiny stem=hmlp $MODEL $PAR finetune.mode=full seed=2"
run 160 "$F/hmlp_8x1_full_s2"    "$FT run=$P/hmlp_8x1 finetune.mode=full seed=2"
run 160 "$F/scratch_8x1_full_s2" "$FT run=null model=tiny stem=hmlp $MODEL $SEQ finetune.mode=full seed=2"

echo "[$(( $(date +%s) - START )) s] report" | tee -a "$LOG"
python report.py "$OUT" --out "$OUT/report" >"$OUT/report.out" 2>&1
echo "[$(( $(date +%s) - START )) s] protocol end $(date -Is), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
