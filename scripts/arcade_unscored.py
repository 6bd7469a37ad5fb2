"""Score methods on the ARCADE val targets that neither ``rau bench`` nor ``calib-arcade-val`` uses.

ARCADE val has 200 images: the bench's ``arcade`` split scores a seeded 50 (``--limit 50 --seed 0``),
``calib-arcade-val`` a seeded 120 of the other 150, and the last 30 are scored by nothing else (no
training reads val). A change judged on bench figures already seen can be checked here once.
Each target gets the default NCC reference from ARCADE train, as in ``rau eval``.

Usage:
    python scripts/arcade_unscored.py OUT_DIR [METHOD[:OPTION=VALUE,...] ...]
e.g. ``python scripts/arcade_unscored.py runs/s29/check30 reg-refine reg-refine:angiogram_masks=memory``
writes one ``rau eval`` report per method to OUT_DIR (``<method>[_<value>...].json``).
"""
import sys
from pathlib import Path

from rau.atomic import write_json
from rau.data.dataset import Dataset, load_dataset
from rau.eval.bench import resolve_splits, without_pick
from rau.eval.evaluate import evaluate, select_targets
from rau.methods import create_method

DATA = Path("../shared/datasets/arcade_syntax")


def unscored(seed: int = 0) -> Dataset:
    """ARCADE val less the targets of the bench's ``arcade`` split and of ``calib-arcade-val``, as
    :func:`rau.eval.bench.resolve_splits` defines them (``rau bench`` / ``rau calibrate`` pick them the same way)."""
    bench, calib = resolve_splits(["arcade", "calib-arcade-val"], DATA.parent, Path("runs/drr"), quick=False, limit=None)
    val = load_dataset(bench.targets)
    scored = {e.id for e in select_targets(val, bench.limit, seed).entries}
    scored |= {e.id for e in select_targets(without_pick(val, calib.without_pick, seed), calib.limit, seed).entries}
    keep = [e for e in val.entries if e.id not in scored]
    assert len(keep) == len(val) - bench.limit - calib.limit
    return Dataset(val.root, keep, val.layout)


def main() -> None:
    out = Path(sys.argv[1])
    targets, references = unscored(), load_dataset(DATA / "train")
    for spec in sys.argv[2:] or ["reg-refine"]:
        name, _, opts = spec.partition(":")
        options = dict(o.split("=", 1) for o in opts.split(",") if o)
        report = evaluate(targets, references, create_method(name, **options), progress=False,
                          config={"targets": "ARCADE val, the 30 targets outside the bench and calib-arcade-val",
                                  "references": str(DATA / "train"), "method": name, **options, "argv": sys.argv[1:]})
        path = out / ("_".join([name, *options.values()]) + ".json")
        write_json(path, report)
        print(f"{spec}: {report['n_targets']} targets, Dice {report['mean']['dice']:.3f} -> {path}", flush=True)


if __name__ == "__main__":
    main()
