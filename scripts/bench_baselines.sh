#!/usr/bin/env bash
# Baseline comparison of the non-VLM methods on the fixed evaluation splits (docs/BENCHMARKS.md):
#   Wingspan held-out = id-sorted images 160..199 (references: 0..159, never trained on or tuned on);
#   ARCADE val (references: ARCADE train), a seeded subset of --limit targets.
# Usage: bash scripts/bench_baselines.sh OUT_DIR [ARCADE_LIMIT]   (from the repo root, venv active)
set -euo pipefail
OUT=${1:-runs/bench}
LIMIT=${2:-50}
DATA=${RAU_DATA:-../shared/datasets}
METHODS=${METHODS:-"registration reg-box reg-fuse oracle-box"}
mkdir -p "$OUT"
git rev-parse --short HEAD > "$OUT/commit.txt"
for m in $METHODS; do
  rau eval --targets "$DATA/wingspan_cxr" --references "$DATA/wingspan_cxr" --target-range 160:200 \
    --reference-range 0:160 --method "$m" --out "$OUT/wingspan_$m.json" --no-progress > "$OUT/wingspan_$m.md"
done
for m in $METHODS; do
  rau eval --targets "$DATA/arcade_syntax/val" --references "$DATA/arcade_syntax/train" --limit "$LIMIT" \
    --seed 0 --method "$m" --out "$OUT/arcade_$m.json" --no-progress > "$OUT/arcade_$m.md"
done
