"""Presence reliability on the ARCADE bench rows: P(present) against the share present, the figure in
docs/RESULTS.md ("Presence"). Reads the reports of `rau bench --out runs/bench_s13_rr ... --methods reg-refine` and
`rau bench --out runs/bench_s13_mem ... --methods sam2-memory`; run `.venv/bin/python scripts/presence_figure.py`."""
import json
from rau.eval.evaluate import calibration_summary
from rau.eval.plots import reliability_plot
docs = []
for f in ["runs/bench_s13_rr/arcade_reg-refine.json", "runs/bench_s13_mem/arcade_sam2-memory.json"]:
    d = json.load(open(f))
    rows = [{"right": bool(r["in_truth"]), "confidence": r["presence"]} for r in d["targets"]
            if r.get("asked") and r.get("presence") is not None]
    docs.append({"method": d["method"], "config": {}, "calibration": calibration_summary(rows)})
    print(d["method"], "presence ECE", round(docs[-1]["calibration"]["ece"], 3))
p = reliability_plot(docs, "docs/images/results/presence_reliability_arcade.png", title="ARCADE bench: presence",
                     xlabel="presence (calibrated P(in target))", ylabel="share in the target")
print(p)
