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
re-ranks the ``submit.rerank_k`` most likely labels of each row (the predictions files keep the top-k;
a label outside them would need a probability over 1/e^(tau x the prior ratio) higher to come back).

Every (candidate, tau) is scored: the candidates are the evaluated phases' TTA'd classifier
ensembles, the kNN and the fused classifier + kNN ensembles (``submit.phase: auto``), or the one
``submit.phase`` names. **The choice holds against val's noise** (:class:`NoiseAwareChoice`): it
starts from a reference output named in params.yaml (``submit.reference`` at the grid's first tau,
0: its plain output) and leaves it only for a choice whose gain over the reference is above zero
at the lower end of its paired interval, the interval widened for the number of choices compared
(Bonferroni: each at ``1 - (1 - submit.confidence) / m`` for ``m`` choices besides the reference).
Among such choices the highest estimate wins (earlier candidates, then smaller tau, on ties). On
real long-tailed photos the plain argmax took the kNN for a val lead of +0.0016 [-0.030, +0.024]
among 35 choices and submitted the run's worst output; an argmax over many noisy estimates favours
whichever one val's noise flatters (the winner's curse). ``docs/pipeline.md`` says what a val of N
images can tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from products10k.estimate import coverage, estimate, paired_gain, row_weights, target_prior

__all__ = [
    "NoiseAwareChoice",
    "adjust",
    "best",
    "coverage",
    "estimate",
    "row_weights",
    "score_taus",
    "target_prior",
]


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
    """One (candidate, tau): its val estimate, plain val top-1, its gain over the reference with the
    interval the choice used, and (for the record) test top-1."""

    candidate: str
    tau: float
    val_estimate: float
    val_top1: float
    test_top1: float | None = None
    #: per val row, whether its top-1 is its label: what the paired interval is computed from
    hits: np.ndarray | None = field(default=None, repr=False)
    gain: float | None = None
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict:
        out = {"candidate": self.candidate, "tau": self.tau}
        out |= {"val_estimate": round(self.val_estimate, 6), "val_top1": round(self.val_top1, 6)}
        if self.gain is not None:
            out |= {"gain": _rounded(self.gain), "gain_interval": [_rounded(self.low), _rounded(self.high)]}
        if self.test_top1 is not None:
            out["test_top1"] = round(self.test_top1, 6)
        return out


def _rounded(x: float) -> float | None:
    """JSON has no nan or inf: an interval val cannot bound is null."""
    return round(x, 6) if np.isfinite(x) else None


def score_taus(
    candidate: str, labels: np.ndarray, probs: np.ndarray, val_labels, weights, log_prior, taus
) -> list[Scored]:
    """Every tau of ``taus`` on one candidate's val top-k."""
    known = np.asarray(val_labels) >= 0
    out = []
    for tau in taus:
        top1 = adjust(labels, probs, log_prior, tau)[0][:, 0]
        plain = float((top1 == val_labels)[known].mean()) if known.any() else float("nan")
        hits = top1 == val_labels
        out.append(Scored(candidate, float(tau), estimate(top1, val_labels, weights), plain, hits=hits))
    return out


def best(scored: list[Scored]) -> Scored:
    """The highest val estimate; ties go to the earlier candidate, then the smaller tau (list order).
    Without val rows (prepare.val_fraction: 0) nothing can be estimated: the first one."""
    finite = [s for s in scored if np.isfinite(s.val_estimate)]
    if not finite:
        return scored[0]
    top = max(s.val_estimate for s in finite)
    return next(s for s in finite if s.val_estimate >= top - 1e-12)


class NoiseAwareChoice:
    """The submission's choice, fed one candidate's (candidate, tau) rows at a time, the reference's first.

    ``compared``: how many choices besides the reference will be seen (the Bonferroni ``m``); each
    gets its gain over the reference with a two-sided interval at ``1 - (1 - confidence) / m``, and
    the pick moves from the reference only to a choice whose interval lies above zero, the highest
    estimate among those. Fed one candidate at a time so that the caller keeps one candidate's
    ensemble in memory besides the pick's.
    """

    def __init__(
        self, reference: tuple[str, float], weights: np.ndarray, *, compared: int, confidence: float
    ):
        self.reference_key = reference
        self.weights = weights
        self.compared = max(compared, 1)
        self.level = 1.0 - (1.0 - confidence) / self.compared
        self.z = NormalDist().inv_cdf(1.0 - (1.0 - self.level) / 2)
        self.scored: list[Scored] = []
        self.reference: Scored | None = None
        self.pick: Scored | None = None

    def add(self, rows: list[Scored]) -> bool:
        """Score one candidate's rows against the reference; True when the pick moved to one of them."""
        if self.reference is None:
            self.reference = next((s for s in rows if (s.candidate, s.tau) == self.reference_key), None)
            if self.reference is None:
                raise ValueError(f"the first candidate fed must hold the reference {self.reference_key}")
            self.pick = self.reference
        moved = False
        for s in rows:
            s.gain, se = paired_gain(s.hits, self.reference.hits, self.weights)
            s.low, s.high = s.gain - self.z * se, s.gain + self.z * se
            if s is not self.reference and s.low > 0 and self._beats_pick(s):
                self.pick, moved = s, True
        self.scored += rows
        return moved

    def _beats_pick(self, s: Scored) -> bool:
        if self.pick is self.reference:
            return True  # its interval already excludes zero
        return s.val_estimate > self.pick.val_estimate + 1e-12

    def report(self) -> dict:
        """The rule and its figures for metrics/submission.json."""
        w = self.weights[self.weights > 0]
        top = best(self.scored)
        return {
            "reference": {"candidate": self.reference.candidate, "tau": self.reference.tau},
            "rule": "leave the reference only for a gain whose interval lies above zero; the intervals are "
            f"paired, two-sided at {self.level:.5f} (Bonferroni for {self.compared} choices compared)",
            "interval_level": round(self.level, 6),
            "z": round(self.z, 4),
            "compared": self.compared,
            "val_rows": int(len(w)),
            # (sum w)^2 / sum w^2: how many equally weighted rows the estimate is worth
            "val_effective_rows": round(float(w.sum() ** 2 / (w**2).sum()), 1) if len(w) else 0.0,
            "highest_estimate": {
                "candidate": top.candidate,
                "tau": top.tau,
                "val_estimate": round(top.val_estimate, 6),
            },
        }
