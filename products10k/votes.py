"""How the nearest gallery photos name a SKU: the vote rules of ``retrieval.vote`` (knn.py searches,
this module turns what the search found into kNN probabilities).

- ``softmax``: each of the k nearest photos votes for its SKU with weight ``exp(cos / T)``;
- ``count``: one vote each;
- ``best``: each SKU among them by its best match alone, ``exp(max cos / T)``: a score that does not
  add up photos, so 5 enrolled photos are not outvoted by a look-alike's 200 near the query;
- ``centroid``: the k nearest SKU prototypes (each SKU's mean gallery vector), scored as ``best``
  scores photos (knn.Prototypes);
- ``expected_best``: each SKU among the k nearest photos' SKUs by the **expected best match of
  ``shots`` of its photos drawn at random** (``retrieval.vote_shots``), ``exp(E[max cos] / T)``. The
  best of n photos grows with n (the best of 200 draws from a look-alike's spread beats the best of
  5 from the right SKU's); judging every SKU as if it had ``shots`` photos (the ones with fewer keep
  their own best) takes the gallery's size out of the comparison, without the variance of cutting
  each SKU to ``shots`` photos at random. It reads every photo of each candidate SKU.

Each rule gives per row the voted labels and their shares; the kNN probability of a label is
``(1 - smoothing) x share + smoothing / K`` (every probability above 0, so the fusion's
log-likelihood fit is finite), and a row keeps k labels, as a predictions file represents it
(``SplitScores``).
"""

from __future__ import annotations

from functools import lru_cache

import faiss
import numpy as np

from products10k.scores import SplitScores

#: the vote rules (``retrieval.vote``)
VOTES = ("softmax", "count", "best", "centroid", "expected_best")


def vote(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    num_classes: int,
    *,
    kind: str,
    temperature: float,
    smoothing: float,
    names,
    labels,
) -> SplitScores:
    """kNN class probabilities of the ``softmax``, ``count`` or ``best`` rule from each row's
    neighbours' similarities and labels, (n, k) each."""
    if kind in ("softmax", "best"):
        # relative to the row's best similarity: exp() cannot overflow, the shares are unchanged
        weights = np.exp((sims - sims[:, :1]) / temperature).astype(np.float64)
    elif kind == "count":
        weights = np.ones_like(sims, dtype=np.float64)
    else:
        raise ValueError(
            f"unknown vote '{kind}' (softmax | count | best; centroid, expected_best: knn_scores)"
        )
    rows = []
    for i in range(len(neighbour_labels)):
        voted, inverse = np.unique(neighbour_labels[i], return_inverse=True)
        if kind == "best":
            share = np.zeros(len(voted))
            np.maximum.at(share, inverse, weights[i])
        else:
            share = np.bincount(inverse, weights=weights[i], minlength=len(voted))
        rows.append((voted, share))
    return shares_as_scores(rows, neighbour_labels.shape[1], num_classes, smoothing, names, labels)


class Members:
    """Each label's gallery ids, grouped (ids listed in ``hidden`` left out): what a rule that reads
    every photo of a candidate SKU looks up."""

    def __init__(self, labels: np.ndarray, num_classes: int, hidden: np.ndarray | None = None):
        ids = np.arange(len(labels))
        if hidden is not None and len(hidden):
            ids = np.setdiff1d(ids, hidden)
        order = np.argsort(np.asarray(labels)[ids], kind="stable")
        self.ids = ids[order]
        counts = np.bincount(np.asarray(labels)[ids], minlength=num_classes)
        self.starts = np.r_[0, np.cumsum(counts)]

    def of(self, label: int) -> np.ndarray:
        return self.ids[self.starts[label] : self.starts[label + 1]]


@lru_cache(maxsize=4096)
def expected_max_weights(n: int, shots: int) -> np.ndarray:
    """P(the i-th largest of n values is the largest of ``shots`` drawn without replacement), i = 1..n:
    C(n - i, shots - 1) / C(n, shots). With n <= shots the largest is always drawn: weight 1 on it."""
    w = np.zeros(n)
    if n <= shots:
        w[0] = 1.0
        return w
    w[0] = shots / n
    for i in range(1, n - shots + 1):  # C(n-i-1, m-1) / C(n-i, m-1) = (n - i - m + 1) / (n - i)
        w[i] = w[i - 1] * (n - i - shots + 1) / (n - i)
    return w


def expected_best(
    index: faiss.Index,
    members: Members,
    queries: np.ndarray,
    neighbour_labels: np.ndarray,
    num_classes: int,
    *,
    shots: int,
    temperature: float,
    smoothing: float,
    names,
    labels,
) -> SplitScores:
    """The ``expected_best`` rule: every SKU among each row's neighbours scored by the expected best
    cosine of ``shots`` of its photos (all of them read from ``index``, less ``members``' hidden ones)."""
    vectors = FlatVectors(index)
    rows = []
    for i, q in enumerate(np.asarray(queries, np.float32)):
        voted = np.unique(neighbour_labels[i])
        expected = np.empty(len(voted))
        for j, label in enumerate(voted):
            sims = np.sort(vectors.take(members.of(int(label))) @ q)[::-1]
            expected[j] = float(expected_max_weights(len(sims), shots) @ sims) if len(sims) else -1.0
        rows.append((voted, np.exp((expected - expected.max()) / temperature)))
    return shares_as_scores(rows, neighbour_labels.shape[1], num_classes, smoothing, names, labels)


class FlatVectors:
    """The vectors a flat index (or a ``faiss.IndexShards`` of flat ones, ids in shard order) holds,
    read in place: no copy of the gallery."""

    def __init__(self, index: faiss.Index):
        shards = [faiss.downcast_index(index.at(i)) for i in range(index.count())] if isinstance(
            index, faiss.IndexShards) else [index]  # fmt: skip
        self.views, self.offsets = [], [0]
        for shard in shards:
            flat = faiss.downcast_index(shard)
            if not isinstance(flat, faiss.IndexFlat):
                raise TypeError(f"expected_best reads a flat index's vectors, not a {type(flat).__name__}")
            self.views.append(
                faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            )
            self.offsets.append(self.offsets[-1] + flat.ntotal)

    def take(self, ids: np.ndarray) -> np.ndarray:
        if len(self.views) == 1:
            return self.views[0][ids]
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.views[0].shape[1]), np.float32)
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.views[s][ids[at] - self.offsets[s]]
        return out


def shares_as_scores(rows, k: int, num_classes: int, smoothing: float, names, labels) -> SplitScores:
    """Per row (voted labels, their unnormalised shares) as kNN probabilities: each row keeps ``k``
    labels (at most K), the voted ones by decreasing share, then (rows with fewer voted labels) the
    lowest unvoted labels at ``smoothing / K``, so that labels are unique within a row as
    ``combine_topk`` requires."""
    n = len(rows)
    k_keep = min(k, num_classes)
    floor = smoothing / num_classes
    topk_labels = np.empty((n, k_keep), dtype=np.int32)
    topk_probs = np.full((n, k_keep), floor, dtype=np.float64)
    for i, (voted, share) in enumerate(rows):
        share = share / share.sum()
        order = np.lexsort((voted, -share))[:k_keep]  # highest share first, then the lower label
        m = len(order)
        topk_labels[i, :m] = voted[order]
        topk_probs[i, :m] += (1.0 - smoothing) * share[order]
        if m < k_keep:
            fill = np.setdiff1d(np.arange(min(num_classes, k_keep + m)), voted[order], assume_unique=True)
            topk_labels[i, m:] = fill[: k_keep - m]
    labels = np.asarray(labels, dtype=np.int64)
    label_prob = np.full(n, floor)
    for i in np.flatnonzero(labels >= 0):
        hit = np.flatnonzero(topk_labels[i] == labels[i])
        if len(hit):
            label_prob[i] = topk_probs[i, hit[0]]
    return SplitScores(
        names=np.asarray(names).astype(str),
        labels=labels,
        topk_labels=topk_labels,
        topk_logits=np.log(topk_probs).astype(np.float32),
        logsumexp=np.zeros(n, dtype=np.float32),  # probabilities: they already sum to 1
        label_logprob=np.where(labels >= 0, np.log(label_prob), np.nan).astype(np.float32),
    )
