#!/usr/bin/env bash
# The figures of the shipped compact RAU VLM in docs/HISTORY.md (2-core CPU). Run after
# scripts/rau_vlm_recipe.sh (needs its test caches and the DRR renders of scripts/chexanatomy_recipe.sh).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-src/rau/assets/refvlm}
mkdir -p runs/ref/eval

# 1. Token level (no image encoding; reference = nearest training image by pooled features).
$RAU eval-tokens --model $MODEL --references runs/chex/wingspan_0_160.npz --targets runs/ref/wingspan_160_200.npz --out runs/ref/eval/token_wingspan.json
$RAU eval-tokens --model $MODEL --references runs/ref/arcade_train.npz --targets runs/ref/arcade_val.npz --out runs/ref/eval/token_arcade.json
$RAU eval-tokens --model $MODEL --references runs/chex/drr_train.npz --targets runs/chex/drr_test.npz --out runs/ref/eval/token_drr.json
$RAU eval-tokens --model $MODEL --references runs/chex/drr_train_lat.npz --targets runs/chex/drr_test_lat.npz --out runs/ref/eval/token_drr_lat.json

# 2. Every method on the same pairs (Wingspan 40 held-out targets, ARCADE val seeded 50, DRR 60 held-out poses).
$RAU bench --splits wingspan,arcade,drr --methods rau,rau-ot,rau-box,rau-tokens,registration,reg-fuse,oracle-box \
  --out runs/bench_rau --drr-dir runs/drr
