"""Top-k scores, NumPy only: the predictions-file contract and the probability averaging that the
evaluate, index and submit stages and the deployed model (predict, serve) all share.

It sits below them all and imports no torch, pandas or scipy, so the deploy runtime stays light and
no stage package imports another for it. ``topk_indices`` picks a row's best labels;
``combine_topk`` averages members' top-k blocks into an ensemble's top-k (with its error bound).

The predictions file between ``evaluate`` and ``submit``: the top-k of every row, not all K scores.

At Products-10K's size a full score matrix is 55,376 test rows x 9,691 classes = 2.1 GB in
float32 per member and phase, and every whole-array step on it (a softmax, an argsort, a float64
copy) costs as much again. What the metrics, the gallery and the ensemble need is much less; per
row of a split the file keeps

- ``topk_labels`` (N, k) int32 and ``topk_logits`` (N, k) float32: the k highest TTA-averaged
  logits, best first, ties broken by the lower label;
- ``logsumexp`` (N,) float32: log of the sum of exp(logit) over **all** K classes, so
  ``exp(topk_logits - logsumexp)`` are the exact softmax probabilities of the kept labels and
  ``1 - sum(them)`` is the exact probability mass of the K - k labels left out;
- ``label_logprob`` (N,) float32: the exact log-softmax of the row's own label (NaN where the label
  is -1, a test SKU the training set lacks), whether or not it is in the top-k: the ensemble weight
  fit needs it for every row;
- ``prob_error`` (N,) float32, optional (zeros when absent): how far the kept probabilities may be
  from the exact ones. Zero for the evaluate stage's files, whose probabilities are exact; the index
  stage's fused file holds estimates (a combination of two top-k blocks, see below) and stores their
  bound here, so an ensemble that uses it as a member (``submit.phase: fused``) carries it on.

What is exact and what is not: a member's top-1..top-k predictions, its top-1/top-5 metrics, its
confidence and every label's probability it kept are exact. The ensemble
(``products10k.ensemble.combine_topk``) needs a member's probability of a label that member did
not keep; it uses the mean of that member's left-out mass, which lies, as the true value does, in
[0, p_k] (p_k = the member's k-th probability). An ensemble probability is therefore off by at most
``sum_m w_m * (p_k,m + e_m)`` (``e_m``: the member's own ``prob_error``, which also moves the left-out
labels' range to [0, p_k + e]); the submit stage reports the largest such bound and how many rows' top-1
it could change. Size at full scale with k = 100: 55,376 x 100 x 8 B = 44 MB of test rows per file.

Kept apart from ``evaluation`` so that ``submit`` (which only ensembles saved scores) depends on
the file format, not on the model, TTA and plotting code that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from products10k import common
from products10k.common import DataError, Products10kError

#: rows per block when probabilities are averaged over the full label space (combine_topk)
BLOCK_ROWS = 2048


def logsumexp(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """log(sum(exp(z))) along ``axis``, shifted by the maximum so exp() cannot overflow."""
    top = np.max(z, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(z - top), axis=axis, keepdims=True)) + top).squeeze(axis)


SPLITS = ("val", "test")
ROW_ARRAYS = ("names", "labels", "topk_labels", "topk_logits", "logsumexp", "label_logprob")
PREDICTION_KEYS = tuple(f"{s}_{a}" for s in SPLITS for a in ROW_ARRAYS) + ("skus",)
PROB_ERROR = "prob_error"  # optional per split: files written before it was added are exact


@dataclass
class SplitScores:
    """One split's predictions: names, labels and the top-k of the averaged logits (see above)."""

    names: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64; -1 = a SKU the training set lacks
    topk_labels: np.ndarray  # (N, k) int32, best first
    topk_logits: np.ndarray  # (N, k) float32
    logsumexp: np.ndarray  # (N,) float32, over all K classes
    label_logprob: np.ndarray  # (N,) float32, NaN where labels < 0
    prob_error: np.ndarray | None = None  # (N,) float32: bound on |kept prob - exact|; None = exact

    def __post_init__(self) -> None:
        if self.prob_error is None:
            self.prob_error = np.zeros(len(self.labels), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def k(self) -> int:
        return int(self.topk_labels.shape[1])

    def topk_probs(self) -> np.ndarray:
        """Exact softmax probabilities of the kept labels, (N, k) float32."""
        return np.exp(self.topk_logits - self.logsumexp[:, None]).astype(np.float32)

    @classmethod
    def from_logits(cls, names, labels, logits: np.ndarray, k: int) -> SplitScores:
        """From a full (N, K) logits array (tests, small data); evaluate streams with TopKWriter."""
        logits = np.asarray(logits, dtype=np.float32)
        writer = TopKWriter(len(labels), k, logits.shape[1])
        if len(labels):
            writer.add(0, logits, np.asarray(labels))
        return writer.result(names, labels)


class TopKWriter:
    """Fills a SplitScores block by block, so that no (N, K) array is ever held."""

    def __init__(self, n: int, k: int, num_classes: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = min(k, num_classes)
        self.topk_labels = np.zeros((n, self.k), dtype=np.int32)
        self.topk_logits = np.zeros((n, self.k), dtype=np.float32)
        self.logsumexp = np.zeros(n, dtype=np.float32)
        self.label_logprob = np.full(n, np.nan, dtype=np.float32)

    def add(self, start: int, logits: np.ndarray, labels: np.ndarray) -> None:
        """Rows ``start:start+B`` from their (B, K) float32 logits and labels."""
        stop = start + len(logits)
        top = topk_indices(logits, self.k)
        self.topk_labels[start:stop] = top
        self.topk_logits[start:stop] = np.take_along_axis(logits, top, axis=1)
        # log-sum-exp in float64 per row: a (B, K) temporary, never (N, K)
        z = logits.astype(np.float64)
        lse = logsumexp(z, axis=1)
        self.logsumexp[start:stop] = lse
        labels = np.asarray(labels)
        known = np.flatnonzero(labels >= 0)
        self.label_logprob[start + known] = z[known, labels[known]] - lse[known]

    def result(self, names, labels) -> SplitScores:
        return SplitScores(
            names=np.asarray(names).astype(str),
            labels=np.asarray(labels, dtype=np.int64),
            topk_labels=self.topk_labels,
            topk_logits=self.topk_logits,
            logsumexp=self.logsumexp,
            label_logprob=self.label_logprob,
        )


#: the single centre crop's top-1 label of every test row (the paper's protocol), beside the TTA
#: top-k: the Table 1 report bootstraps its per-image hits (``products10k.report``)
SINGLE_TOP1 = "test_single_top1"


def save_predictions(
    path: str | Path,
    val: SplitScores,
    test: SplitScores,
    skus: np.ndarray,
    single_top1: np.ndarray | None = None,
) -> None:
    """Write both splits and the label -> SKU map as one uncompressed ``.npz`` (atomically).

    ``single_top1``: the test rows' single-crop top-1 labels, stored as ``SINGLE_TOP1``.

    Names are stored as fixed-width unicode so that the file loads with ``allow_pickle=False``: a
    predictions file must never be able to run code.
    """
    arrays = {"skus": np.asarray(skus, dtype=np.int64)}
    if single_top1 is not None:
        if len(single_top1) != len(test):
            raise ValueError(f"{len(single_top1)} single-crop labels for {len(test)} test rows")
        arrays[SINGLE_TOP1] = np.asarray(single_top1, dtype=np.int32)
    for split, scores in (("val", val), ("test", test)):
        for name in (*ROW_ARRAYS, PROB_ERROR):
            arrays[f"{split}_{name}"] = getattr(scores, name)
    with common.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


@dataclass
class Predictions:
    """A loaded predictions file."""

    val: SplitScores
    test: SplitScores
    skus: np.ndarray  # label -> SKU id


def load_predictions(path: str | Path, member: str = "") -> Predictions:
    """Read an evaluate ``.npz``; a missing file or key names the member and the file."""
    path = Path(path)
    who = f"ensemble member '{member}': " if member else ""
    if not path.is_file():
        raise Products10kError(f"{who}predictions {path} not found (run its evaluate stage)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in PREDICTION_KEYS if k not in data.files]
        if missing:
            raise DataError(
                f"{who}{path}: missing array '{missing[0]}' (written by an older evaluate? "
                "re-run it: `dvc repro -f` the evaluate stage)"
            )
        splits = {
            s: SplitScores(
                **{a: data[f"{s}_{a}"] for a in ROW_ARRAYS},
                prob_error=data[f"{s}_{PROB_ERROR}"] if f"{s}_{PROB_ERROR}" in data.files else None,
            )
            for s in SPLITS
        }
        return Predictions(splits["val"], splits["test"], data["skus"])


# --- top-k and the ensemble average --------------------------------------------------------


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, best first: (N, min(k, K)); ties -> lower index.

    ``argpartition`` then a sort of only the k survivors: O(N*K) instead of a full O(N*K log K)
    sort, which matters at 55k x 9.7k test logits. ``argpartition`` picks arbitrarily among
    scores equal to the k-th largest, so the rows where such a tie crosses the k-th place (rare
    with real logits, common with a constant prior) are redone with a stable full sort.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, K), got shape {scores.shape}")
    k = min(k, scores.shape[1])
    if k == scores.shape[1] or scores.shape[0] == 0:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    kth = part_scores.min(axis=1)
    tied = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    if len(tied):
        part[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
        part_scores[tied] = np.take_along_axis(scores[tied], part[tied], axis=1)
    # lexsort on (index, -score): equal scores in index order
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


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
    the estimate (see products10k.scores).
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


# --- cross-validation: out-of-fold rows and the fold ensemble -------------------------------


def take_rows(scores: SplitScores, rows: np.ndarray) -> SplitScores:
    """The predictions of ``rows`` (indices or a boolean mask), in that order."""
    return SplitScores(**{f: getattr(scores, f)[rows] for f in (*ROW_ARRAYS, PROB_ERROR)})


def concat_scores(parts: list[SplitScores]) -> SplitScores:
    """Row blocks of one split predicted by different models (the folds' held-out rows), in order."""
    fields = (*ROW_ARRAYS, PROB_ERROR)
    return SplitScores(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def mean_scores(parts: list[SplitScores], num_classes: int, k: int) -> SplitScores:
    """The equal-weight average of several models' probabilities of the same rows (the fold
    ensemble), as a SplitScores: ``topk_logits`` are the log averaged probabilities (``logsumexp`` 0,
    as they are a distribution over every class), ``prob_error`` the average's error bound."""
    ens = combine_topk(parts, [1.0 / len(parts)] * len(parts), num_classes, k)
    with np.errstate(divide="ignore"):
        logits = np.log(ens.probs).astype(np.float32)
    return SplitScores(
        names=parts[0].names,
        labels=parts[0].labels,
        topk_labels=ens.labels.astype(np.int32),
        topk_logits=logits,
        logsumexp=np.zeros(len(ens.probs), dtype=np.float32),
        label_logprob=ens.label_logprob.astype(np.float32),
        prob_error=ens.error_bound.astype(np.float32),
    )
