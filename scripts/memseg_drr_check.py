"""Issue 15 check: a memseg checkpoint vs registration on held-out DRR poses (same pairs), held-out
families (clavicles, scapulae) and seen structures. Usage: python scripts/memseg_drr_check.py RUN/final OUT_PREFIX N_TARGETS"""
import json, sys
from rau.data.dataset import load_dataset
from rau.eval.evaluate import evaluate
from rau.methods import create_method
from rau.methods.interfaces import Method
from rau.methods.memseg import MemSegSegmenter

ckpt, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
structs = ["left_clavicle", "right_clavicle", "left_scapula", "right_scapula", "left_lung", "right_lung", "heart",
           "trachea", "aorta", "vertebra_T6"]
tset, rset = load_dataset("runs/drr_full/test"), load_dataset("runs/drr_full/train")
docs = {}
for name, method in (("memseg", Method("memseg", None, MemSegSegmenter(ckpt, precision="bf16"))),
                     ("registration", create_method("registration"))):
    doc = evaluate(tset, rset, method, structures=structs, limit=limit, seed=0, progress=False)
    docs[name] = doc
    json.dump(doc, open(f"{out}_{name}.json", "w"), default=str)
print("| structure | memseg | registration |\n|---|---|---|")
for s in structs:
    a, b = docs["memseg"]["per_structure"].get(s, {}), docs["registration"]["per_structure"].get(s, {})
    print(f"| {s} | {a.get('dice', float('nan')):.3f} | {b.get('dice', float('nan')):.3f} |")
print(f"| mean | {docs['memseg']['mean']['dice']:.3f} | {docs['registration']['mean']['dice']:.3f} |")
print("s/target", docs["memseg"]["mean"].get("seconds"), docs["registration"]["mean"].get("seconds"))
