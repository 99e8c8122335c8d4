"""The statistics of the Table 1 report: per-row mean and spread over seeds, and each step's gain
with a paired bootstrap confidence interval over test images.

Method. Every row is evaluated on the same test images, for every seed, so a step (row r vs row
r - 1) is compared image by image: ``d[s, i] = hit_r[s, i] - hit_{r-1}[s, i]``. Pooled over seeds,
each image has one mean difference ``D[i] = mean_s d[s, i]``; the gain is ``mean_i D[i]`` (the
difference of the seed-mean accuracies) and its interval is the percentile interval of the means of
``bootstrap`` resamples of the images, with replacement. Resampling images (not seeds) measures
how much the figure would move on another test set of the same size: with a few hundred test images, the
dominant uncertainty of the embedded default. Seed-to-seed variation is reported beside it as the
standard deviation of each row's accuracy over seeds (with 2-3 seeds an interval over seeds would
be meaningless). An interval that excludes 0 says the step is real on this test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: resamples drawn per chunk: (chunk, images) int64 indices, 44 MB at 55k test images
CHUNK = 100


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def seed_spread(hits: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds of the accuracy; ``hits`` is (seeds, images)."""
    per_seed = hits.mean(axis=1)
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return float(per_seed.mean()), std


def paired_bootstrap(
    after: np.ndarray, before: np.ndarray, *, resamples: int, confidence: float, seed: int
) -> Interval:
    """Gain ``after - before`` in accuracy with its bootstrap interval (see the module docstring).

    ``after``, ``before``: (seeds, images) boolean or 0/1 hits on the same images in the same order.
    """
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"rows compared on different images: {after.shape} vs {before.shape}")
    per_image = (after - before).mean(axis=0)
    n = len(per_image)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        stop = min(start + CHUNK, resamples)
        means[start:stop] = per_image[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(per_image.mean()), float(low), float(high))
