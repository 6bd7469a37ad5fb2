#!/usr/bin/env bash
# The shipped compact RAU VLM (src/rau/assets/refvlm): the exact commands that produced it
# (2-core CPU, no GPU). Every step is resumable: rerun after a kill and finished work is skipped.
# Needs the DRR caches of scripts/chexanatomy_recipe.sh (steps 1-2) and ../shared/datasets.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
WS=${WS:-../shared/datasets/wingspan_cxr}
AR=${AR:-../shared/datasets/arcade_syntax}
mkdir -p runs/ref

# 1. Frozen LiteMedSAM features + box/mask tokens, once per image. Training parts only:
#    Wingspan 0:160 (160:200 is the held-out test part), ARCADE train (val is the test), DRR train poses.
[ -f runs/chex/wingspan_0_160.npz ] || $RAU train chex-cache --dataset $WS --id-range 0:160 --out runs/chex/wingspan_0_160.npz
[ -f runs/ref/arcade_train.npz ] || $RAU train chex-cache --dataset $AR/train --out runs/ref/arcade_train.npz
# test caches (evaluation only)
[ -f runs/ref/wingspan_160_200.npz ] || $RAU train chex-cache --dataset $WS --id-range 160:200 --out runs/ref/wingspan_160_200.npz
[ -f runs/ref/arcade_val.npz ] || $RAU train chex-cache --dataset $AR/val --out runs/ref/arcade_val.npz

# 2. Train on reference/target pairs of each dataset (pairs never mix datasets).
$RAU train refvlm --cache runs/chex/wingspan_0_160.npz --cache runs/chex/drr_train.npz \
  --cache runs/chex/drr_train_lat.npz --cache runs/ref/arcade_train.npz --cache-weights 0.3,0.2,0.1,0.4 \
  --output-dir runs/ref/vlm --steps "${STEPS:-2000}" --batch-size 8 --structures-per-pair 6 --lr 1e-3 --warmup 100 \
  --seed 0 --threads 2

# 3. Ship: fp16 weights + config + training record into the package.
$PY -c "from rau.models.refvlm.modeling import RefVlmModel; RefVlmModel.from_pretrained('runs/ref/vlm/final').save_pretrained('src/rau/assets/refvlm', half=True)"
