"""The statistics of the Table 1 report: per-row mean and spread over seeds, and each step's gain
with a bootstrap confidence interval over both training seeds and test images.

Method. Every row is evaluated on the same test images, for every seed, so a step (row r vs row
r - 1) is compared seed by seed and image by image: ``d[s, i] = hit_r[s, i] - hit_{r-1}[s, i]``.
The gain is ``mean_{s,i} d[s, i]`` (the difference of the seed-mean accuracies). Its interval is
the percentile interval of the gains of ``bootstrap`` two-level resamples: each draws the seeds
with replacement (S of S) and, independently, the test images with replacement (n of n), and
averages ``d`` over the drawn seeds x drawn images (the images are drawn once per resample and
shared by the seeds, as every seed was tested on the same images).

What the interval covers: how far the gain would move with other training seeds *and* another
test set of the same size. One that excludes 0 (marked ``*``) says the step's sign is not
explained by either source of variation at this data size. What it does not cover: other data,
other models, other hyper-parameters. With 2-3 seeds the seed part is itself a rough estimate
(the bootstrap of S values understates their variance by about (S-1)/S); the per-row standard
deviation over seeds is reported beside it.
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
    """Gain ``after - before`` in accuracy with its seeds x images bootstrap interval (module docstring).

    ``after``, ``before``: (seeds, images) boolean or 0/1 hits on the same images in the same order.
    """
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"rows compared on different images: {after.shape} vs {before.shape}")
    diff = after - before
    seeds, n = diff.shape
    if n == 0 or seeds == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    gains = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        stop = min(start + CHUNK, resamples)
        images = rng.integers(0, n, (stop - start, n))
        drawn_seeds = rng.integers(0, seeds, (stop - start, seeds))
        # per resample and seed: the mean difference over the drawn images, (chunk, seeds)
        per_seed = np.stack([diff[s][images].mean(axis=1) for s in range(seeds)], axis=1)
        gains[start:stop] = np.take_along_axis(per_seed, drawn_seeds, axis=1).mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high))
