"""What benchmarks/bench_enrol.py measures beyond the vote rules of products10k/votes.py: a cohort
normalised rule, a rule switched by the classifier's doubt, how well a new SKU's photo stands out
(AUROC), and the rates with their intervals. Measured there only: none is a ``retrieval.vote``
(docs/retrieval.md says why).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from products10k.scores import SplitScores
from products10k.votes import VOTES, vote

#: gallery photo counts the trained SKUs' kNN top-1 is broken down by (a rule that names SKUs with
#: few photos better may name those with many worse)
PHOTO_BUCKETS = ((1, 10), (11, 29), (30, 9999))


#: the rules scored: every vote of votes.py (expected_best with retrieval.vote_shots),
#: expected_best judging each SKU by 20 photos (between best, its photos all, and 5), and each SKU's
#: best match less its impostor baseline (enrol_rules.impostor_baseline), among k and 50 neighbours
RULES = (*VOTES, "expected_best@20", "normalised", "normalised@50")


def rates(top: np.ndarray, truth: np.ndarray, rows: np.ndarray) -> dict:
    """top-1 and top-5 of the ``rows`` of ``top`` (labels, best first), each with a 95% interval (normal
    approximation of the binomial: rows as independent draws)."""
    out = {}
    for k in (1, 5):
        hit = (top[rows, :k] == truth[rows, None]).any(axis=1)
        p = float(hit.mean()) if len(hit) else float("nan")
        half = 1.96 * np.sqrt(p * (1 - p) / max(len(hit), 1))
        out[f"top{k}"] = round(p, 4)
        out[f"top{k}_ci95"] = [round(max(p - half, 0.0), 4), round(min(p + half, 1.0), 4)]
    return out


def impostor_baseline(
    vectors: np.ndarray, labels: np.ndarray, num_classes: int, *, cohort: int = 1000, seed: int = 0,
    chunk: int = 64,
) -> np.ndarray:  # fmt: skip
    """Each SKU's impostor baseline: the mean best match that photos of other SKUs (a fixed random
    ``cohort`` of the gallery's photos) find among its photos, (num_classes,).

    A SKU's best match to a query grows with its photo count, for other SKUs' queries as much as
    for its own; so does the best match an impostor's photo finds in it. ``best - baseline`` asks
    how far a query's best match stands above what any other SKU's photo finds there (cohort score
    normalisation, as speaker and face verification use): a SKU is not ahead for having more photos,
    yet is judged by all of them (no draw of a few, which loses the views those leave out)."""
    vectors = np.asarray(vectors, np.float32)
    labels = np.asarray(labels)
    picked = np.sort(
        np.random.default_rng(seed).choice(len(vectors), min(cohort, len(vectors)), replace=False)
    )
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    starts = np.r_[0, np.cumsum(counts)][present]
    gallery = vectors[order].T
    total = np.zeros(num_classes)
    seen = np.zeros(num_classes)
    for at in range(0, len(picked), chunk):
        rows = picked[at : at + chunk]
        best = np.maximum.reduceat(vectors[rows] @ gallery, starts, axis=1).astype(np.float64)
        impostor = labels[rows][:, None] != present[None, :]  # a SKU's own photos are not impostors
        total[present] += np.where(impostor, best, 0.0).sum(axis=0)
        seen[present] += impostor.sum(axis=0)
    return (total / np.maximum(seen, 1)).astype(np.float32)


def normalised_best(
    sims: np.ndarray, neighbour_labels: np.ndarray, baseline: np.ndarray, num_classes: int,
    *, temperature: float, smoothing: float, names, labels,
) -> SplitScores:  # fmt: skip
    """Each SKU among the neighbours by its best match less its impostor baseline
    (:func:`impostor_baseline`), ``exp((best - baseline) / T)``: votes.py's ``best`` vote over the
    similarities less their SKU's baseline (the baseline is constant within a SKU, so the best of
    the shifted similarities is the shifted best), re-sorted best first as that vote reads them."""
    shifted = sims - baseline[neighbour_labels]
    order = np.argsort(-shifted, axis=1, kind="stable")
    best_first = (np.take_along_axis(a, order, axis=1) for a in (shifted, neighbour_labels))
    return vote(*best_first, num_classes, kind="best", temperature=temperature, smoothing=smoothing,
                names=names, labels=labels)  # fmt: skip


#: quantiles of val's classifier doubt above which a test photo is judged by expected_best
GATE_QUANTILES = (0.5, 0.75, 0.9)


def gated(tops: dict, val_doubt: np.ndarray, doubt: np.ndarray, truth, is_held, num_known: int) -> dict:
    """Each photo judged by ``expected_best`` where the classifier doubts it more than the q-quantile
    of its doubt on val's photos (all of trained SKUs: the threshold needs no new SKU), and by
    ``best`` elsewhere: the trade-off between naming enrolled SKUs and keeping the trained ones, one
    point per quantile (q 0: expected_best everywhere; q 1: best)."""
    out = {}
    for q in GATE_QUANTILES:
        doubtful = doubt > np.quantile(val_doubt, q)
        top = np.where(doubtful[:, None], tops["expected_best"], tops["best"])
        out[f"q{q}"] = {
            "trained": rates(top, truth, ~is_held),
            "held_out": rates(top, truth, is_held),
            "named_enrolled": round(float((top[~is_held, 0] >= num_known).mean()), 4),
        }
    return out


def doubt(logits: np.ndarray) -> np.ndarray:
    """1 - the classifier's top softmax probability, per row."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return 1.0 - p.max(axis=1) / p.sum(axis=1)


def doubt_of(scores: SplitScores) -> np.ndarray:
    """:func:`doubt` from a predictions block (its top label's exact log-probability)."""
    return 1.0 - np.exp(scores.topk_logits[:, 0] - scores.logsumexp)


def novelty(logits: np.ndarray, nearest: np.ndarray, is_held: np.ndarray) -> dict:
    """How well a photo of a SKU the model never saw stands out from a trained SKU's, before any
    enrolment: the AUROC (0.5 = no better than chance) of the classifier's doubt (1 - its top
    softmax probability) and of the distance to the nearest gallery photo (1 - cosine). A rule
    could leave the trained SKUs' photos alone only as far as these tell the two apart."""
    if not is_held.any() or is_held.all():
        return {}
    return {
        "classifier_doubt_auroc": auroc(doubt(logits), is_held),
        "nearest_distance_auroc": auroc(1.0 - nearest, is_held),
    }


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive row scores above a negative one), ties half (Mann-Whitney)."""
    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return round(float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)), 4)
