#!/usr/bin/env bash
# The ablation table of issue 4 in docs/BENCHMARKS.md (2-core CPU): box prompt vs <seg> query,
# per-structure vs one-pass Hungarian boxes, SFT vs SFT+GRPO, 1 vs k references, retrieved vs random
# reference. Needs runs/ref/vlm/sft_fp16 and runs/ref/grpo (scripts/rau_vlm_recipe.sh), the <seg> head
# (VLM=runs/ref/grpo/ship scripts/rau_seg_recipe.sh) and the LiteMedSAM bank of scripts/bank_experiments.sh.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
WS=${WS:-../shared/datasets/wingspan_cxr}
OUT=${OUT:-runs/ablation}
SFT=${SFT:-runs/ref/vlm/sft_fp16}
GRPO=${GRPO:-runs/ref/grpo/ship}
SEG=${SEG:-runs/seg/head/final}
mkdir -p $OUT

# 1. SFT model on the same pairs of the three splits, with registration as the baseline of the run.
$RAU bench --splits wingspan,arcade,drr --methods rau,rau-box,rau-tokens,registration --vlm $SFT --out $OUT/sft --no-progress
# 2. SFT+GRPO on the same pairs, and its <seg> query route.
$RAU bench --splits wingspan,arcade,drr --methods rau,rau-box,rau-seg,rau-tokens --vlm $GRPO --seg-head $SEG \
  --out $OUT/grpo --no-progress

# 3. Wingspan held-out only (SFT+GRPO): one-pass Hungarian boxes, random vs retrieved reference, 1 vs 3 references.
E="$RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --vlm $GRPO --no-progress"
$E --method rau-ot --out $OUT/ws_rau-ot.json
$E --method rau --reference-choice random --out $OUT/ws_rau_random.json
$E --method rau --bank runs/bank/wingspan_litemedsam.npz --out $OUT/ws_rau_bank_k1.json
$E --method rau --bank runs/bank/wingspan_litemedsam.npz --k-references 3 --out $OUT/ws_rau_bank_k3.json
$RAU report $OUT/ws_rau-ot.json $OUT/ws_rau_random.json $OUT/ws_rau_bank_k1.json $OUT/ws_rau_bank_k3.json
