"""The submit stage's work: the candidates' ensembles, the choice among them on val, the submission
written, checked and scored (the file's format and its checks: :mod:`.format`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k import common
from products10k.choose import (
    NoiseAwareChoice,
    adjust,
    best,
    coverage,
    row_weights,
    score_taus,
    target_prior,
)
from products10k.common import DataError, Products10kError
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map
from products10k.ensemble import resolve_weights
from products10k.estimate import log_train_prior
from products10k.scores import combine_topk, load_predictions, log_likelihood
from products10k.submission.format import (
    align_to_test_list,
    build_submission,
    fallback_scores,
    log_fallback,
    read_excluded_test_names,
    read_test_list,
    validate_submission,
)
from products10k.submission.leaderboard import score_submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoiceSpec:
    """How the submission is chosen on val (products10k/choose.py): the SKU mix test
    follows (``evaluate.target_prior``), the logit-adjustment taus to try, the reference output the
    choice starts from (``submit.reference``; None: the first candidate), the confidence of the
    intervals (``submit.confidence``) and how many labels per row logit adjustment re-ranks
    (``submit.rerank_k``)."""

    target_prior: str
    taus: tuple[float, ...]
    reference: str | None
    confidence: float
    rerank_k: int


def make_submission(
    *,
    members: list[str],
    prediction_paths: dict[str, str | os.PathLike] | None = None,
    candidates: dict[str, dict[str, str | os.PathLike]] | None = None,
    choice: ChoiceSpec,
    weights_spec: str | dict,
    label_map_path: str | os.PathLike,
    test_list_path: str | os.PathLike,
    out: str | os.PathLike,
    top_k_out: str | os.PathLike,
    top_k: int,
    report_path: str | os.PathLike | None = None,
) -> dict:
    """Ensemble the members' predictions, validate and write the submission; return its metrics.

    ``candidates``: ``{name: {member: predictions file}}`` to choose from on val (products10k/
    products10k/choose.py, as ``choice`` says), each with every tau of logit adjustment; or one set of
    ``prediction_paths``. Nothing is written unless every check passes: members agree on the label
    map and the rows, the predictions cover the test list exactly (except the test images the
    prepare report ``report_path`` lists as excluded: they get the fallback, see the module
    docstring; without a report every test image needs a prediction), and the submission validates.
    """
    label_map = read_label_map(label_map_path, LABEL_MAP_ALL_COLUMNS)
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    test_list = read_test_list(test_list_path)
    if candidates is None:
        candidates = {Path(next(iter(prediction_paths.values()))).parent.name: prediction_paths}
    target = target_prior(choice.target_prior, label_map)
    log_prior = log_train_prior(label_map)
    reference = choice.reference if choice.reference in candidates else next(iter(candidates))
    k = max(top_k, choice.rerank_k)
    ensembles = (  # one at a time, the reference's first: memory stays one candidate's besides the pick's
        (name, _ensemble(members, candidates[name], weights_spec, skus, label_map_path, k, target))
        for name in [reference, *(name for name in candidates if name != reference)]
    )
    compared = len(candidates) * len(choice.taus) - 1
    rule, chosen = _choose(ensembles, members[0], target, log_prior, choice, (reference, compared))
    pick = rule.pick
    preds, weights = chosen["preds"], chosen["weights"]
    first = members[0]
    log.info("ensemble weights: %s", ", ".join(f"{m}={w:.3f}" for m, w in weights.items()))
    _log_choice(rule, choice.target_prior)
    val_ens, test_ens = chosen["val"], chosen["test"]
    for ens in (val_ens, test_ens):
        ens.labels, ens.probs = (a[:, :top_k] for a in adjust(ens.labels, ens.probs, log_prior, pick.tau))

    submission, topk, fallback_names = _write_submission(
        preds[first].test.names,
        test_ens,
        test_list,
        label_map,
        where=f"{candidates[pick.candidate][first]} vs {test_list_path}",
        outs=(Path(out), Path(top_k_out)),
        report_path=report_path,
        test_list_path=test_list_path,
    )
    val_labels = preds[first].val.labels
    known = val_labels >= 0
    return {
        "test": {**score_submission(submission, topk, test_list), "fallback_rows": len(fallback_names)},
        # in-sample: the ensemble weights were fitted on these very rows (ensemble.weights: fit), and
        # each member's best epoch chosen on them; the name says so wherever the figure is shown
        "val_in_sample": {
            "top1": float((val_ens.labels[:, 0] == val_labels)[known].mean())
            if known.any()
            else float("nan"),
            "log_likelihood": log_likelihood(val_ens.label_logprob, val_labels),
        },
        "choice": _choice_report(rule, choice, coverage(val_labels, target), list(candidates)),
        "ensemble": _ensemble_report(members, weights, test_ens),
    }


def _choose(ensembles, first: str, target, log_prior, choice: ChoiceSpec, against: tuple[str, int]):
    """Every candidate's choices scored on val against the reference (fed first); the rule and the
    pick's ensembles, the only ones kept besides the candidate in hand."""
    (reference, compared), taus = against, choice.taus
    ref_tau = 0.0 if 0.0 in taus else taus[0]
    rule, chosen = None, None
    for name, ens in ensembles:
        rows = _score_candidate(name, ens, first, target, log_prior, taus)
        if rule is None:
            weights = row_weights(ens["preds"][first].val.labels, target)
            rule = NoiseAwareChoice(
                (reference, ref_tau), weights, compared=compared, confidence=choice.confidence
            )
            rule.add(rows)
            chosen = ens
        elif rule.add(rows):
            chosen = ens
    return rule, chosen


def _choice_report(rule: NoiseAwareChoice, choice: ChoiceSpec, val_coverage: float, names: list[str]) -> dict:
    """metrics/submission.json's ``choice``: the pick, the rule, and every candidate in params order."""
    listed = [(name, tau) for name in names for tau in choice.taus]
    return {
        **rule.pick.as_dict(),
        "target_prior": choice.target_prior,
        "val_coverage": round(val_coverage, 6),
        **rule.report(),
        "reason": _reason(rule, choice.target_prior),
        "candidates": [
            s.as_dict() for s in sorted(rule.scored, key=lambda s: listed.index((s.candidate, s.tau)))
        ],
    }


def _log_choice(rule: NoiseAwareChoice, target_prior_spec: str) -> None:
    pick, top = rule.pick, best(rule.scored)
    log.info(
        "submitting %s with logit adjustment tau %g: val estimate %.4f (target prior %s), gain over the "
        "reference %s %+.4f of %d choices",
        pick.candidate, pick.tau, pick.val_estimate, target_prior_spec, rule.reference.candidate,
        pick.gain, len(rule.scored),
    )  # fmt: skip
    if top is not pick:
        log.info(
            "the highest val estimate, %s tau %g (%.4f), leads the reference by %+.4f [%+.4f, %+.4f]: "
            "inside val's noise for %d choices, not taken",
            top.candidate, top.tau, top.val_estimate, top.gain, top.low, top.high, rule.compared,
        )  # fmt: skip


def _reason(rule: NoiseAwareChoice, target_prior_spec: str) -> str:
    ref = rule.reference
    how = (
        "the reference"
        if rule.pick is ref
        else "the highest val estimate whose gain over the reference lies above zero"
    )
    return (
        f"{how} ({ref.candidate} at tau {ref.tau:g}) of {len(rule.scored)} candidate x tau choices, each "
        f"scored by val top-1 weighted to the {target_prior_spec} SKU mix with its paired interval against "
        f"the reference at {rule.level:.5f} (Bonferroni for {rule.compared}); test top-1 is recorded, "
        "never used"
    )


def _ensemble_report(members: list[str], weights: dict, test_ens) -> dict:
    uncertain = int(test_ens.uncertain_top1.sum())
    if uncertain:
        log.info(
            "%d test row(s) have an ensemble top-1 margin within the top-k estimate's error bound "
            "(evaluate.top_k); raise evaluate.top_k to make them exact",
            uncertain,
        )
    return {
        "size": len(members),
        "weights": weights,
        # how far the top-k files may put any ensemble probability from the exact average
        "max_prob_error": float(test_ens.error_bound.max(initial=0.0)),
        "uncertain_top1_rows": uncertain,
    }


def _score_candidate(name: str, ens: dict, first: str, target, log_prior, taus) -> list:
    """One candidate's val estimate at every tau; its test top-1 for the record only (the choice is
    made on val)."""
    val_labels, test_labels = ens["preds"][first].val.labels, ens["preds"][first].test.labels
    rows = score_taus(name, ens["val"].labels, ens["val"].probs, val_labels,
                      row_weights(val_labels, target), log_prior, taus)  # fmt: skip
    known = test_labels >= 0
    for s in rows:
        top1 = adjust(ens["test"].labels, ens["test"].probs, log_prior, s.tau)[0][:, 0]
        s.test_top1 = float((top1 == test_labels)[known].mean()) if known.any() else None
    return rows


def _write_submission(
    test_names,
    test_ens,
    test_list,
    label_map,
    *,
    where: str,
    outs: tuple[Path, Path],
    report_path,
    test_list_path,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Align the ensemble's test rows to the test list (the fallback for the images prepare
    excluded), validate, write submission.csv and the top-k file; a failed check removes the files
    an earlier run left, so they cannot pass for this run's result."""
    out, top_k_out = outs
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    try:
        excluded = read_excluded_test_names(report_path, test_list_path) if report_path else set()
        names, (top_labels, top_probs) = align_to_test_list(
            test_names,
            (test_ens.labels, test_ens.probs),
            test_list,
            where,
            excluded=excluded,
            fallback=fallback_scores(label_map, test_ens.labels.shape[1]) if excluded else None,
        )
        fallback_names = names[~np.isin(names, test_names)]
        if len(fallback_names):
            log_fallback(fallback_names, report_path, label_map)
        submission, topk = build_submission(names, top_labels, top_probs, skus)
        validate_submission(submission, test_list, skus, where=str(out))
    except Products10kError:
        for stale in outs:
            if stale.exists():
                log.warning("removing stale %s: this run's submission failed its checks", stale)
                stale.unlink()
        raise
    common.write_csv(out, submission)
    common.write_csv(top_k_out, topk)
    log.info("wrote %s (%d rows) and %s", out, len(submission), top_k_out)
    return submission, topk, fallback_names


def _ensemble(members, paths, weights_spec, skus, label_map_path, k: int, target: np.ndarray) -> dict:
    """One candidate's members loaded and ensembled (weights fitted on val's estimate of the
    ``target`` SKU mix): val and test top-``k``."""
    preds = _load_members(members, paths, skus, label_map_path)
    val = [preds[m].val for m in members]
    weights = resolve_weights(weights_spec, members, val, row_weights(val[0].labels, target))
    w = [weights[m] for m in members]
    val = combine_topk([preds[m].val for m in members], w, len(skus), k=k)
    test = combine_topk([preds[m].test for m in members], w, len(skus), k=k)
    return {"preds": preds, "weights": weights, "val": val, "test": test}


def _load_members(members: list[str], prediction_paths: dict, skus: np.ndarray, label_map_path) -> dict:
    """Every member's predictions file, checked to share the label map and the val/test rows."""
    preds = {}
    for m in members:
        p = load_predictions(prediction_paths[m], m)
        if not np.array_equal(p.skus, skus):
            raise Products10kError(
                f"ensemble member '{m}': {prediction_paths[m]} was made with a different label map "
                f"than {label_map_path} (re-run its training and evaluate stages)"
            )
        preds[m] = p
    first = members[0]
    for m in members[1:]:
        for split in ("val", "test"):
            if not np.array_equal(getattr(preds[m], split).names, getattr(preds[first], split).names):
                raise DataError(
                    f"ensemble members '{first}' and '{m}' predicted different {split} rows "
                    f"({prediction_paths[first]} vs {prediction_paths[m]})"
                )
    return preds
