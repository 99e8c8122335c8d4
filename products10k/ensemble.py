"""Combine ensemble members: a weighted average of their softmax probabilities.

Weights are fitted on the validation split by maximising its log-likelihood
``mean_i log(sum_m w_m * p_m[i, y_i])`` over the simplex (w >= 0, sum w = 1). The objective is
concave in ``w`` (log of a linear function), so SLSQP finds the global optimum from equal
weights; it needs only the true-class probability of each member per row, an (N, M) matrix,
however many classes there are. Averaging probabilities rather than raw logits keeps members with
differently scaled logits (an accuracy-loss finetune, a different resolution) comparable.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from products10k.errors import Products10kError

log = logging.getLogger(__name__)


# Rows per block when a full softmax is needed: 55k x 9.7k test logits are 2 GB in float32, so
# whole-array temporaries (a float64 softmax would be 4 GB) are avoided.
BLOCK_ROWS = 4096


def true_class_probs(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of each row's label: (N,), computed block-wise in float64."""
    out = np.empty(len(labels), dtype=np.float64)
    for start in range(0, len(labels), BLOCK_ROWS):
        z = np.asarray(logits[start : start + BLOCK_ROWS], dtype=np.float64)
        y = labels[start : start + BLOCK_ROWS]
        out[start : start + len(y)] = np.exp(z[np.arange(len(y)), y] - logsumexp(z, axis=1))
    return out


def fit_weights(member_logits: list[np.ndarray], labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Simplex weights maximising the val log-likelihood of the weighted softmax average.

    Rows with a negative label (no training SKU) carry no information and are skipped.
    """
    labels = np.asarray(labels)
    n_members = len(member_logits)
    if n_members == 1:
        return np.ones(1)
    keep = labels >= 0
    if not keep.any():
        raise Products10kError("cannot fit ensemble weights: the validation split has no labelled rows")
    probs = np.stack([true_class_probs(z[keep], labels[keep]) for z in member_logits], axis=1)

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


def resolve_weights(
    spec: str | dict, members: list[str], val_logits: list[np.ndarray], val_labels: np.ndarray
) -> dict[str, float]:
    """Member -> weight from ``ensemble.weights``: 'fit', 'equal' or a mapping (normalised)."""
    if isinstance(spec, dict):
        raw = np.array([float(spec[m]) for m in members])
        weights = raw / raw.sum()
    elif spec == "equal":
        weights = np.full(len(members), 1.0 / len(members))
    elif spec == "fit":
        weights = fit_weights(val_logits, val_labels)
    else:
        raise Products10kError(f"ensemble.weights is {spec!r}, expected 'fit', 'equal' or a mapping")
    return {m: float(w) for m, w in zip(members, weights, strict=True)}


def combine(member_logits: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted average of the members' softmax probabilities: (N, K) float32, rows sum to 1."""
    if len(member_logits) != len(weights):
        raise ValueError(f"{len(member_logits)} members but {len(weights)} weights")
    shapes = {z.shape for z in member_logits}
    if len(shapes) != 1:
        raise ValueError(f"members' logits differ in shape: {sorted(shapes)}")
    out = np.zeros(member_logits[0].shape, dtype=np.float32)
    for z, w in zip(member_logits, weights, strict=True):
        if w > 0:
            for start in range(0, len(out), BLOCK_ROWS):
                block = np.asarray(z[start : start + BLOCK_ROWS], dtype=np.float32)
                out[start : start + len(block)] += np.float32(w) * softmax(block, axis=1)
    return out


def log_likelihood(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean log-probability of the labelled rows (the quantity the weight fit maximises)."""
    keep = np.asarray(labels) >= 0
    p = probs[np.flatnonzero(keep), np.asarray(labels)[keep]]
    return float(np.mean(np.log(p + eps)))
