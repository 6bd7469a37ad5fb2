#!/usr/bin/env bash
# rau-seg on the memory segmenter (issue 15, item 3; the paper's RAU): the shipped RAU VLM's <seg> query, projected
# by a small head (the <seg> embedding + an MLP, 0.4 MB) into prompt tokens of the shipped memory segmenter's mask
# decoder, beside its prior (the reference mask moved into the VLM's answer box) and its memory (the reference image
# and mask). VLM and memory segmenter frozen; the head starts with zero tokens. Clavicles and scapulae never drawn.
# Trains on the memseg caches of scripts/memseg_blobs_recipe.sh (its first lines build them), 2-core CPU, ~25 min.
# Resumable: rerun after a kill.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
PY=${PY:-.venv/bin/python}
E=${E:-runs/memseg_emb}
$RAU train seg-head-memseg --cache "$E/drr_train.npz" --cache "$E/wingspan_train.npz" --cache "$E/arcade_train.npz" \
  --cache "$E/blobs_1.npz" --output-dir runs/seghead_mem --steps 400 --batch-size 8 --lr 3e-4 --warmup 20 \
  --exclude '*clavicle*' --exclude '*scapula*' --threads 2 --device cpu --no-progress
# Ship (fp16):
#   $PY -c "from rau.models.refvlm.seghead import SegHeadModel as M, DEFAULT_MEMSEG_HEAD_DIR as D; M.from_pretrained('runs/seghead_mem/final').save_pretrained(D, half=True)"
