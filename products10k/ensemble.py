"""Combine ensemble members: a weighted average of their softmax probabilities, from top-k files.

Weights are fitted on the validation split by maximising its log-likelihood
``mean_i log(sum_m w_m * p_m[i, y_i])`` over the simplex (w >= 0, sum w = 1). The objective is
concave in ``w`` (log of a linear function), so SLSQP finds the global optimum from equal
weights; it needs only the true-class probability of each member per row, an (N, M) matrix that
the predictions files hold exactly (``label_logprob``), however many classes there are.
Averaging probabilities rather than raw logits keeps members with differently scaled logits (an
accuracy-loss finetune, a different resolution) comparable.

The average itself (``combine_topk``) works on blocks of rows with one (rows, K) float32 buffer,
so memory does not grow with the member count or the test set: 2,048 rows x 9,691 classes is
79 MB. A member's probability of a label it did not keep in its top-k is estimated by the mean of
its left-out mass (see ``products10k.scores`` for the error this allows, reported per row).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize

from products10k.common import Products10kError
from products10k.scores import SplitScores

log = logging.getLogger(__name__)


def fit_weights(
    label_logprobs: list[np.ndarray],
    labels: np.ndarray,
    row_weight: np.ndarray | None = None,
    eps: float = 1e-12,
) -> np.ndarray:
    """Simplex weights maximising the val log-likelihood of the weighted softmax average.

    ``label_logprobs[m]`` is member m's exact log-probability of each row's label. Rows with a
    negative label (no training SKU) carry no information and are skipped. ``row_weight`` (the val
    estimate's weights, products10k/estimate.py) makes it the log-likelihood of the target SKU
    mix rather than of val's own; rows of weight 0 then count for nothing.
    """
    labels = np.asarray(labels)
    n_members = len(label_logprobs)
    if n_members == 1:
        return np.ones(1)
    keep = labels >= 0
    if row_weight is not None:
        keep &= np.asarray(row_weight) > 0
    if not keep.any():
        raise Products10kError("cannot fit ensemble weights: the validation split has no labelled rows")
    probs = np.stack([np.exp(np.asarray(lp, dtype=np.float64)[keep]) for lp in label_logprobs], axis=1)
    rw = np.ones(int(keep.sum())) if row_weight is None else np.asarray(row_weight, dtype=np.float64)[keep]
    rw = rw / rw.sum()

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = probs @ w + eps
        return -float(rw @ np.log(mix)), -(rw[:, None] * probs / mix[:, None]).sum(axis=0)

    start = np.full(n_members, 1.0 / n_members)
    result = minimize(
        nll,
        start,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_members,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-10, "maxiter": 200},
    )
    if not result.success:
        # equal weights are a safe fallback; a failed fit must not silently produce garbage
        log.warning("ensemble weight fit did not converge (%s); using equal weights", result.message)
        return start
    weights = np.clip(result.x, 0.0, None)
    return weights / weights.sum()


def resolve_weights(
    spec: str | dict, members: list[str], val: list[SplitScores], row_weight: np.ndarray | None = None
) -> dict[str, float]:
    """Member -> weight from ``ensemble.weights``: 'fit' (on val, rows weighted by ``row_weight``),
    'equal' or a mapping (normalised).

    ``fit`` with no labelled validation rows (``prepare.val_fraction: 0``) falls back to equal
    weights with a log line: there is nothing to fit on.
    """
    if isinstance(spec, dict):
        raw = np.array([float(spec[m]) for m in members])
        weights = raw / raw.sum()
    elif spec == "equal":
        weights = np.full(len(members), 1.0 / len(members))
    elif spec == "fit":
        labels = val[0].labels
        if len(members) > 1 and not (labels >= 0).any():
            log.info("ensemble.weights is 'fit' but there are no labelled val rows: using equal weights")
            weights = np.full(len(members), 1.0 / len(members))
        else:
            weights = fit_weights([v.label_logprob for v in val], labels, row_weight)
    else:
        raise Products10kError(f"ensemble.weights is {spec!r}, expected 'fit', 'equal' or a mapping")
    return {m: float(w) for m, w in zip(members, weights, strict=True)}


def fit_fusion_weight(
    classifier: SplitScores, knn: SplitScores, row_weight: np.ndarray | None = None
) -> float:
    """The kNN weight ``w`` in [0, 1] maximising the val log-likelihood of the fused probabilities
    (rows weighted by ``row_weight``: the val estimate's, products10k/estimate.py)."""
    if not (classifier.labels >= 0).any():
        raise Products10kError("cannot fit the fusion weight: the validation split has no labelled rows")
    return float(fit_weights([classifier.label_logprob, knn.label_logprob], classifier.labels, row_weight)[1])


def cross_fit_fusion_weights(
    classifier: SplitScores, knn: SplitScores, row_weight: np.ndarray, parts: int, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """The fusion weight cross-fitted over ``parts`` random parts of val: (each row's part, the
    weight fitted on every other part). Val's fused predictions made with their own part's weight
    are then out of sample, as test's are, so the submit stage judges the fused candidate on an
    estimate its weight's fit did not see. The labelled rows (row weight > 0) are dealt evenly over
    the parts, so every fit has rows; with fewer than 2 of them nothing can be held out: one part,
    the weight fitted on all of val (in sample)."""
    labelled = (np.asarray(classifier.labels) >= 0) & (np.asarray(row_weight) > 0)
    parts = int(min(parts, labelled.sum()))
    part = np.zeros(len(labelled), dtype=np.int64)
    if parts < 2:
        return part, [fit_fusion_weight(classifier, knn, row_weight)]
    rng = np.random.default_rng(seed)
    for rows in (np.flatnonzero(labelled), np.flatnonzero(~labelled)):
        part[rng.permutation(rows)] = np.arange(len(rows)) % parts
    weights = [fit_fusion_weight(classifier, knn, np.where(part == j, 0.0, row_weight)) for j in range(parts)]
    return part, weights
