"""Which of a run's outputs to submit, chosen on val by an estimate of the test metric.

Val follows train's SKU mix (it is held out of the head SKUs in proportion to their images), test
may not: Products-10K's test is its own mix, the embedded default's is balanced. Val top-1 then
answers the wrong question: on real long-tailed photos it read 0.95 where test read 0.79, and no
choice made on it could see the gap. So every choice here is made on a **prior-corrected val
top-1**: each val image weighted so that val's SKU mix matches ``evaluate.target_prior``
(``uniform``: every SKU alike, as a balanced test; ``train``: train's mix, plain val top-1; or a
CSV ``sku,weight`` of the mix you expect). SKUs without val images (the tail, under
``prepare.val_min_images``) cannot be measured; ``coverage`` says how much of the target's mass the
estimate stands on.

Post-hoc logit adjustment (Menon et al., ICLR 2021): a classifier trained on a long-tailed set
carries the training prior in its scores; subtracting ``tau * log prior(y)`` from each label's log
probability removes it (``tau = 1`` is the Bayes-optimal correction for a balanced target). ``tau``
is fitted on the val estimate over ``submit.tau_grid`` (``submit.logit_adjust: auto``) or set. It
re-ranks the ``RERANK_K`` most likely labels of each row (the predictions files keep the top-k;
a label outside them would need a probability over 1/e^(tau x the prior ratio) higher to come back).

:func:`choose` scores every (candidate, tau): the candidates are the evaluated phases' TTA'd
classifier ensembles and the fused classifier + kNN ensemble (``submit.phase: auto``), or the one
``submit.phase`` names; the best estimate wins, earlier candidates and smaller tau on ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from products10k.estimate import coverage, estimate, row_weights, target_prior

__all__ = ["RERANK_K", "adjust", "best", "coverage", "estimate", "row_weights", "score_taus", "target_prior"]

#: labels per row that logit adjustment may re-rank
RERANK_K = 50


def adjust(
    labels: np.ndarray, probs: np.ndarray, log_prior: np.ndarray, tau: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k re-ranked by ``log p - tau * log prior``, probabilities renormalised over the
    row's k labels (softmax of the adjusted log scores). ``tau = 0`` returns the input unchanged."""
    if tau == 0:
        return labels, probs
    scores = np.log(np.clip(probs.astype(np.float64), 1e-30, None)) - tau * log_prior[labels]
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    new = np.exp(scores - scores[:, :1])
    return np.take_along_axis(labels, order, axis=1), (new / new.sum(axis=1, keepdims=True)).astype(
        np.float32
    )


@dataclass
class Scored:
    """One (candidate, tau): its val estimate, plain val top-1 and (for the record) test top-1."""

    candidate: str
    tau: float
    val_estimate: float
    val_top1: float
    test_top1: float | None = None

    def as_dict(self) -> dict:
        out = {"candidate": self.candidate, "tau": self.tau}
        out |= {"val_estimate": round(self.val_estimate, 6), "val_top1": round(self.val_top1, 6)}
        if self.test_top1 is not None:
            out["test_top1"] = round(self.test_top1, 6)
        return out


def score_taus(
    candidate: str, labels: np.ndarray, probs: np.ndarray, val_labels, weights, log_prior, taus
) -> list[Scored]:
    """Every tau of ``taus`` on one candidate's val top-k."""
    known = np.asarray(val_labels) >= 0
    out = []
    for tau in taus:
        top1 = adjust(labels, probs, log_prior, tau)[0][:, 0]
        plain = float((top1 == val_labels)[known].mean()) if known.any() else float("nan")
        out.append(Scored(candidate, float(tau), estimate(top1, val_labels, weights), plain))
    return out


def best(scored: list[Scored]) -> Scored:
    """The highest val estimate; ties go to the earlier candidate, then the smaller tau (list order).
    Without val rows (prepare.val_fraction: 0) nothing can be estimated: the first one."""
    finite = [s for s in scored if np.isfinite(s.val_estimate)]
    if not finite:
        return scored[0]
    top = max(s.val_estimate for s in finite)
    return next(s for s in finite if s.val_estimate >= top - 1e-12)
