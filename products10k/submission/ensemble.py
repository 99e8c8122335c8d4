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
its left-out mass (see ``products10k.submission.predictions`` for the error this allows, reported per row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from products10k.common import Products10kError
from products10k.evaluation.metrics import topk_indices
from products10k.submission.predictions import SplitScores

log = logging.getLogger(__name__)

BLOCK_ROWS = 2048


def fit_weights(label_logprobs: list[np.ndarray], labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Simplex weights maximising the val log-likelihood of the weighted softmax average.

    ``label_logprobs[m]`` is member m's exact log-probability of each row's label. Rows with a
    negative label (no training SKU) carry no information and are skipped.
    """
    labels = np.asarray(labels)
    n_members = len(label_logprobs)
    if n_members == 1:
        return np.ones(1)
    keep = labels >= 0
    if not keep.any():
        raise Products10kError("cannot fit ensemble weights: the validation split has no labelled rows")
    probs = np.stack([np.exp(np.asarray(lp, dtype=np.float64)[keep]) for lp in label_logprobs], axis=1)

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = probs @ w + eps
        return -float(np.mean(np.log(mix))), -(probs / mix[:, None]).mean(axis=0)

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


def resolve_weights(spec: str | dict, members: list[str], val: list[SplitScores]) -> dict[str, float]:
    """Member -> weight from ``ensemble.weights``: 'fit', 'equal' or a mapping (normalised).

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
            weights = fit_weights([v.label_logprob for v in val], labels)
    else:
        raise Products10kError(f"ensemble.weights is {spec!r}, expected 'fit', 'equal' or a mapping")
    return {m: float(w) for m, w in zip(members, weights, strict=True)}


@dataclass
class EnsembleTopK:
    """The ensemble's top-k per row and how far its probabilities may be from the exact average."""

    labels: np.ndarray  # (N, k) int64, best first
    probs: np.ndarray  # (N, k) float32
    error_bound: np.ndarray  # (N,) max |estimated - exact| of any ensemble probability of the row
    label_logprob: np.ndarray  # (N,) exact log of the ensemble probability of the row's label

    @property
    def uncertain_top1(self) -> np.ndarray:
        """Rows whose top-1 the estimate could change: margin to the runner-up <= 2 x the bound."""
        if self.probs.shape[1] < 2:
            return np.zeros(len(self.probs), dtype=bool)
        return (self.probs[:, 0] - self.probs[:, 1]) <= 2 * self.error_bound


def combine_topk(
    members: list[SplitScores], weights: list[float], num_classes: int, k: int, block_rows: int = BLOCK_ROWS
) -> EnsembleTopK:
    """Weighted average of the members' softmax probabilities, reduced to its top-``k`` per row.

    Per block of rows: a (rows, K) buffer gets, for each member, its probabilities of the labels it
    kept and the mean of its left-out mass elsewhere. A member that kept every label (k = K) adds only
    its own ``prob_error`` e_m; another adds ``w_m * (p_k,m + e_m)``: its kept probabilities are within
    e_m of the exact ones, and a left-out label's exact probability lies in [0, p_k,m + e_m], as does
    the estimate (see products10k.submission.predictions).
    """
    if len(members) != len(weights):
        raise ValueError(f"{len(members)} members but {len(weights)} weights")
    n = len(members[0])
    if any(len(m) != n for m in members):
        raise ValueError(f"members predicted different row counts: {[len(m) for m in members]}")
    k = min(k, num_classes)
    out_labels = np.zeros((n, k), dtype=np.int64)
    out_probs = np.zeros((n, k), dtype=np.float32)
    bound = np.zeros(n, dtype=np.float64)
    label_prob = np.zeros(n, dtype=np.float64)
    rows_labels = members[0].labels
    for m, w in zip(members, weights, strict=True):
        if w > 0:
            label_prob += w * np.exp(np.asarray(m.label_logprob, dtype=np.float64))
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        dense = np.zeros((stop - start, num_classes), dtype=np.float32)
        for m, w in zip(members, weights, strict=True):
            if w <= 0:
                continue
            p = np.exp(m.topk_logits[start:stop].astype(np.float64) - m.logsumexp[start:stop, None])
            bound[start:stop] += w * m.prob_error[start:stop]
            rest = np.zeros(len(p))
            if m.k < num_classes:
                # the left-out labels share the rest of the member's mass equally
                rest = np.clip(1.0 - p.sum(axis=1), 0.0, None) / (num_classes - m.k)
                dense += (w * rest[:, None]).astype(np.float32)
                bound[start:stop] += w * p[:, -1]
            rows = np.arange(len(p))[:, None]  # labels are unique within a row: plain fancy add
            dense[rows, m.topk_labels[start:stop]] += (w * (p - rest[:, None])).astype(np.float32)
        top = topk_indices(dense, k)
        out_labels[start:stop] = top
        out_probs[start:stop] = np.take_along_axis(dense, top, axis=1)
    with np.errstate(divide="ignore"):
        label_logprob = np.where(rows_labels >= 0, np.log(label_prob), np.nan)
    return EnsembleTopK(out_labels, out_probs, bound, label_logprob)


def log_likelihood(label_logprob: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean log-probability of the labelled rows (the quantity the weight fit maximises)."""
    keep = np.asarray(labels) >= 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.log(np.exp(label_logprob[keep]) + eps)))
