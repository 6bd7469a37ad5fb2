#!/usr/bin/env bash
# The ablation table of issue 4 in docs/HISTORY.md (2-core CPU): box prompt (rau-box, rau) vs
# <seg> query (rau-seg), against registration, reg-fuse and oracle-box on the same pairs of the three
# splits; then on Wingspan held-out: retrieved vs random reference and 1 vs 3 references.
# Uses the shipped VLM and the shipped <seg> head (scripts/rau_seg_recipe.sh); the DRR folders are
# rendered into runs/drr on first use. For another VLM/head pair: VLM=DIR SEG=DIR.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
WS=${WS:-../shared/datasets/wingspan_cxr}
OUT=${OUT:-runs/ablation}
VLM_OPT=${VLM:+--vlm $VLM}
SEG_OPT=${SEG:+--seg-head $SEG}
mkdir -p $OUT

# 1. Every method on the same pairs (Wingspan 40 held-out, ARCADE val seeded 50, DRR 60 held-out poses).
$RAU bench --splits wingspan,arcade,drr --methods rau-seg,rau,rau-box,registration,reg-fuse,oracle-box \
  $VLM_OPT $SEG_OPT --out $OUT/bench --drr-dir runs/drr --no-progress

# 2. Wingspan held-out, rau-seg: random vs retrieved reference (thumbnail NCC, LiteMedSAM bank), 1 vs 3 references.
[ -f runs/bank/wingspan_litemedsam.npz ] || $RAU index --dataset $WS --id-range 0:160 --out runs/bank/wingspan_litemedsam.npz --encoder litemedsam --no-progress
E="$RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --method rau-seg $VLM_OPT $SEG_OPT --no-progress"
$E --reference-choice random --out $OUT/ws_rau-seg_random.json
$E --bank runs/bank/wingspan_litemedsam.npz --out $OUT/ws_rau-seg_bank_k1.json
$E --bank runs/bank/wingspan_litemedsam.npz --k-references 3 --out $OUT/ws_rau-seg_bank_k3.json
$RAU report $OUT/bench/wingspan_rau-seg.json $OUT/ws_rau-seg_random.json $OUT/ws_rau-seg_bank_k1.json $OUT/ws_rau-seg_bank_k3.json
