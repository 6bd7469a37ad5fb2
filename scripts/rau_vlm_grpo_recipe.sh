#!/usr/bin/env bash
# GRPO after SFT for the compact RAU VLM (issue 4, item 4): the exact command of the run measured in
# docs/HISTORY.md (2-core CPU, no GPU). Resumable: rerun after a kill. Needs the caches of
# scripts/rau_vlm_recipe.sh (same training parts: the held-out test parts are never drawn).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
INIT=${INIT:-src/rau/assets/refvlm}
$RAU train grpo --init-from "$INIT" --cache runs/chex/wingspan_0_160.npz --cache runs/chex/drr_train.npz \
  --cache runs/chex/drr_train_lat.npz --cache runs/ref/arcade_train.npz --cache-weights 0.3,0.2,0.1,0.4 \
  --output-dir "${OUT:-runs/ref/grpo}" --steps "${STEPS:-400}" --pairs-per-step 4 --structures-per-pair 4 \
  --group-size 8 --temperature 1.0 --lr 5e-5 --beta 0.04 --seed 0 --threads "${THREADS:-2}"
