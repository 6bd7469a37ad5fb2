#!/usr/bin/env bash
# The shipped mask tokenizer (src/rau/assets/masktok): the command recorded in its training.json
# (`python -m rau.chex.masktok ...`, before the layout change), written for today's CLI. The
# training loop moved onto rau's one engine and gives bit-identical weights to the old one on CPU
# (checked on a tiny config with torch.equal); this full-size run was not repeated after the move.
# About 2,500 steps on one CPU thread. Needs the DRR reference render (rau drr, see chexanatomy_recipe.sh).
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
DATA=${DATA:-../shared/datasets}
$RAU train masktok --data runs/drr/train --data "$DATA/arcade_syntax/train" --out runs/masktok \
  --steps 2500 --batch-size 128 --lr 2e-3 --seed 0 --threads 1
# Ship (fp32, as now):  cp runs/masktok/final/{config.json,model.safetensors,training.json} src/rau/assets/masktok/
