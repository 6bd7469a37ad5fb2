#!/usr/bin/env bash
# Reference retrieval and k-reference fusion on Wingspan held-out (issue 4, item 3): the commands
# behind the table in docs/HISTORY.md. References: ids 0..159; targets: 160..199.
set -euo pipefail
RAU=${RAU:-.venv/bin/rau}
WS=${WS:-../shared/datasets/wingspan_cxr}
OUT=${OUT:-runs/bank}
M=${M:-registration}
mkdir -p $OUT
[ -f $OUT/wingspan_litemedsam.npz ] || $RAU index --dataset $WS --id-range 0:160 --out $OUT/wingspan_litemedsam.npz --encoder litemedsam
[ -f $OUT/wingspan_thumbnail.npz ] || $RAU index --dataset $WS --id-range 0:160 --out $OUT/wingspan_thumbnail.npz --encoder thumbnail
E="$RAU eval --targets $WS --references $WS --target-range 160:200 --reference-range 0:160 --method $M --no-progress"
$E --reference-choice random --out $OUT/${M}_random_k1.json
$E --bank $OUT/wingspan_thumbnail.npz --out $OUT/${M}_thumbnail_k1.json
$E --bank $OUT/wingspan_litemedsam.npz --out $OUT/${M}_litemedsam_k1.json
$E --bank $OUT/wingspan_thumbnail.npz --k-references 3 --out $OUT/${M}_thumbnail_k3.json
$E --bank $OUT/wingspan_litemedsam.npz --k-references 3 --out $OUT/${M}_litemedsam_k3.json
$E --reference-choice random --k-references 3 --out $OUT/${M}_random_k3.json
$RAU report $OUT/${M}_random_k1.json $OUT/${M}_thumbnail_k1.json $OUT/${M}_litemedsam_k1.json \
  $OUT/${M}_random_k3.json $OUT/${M}_thumbnail_k3.json $OUT/${M}_litemedsam_k3.json
