"""The embedded dataset's catalogue: which SKUs exist (groups sharing a shape and base colour,
told apart by a mark, stripes and a printed code), how many train and test images each gets (the
long tail), and which rows (in-shop or customer photos) the splits hold. ``render.py`` draws them;
``synthetic.py`` writes the four official files."""

from __future__ import annotations

import colorsys
import string
from dataclasses import dataclass

import numpy as np

from products10k.config import SyntheticConfig

SHAPES = ("box", "bottle", "can", "pouch", "jar", "tube")
MARKS = ("circle", "triangle", "square", "diamond")
MAX_STRIPES = 4
# Letters and digits that stay distinct in the Hershey font (no O/0, I/1, S/5, Z/2, B/8).
CODE_ALPHABET = "ACDEFHKLMNPRTUVWXY34679"
# Every code has 3 characters: a blurred code of 2 would still be told from one of 3 by its width.
CODE_LENGTH = 3
# Cap height of the code, as a fraction of the product height. A 128 px training crop (the default)
# shows the product ~60-110 px high, the code ~4-7 px: legible. Half of it (64 px, the Table 1
# baseline) leaves ~2-3 px with sub-pixel strokes: a grey smudge.
CODE_HEIGHT = 0.06
INSHOP_JPEG_QUALITY = 92
SPLIT_CODES = {"train": 1, "test": 2}
# Real SKU ids run up to ~9.7k and group ids to ~360; spread synthetic ids over similar ranges so
# that nothing downstream can assume contiguous ids.
SKU_ID_RANGE = (1, 10_000)
GROUP_ID_RANGE = (1, 400)


@dataclass(frozen=True)
class Sku:
    """One synthetic SKU and the cues that make it look like itself."""

    sku_id: int
    group_id: int
    shape: str
    base_bgr: tuple[int, int, int]  # shared by the group
    accent_bgr: tuple[int, int, int]  # mark colour, shared by the group
    brand: str  # shared by the group
    mark: str  # medium cue
    stripes: int  # medium cue
    code: str  # fine cue
    dots: int  # fine cue
    barcode: tuple[int, ...]  # fine cue: bar widths in units


@dataclass(frozen=True)
class Row:
    """One image to render: its file name, SKU and domain (``inshop`` or ``customer``)."""

    split: str
    index: int
    name: str
    sku: Sku
    domain: str


# --------------------------------------------------------------------------------------------
# Catalogue: groups, SKUs and the rows of both CSVs, all from one RNG in a fixed order.
# --------------------------------------------------------------------------------------------


def _hsv_to_bgr(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(b * 255), round(g * 255), round(r * 255))


def make_catalogue(cfg: SyntheticConfig) -> list[Sku]:
    """The SKUs of ``cfg``: ``num_groups`` groups of ``skus_per_group`` SKUs each."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    n_skus = cfg.n_skus
    # SKUs per group: all equal (skus_per_group), or num_skus dealt out, sizes differing by <= 1
    sizes = [n_skus // cfg.num_groups + (g < n_skus % cfg.num_groups) for g in range(cfg.num_groups)]
    if n_skus > SKU_ID_RANGE[1] - SKU_ID_RANGE[0]:
        raise ValueError(f"{n_skus} SKUs do not fit the id range {SKU_ID_RANGE}")
    group_span = max(GROUP_ID_RANGE[1], 2 * cfg.num_groups)
    group_ids = np.sort(rng.choice(np.arange(GROUP_ID_RANGE[0], group_span), cfg.num_groups, replace=False))
    sku_ids = rng.choice(np.arange(*SKU_ID_RANGE), n_skus, replace=False)
    # Base colours: hues spread evenly around the wheel (rotated by the seed) so that groups are easy
    # to tell apart by colour; shapes cycle, so two groups share a shape only with different hues.
    hue0 = rng.random()
    shape_order = rng.permutation(len(SHAPES))
    pairs = [(mark, stripes) for mark in range(len(MARKS)) for stripes in range(1, MAX_STRIPES + 1)]
    skus: list[Sku] = []
    for g, group_size in enumerate(sizes):
        hue = hue0 + g / cfg.num_groups
        base = _hsv_to_bgr(hue, 0.55 + 0.3 * rng.random(), 0.6 + 0.25 * rng.random())
        accent = _hsv_to_bgr(hue + 0.5, 0.8, 0.75)
        brand = "".join(rng.choice(list(string.ascii_uppercase), int(rng.integers(4, 6))))
        shape = SHAPES[shape_order[g % len(SHAPES)]]
        order = rng.permutation(len(pairs))
        codes: set[str] = set()
        for j in range(group_size):
            mark, stripes = pairs[order[j % cfg.medium_variants]]
            while True:  # codes are unique within the group: the fine cue always differs
                code = "".join(rng.choice(list(CODE_ALPHABET), CODE_LENGTH))
                if code not in codes:
                    codes.add(code)
                    break
            skus.append(
                Sku(
                    sku_id=int(sku_ids[len(skus)]),
                    group_id=int(group_ids[g]),
                    shape=shape,
                    base_bgr=base,
                    accent_bgr=accent,
                    brand=brand,
                    mark=MARKS[mark],
                    stripes=stripes,
                    code=code,
                    dots=int(rng.integers(1, 4)),
                    barcode=tuple(int(w) for w in rng.integers(1, 4, size=18)),
                )
            )
    return skus


# Spread of log(images per SKU) when train_images fixes the total: with Products-10K's mean of
# 14.6 images per SKU it gives what the real data shows - most SKUs under 20 images, about one in
# ten with 1-2, a few heads of several hundred.
TOTAL_MODE_LOG_SIGMA = 1.0


def train_counts(cfg: SyntheticConfig, n_skus: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed images per SKU.

    Without ``train_images``: rank k gets ``max * (k+1)^-tail_power`` (at least ``min``), ranks
    shuffled so that head and tail SKUs are spread over groups and ids. With it: log-normal counts
    clipped to [min, max], scaled so that they sum to exactly ``train_images``.
    """
    if cfg.train_images is None:
        ranks = rng.permutation(n_skus)
        counts = np.round(cfg.train_max_per_sku * (ranks + 1.0) ** -cfg.tail_power).astype(int)
        return np.maximum(counts, cfg.train_min_per_sku)
    base = rng.lognormal(0.0, TOTAL_MODE_LOG_SIGMA, size=n_skus)
    return _counts_with_total(base, cfg.train_images, cfg.train_min_per_sku, cfg.train_max_per_sku, rng)


def _counts_with_total(base: np.ndarray, total: int, low: int, high: int, rng) -> np.ndarray:
    """Integers ~ ``scale * base`` in [low, high] summing to exactly ``total`` (validated feasible)."""

    def counts(scale: float) -> np.ndarray:
        return np.clip(np.round(scale * base), low, high).astype(np.int64)

    lo, hi = 0.0, 1.0
    while counts(hi).sum() < total:
        hi *= 2.0
    for _ in range(60):  # bisection on the scale: the sum is monotone in it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() < total else (lo, mid)
    out = counts(hi)
    # rounding leaves a small excess: take single images from random SKUs that stay >= low
    while (excess := int(out.sum()) - total) > 0:
        can = np.flatnonzero(out > low)
        out[rng.choice(can, size=min(excess, len(can)), replace=False)] -= 1
    return out


def per_sku_test_counts(cfg: SyntheticConfig, n_skus: int, rng: np.random.Generator) -> np.ndarray:
    """``test_per_sku`` each, or ``test_images`` spread evenly (random SKUs get the remainder)."""
    if cfg.test_images is None:
        return np.full(n_skus, cfg.test_per_sku)
    counts = np.full(n_skus, cfg.test_images // n_skus)
    counts[rng.permutation(n_skus)[: cfg.test_images % n_skus]] += 1
    return counts


def _domains(n: int, inshop_fraction: float, rng: np.random.Generator) -> list[str]:
    """``n`` domains for one SKU: the first is in-shop and (when n >= 2) one is customer, so every SKU
    has both kinds; the rest are in-shop with probability ``inshop_fraction``."""
    out = ["inshop" if rng.random() < inshop_fraction else "customer" for _ in range(n)]
    out[0] = "inshop"
    if n >= 2 and "customer" not in out:
        out[1] = "customer"
    return out


def make_rows(cfg: SyntheticConfig, skus: list[Sku]) -> tuple[list[Row], list[Row], list[str]]:
    """Train rows, test rows and the test ``Usage`` column, in CSV order."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    counts = train_counts(cfg, len(skus), rng)
    train_items = [
        (sku, domain)
        for sku, n in zip(skus, counts, strict=True)
        for domain in _domains(int(n), cfg.train_inshop_fraction, rng)
    ]
    train_items = [train_items[i] for i in rng.permutation(len(train_items))]
    train = [Row("train", i, f"{i + 1}.jpg", sku, domain) for i, (sku, domain) in enumerate(train_items)]

    test_items = []
    for sku, n in zip(skus, per_sku_test_counts(cfg, len(skus), rng), strict=True):
        for _ in range(n):
            test_items.append((sku, "customer" if rng.random() < cfg.test_customer_fraction else "inshop"))
    # Test names are unique 7-digit ids, like the real 4713701.jpg; rows are sorted by name.
    ids = np.sort(rng.choice(np.arange(1_000_000, 10_000_000), len(test_items), replace=False))
    test_items = [test_items[i] for i in rng.permutation(len(test_items))]
    test = [Row("test", i, f"{ids[i]}.jpg", sku, domain) for i, (sku, domain) in enumerate(test_items)]
    n_public = round(len(test) * cfg.public_fraction)
    usage_flags = np.zeros(len(test), dtype=bool)
    usage_flags[rng.permutation(len(test))[:n_public]] = True
    usage = ["Public" if flag else "Private" for flag in usage_flags]
    return train, test, usage
