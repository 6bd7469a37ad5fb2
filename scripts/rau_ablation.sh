#!/usr/bin/env bash
# The ablation table of issue 4 in docs/BENCHMARKS.md (2-core CPU): box prompt vs <seg> query,
# per-structure vs one-pass Hungarian boxes, SFT vs SFT+GRPO, 1 vs k references, retrieved vs random
# reference. Needs scripts/rau_vlm_grpo_recipe.sh (runs/ref/grpo/final), scripts/rau_seg_recipe.sh
# (the <seg> head) and scripts/bank_experiments.sh (the LiteMedSAM bank over Wingspan 0..159).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
WS=${WS:-../shared/datasets/wingspan_cxr}
OUT=${OUT:-runs/ablation}
GRPO=${GRPO:-runs/ref/grpo/final}
SEG=${SEG:-runs/seg/head/final}
mkdir -p $OUT

# 1. The same pairs of the three splits: SFT model with box prompt (rau-box), fused (rau), <seg> query
#    (rau-seg), its own tokens (rau-tokens), and registration as the baseline of the same run.
$RAU bench --splits wingspan,arcade,drr --methods rau,rau-box,rau-seg,rau-tokens,registration --seg-head $SEG \
  --out $OUT/sft --no-progress
# 2. SFT+GRPO on the same pairs.
$RAU bench --splits wingspan,arcade,drr --methods rau,rau-box,rau-tokens --vlm $GRPO --out $OUT/grpo --no-progress

# 3. Wingspan held-out only: one-pass Hungarian boxes, retrieved vs random reference, 1 vs 3 references.
E="$RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --no-progress"
$E --method rau-ot --out $OUT/ws_rau-ot.json
$E --method rau --reference-choice random --out $OUT/ws_rau_random.json
$E --method rau --bank runs/bank/wingspan_litemedsam.npz --out $OUT/ws_rau_bank_k1.json
$E --method rau --bank runs/bank/wingspan_litemedsam.npz --k-references 3 --out $OUT/ws_rau_bank_k3.json
$RAU report $OUT/ws_rau-ot.json $OUT/ws_rau_random.json $OUT/ws_rau_bank_k1.json $OUT/ws_rau_bank_k3.json
