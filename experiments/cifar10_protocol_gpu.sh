#!/usr/bin/env bash
# The CIFAR-10 protocol of experiments/cifar10_protocol.sh at GPU scale (one GPU; not run in this repository yet).
#
#   export TFDS_DATA_DIR=/path/to/tensorflow_datasets
#   bash experiments/cifar10_protocol_gpu.sh             # -> outputs/protocol_gpu/{pretrain,finetune,probe,report}
#
# Same runs and the same options as the CPU script, with the budgets of a real experiment:
# A. pretraining with experiment=cifar10_gpu (the `tiny` dim-192 encoder, 6x2 vs tiny_seq 12x1 = the same 5.4M
#    parameters; batch 256, 39,000 steps = 200 epochs, bfloat16, 1024 k-means codes)
# B. fine-tuning 100 epochs (19,500 steps x 256), whole test split, three seeds; changed resolution 48 px
# C. linear probes on the whole train/test splits, 100 epochs
# Rough cost on one H200 (bench/throughput.py: ~27k pretraining / ~28-34k fine-tuning images/s in bfloat16 for the
# 6x2 preset): ~7 min per pretraining run, ~3 min per 32-px fine-tune, ~8 min per 48-px one; ~2.5 h in all.
set -eu
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/protocol_gpu}
SEEDS=${SEEDS:-"0 1 2"}
RES=${RES:-48}

PAR="model=tiny"        # 6 layers x 2 branches
SEQ="model=tiny_seq"    # 12 layers x 1 branch
PT="python pretrain.py experiment=cifar10_gpu progress=false seed=0 mask=block mask_ratio=0.4 target=kmeans"
# As on CPU: one optimiser for pretrained and from-scratch runs, no layer decay (it would treat 6 and 12 layers
# differently); BEiT's Mixup/CutMix for the 100 epochs.
FT="python finetune.py progress=false batch_size=256 steps=19500 log_every=100 ckpt_every=2000 model.dtype=bfloat16 \
    optim.lr=1.0e-3 optim.warmup_steps=1950 optim.layer_decay=null finetune.drop_path=0.1 \
    finetune.mixup_alpha=0.8 finetune.cutmix_alpha=1.0"
PROBE="python linear_probe.py progress=false batch_size=1024 probe.epochs=100"

run() {  # run <output dir> <command...>: skipped when its results.json exists (re-running the script resumes)
  local dir=$1; shift
  if [ -f "$dir/results.json" ]; then echo "done already: $dir"; return 0; fi
  echo "$(date -Is) START $dir: $*"
  bash -c "$* hydra.run.dir=$dir"
}

P=$OUT/pretrain; F=$OUT/finetune; L=$OUT/probe
TOK="target.path=$P/hmlp_6x2/tokenizer.npz"

# --- A. pretraining
run "$P/hmlp_6x2"   "$PT stem=hmlp   $PAR"
run "$P/hmlp_12x1"  "$PT stem=hmlp   $SEQ $TOK"
run "$P/linear_6x2" "$PT stem=linear $PAR $TOK"
run "$P/conv_6x2"   "$PT stem=conv   $PAR $TOK"

# --- B. fine-tuning
for s in $SEEDS; do
  run "$F/hmlp_6x2_full_s$s"      "$FT run=$P/hmlp_6x2 finetune.mode=full seed=$s"
  run "$F/hmlp_12x1_full_s$s"     "$FT run=$P/hmlp_12x1 finetune.mode=full seed=$s"
  run "$F/scratch_6x2_full_s$s"   "$FT run=null stem=hmlp $PAR finetune.mode=full seed=$s"
  run "$F/scratch_12x1_full_s$s"  "$FT run=null stem=hmlp $SEQ finetune.mode=full seed=$s"
  run "$F/hmlp_6x2_attn_only_s$s" "$FT run=$P/hmlp_6x2 finetune.mode=attn_only seed=$s"
  run "$F/linear_6x2_full_s$s"    "$FT run=$P/linear_6x2 finetune.mode=full seed=$s"
  run "$F/conv_6x2_full_s$s"      "$FT run=$P/conv_6x2 finetune.mode=full seed=$s"
  run "$F/hmlp_6x2_full_${RES}px_s$s"      "$FT run=$P/hmlp_6x2 finetune.mode=full finetune.image_size=$RES seed=$s"
  run "$F/hmlp_6x2_attn_only_${RES}px_s$s" "$FT run=$P/hmlp_6x2 finetune.mode=attn_only finetune.image_size=$RES seed=$s"
done

# --- C. linear probes (+ k-NN): each stem and a random-init encoder of the same architecture
for st in hmlp linear conv; do
  run "$L/${st}_6x2"        "$PROBE run=$P/${st}_6x2 seed=0"
  run "$L/${st}_6x2_random" "$PROBE run=$P/${st}_6x2 random_init=true seed=0"
done

python report.py "$OUT" --out "$OUT/report"
