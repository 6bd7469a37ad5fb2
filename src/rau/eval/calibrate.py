"""``rau calibrate``: fit a method's confidence (:class:`rau.methods.confidence.Calibration`) on
the calibration splits (:data:`rau.eval.bench.CALIB_SPLITS`: Wingspan 120..159 against 0..119,
ARCADE train 600..999 against all of train, DRR poses of seed 3, and wrong inputs built from those),
which the bench never scores, nor any shipped model trains on (the refiner trains on Wingspan 0..119
and ARCADE train 0..599).

1. The method runs on every calibration pair with no calibration (``<work>/<split>_<method>.json``,
   the ``rau eval`` document; a split already there is reused, so a killed run resumes).
2. Each asked structure is a row: its features and whether it was right (Dice >= 0.5; no mask for
   a structure absent from the target). Rows of blank/noise targets (never run, answered "not
   there") only give ``target_rate``, their share right (Laplace-smoothed), which is their confidence.
3. Pair rules, set on the right rows of the correct-pair splits (not ``calib-wrong``): ``min_fit`` =
   midway between the 99% quantile of the wrong inputs' reference fit (other anatomy, modality,
   noise; mirrored targets are the "mirrored" rule's) and the lowest split's 1% quantile of right
   outputs' fit (calibration pairs have the most similar reference; a user's may be less alike).
   Pairs of different kinds of image (the image-kind rule, :func:`rau.methods.confidence.kind_reason`,
   tried first whatever the fit) are left out of those wrong inputs: the fit rule is set on what
   the image-kind rule leaves, and counts its rows as its own ("reference does not fit"); where it
   leaves none, ``min_fit`` is the right masks' 1% quantile (a same-kind reference that fits that
   badly is mostly wrong: without the rule, random-reference ARCADE outputs lost their ranking).
   Rows it catches, and those of the "mirrored" rule
   (:func:`rau.methods.confidence.mirror_reason`), get as confidence the share of right among the
   rows their rule caught, per structure name shrunk towards that rule's pooled share by a
   strength chosen by leave-one-target-out log loss (:func:`choose_strength`; ``rule_rates``: a
   mirrored radiograph's heart mask is usually right and its lungs are swapped, while an angiogram
   read against a chest is wrong whatever the name; with ``rule_rates=False`` one share for all,
   ``gated_rate``). With ``orientation_rule`` (off by default) ``min_orientation`` = the 1% quantile
   of the thumbnail orientation model's agreement over right masks is a rule too; by default the
   agreement is only a feature: as a rule it withheld 2 of the 40 correct Wingspan bench targets
   (which the registration-based rule reads as not mirrored, gain -0.09 and -0.08) and 28 right
   calibration outputs, and caught 2 more of the 12 mirrored calibration targets, none on the bench
   (docs/RESULTS.md). The orientation model (:func:`fit_orientation`) is fitted first, on
   calibration-side images only, if none ships.
   Random-reference twins of the splits (``calib-*-random``: each target with a seeded random
   reference, as a user's one reference may be) anchor the pair rules and nothing else: steps 4-6
   and the rules' shares read the other splits, and the twins' rows are scored by the fitted model
   as held-out data (``twins_rules_only``; fitted on them too, the model was under-confident on the
   bench's ARCADE pairs, docs/HISTORY.md 2026-12-06 s20).
4. On the other rows: an L2 logistic model on standardised features, out-of-fold (5 folds by
   target) probabilities mapped to the share right by isotonic regression (scipy), then the
   logistic refitted on all rows. With ``use_prior`` (default) one more feature,
   :data:`rau.methods.confidence.PRIOR_FEATURE`: the share right of the row's structure name
   (:func:`structure_rates`, shrunk towards the pooled share), computed for every row from the
   other folds only, so no row's feature holds its own outcome; the calibration stores the shares
   from all rows for use.
5. ``threshold`` = the lowest, over the correct-pair splits with at least 20 right masks, of
   :func:`keep_threshold` of their right masks' (out-of-fold) confidence: the most right masks
   withheld such that the 95% upper bound on the share withheld stays within 5% (withholding a
   right "not there" answer loses nothing: it stays "no"). The plain 5% quantile withheld 7-12% of
   right ARCADE masks on the bench: the quantile of ~100 masks is itself uncertain.
6. Presence (:func:`fit_presence`), where the correct-pair rows of step 4 hold at least
   :data:`MIN_ABSENT` structures absent from their target: the same kind of model for "is it in the
   target" (label: in the truth), its prior the per-name share present. Threshold: 0.5 (the likelier
   answer), lowered per split so that, together with the confidence threshold, at most 5% of right
   masks are withheld (the bound of step 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression, minimize

from rau.errors import RauInputError
from rau.methods.confidence import (
    FEATURES,
    PRIOR_FEATURE,
    RULES,
    TARGET_FEATURES,
    Calibration,
    Presence,
    kind_reason,
    mirror_reason,
    rule_key,
    with_derived,
)

MIN_ROWS = 20
#: A calibration split takes part in choosing the threshold when it has this many right masks.
MIN_SPLIT_MASKS = 20
#: Shrinkage of a structure's share of right outputs towards the pooled share, in pseudo-outputs:
#: a structure seen 5 times on the calibration split moves halfway from the pooled share.
PRIOR_STRENGTH = 5.0


def structure_rates(names: np.ndarray, right: np.ndarray, strength: float = PRIOR_STRENGTH) -> tuple[dict[str, float], float]:
    """Per structure name, the share of ``right`` shrunk towards the pooled share (``strength``
    pseudo-outputs), and the pooled share (Laplace-smoothed) -> (rates, pooled)."""
    pooled = float((right.sum() + 1) / (len(right) + 2))
    rates = {str(n): float((right[names == n].sum() + strength * pooled) / ((names == n).sum() + strength))
             for n in np.unique(names)}
    return rates, pooled


#: Shrinkage strengths tried for the per-rule rates (:func:`choose_strength`); the last one pools.
RULE_STRENGTHS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 1e9)


def choose_strength(names: np.ndarray, right: np.ndarray, groups: np.ndarray,
                    grid: tuple[float, ...] = RULE_STRENGTHS) -> float:
    """The shrinkage of :func:`structure_rates` with the least leave-one-target-out log loss
    (``groups``: each row's target): small where structures differ (a mirrored radiograph's heart
    against its lungs), pooled where they do not (an angiogram against a chest)."""
    best, best_loss = grid[-1], np.inf
    for strength in grid:
        loss = 0.0
        for g in np.unique(groups):
            out = groups == g
            rates, pooled = structure_rates(names[~out], right[~out], strength)
            p = np.clip([rates.get(str(n), pooled) for n in names[out]], 1e-6, 1 - 1e-6)
            loss -= float(np.sum(np.where(right[out], np.log(p), np.log1p(-p))))
        if loss < best_loss - 1e-12:
            best, best_loss = strength, loss
    return best


def keep_threshold(conf: np.ndarray, share: float = 0.05, level: float = 0.95, bound: bool = True) -> float:
    """A ``min_confidence`` that withholds few of these right masks' confidences ``conf``: with
    ``bound``, the most withheld (k of n) whose one-sided ``level`` Clopper-Pearson upper bound on
    the withheld share stays within ``share`` (so a new sample like this one withholds at most
    ``share`` with that confidence; for n < 59 none is withheld); without, the ``share`` quantile
    (at most ``share`` withheld on this very sample)."""
    from scipy.stats import beta

    c = np.sort(np.asarray(conf, np.float64))
    if not bound:
        return float(np.quantile(c, share, method="lower"))
    k = 0
    while k + 1 < len(c) and beta.ppf(level, k + 2, len(c) - k - 1) <= share:
        k += 1
    return float(c[k])  # outputs below it are withheld: at most k


def _prior_column(names: np.ndarray, right: np.ndarray, fold: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """:data:`PRIOR_FEATURE` of each row where ``fit`` (the rows a model is fitted on) is False or
    True: from the rows of the other folds among ``fit``, so no row's prior holds its own outcome."""
    col = np.zeros(len(names))
    for f in np.unique(fold):
        rates, pooled = structure_rates(names[fit & (fold != f)], right[fit & (fold != f)])
        sel = fold == f
        col[sel] = [rates.get(str(n), pooled) for n in names[sel]]
    return col


def calibration_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(features, right, target, split, structure, in_truth) of every assessed, asked structure in ``reports``;
    a blank or noise target's (never run) with ``features`` None and ``never_run`` True."""
    rows = []
    for doc in reports:
        split = doc.get("config", {}).get("split", "?")
        for r in doc["targets"]:
            if "right" in r and r.get("features"):
                rows.append({"features": r["features"], "right": bool(r["right"]), "target": f"{split}/{r['target']}",
                             "split": split, "structure": r.get("structure", ""), "in_truth": bool(r.get("in_truth"))})
            elif "right" in r and r.get("flag"):  # a blank or noise target: never run, no features
                rows.append({"features": None, "right": bool(r["right"]), "target": f"{split}/{r['target']}",
                             "split": split, "structure": r.get("structure", ""), "never_run": True})
    return rows


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (intercept unpenalised) -> (coef, intercept)."""
    n, d = x.shape

    def loss(w):
        z = x @ w[:d] + w[d]
        p = 1.0 / (1.0 + np.exp(-z))
        nll = np.sum(np.logaddexp(0, z) - y * z)
        g = np.concatenate([x.T @ (p - y) + l2 * w[:d], [np.sum(p - y)]])
        return nll + 0.5 * l2 * w[:d] @ w[:d], g

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B")
    return res.x[:d], float(res.x[d])


def _isotonic_map(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Isotonic fit of y on p -> breakpoints (x increasing, unique) for np.interp."""
    order = np.argsort(p, kind="stable")
    fitted = isotonic_regression(y[order].astype(np.float64), increasing=True).x
    xs, ys = p[order], fitted
    ux, inv = np.unique(xs, return_inverse=True)
    uy = np.bincount(inv, weights=ys) / np.bincount(inv)
    return ux.tolist(), uy.tolist()


def fit_calibration(rows: list[dict[str, Any]], method: str, *, folds: int = 5, seed: int = 0,
                    record: dict[str, Any] | None = None, use_prior: bool = True,
                    threshold_bound: bool = True, orientation_rule: bool = False,
                    drop: tuple[str, ...] = (), rule_rates: bool = True, presence: bool = True,
                    twins_rules_only: bool = True) -> Calibration:
    """Fit a :class:`Calibration` on ``rows`` (:func:`calibration_rows`); see the module docstring.
    ``twins_rules_only``: rows of random-reference twins (``calib-*-random``) anchor the pair rules
    and nothing else; the model, threshold, rule shares and presence are fitted on the other splits,
    and the twins' rows are scored by that model as held-out data."""
    from rau.eval.bench import RANDOM_SUFFIX

    never_run = [r for r in rows if r.get("never_run")]
    target_rate = float((sum(r["right"] for r in never_run) + 1) / (len(never_run) + 2)) if never_run else None
    rows = [r for r in rows if not r.get("never_run")]
    if len(rows) < MIN_ROWS:
        raise RauInputError(f"calibrate: {len(rows)} assessed outputs, need at least {MIN_ROWS}")
    rows = [{**r, "features": with_derived(r["features"])} for r in rows]  # reports from before a derived feature
    y_all = np.array([r["right"] for r in rows], bool)
    if y_all.all() or not y_all.any():
        raise RauInputError("calibrate: the outputs are all right or all wrong; nothing to calibrate on")
    fit = np.array([r["features"]["fit"] for r in rows])
    orient = np.array([r["features"]["orientation"] for r in rows])
    # the rules are set on correct pairs (a wrong-input split's right outputs are luck, e.g. a heart
    # found on a mirrored target): at most 1% of their right outputs are caught
    correct = y_all & np.array(["wrong" not in r["split"] for r in rows])
    if not correct.any():
        raise RauInputError("calibrate: no right output on a correct-pair split")
    found = np.array([r["features"]["found"] > 0 for r in rows])
    # orientation matters where a mask was found: a right "not there" answer is right either way round
    min_orient = float(np.quantile(orient[correct & found], 0.01)) if (correct & found).any() else -1.0
    if not orientation_rule:  # the agreement stays a feature of the logistic model
        min_orient = None
    # fit: the rule sits midway between the wrong inputs' fits (other anatomy, modality, noise) and the
    # lowest split's 1% quantile of right masks' fits (a withheld right "not there" loses nothing), over
    # the correct-pair splits with enough right masks (a random-reference twin holds pairs less alike
    # than the most similar ones)
    split_of = np.array([r["split"] for r in rows])
    anchor = rule_anchor(rows, correct & found)
    hi = min(float(np.quantile(fit[anchor & (split_of == sp)], 0.01)) for sp in sorted(set(split_of[anchor])))
    # (mirrored targets are the orientation rule's: they fit their reference as well as right ones;
    # pairs of different kinds of image are the image-kind rule's, tried first, whatever the fit)
    other_kind = np.array([kind_reason(r["features"]) is not None for r in rows])
    bad = ~y_all & ~other_kind & np.array(["wrong" in r["split"] and "/mirror_" not in r["target"] for r in rows])
    lo = float(np.quantile(fit[bad], 0.99)) if bad.any() else hi
    # where the kind rule caught every wrong input the rule stays at the right masks' 1% quantile: a
    # same-kind reference that fits that badly is mostly wrong (random ARCADE pairs, docs/HISTORY.md s21)
    min_fit = (lo + hi) / 2 if lo < hi else hi
    # the "mirrored" rule (rau.methods.confidence.mirror_reason) withholds its rows whatever the fit
    mirrored = np.array([mirror_reason(r["features"]) is not None for r in rows])
    caught = {"fit": other_kind | (fit < min_fit), "mirrored": mirrored,
              "orientation": (orient < min_orient) if min_orient is not None else np.zeros(len(rows), bool)}
    gated = caught["fit"] | caught["mirrored"] | caught["orientation"]
    gated_rate = float((y_all[gated].sum() + 1) / (gated.sum() + 2))
    all_names = np.array([r.get("structure", "") for r in rows], object)
    twin = np.char.endswith(split_of.astype(str), RANDOM_SUFFIX) & twins_rules_only
    rule_of = np.full(len(rows), "", object)  # each row's first rule that catches it, as in Calibration.pair_rule
    for rule in reversed(RULES):
        rule_of[caught[rule]] = rule
    # with or without a mask apart (rule_key): an angiogram's "not there" is right, its mask never
    key_of = np.array([rule_key(k, f) if k else "" for k, f in zip(rule_of, found)], object)
    all_targets = np.array([r["target"] for r in rows])
    per_rule, rule_pooled, rule_strength = {}, {}, {}
    for rule in [rule_key(k, f) for k in RULES for f in (True, False)]:
        sel = (key_of == rule) & ~twin
        if rule_rates and sel.any():
            targets = all_targets[sel]
            strength = choose_strength(all_names[sel], y_all[sel], targets) if len(np.unique(targets)) > 1 else 1e9
            per_rule[rule], rule_pooled[rule] = structure_rates(all_names[sel], y_all[sel], strength)
            rule_strength[rule] = strength
    keep = ~gated & ~twin
    # a feature some rows lack (reports written before it existed) is left out, but one that only some
    # structures have (TARGET_FEATURES) is kept where any fitted row has it, the others reading its mean
    measured = [k for k in FEATURES if k not in drop and (all(k in r["features"] for r in rows) or (
        k in TARGET_FEATURES and any(k in r["features"] for r, g in zip(rows, keep) if g)))]
    feature_names = measured + ([PRIOR_FEATURE] if use_prior else [])
    x = feature_matrix([r for r, g in zip(rows, keep) if g], measured)
    names = np.array([r.get("structure", "") for r, g in zip(rows, keep) if g], object)
    groups = np.array([r["target"] for r, g in zip(rows, keep) if g])
    model = _fit_model(x, y_all[keep], names, groups, folds=folds, seed=seed, use_prior=use_prior)
    cal = Calibration(method, model["mean"], model["std"], model["coef"], model["intercept"], model["iso_x"],
                      model["iso_y"], 0.0, min_fit, min_orient, gated_rate, feature_names, dict(record or {}),
                      model["rates"], model["pooled"], target_rate, per_rule, rule_pooled)
    # rule-withheld rows: their rule's rate for their name (withheld by the rule whatever the threshold)
    conf = np.array([cal.rule_confidence(k, str(n), f) if k else 0.0 for k, n, f in zip(rule_of, all_names, found)])
    conf[keep] = model["oof"]  # out-of-fold: the threshold is not set on fitted values
    held = twin & ~gated  # never fitted on: scored by the fitted model, out of sample
    if held.any():
        conf[held] = cal.predict([r["features"] for r, h in zip(rows, held) if h], list(all_names[held]))
    # a withheld right mask is lost; a withheld right "not there" loses nothing (it stays "no").
    # Every correct-pair split with enough right masks keeps >= 95% of them (pooled, the split with
    # the most structures would set it alone: DRR has 24 per target, Wingspan 3).
    cuts = []
    for split in sorted(set(split_of[~twin])):
        sel = correct & found & (split_of == split)
        if sel.sum() >= MIN_SPLIT_MASKS:
            cuts.append(keep_threshold(conf[sel], bound=threshold_bound))
    cal.threshold = min(cuts) if cuts else keep_threshold(conf[correct & found & ~twin], bound=threshold_bound)
    cal.record.update({"n_outputs": len(rows), "n_right": int(y_all.sum()), "n_gated": int(gated.sum()),
                       "n_never_run": len(never_run), "rule_strength": rule_strength,
                       "twins_rules_only": bool(twin.any()),
                       "splits": sorted({r["split"] for r in rows}), "out_of_fold": _oof_summary(rows, y_all, conf)})
    if presence:
        on = keep & np.array(["wrong" not in r["split"] and "in_truth" in r for r in rows])
        pres = fit_presence([r for r, g in zip(rows, on) if g], measured, folds=folds, seed=seed,
                            withheld=conf[on] < cal.threshold)
        cal.presence = None if pres is None else dataclasses.asdict(pres)
    return cal


def rule_anchor(rows: list[dict[str, Any]], right_masks: np.ndarray) -> np.ndarray:
    """The rows the pair rules are set on: ``right_masks`` (right masks on correct pairs) of the splits
    holding at least :data:`MIN_SPLIT_MASKS` of them (all of them where none does): a split with a handful
    of right masks, such as ARCADE with random references (19 of ~600 outputs), would set the rules
    on luck."""
    split_of = np.array([r["split"] for r in rows])
    enough = [sp for sp in set(split_of[right_masks]) if (right_masks & (split_of == sp)).sum() >= MIN_SPLIT_MASKS]
    return right_masks & np.isin(split_of, enough) if enough else right_masks


def feature_matrix(rows: list[dict[str, Any]], measured: list[str]) -> np.ndarray:
    """(rows, features) float64; a feature a row lacks (only :data:`TARGET_FEATURES` may be lacking) is NaN,
    which :func:`_fit_model` reads as the column's mean."""
    return np.array([[r["features"][k] if k not in TARGET_FEATURES else r["features"].get(k, np.nan)
                      for k in measured] for r in rows], np.float64).reshape(len(rows), len(measured))


def _fit_model(x: np.ndarray, y: np.ndarray, names: np.ndarray, groups: np.ndarray, *, folds: int, seed: int,
               use_prior: bool) -> dict[str, Any]:
    """The logistic + isotonic model of step 4 (module doc) for labels ``y`` on features ``x`` (rows
    of targets ``groups``, structures ``names``; with ``use_prior`` a last column, the shrunk share of
    ``y`` per name, from the other folds) -> mean, std, coef, intercept, iso_x, iso_y (the model),
    rates, pooled (the shares per name), oof (each row's out-of-fold calibrated probability)."""
    y = np.asarray(y, np.float64)
    x = np.array(x, np.float64)
    gaps = np.isnan(x)
    if gaps.any():  # a feature some rows lack reads as the mean of those that have it (0 where none has it)
        fill = np.array([col[~np.isnan(col)].mean() if (~np.isnan(col)).any() else 0.0 for col in x.T])
        x[gaps] = np.broadcast_to(fill, x.shape)[gaps]
    uniq = np.unique(groups)
    fold_of = dict(zip(uniq, np.random.default_rng(seed).permutation(len(uniq)) % folds))
    fold = np.array([fold_of[g] for g in groups])
    if use_prior:  # the final model reads each row's prior from the other folds (no row sees its own outcome)
        x = np.column_stack([x, _prior_column(names, y, fold, np.ones(len(y), bool))])
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-9] = 1.0
    z = (x - mean) / std
    oof = np.zeros(len(y))
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        zf = z
        if use_prior:  # priors from the training folds only, each training row's from the folds other than its own
            col = _prior_column(names, y, fold, ~test)
            zf = z.copy()
            zf[:, -1] = (col - mean[-1]) / std[-1]
        coef, b = _logistic(zf[~test], y[~test])
        oof[test] = 1.0 / (1.0 + np.exp(-(zf[test] @ coef + b)))
    iso_x, iso_y = _isotonic_map(oof, y)
    coef, b = _logistic(z, y)
    rates, pooled = structure_rates(names, y) if use_prior else ({}, 0.5)
    return {"mean": mean.tolist(), "std": std.tolist(), "coef": coef.tolist(), "intercept": b, "iso_x": iso_x,
            "iso_y": iso_y, "rates": rates, "pooled": pooled, "oof": np.interp(oof, iso_x, iso_y)}


#: A presence model is fitted only when the calibration outputs hold this many absent structures.
MIN_ABSENT = 20
#: The presence threshold's ceiling: below it "absent" is the likelier answer.
PRESENCE_CEILING = 0.5


def fit_presence(rows: list[dict[str, Any]], measured: list[str], *, folds: int = 5, seed: int = 0,
                 withheld: np.ndarray | None = None) -> Presence | None:
    """:class:`rau.methods.confidence.Presence` on ``rows`` (correct-pair calibration outputs not
    caught by a pair rule, each with ``in_truth``), features ``measured`` + the per-name share present,
    or None with fewer than :data:`MIN_ABSENT` absent structures. Threshold: at most
    :data:`PRESENCE_CEILING`, and per split with enough right masks at most :func:`keep_threshold` of
    their out-of-fold presence among the right masks the confidence threshold keeps (``withheld``:
    those it withholds), so that the two rules together keep >= 95% of right masks."""
    from rau.metrics import auroc

    present = np.array([r["in_truth"] for r in rows], bool)
    if (~present).sum() < MIN_ABSENT or present.sum() < MIN_ABSENT:
        return None
    x = feature_matrix(rows, measured)
    names = np.array([r.get("structure", "") for r in rows], object)
    groups = np.array([r["target"] for r in rows])
    model = _fit_model(x, present, names, groups, folds=folds, seed=seed, use_prior=True)
    oof = model["oof"]
    withheld = np.zeros(len(rows), bool) if withheld is None else np.asarray(withheld, bool)
    right_mask = np.array([r["right"] and r["features"].get("found", 0) > 0 for r in rows], bool)
    split_of = np.array([r["split"] for r in rows])
    threshold = PRESENCE_CEILING
    for split in sorted(set(split_of)):
        sel = right_mask & (split_of == split)
        if sel.sum() < MIN_SPLIT_MASKS:
            continue
        # masks the confidence threshold already withholds count against the same 5%
        already = int((sel & withheld).sum())
        kept = np.sort(oof[sel & ~withheld])
        cut = keep_threshold(np.concatenate([np.full(already, -1.0), kept]))
        threshold = min(threshold, max(cut, 0.0))
    said_present = oof >= threshold
    record = {"n": len(rows), "n_absent": int((~present).sum()), "out_of_fold": {
        str(split): {"n": int((split_of == split).sum()), "auroc": auroc(oof[split_of == split], present[split_of == split]),
                "identification": float((said_present == present)[split_of == split].mean()),
                "right_masks_withheld": float((~said_present & right_mask & (split_of == split)).sum()
                                              / max(1, (right_mask & (split_of == split)).sum()))}
        for split in sorted(set(split_of))}}
    return Presence([*measured, PRIOR_FEATURE], model["mean"], model["std"], model["coef"], model["intercept"],
                    model["iso_x"], model["iso_y"], float(threshold), model["rates"], model["pooled"], record)


def _oof_summary(rows: list[dict[str, Any]], right: np.ndarray, conf: np.ndarray) -> dict[str, dict[str, float]]:
    """Per calibration split, AUROC and ECE of the out-of-fold confidence (rule-withheld rows at
    their rule's rate, which is not out-of-fold): how well the calibration does on rows it was not
    fitted on."""
    from rau.eval.evaluate import calibration_summary

    out = {}
    for split in sorted({r["split"] for r in rows}):
        sel = np.array([r["split"] == split for r in rows])
        s = calibration_summary([{"right": bool(a), "confidence": float(c)} for a, c in zip(right[sel], conf[sel])])
        out[split] = {"n": int(sel.sum()), "auroc": s["auroc"], "ece": s["ece"]}
    return out


def fit_orientation(images: list[np.ndarray], size: int = 16, l2: float = 1.0, record: dict | None = None):
    """:class:`rau.methods.confidence.Orientation` from ``images`` in their usual orientation: each
    image and its mirror image are the two classes of a logistic model without intercept on
    :func:`rau.methods.confidence.orientation_features` (odd under mirroring, so no intercept)."""
    from rau.methods.confidence import Orientation, orientation_features

    if len(images) < 4:
        raise RauInputError(f"orientation: {len(images)} images, need at least 4")
    feats = np.stack([orientation_features(im, size) for im in images])
    x = np.concatenate([feats, -feats])  # the mirror image's features are the negatives
    y = np.concatenate([np.zeros(len(feats)), np.ones(len(feats))])
    coef, _ = _logistic(x, y, l2)
    # label 1 = mirrored, so the "usual orientation" score is the negative of the logit
    return Orientation(size, (-coef).tolist(), dict(record or {}, n_images=len(images)))


def orientation_images(data: Path, drr_dir: Path, per_set: int = 120) -> list[np.ndarray]:
    """Calibration-side images in their usual orientation (never a bench target): Wingspan
    0..119, DRR training poses (seed 0), ARCADE train; up to ``per_set`` of each."""
    from rau.data.dataset import load_dataset

    out = []
    for root, sl in ((data / "wingspan_cxr", slice(0, 120)), (drr_dir / "train", None),
                     (data / "arcade_syntax" / "train", None)):
        ds = load_dataset(root).slice(sl)
        step = max(1, len(ds) // per_set)
        out += [ds.load(e, []).image for e in ds.entries[::step][:per_set]]
    return out


def visibility_trained_on(folder: str | Path, model=None) -> bool:
    """Whether the visibility model (default: the shipped one) trained on images of dataset ``folder``:
    one of its training sources is that folder (by its last two path parts, e.g. ``arcade_syntax/train``,
    so a relative path recorded elsewhere still matches). False without the model."""
    from rau.methods.confidence import default_visibility

    model = model if model is not None else default_visibility()
    if model is None:
        return False
    tail = Path(folder).resolve().parts[-2:]
    sources = (model.training or {}).get("data", {}).get("sources", [])
    return any(Path(src[0]).resolve().parts[-2:] == tail for src in sources)


def run_calibration(method: str, out: Path, work: Path, *, data: Path, drr_dir: Path, method_options: dict[str, Any],
                    quick: bool = False, seed: int = 0, progress: bool = True, argv: list[str] | None = None,
                    k: int = 1, splits: Sequence[str] | None = None, memory_route: bool = False) -> Calibration:
    """Run ``method`` on the calibration splits (reusing ``work/<split>_<method>.json``), fit, save to ``out``.
    ``k`` > 1: each target with the top k references of the split's LiteMedSAM bank, as ``rau bench
    --k-references K`` runs it (``work/<split>_<method>_k<K>.json``); the fit then also reads the
    k-reference features (:data:`rau.methods.confidence.K_FEATURES`) of methods that fuse in memory.
    ``splits``: the calibration splits (default :data:`rau.eval.bench.CALIB_SPLITS`; e.g.
    ``calib-arcade-val`` in place of ``calib-arcade`` for a model trained on all of ARCADE train).
    ``memory_route``: fit only the outputs that carry ``second_opinion`` (the targets where ``reg-refine``'s
    memory segmenter delivers: angiograms), the calibration :attr:`rau.methods.interfaces.Method.calibration_memory`
    reads; the method must run with its second opinion delivering."""
    from rau.atomic import write_json
    from rau.eval.bench import (
        CALIB_SPLITS,
        ensure_drr,
        git_commit,
        machine_line,
        needs_calib_drr,
        report_name,
        resolve_splits,
        run_bench,
    )

    from rau.methods import confidence

    work.mkdir(parents=True, exist_ok=True)
    split_names = list(splits or CALIB_SPLITS)
    orientation = confidence.default_orientation() is None  # its images include DRR training poses
    if orientation or needs_calib_drr(split_names):  # no DRR render for calibrations without DRR splits
        ensure_drr(drr_dir, quick, calib=needs_calib_drr(split_names))
    if orientation:
        orient = fit_orientation(orientation_images(data, drr_dir), record={"command": "rau " + " ".join(argv or []),
                                                                             "commit": git_commit()})
        orient.save(confidence.CALIBRATION_DIR / "orientation.json")
        confidence._ORIENTATION.clear()
    splits = resolve_splits(split_names, data, drr_dir, quick=quick, limit=None)
    reports = []
    options = {**method_options, "calibration": False}
    for split in splits:
        path = work / report_name(split.name, method, k)
        if path.is_file():
            reports.append(json.loads(path.read_text()))
            continue
        reports += run_bench(work, methods=[method], splits=[split], method_options=options, seed=seed,
                             progress=progress, k=k)[split.name]
    record = {"command": "rau " + " ".join(argv or []), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": git_commit(), "machine": machine_line(), "k_references": k,
              "reports": [str(work / report_name(s.name, method, k)) for s in splits],
              # fitted decoding every structure (--decode-unknown); absent: copying those the model never trained on
              **({"follow_unknown": False} if method_options.get("follow_unknown") is False else {}),
              # the VLM methods' mode (--segment-all / --segment-visible) as their reports record it; absent: no such choice
              **{"segment_all": r["config"]["segment_all"] for r in reports if "segment_all" in r.get("config", {})}}
    # a calibration split drawn from the visibility model's own training images would read it at its
    # training fit (ARCADE train: calib-arcade), and so would the second opinion's memory segmenter,
    # trained on all of ARCADE train too: both features are left out of such a calibration
    seen = sorted({r["config"]["targets"] for r in reports if visibility_trained_on(r["config"]["targets"])})
    if seen:
        record["left_out"] = {"features": list(TARGET_FEATURES),
                              "why": f"the visibility model and the memory segmenter trained on {seen}"}
    rows = calibration_rows(reports)
    if memory_route:  # the outputs a second opinion delivered, apart: their masks come from another segmenter
        rows = [r for r in rows if r["features"] and "second_opinion" in r["features"]]
        record["memory_route"] = True
    cal = fit_calibration(rows, method, seed=seed, record=record, drop=TARGET_FEATURES if seen else ())
    cal.save(out)
    write_json(work / f"calibration_{method}.json", cal.to_json())
    return cal
