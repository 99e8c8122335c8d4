"""The Kaggle submission: build it from ensemble scores, validate it, score it, upload it.

Format (Products-10K on Kaggle): header ``name,class``, one row per image of the official
``test_kaggletest.csv``, ``class`` = the original SKU id (not the contiguous training label).
``validate_submission`` checks all of that before anything is written; outputs are written
atomically, so a failed check or a killed stage never leaves a partial submission behind.

Excluded test images. The prepare stage drops unreadable test images (missing, empty, truncated,
undecodable; at most ``prepare.max_bad_fraction``) and lists them under ``excluded`` in its
``report.json``; they have no prediction, yet Kaggle wants a row for every listed image. Exactly
those images get the **fallback**: the training prior (``n_train`` of label_map.csv, normalised),
so their class is the most frequent training SKU (the lowest label among ties) and their top-k the
k most frequent SKUs. They are scored like any other row (wrong unless the fallback SKU is right),
a warning says how many there are, and ``test.fallback_rows`` in the metrics counts them. Any
other test image without a prediction is still an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k import common
from products10k.common import DataError, Products10kError
from products10k.ensemble import resolve_weights
from products10k.estimate import log_train_prior
from products10k.prepared.contract import LABEL_MAP_ALL_COLUMNS, read_label_map
from products10k.scores import combine_topk, load_predictions, log_likelihood, topk_indices
from products10k.submission.choose import (
    NoiseAwareChoice,
    adjust,
    best,
    coverage,
    row_weights,
    score_taus,
    target_prior,
)
from products10k.submission.leaderboard import score_submission

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["name", "class"]


def read_test_list(path: str | os.PathLike) -> pd.DataFrame:
    """The official test list (``name,class,Usage``); ``class``/``Usage`` may be absent (unlabelled)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: test list not found (run the download stage)")
    df = pd.read_csv(path, dtype={"name": str})
    if "name" not in df.columns:
        raise DataError(f"{path}: missing column 'name' (columns: {', '.join(df.columns)})")
    dup = df["name"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: test image '{df['name'].iloc[row]}' is listed twice")
    return df


def build_submission(
    names: np.ndarray, top_labels: np.ndarray, top_scores: np.ndarray, label_skus: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The submission (name, class) and the top-k file (name, class_1.., score_1..).

    ``top_labels``/``top_scores`` are (N, k), best first, in training-label space;
    ``label_skus[label]`` is that label's SKU id.
    """
    names = np.asarray(names).astype(str)
    if len(names) != len(top_labels):
        raise DataError(f"{len(top_labels)} prediction rows for {len(names)} test names")
    skus = np.asarray(label_skus, dtype=np.int64)[top_labels]
    submission = pd.DataFrame({"name": names, "class": skus[:, 0]})
    topk = pd.DataFrame({"name": names})
    for j in range(top_labels.shape[1]):
        topk[f"class_{j + 1}"] = skus[:, j]
    for j in range(top_labels.shape[1]):
        topk[f"score_{j + 1}"] = np.round(top_scores[:, j].astype(np.float64), 6)
    return submission, topk


def validate_submission(
    submission: pd.DataFrame, test_list: pd.DataFrame, valid_skus, where: str = "submission"
) -> None:
    """Raise DataError unless ``submission`` is exactly what Kaggle expects for ``test_list``.

    Checks: columns exactly ``name,class`` (no index or extras), one row per test image, no
    duplicates, no names outside the list, integer classes that are SKU ids of the training label map.
    """
    cols = list(submission.columns)
    if cols != SUBMISSION_COLUMNS:
        raise DataError(f"{where}: columns are {cols}, expected exactly {SUBMISSION_COLUMNS}")
    names = submission["name"].astype(str)
    expected = test_list["name"].astype(str)
    if len(submission) != len(expected):
        missing = sorted(set(expected) - set(names))[:5]
        raise DataError(
            f"{where}: {len(submission)} rows but the test list has {len(expected)} images"
            + (f" (missing e.g. {', '.join(missing)})" if missing else "")
        )
    dup = names.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{where}: row {row + 2}: image '{names.iloc[row]}' appears more than once")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise DataError(f"{where}: {len(extra)} images not in the test list, e.g. '{extra[0]}'")
    cls = submission["class"]
    if not pd.api.types.is_integer_dtype(cls):
        raise DataError(f"{where}: column 'class' must hold integer SKU ids, got dtype {cls.dtype}")
    unknown = ~cls.isin(set(int(s) for s in valid_skus))
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(
            f"{where}: row {row + 2}: class {int(cls.iloc[row])} is not a SKU id of the training label map"
        )


def read_excluded_test_names(report_path: str | os.PathLike, test_list_path: str | os.PathLike) -> set[str]:
    """Names of the test images the prepare stage excluded, from its ``report.json``.

    The report's ``excluded`` entries carry the CSV they came from (``file``); those of the test
    list (same file name as ``test_list_path``, e.g. ``test_kaggletest.csv``) are returned.
    """
    path = Path(report_path)
    if not path.is_file():
        raise DataError(f"{path}: prepare report not found (run the prepare stage)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    excluded = report.get("excluded") if isinstance(report, dict) else None
    if not isinstance(excluded, list):
        raise DataError(f"{path}: no 'excluded' list (not a report.json of the prepare stage?)")
    table = Path(test_list_path).name
    names = set()
    for i, entry in enumerate(excluded):
        if not isinstance(entry, dict) or "file" not in entry or "name" not in entry:
            raise DataError(f"{path}: excluded[{i}] lacks 'file' or 'name': {entry!r}")
        if Path(str(entry["file"])).name == table:
            names.add(str(entry["name"]))
    return names


def fallback_scores(label_map: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The fallback row for an excluded test image: the top-``k`` of the training prior.

    ``n_train / sum(n_train)`` of label_map.csv: top-1 is the most frequent training SKU (the
    lowest label among ties). Returns (labels (k,), probabilities (k,)).
    """
    counts = label_map["n_train"].to_numpy(dtype=np.float64)
    if not counts.sum() > 0:
        raise DataError("label map: no training images (n_train is 0 for every SKU), so no fallback SKU")
    prior = (counts / counts.sum())[None, :]
    top = topk_indices(prior, k)
    return top[0], np.take_along_axis(prior, top, axis=1)[0].astype(np.float32)


def align_to_test_list(
    names: np.ndarray,
    rows: tuple[np.ndarray, ...],
    test_list: pd.DataFrame,
    where: str,
    excluded: set[str] | frozenset[str] = frozenset(),
    fallback: tuple[np.ndarray, ...] | None = None,
):
    """Reorder prediction rows into the test list's order; a count or name mismatch is an error.

    ``rows`` are arrays with one row per prediction (e.g. top-k labels and scores). A test image
    without a prediction is allowed only if its name is in ``excluded`` (the test images prepare
    excluded); its rows are then ``fallback`` (one row per array, see :func:`fallback_scores`).
    Returns the test list's names and the reordered arrays.
    """
    names = np.asarray(names).astype(str)
    expected = test_list["name"].astype(str).to_numpy()
    absent = ~np.isin(expected, names)
    filled = absent & np.isin(expected, list(excluded))
    if filled.any() and fallback is None:
        raise ValueError("excluded test images need a fallback row")
    if len(names) + int(filled.sum()) != len(expected):
        missing = sorted(set(expected[absent & ~filled]))[:5]
        extra = sorted(set(names) - set(expected))[:5]
        raise DataError(
            f"{where}: predictions for {len(names)} test images"
            + (f" (+{int(filled.sum())} excluded by prepare)" if filled.any() else "")
            + f" but the test list has {len(expected)}"
            + (f" (no prediction for e.g. {', '.join(missing)})" if missing else "")
            + (f" (not in the test list: e.g. {', '.join(extra)})" if extra else "")
        )
    index = pd.Index(names)
    if index.has_duplicates:
        raise DataError(f"{where}: test image '{index[index.duplicated()][0]}' is predicted twice")
    pos = index.get_indexer(expected)
    unexplained = (pos < 0) & ~filled
    if unexplained.any():
        raise DataError(f"{where}: no prediction for test image '{expected[unexplained][0]}'")
    out = []
    for i, array in enumerate(rows):
        reordered = array[np.maximum(pos, 0)]  # one copy, as fancy indexing always makes
        if filled.any():
            reordered[filled] = fallback[i]
        out.append(reordered)
    return expected, tuple(out)


# --- the submit stage ---


@dataclass(frozen=True)
class ChoiceSpec:
    """How the submission is chosen on val (products10k/submission/choose.py): the SKU mix test
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
    submission/choose.py, as ``choice`` says), each with every tau of logit adjustment; or one set of
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
            _log_fallback(fallback_names, report_path, label_map)
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


def _log_fallback(fallback_names: np.ndarray, report_path, label_map: pd.DataFrame) -> None:
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    log.warning(
        "%d test image(s) excluded by prepare (%s) have no prediction; submitting the most "
        "frequent training SKU %d for them, scored as any other row (e.g. %s)",
        len(fallback_names),
        report_path,
        int(skus[int(np.argmax(label_map["n_train"].to_numpy()))]),
        ", ".join(fallback_names[:5]),
    )
