#!/usr/bin/env bash
# The supervised ceilings of issue 15 (the paper's nnU-Net row), scored by `rau bench` on the same
# pairs as the reference-based methods (`--methods unet --unet DIR`, one split per model):
#   ARCADE: a 25-segment U-Net trained on all 1,000 images of arcade_syntax/train (the bench's
#           targets come from arcade_syntax/val); 256 px, 2.4-3.8 s/step on one CPU thread (about 95 min on a busy 2-core machine).
#   Wingspan: a lungs + heart U-Net trained on the reference part 0:160 (targets are 160:200);
#           the 2026-11-23 recipe, 128 px, ~0.7 s/step on one thread.
# Neither reads a reference; neither ships. Resumable: rerun after a kill.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
DATA=${DATA:-../shared/datasets}
OUT=${OUT:-runs/unet}
ARCADE_SEGMENTS=1,10,10a,11,12,12a,12b,13,14,14a,14b,15,16,16a,16b,16c,2,3,4,5,6,7,8,9,9a
$RAU train unet --data "$DATA/arcade_syntax/train" --out "$OUT/arcade" --structures "$ARCADE_SEGMENTS" \
  --steps 1500 --batch-size 8 --lr 1e-3 --seed 0 --image-size 256 --threads 1 --no-progress
$RAU train unet --data "$DATA/wingspan_cxr" --id-range 0:160 --out "$OUT/wingspan" \
  --structures right_lung,left_lung,heart --steps 1500 --batch-size 8 --lr 1e-3 --seed 0 --image-size 128 \
  --channels 16,16,32,64,128,16 --preprocessing equalize --threads 1 --no-progress
# Score (same pairs as every other method of the bench):
#   $RAU bench --out runs/bench_unet_arcade --splits arcade --methods unet --unet "$OUT/arcade/final"
#   $RAU bench --out runs/bench_unet_wingspan --splits wingspan --methods unet --unet "$OUT/wingspan/final"
