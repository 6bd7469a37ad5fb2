"""rau-refine's rule: consensus where the VLM route and the reference route agree, the reference
route where they do not, whichever route found the structure when only one did."""

import numpy as np

from rau.data.annotated import StructureResult
from rau.methods.agreement import agree, consensus


def _square(y0, x0, side, shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_consensus_puts_the_boundary_halfway():
    a, b = _square(10, 10, 20), _square(10, 14, 20)  # b shifted right by 4 px
    c = consensus(a, b, 1.0)
    cols = np.nonzero(c[20])[0]
    assert cols.min() == 12 and cols.max() == 31


def test_agree_rules():
    near, far, ref = _square(10, 10, 20), _square(40, 40, 20), _square(10, 12, 20)
    vlm = StructureResult("x", "yes", (10, 10, 30, 30), 0.8, near)
    r = StructureResult("x", "yes", (12, 10, 32, 30), 0.6, ref)
    out, rule = agree(vlm, r, 0.5, 1.0)
    assert rule == "consensus" and out.found and abs(out.score - 0.7) < 1e-9
    out, rule = agree(StructureResult("x", "yes", None, 0.8, far), r, 0.5, 1.0)
    assert rule == "reference" and (out.mask == ref).all()
    none = StructureResult("x", "no", None, 0.0, None, "the warped reference mask left the target image")
    out, rule = agree(vlm, none, 0.5, 1.0)
    assert rule == "vlm" and (out.mask == near).all()
    out, rule = agree(StructureResult("x", "no", None, 0.0, None, "not visible"), none, 0.5, 1.0)
    assert rule == "reference" and not out.found and out.reason
