"""The index stage's fusion of kNN and classifier: ``(1 - w) x classifier + w x kNN``, the weight
fitted on val (the ensemble's log-likelihood fit, rows weighted to ``evaluate.target_prior``).

Val's own fused predictions are the submit stage's fused candidate, and its choice reads their
val estimate; a weight fitted on those very rows would make that estimate in-sample. So val is
cross-fitted: each tenth of val is fused with the weight fitted on the other nine, as K-fold
cross-validation holds out each fold; test keeps the weight fitted on all of val.
"""

from __future__ import annotations

import logging

import numpy as np

from products10k.ensemble import cross_fit_fusion_weights, fit_fusion_weight
from products10k.knn import fuse
from products10k.scores import SplitScores, concat_scores, take_rows

log = logging.getLogger(__name__)

#: val's parts for the fusion weight's cross-fit: each fit sees nine tenths of val, as K-fold's
#: usual 10 keeps the fits close to the one test's weight comes from
FUSION_CROSS_FIT_PARTS = 10


def fusion_weight(
    classifier_val: SplitScores,
    knn_val: SplitScores,
    member: str,
    scores: str,
    row_weight: np.ndarray,
    unfitted: float,
) -> float:
    """The kNN weight fitted on val (``unfitted``, retrieval.unfitted_weight, without labelled rows)."""
    if not (classifier_val.labels >= 0).any():
        log.warning("%s: no labelled val rows to fit the kNN fusion weight on; using %.2f", member, unfitted)
        return unfitted
    weight = fit_fusion_weight(classifier_val, knn_val, row_weight)
    log.info(
        "%s: kNN fusion weight (%s classifier) fitted on %d val rows: %.3f",
        member,
        scores,
        len(classifier_val),
        weight,
    )
    return weight


def fused_predictions(classifier, knn: dict, weight: float, row_weight, num_classes: int, top_k: int):
    """Val's and test's fused predictions, and the cross-fit's figures. Test is fused with the
    weight fitted on all of val; each part of val (``FUSION_CROSS_FIT_PARTS``) with the weight fitted
    on the others, so the fused candidate's val estimate is out of sample, as the classifier's and
    the kNN's are. The figures show what the in-sample fit would have added: the parts' weights and
    val's top-1 both ways."""
    test = fuse(classifier.test, knn["test"], weight, num_classes, top_k)
    in_sample = fuse(classifier.val, knn["val"], weight, num_classes, top_k)
    if not (classifier.val.labels >= 0).any():  # no labelled rows: the unfitted weight, nothing fitted
        return {"val": in_sample, "test": test}, {"parts": 0}
    part, weights = cross_fit_fusion_weights(classifier.val, knn["val"], row_weight, FUSION_CROSS_FIT_PARTS)
    blocks, order = [], []
    for j, w in enumerate(weights):
        rows = np.flatnonzero(part == j)
        part_scores = take_rows(classifier.val, rows), take_rows(knn["val"], rows)
        blocks.append(fuse(*part_scores, w, num_classes, top_k))
        order.append(rows)
    val = take_rows(concat_scores(blocks), np.argsort(np.concatenate(order), kind="stable"))
    labelled = classifier.val.labels >= 0
    top1 = {
        name: round(float((s.topk_labels[labelled, 0] == s.labels[labelled]).mean()), 4)
        for name, s in (("cross_fit", val), ("in_sample", in_sample))
    }
    return {"val": val, "test": test}, {
        "parts": len(weights),
        "weight_min": round(min(weights), 4),
        "weight_max": round(max(weights), 4),
        "val_top1": top1,
    }
