#!/usr/bin/env bash
# The shipped CheXanatomy model (src/rau/assets/chex): steps 1-3 of chexanatomy_recipe.sh, the
# same commands, for the model that ships: the DRR model (300 PA + 100 lateral poses, 2,000 steps)
# fine-tuned on 20 Wingspan reference-part radiographs (ids 0..159 only; the bench's targets are
# 160..199). DRR PA poses come from the bench's render (rendering is deterministic per seed, so
# runs/drr_full/train == runs/drr/train of the recipe). Resumable: rerun after a kill.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
WS=${WS:-../shared/datasets/wingspan_cxr}
PA=${PA:-runs/drr_full/train}
K20=wingspan_010,wingspan_041,wingspan_052,wingspan_053,wingspan_054,wingspan_068,wingspan_071,wingspan_083,wingspan_088,wingspan_089,wingspan_102,wingspan_103,wingspan_106,wingspan_107,wingspan_110,wingspan_135,wingspan_139,wingspan_144,wingspan_146,wingspan_158
[ -f "$PA/annotations.json" ] || $RAU drr --out "$PA" --views 300 --seed 0 --height 256
[ -f runs/drr/train_lat/annotations.json ] || $RAU drr --out runs/drr/train_lat --views 100 --seed 2 --height 256 --projection LAT
mkdir -p runs/chex
[ -f runs/chex/drr_train.npz ] || $RAU train chex-cache --dataset "$PA" --out runs/chex/drr_train.npz --threads 2 --no-progress
[ -f runs/chex/drr_train_lat.npz ] || $RAU train chex-cache --dataset runs/drr/train_lat --out runs/chex/drr_train_lat.npz --threads 2 --no-progress
[ -f runs/chex/wingspan_k20.npz ] || $RAU train chex-cache --dataset "$WS" --id-range 0:160 --ids $K20 --out runs/chex/wingspan_k20.npz --threads 2 --no-progress
$RAU train chex --cache runs/chex/drr_train.npz --cache runs/chex/drr_train_lat.npz --output-dir runs/chex/drr \
  --steps 2000 --batch-size 8 --tasks-per-seq 8 --lr 1e-3 --warmup 100 --seed 0 --threads 2 --no-progress
$RAU train chex --cache runs/chex/wingspan_k20.npz --init-from runs/chex/drr/final --output-dir runs/chex/drr_k20 \
  --steps 300 --batch-size 8 --tasks-per-seq 3 --lr 2e-4 --warmup 20 --seed 0 --threads 2 --no-progress
# Ship: fp16 weights + config + training record.
$PY -c "from rau.models.chex.modeling import ChexModel as M; from rau.methods.chexanatomy import DEFAULT_CHEX_DIR as D; M.from_pretrained('runs/chex/drr_k20/final').save_pretrained(D, half=True)"
