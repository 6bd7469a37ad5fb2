#!/usr/bin/env bash
# The <seg> query head of method rau-seg (issue 4, item 1), shipped as src/rau/assets/refvlm_seg: the
# exact commands of the run measured in docs/HISTORY.md (2-core CPU). Resumable. Needs the token
# caches runs/chex/wingspan_0_160.npz and runs/chex/drr_train.npz of scripts/rau_vlm_recipe.sh.
# The head is tied to its VLM by weight hash: VLM=DIR trains one for another VLM (then SHIP=0).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
VLM=${VLM:-src/rau/assets/refvlm}
mkdir -p runs/seg
[ -f runs/seg/wingspan_0_160.npz ] || $RAU train seg-cache --cache runs/chex/wingspan_0_160.npz --out runs/seg/wingspan_0_160.npz
[ -f runs/seg/drr_train.npz ] || $RAU train seg-cache --cache runs/chex/drr_train.npz --out runs/seg/drr_train.npz
$RAU train seg-head --vlm "$VLM" --cache runs/chex/wingspan_0_160.npz --cache runs/chex/drr_train.npz \
  --seg-cache runs/seg/wingspan_0_160.npz --seg-cache runs/seg/drr_train.npz --cache-weights 0.6,0.4 \
  --output-dir "${OUT:-runs/seg/head}" --steps "${STEPS:-400}" --pairs-per-step 4 --structures-per-pair 4 \
  --lr 1e-4 --seed 0 --threads "${THREADS:-2}" --seg-after "${SEG_AFTER:-box}"

# Ship: fp16 head + config (with the VLM's hash) + training record into the package.
if [ "${SHIP:-1}" = 1 ]; then
  ${PY:-.venv/bin/python} -c "from rau.models.refvlm.seghead import SegHeadModel as M, DEFAULT_HEAD_DIR as D; M.from_pretrained('${OUT:-runs/seg/head}/final').save_pretrained(D, half=True)"
fi
