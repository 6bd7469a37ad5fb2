#!/usr/bin/env bash
# The registration refiner (method reg-refine; src/rau/assets/refiner when shipped): caches of real
# registration outputs, then training. Clavicles and scapulae are held out of ALL its training (the
# caches never store them) so that `rau bench --splits drr-unseen` measures structures it never saw.
# Images used: the DRR reference render (300 poses, seed 0; the bench's drr targets are the seed-1
# poses), Wingspan 0:120 (bench targets are 160:200 and the confidence calibration reads 120:160, so
# neither is trained on), ARCADE train 0:600 (targets come from ARCADE val; calibration reads 600:1000). On 2 CPU cores: caches ~10 min (two at a time, one ITK thread each), training
# ~1 s/step. Resumable: rerun the same line after a kill (a finished cache is kept).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
DATA=${DATA:-../shared/datasets}
DRR=${DRR:-runs/drr_full}
OUT=${OUT:-runs/refine}
STEPS=${STEPS:-3000}
HOLD=(--exclude '*clavicle*' --exclude '*scapula*')
[ -f "$DRR/train/annotations.json" ] || $RAU drr --out "$DRR/train" --views 300 --seed 0 --height 256
[ -f "$OUT/drr_train.npz" ] || $RAU train refine-cache --data "$DRR/train" --out "$OUT/drr_train.npz" "${HOLD[@]}" --threads 1
[ -f "$OUT/wingspan_train.npz" ] || $RAU train refine-cache --data "$DATA/wingspan_cxr" --images 0:120 \
  --out "$OUT/wingspan_train.npz" "${HOLD[@]}" --threads 1
[ -f "$OUT/arcade_train.npz" ] || $RAU train refine-cache --data "$DATA/arcade_syntax/train" --images 0:600 --limit 400 \
  --out "$OUT/arcade_train.npz" "${HOLD[@]}" --threads 1
$RAU train refine --cache "$OUT/drr_train.npz" --cache "$OUT/wingspan_train.npz" --cache "$OUT/arcade_train.npz" \
  --output-dir "$OUT/run" --steps "$STEPS" --batch-size 16 --lr 1e-3 --warmup 50 --save-every 100 "${HOLD[@]}" \
  --threads 2 --device auto --no-progress
# Ship (weights + config + training record into the package):
#   .venv/bin/python -c "from rau.models.refiner.modeling import RefinerModel as M; from rau.methods.refine import DEFAULT_REFINER_DIR as D; m = M.from_pretrained('runs/refine/run'); m.save_pretrained(D, training=m.training)"
