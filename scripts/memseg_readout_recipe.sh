#!/usr/bin/env bash
# Issue 15: a trained readout path in the memory segmenter (STM/XMem-style memory read: the reference masks'
# VALUES carried to the target by learned feature similarity), on the 2-core CPU, from the shipped memory
# segmenter. Needs the caches of scripts/memseg_blobs_recipe.sh (its lines up to the encoding: runs/memseg_emb).
# Clavicles and scapulae stay out of ALL training. Resumable: rerun a line after a kill.
#  Stage A: the readout path alone (learned 1x1 key, temperature, locality; no decoder pass), 300 x 8 pairs, ~12 min.
#  Stage B: the whole model with the trained readout as the decoder's default prior, the readout's own loss added;
#           otherwise the shipped recipe's settings. 500 x 4 pairs, ~28 min.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
E=${E:-runs/memseg_emb}
HOLD=(--exclude '*clavicle*' --exclude '*scapula*')
C=(--cache "$E/drr_train.npz" --cache "$E/wingspan_train.npz" --cache "$E/arcade_train.npz" --cache "$E/blobs_1.npz" --cache "$E/blobs_2.npz")
COMMON=(--k-references 3 --vary-k --grid 32 --decoder-grid 64 --mask-prompt --readout --pseudo 0.3 --save-every 50
        "${HOLD[@]}" --threads 2 --device cpu --no-progress)
$RAU train memseg "${C[@]}" --output-dir runs/memseg_readA --steps 300 --batch-size 8 --lr 1e-3 --warmup 20 --readout-only \
  --init-from src/rau/assets/memseg "${COMMON[@]}"
$RAU train memseg "${C[@]}" --output-dir runs/memseg_readB --steps 500 --batch-size 4 --lr 1e-4 --warmup 30 --target-prior 0.6 \
  --readout-weight 1 --init-from runs/memseg_readA/final "${COMMON[@]}"
# Stages D-G (2026-12-06): the decoder as a correction of the readout (--readout-residual), 400 x 4 pairs from stage B,
# ~21 min each. Stage E: gain 0.1 at init. Stage G (meets its ship rule, docs/HISTORY.md 2026-12-06 s17; not yet
# shipped): stage E with 8 x 24 random 3D shapes instead of 2 x 24, so most pairs are shapes it cannot learn.
$RAU train memseg "${C[@]}" --output-dir runs/memseg_readE --steps 400 --batch-size 4 --lr 1e-4 --warmup 30 --target-prior 0.6 \
  --readout-residual --residual-gain 0.1 --readout-weight 1 --init-from runs/memseg_readB/final "${COMMON[@]}"
PY=${PY:-.venv/bin/python}; F=${F:-runs/memseg_frames}
for s in 3 4 5 6 7 8; do  # six more shape sets (~3 min each), as scripts/memseg_blobs_recipe.sh draws seeds 1 and 2
  [ -f "runs/blobs/drr_$s/annotations.json" ] || $PY -c "
from rau.data.drr_blobs import write_blob_labelmap
from rau.data.drr import render_drr_dataset
ct, lab, csv = write_blob_labelmap('runs/blobs', n=24, seed=$s, avoid_names=('clavicul', 'scapula'))
render_drr_dataset('runs/blobs/drr_$s', n_views=100, seed=0, ct=ct, labelmap=lab, label_names=csv, threads=1, progress=False)"
  [ -f "$F/blobs_$s.npz" ] || $RAU train memseg-cache --data "runs/blobs/drr_$s" --out "$F/blobs_$s.npz" --frames
  [ -f "$E/blobs_$s.npz" ] || $PY -c "from rau.training.recipes.memseg import encode_frame_cache as f; f('$F/blobs_$s.npz', '$E/blobs_$s.npz', progress=False)"
done
G=(); for s in 3 4 5 6 7 8; do G+=(--cache "$E/blobs_$s.npz"); done
$RAU train memseg "${C[@]}" "${G[@]}" --output-dir runs/memseg_readG --steps 400 --batch-size 4 --lr 1e-4 --warmup 30 \
  --target-prior 0.6 --readout-residual --residual-gain 0.1 --readout-weight 1 --init-from runs/memseg_readB/final "${COMMON[@]}"
# Readout alone vs the training-free readout and the model (development check, docs/HISTORY.md 2026-12-06 03:06):
#   python scripts/readout_eval.py runs/memseg_readA/final runs/bench_s13_mem/drr-unseen_sam2-memory.json runs/drr_full/test runs/drr_full/train 60
# Bench (same pairs as docs/RESULTS.md):
#   $RAU bench --out runs/bench_s15_readB --splits drr-unseen,wingspan,arcade,drr --methods sam2-memory,reg-memseg \
#     --memseg runs/memseg_readB/final --drr-dir runs/drr_full
