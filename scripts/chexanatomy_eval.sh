#!/usr/bin/env bash
# CheXanatomy evaluation: the commands behind the CheXanatomy tables in docs/HISTORY.md
# (after scripts/chexanatomy_recipe.sh). Results in runs/chex/eval/.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
WS=${WS:-../shared/datasets/wingspan_cxr}
E=runs/chex/eval
mkdir -p $E
SIX=right_lung,left_lung,heart,trachea,right_clavicle,left_clavicle
# DRR held-out poses (PA 60, lateral 20): all 24 structures for the VLM, the U-Net's six for both.
$RAU eval --targets runs/drr/test --references runs/drr/train --method chexanatomy --chex runs/chex/drr/final --out $E/drr_test_chex.json --no-progress
$RAU eval --targets runs/drr/test_lat --references runs/drr/train_lat --method chexanatomy --chex runs/chex/drr/final --out $E/drr_test_lat_chex.json --no-progress
$RAU eval --targets runs/drr/test --references runs/drr/train --method unet --unet runs/unet/drr --structures $SIX --out $E/drr_test_unet_drr.json --no-progress
$RAU eval --targets runs/drr/test_lat --references runs/drr/train_lat --method unet --unet runs/unet/drr --structures $SIX --out $E/drr_test_lat_unet_drr.json --no-progress
# Real radiographs, Wingspan held-out 160..199: zero-shot (DRR only) and k-shot fine-tuned.
for m in drr drr_k5 drr_k20; do  # (+ chexanatomy drr_ws160 below)
  $RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --method chexanatomy --chex runs/chex/$m/final --out $E/wingspan_chex_$m.json --no-progress
  $RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --method unet --unet runs/unet/$m --out $E/wingspan_unet_$m.json --no-progress
done
# Token-level: naming a structure from its true box, and "detect X" box IoU.
$RAU eval-chex-tokens --model runs/chex/drr/final --cache runs/chex/drr_test.npz --out $E/tokens_drr_test.json
$RAU eval-chex-tokens --model runs/chex/drr/final --cache runs/chex/drr_test_lat.npz --out $E/tokens_drr_test_lat.json
# Figure: predicted vs true masks on real radiographs.
$PY scripts/chex_figure.py --data $WS --out docs/images/chex_wingspan.png --ids wingspan_163,wingspan_177,wingspan_191 \
  --method chexanatomy:runs/chex/drr/final --method chexanatomy:runs/chex/drr_k20/final \
  --method unet:runs/unet/drr --method unet:runs/unet/drr_k20
$RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --method chexanatomy --chex runs/chex/drr_ws160/final --out $E/wingspan_chex_drr_ws160.json --no-progress
# The U-Net and the VLM restricted to the U-Net's six structures on DRRs (same targets as above).
$RAU eval --targets runs/drr/test --references runs/drr/train --method chexanatomy --chex runs/chex/drr/final --structures $SIX --out $E/drr_test_chex_six.json --no-progress
$RAU eval --targets runs/drr/test_lat --references runs/drr/train_lat --method chexanatomy --chex runs/chex/drr/final --structures $SIX --out $E/drr_test_lat_chex_six.json --no-progress
