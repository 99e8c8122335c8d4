"""A deterministic, Products-10K-like dataset: the embedded default that exercises the real code path.

What it imitates (the paper, section 3): SKUs are organised in groups; SKUs of one group share the
packaging shape and base colour and differ only in details, so recognising the group is easy and
recognising the SKU is fine-grained. Every SKU has clean *in-shop* images (centred, plain
background) and harder *customer* images (clutter, rotation and perspective, lighting and colour
casts, blur, partial occlusion); the test set is mostly customer images; training counts per SKU are
long-tailed.

The cues that separate SKUs of one group, from coarse to fine (sizes relative to the product height):

- a *mark* (circle, triangle, square or diamond, ~12%) and the *count of stripes* (1-4 bars of ~3%):
  medium cues that survive even a 64 px crop (the product ~43 px high);
- a 3-character *code* (``CODE_HEIGHT`` = 6%): the fine cue, sized for the default 128 px training
  crop - ~5 px high and legible there, a smudge at 64 px, the Table 1 baseline's half resolution (the
  paper's 448:224, scaled down);
- a row of 1-3 tiny *dots* and a *barcode* of thin bars: the finest cues, resolved only at several
  hundred pixels (they never decide the SKU: the code already does).

Within a group the SKUs cycle through ``medium_variants`` distinct (mark, stripes) pairs (at most
4 x 4): with 8 SKUs and 4 variants every SKU shares its mark and stripes with one other SKU of its
group, and only the code tells the two apart - what a low-resolution model cannot read.

Output is the official layout (``products10k.raw.contract``): ``train.zip`` (``train/<n>.jpg``),
``test.zip`` (``test/<7 digits>.jpg``), ``train.csv`` (``name,class,group,domain``) and
``test_kaggletest.csv`` (``name,class,Usage,domain``). The same params give byte-identical files:
every image draws from its own RNG seeded by (seed, split, row), JPEGs are encoded by cv2 with
fixed settings, zip entries carry a fixed timestamp, and the worker count never changes the bytes.
"""

from __future__ import annotations

import colorsys
import csv
import logging
import math
import os
import string
import zipfile
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from products10k.common import ordered_map, resolve_n_jobs
from products10k.config import SyntheticConfig
from products10k.imaging.images import encode_jpeg

logger = logging.getLogger(__name__)

# Zip entries get this timestamp (the zip epoch) so that archives do not depend on the clock.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
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


# --------------------------------------------------------------------------------------------
# Rendering: one canonical product image per SKU, placed into a scene per row.
# --------------------------------------------------------------------------------------------

# Per shape: width/height aspect and the label rectangle (x0, y0, x1, y1) in fractions of the
# product's width and height. Labels are at least 0.62 high so the layout below always fits.
_LABELS = {
    "box": (0.72, (0.07, 0.16, 0.93, 0.92)),
    "bottle": (0.46, (0.04, 0.33, 0.96, 0.96)),
    "can": (0.58, (0.02, 0.12, 0.98, 0.88)),
    "pouch": (0.74, (0.09, 0.18, 0.91, 0.94)),
    "jar": (0.84, (0.03, 0.22, 0.97, 0.94)),
    "tube": (0.52, (0.15, 0.10, 0.85, 0.74)),
}


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))


def _silhouette(shape: str, w: int, h: int, mask: np.ndarray, img: np.ndarray, sku: Sku) -> None:
    """Draw the packaging shape into ``mask`` (255 inside) and its non-label parts into ``img``."""
    base = sku.base_bgr
    dark = _shade(base, 0.55)
    metal = (185, 185, 190)

    def poly(points, color, target=img):
        pts = np.array([[round(x * (w - 1)), round(y * (h - 1))] for x, y in points], np.int32)
        cv2.fillPoly(target, [pts], color, lineType=cv2.LINE_AA)

    def rect(x0, y0, x1, y1, color, target=img):
        poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color, target)

    def ellipse(cx, cy, rx, ry, color, target=img):
        cv2.ellipse(
            target,
            (round(cx * w), round(cy * h)),
            (round(rx * w), round(ry * h)),
            0,
            0,
            360,
            color,
            -1,
            cv2.LINE_AA,
        )

    if shape == "box":
        rect(0, 0, 1, 1, 255, mask)
        rect(0, 0, 1, 1, base)
        rect(0, 0, 1, 0.07, dark)  # top flap
    elif shape == "bottle":
        for target, (cap, neck, body) in ((mask, (255, 255, 255)), (img, (dark, base, base))):
            rect(0.33, 0.0, 0.67, 0.08, cap, target)
            rect(0.37, 0.08, 0.63, 0.2, neck, target)
            poly([(0.37, 0.2), (0.63, 0.2), (1.0, 0.3), (0.0, 0.3)], body, target)
            rect(0.0, 0.3, 1.0, 1.0, body, target)
    elif shape == "can":
        rect(0, 0.04, 1, 0.96, 255, mask)
        ellipse(0.5, 0.04, 0.5, 0.04, 255, mask)
        ellipse(0.5, 0.96, 0.5, 0.04, 255, mask)
        rect(0, 0.04, 1, 0.96, base)
        ellipse(0.5, 0.96, 0.5, 0.04, metal)
        ellipse(0.5, 0.04, 0.5, 0.04, metal)
    elif shape == "pouch":
        outline = [(0.06, 0.0), (0.94, 0.0), (0.98, 0.5), (1.0, 1.0), (0.0, 1.0), (0.02, 0.5)]
        poly(outline, 255, mask)
        poly(outline, base)
        teeth = [(0.06 + 0.88 * k / 16, 0.0 if k % 2 == 0 else 0.03) for k in range(17)]
        poly(teeth + [(0.94, 0.08), (0.06, 0.08)], _shade(base, 1.3))  # crimped seal
    elif shape == "jar":
        rect(0.06, 0.0, 0.94, 0.17, 255, mask)
        rect(0.0, 0.15, 1.0, 1.0, 255, mask)
        rect(0.0, 0.15, 1.0, 1.0, base)
        rect(0.06, 0.0, 0.94, 0.17, dark)  # lid
    elif shape == "tube":
        outline = [(0.0, 0.0), (1.0, 0.0), (0.72, 0.86), (0.28, 0.86)]
        for target, color, cap in ((mask, 255, 255), (img, base, dark)):
            poly(outline, color, target)
            rect(0.3, 0.86, 0.7, 1.0, cap, target)
        rect(0.0, 0.0, 1.0, 0.05, _shade(base, 1.25))  # crimp
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _draw_mark(img: np.ndarray, kind: str, cx: int, cy: int, r: int, color) -> None:
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
        return
    if kind == "square":
        k = round(r * 0.85)
        pts = [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    elif kind == "triangle":
        pts = [
            (cx, cy - r),
            (cx + round(r * 0.95), cy + round(r * 0.75)),
            (cx - round(r * 0.95), cy + round(r * 0.75)),
        ]
    elif kind == "diamond":
        pts = [(cx, cy - r), (cx + round(r * 0.8), cy), (cx, cy + r), (cx - round(r * 0.8), cy)]
    else:  # pragma: no cover - MARKS is closed
        raise ValueError(f"unknown mark {kind!r}")
    cv2.fillPoly(img, [np.array(pts, np.int32)], color, lineType=cv2.LINE_AA)


def _put_text_fit(
    img, text: str, x0: int, x1: int, y_top: int, height: int, color, thick_frac: float
) -> None:
    """Draw ``text`` centred between x0 and x1, with its cap height about ``height`` px."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, base_h), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = height / max(base_h, 1)
    thickness = max(1, round(height * thick_frac))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    if tw > (x1 - x0):  # too wide: shrink to fit the label
        scale *= (x1 - x0) / tw
        (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    org = (x0 + (x1 - x0 - tw) // 2, y_top + th)
    cv2.putText(img, text, org, font, scale, color, thickness, cv2.LINE_AA)


def render_product(sku: Sku, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical front view of ``sku``: a BGR image and an alpha mask (uint8), ``height`` px high."""
    aspect, (lx0, ly0, lx1, ly1) = _LABELS[sku.shape]
    h = height
    w = round(aspect * h)
    img = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    _silhouette(sku.shape, w, h, mask, img, sku)

    # Label: a light tint of the group colour, identical for the whole group.
    x0, y0, x1, y1 = round(lx0 * w), round(ly0 * h), round(lx1 * w), round(ly1 * h)
    label_bg = _mix(sku.base_bgr, (245, 245, 245), 0.6)
    cv2.rectangle(img, (x0, y0), (x1, y1), label_bg, -1)
    ink = _shade(sku.base_bgr, 0.45)
    lw = x1 - x0

    # Vertical layout in fractions of the product height (sums to ~0.58 < smallest label, 0.62).
    y = y0 + round(0.025 * h)
    _put_text_fit(img, sku.brand, x0 + lw // 12, x1 - lw // 12, y, round(0.07 * h), ink, 0.14)
    y += round(0.10 * h)
    r = round(0.06 * h)  # medium cue: the mark, ~10% of a 512 px image at in-shop scale
    _draw_mark(img, sku.mark, (x0 + x1) // 2, y + r, r, sku.accent_bgr)
    y += 2 * r + round(0.025 * h)
    # Medium cue: 1-4 bars centred in a fixed-height band, so count and position both differ.
    bar, gap = round(0.03 * h), round(0.02 * h)
    band = MAX_STRIPES * bar + (MAX_STRIPES - 1) * gap
    used = sku.stripes * bar + (sku.stripes - 1) * gap
    yb = y + (band - used) // 2
    for _ in range(sku.stripes):
        cv2.rectangle(img, (x0 + lw // 5, yb), (x1 - lw // 5, yb + bar - 1), ink, -1)
        yb += bar + gap
    y += band + round(0.02 * h)
    # Fine cue: the code on a line of its own, sized for the default 128 px crop (see CODE_HEIGHT).
    code_h = round(CODE_HEIGHT * h)
    _put_text_fit(img, sku.code, x0 + lw // 12, x1 - lw // 12, y, code_h, (30, 30, 30), 0.15)
    y += code_h + round(0.025 * h)
    # Finest cues on one line, for high resolutions only: 1-3 dots (left), a barcode (right).
    text_h = round(0.028 * h)
    dot_r = max(2, round(0.007 * h))
    for k in range(sku.dots):
        cv2.circle(img, (x0 + lw // 8 + k * 3 * dot_r, y + text_h // 2), dot_r, (30, 30, 30), -1, cv2.LINE_AA)
    unit = max(1, round(0.0035 * h))
    xb = x0 + round(lw * 0.45)
    for i, width in enumerate(sku.barcode):
        if xb + width * unit > x1 - lw // 20:
            break
        if i % 2 == 0:
            cv2.rectangle(img, (xb, y), (xb + width * unit - 1, y + text_h), (20, 20, 20), -1)
        xb += width * unit

    # Shading: cylinders get a horizontal cosine profile, boxes a soft gradient; a 3-D look that
    # is the same for every SKU of a group, so it carries no label information.
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    if sku.shape in ("bottle", "can", "jar", "tube"):
        profile = 0.72 + 0.34 * np.cos(xs * 1.25)
    else:
        profile = 1.02 - 0.12 * (xs + 1.0) / 2
    img = np.clip(img.astype(np.float32) * profile[None, :, None], 0, 255).astype(np.uint8)
    img[mask == 0] = 0
    return img, mask


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def _clutter_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A shop-shelf-like busy background: bands, random objects and low-frequency texture."""
    base = rng.integers(40, 200, size=3)
    bg = np.empty((h, w, 3), np.uint8)
    bg[:] = base.astype(np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # shelf edges
        y = int(rng.integers(0, h))
        cv2.rectangle(
            bg, (0, y), (w, y + int(rng.integers(h // 40, h // 12))), rng.integers(0, 256, 3).tolist(), -1
        )
    for _ in range(int(rng.integers(6, 14))):  # other products and objects
        color = rng.integers(0, 256, 3).tolist()
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        a, b = int(rng.integers(w // 20, w // 5)), int(rng.integers(h // 20, h // 4))
        if rng.random() < 0.5:
            cv2.rectangle(bg, (cx - a, cy - b), (cx + a, cy + b), color, -1)
        else:
            cv2.ellipse(bg, (cx, cy), (a, b), float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
    # Low-frequency shading: a 6x6 random field blown up (linear: cubic costs 3x, looks the same).
    texture = rng.normal(0.0, 25.0, size=(6, 6, 3)).astype(np.float32)
    texture = cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)
    bg = cv2.add(bg, texture, dtype=cv2.CV_8U)  # saturating uint8 add
    sigma = float(rng.uniform(1.0, 3.0))  # shallow depth of field: the shelf is out of focus
    return cv2.GaussianBlur(bg, (0, 0), sigma)


def _placement(
    pw: int,
    ph: int,
    w: int,
    h: int,
    height_frac: float,
    angle_deg: float,
    persp: float,
    shift: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """The homography that maps the canonical product (pw x ph) into a (w x h) scene."""
    scale = height_frac * h / ph
    cx, cy = w / 2 + shift[0] * w, h / 2 + shift[1] * h
    src = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float32)
    corners = (src - [pw / 2, ph / 2]) * scale
    if persp > 0:
        corners = corners + rng.normal(0.0, persp * ph * scale, size=(4, 2))
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    dst = (corners @ rot.T + [cx, cy]).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def _composite(bg: np.ndarray, product: np.ndarray, mask: np.ndarray, homography: np.ndarray) -> tuple:
    h, w = bg.shape[:2]
    fg = cv2.warpPerspective(product, homography, (w, h), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(mask, homography, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    # out = bg + alpha * (fg - bg), in place on one float buffer
    out = fg.astype(np.float32)
    out -= bg
    out *= alpha[..., None]
    out += bg
    return out, alpha


def render_inshop(product: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A catalogue photo: centred, upright, plain light background, a soft shadow."""
    h = w = size
    bg = np.empty((h, w, 3), np.float32)
    bg[:] = float(rng.uniform(225, 255))
    bg *= np.linspace(1.0, float(rng.uniform(0.92, 1.0)), h, dtype=np.float32)[:, None, None]
    hom = _placement(
        product.shape[1],
        product.shape[0],
        w,
        h,
        height_frac=float(rng.uniform(0.78, 0.9)),
        angle_deg=float(rng.normal(0, 1.0)),
        persp=0.0,
        shift=(float(rng.normal(0, 0.01)), float(rng.normal(0, 0.01))),
        rng=rng,
    )
    shadow = cv2.warpPerspective(mask, hom, (w, h)).astype(np.float32) / 255.0
    shadow = cv2.GaussianBlur(shadow, (0, 0), size / 60)
    shadow = np.roll(shadow, (size // 60, size // 80), axis=(0, 1))
    bg *= 1.0 - 0.25 * shadow[..., None]
    out, _ = _composite(bg, product, mask, hom)
    out *= float(rng.uniform(0.95, 1.05))
    return np.clip(out, 0, 255).astype(np.uint8)


def render_customer(
    product: np.ndarray, mask: np.ndarray, size: int, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """A shopper's photo: clutter, rotation and perspective, lighting and colour casts, blur,
    partial occlusion, sensor noise; some are portrait (size x 4/3 size), as phone photos are."""
    w = size
    h = round(size * 4 / 3) if rng.random() < 0.3 else size
    bg = _clutter_background(h, w, rng)
    hom = _placement(
        product.shape[1],
        product.shape[0],
        w,
        h,
        height_frac=float(rng.uniform(0.5, 0.85)) * w / h,  # same product scale in portrait photos
        angle_deg=float(rng.normal(0, 12.0 * difficulty)),
        persp=0.035 * difficulty,
        shift=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.08, 0.08))),
        rng=rng,
    )
    out, alpha = _composite(bg, product, mask, hom)

    # Partial occlusion: a hand or another object entering from a side of the product.
    if rng.random() < 0.5 * min(1.0, difficulty):
        ys, xs = np.nonzero(alpha > 0.5)
        if len(xs):
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            pw, ph = x1 - x0, y1 - y0
            color = (
                rng.uniform([120, 140, 180], [170, 190, 235])
                if rng.random() < 0.6
                else rng.uniform(0, 255, 3)
            ).tolist()
            side = int(rng.integers(0, 4))
            rx, ry = int(pw * rng.uniform(0.15, 0.35)), int(ph * rng.uniform(0.12, 0.25))
            cx = {0: x0, 1: x1}.get(side, int(rng.integers(x0, x1 + 1)))
            cy = {2: y0, 3: y1}.get(side, int(rng.integers(y0, y1 + 1)))
            cv2.ellipse(
                out, (int(cx), int(cy)), (rx, ry), float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA
            )

    # Lighting: a directional gain ramp, a colour cast and a gamma change.
    phi = rng.uniform(0, 2 * math.pi)
    xs = (np.arange(w, dtype=np.float32) / w - 0.5) * math.cos(phi)
    ys = (np.arange(h, dtype=np.float32) / h - 0.5) * math.sin(phi)
    ramp = ys[:, None] + xs[None, :]
    gain = float(rng.uniform(0.75, 1.15)) + float(rng.uniform(0.1, 0.45)) * min(1.0, difficulty) * ramp
    cast = rng.normal(1.0, 0.07 * difficulty, size=3).clip(0.75, 1.25).astype(np.float32)
    out *= gain[..., None]
    out *= cast
    img = np.clip(out, 0, 255).astype(np.uint8)
    # Gamma through a 256-entry table: a per-pixel power on floats costs ~10x more.
    lut = (255.0 * (np.arange(256) / 255.0) ** float(rng.uniform(0.8, 1.25))).round().astype(np.uint8)
    img = cv2.LUT(img, lut)

    # Blur: defocus or hand shake, mild enough that the code stays legible at 448 on most photos.
    u = rng.random()
    if u < 0.45:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.1)) * difficulty + 1e-3)
    elif u < 0.65:
        length = int(rng.integers(3, 8))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        img = cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))
    # Sensor noise on luminance only: a third of the random numbers of per-channel noise.
    noise = rng.standard_normal((h, w), dtype=np.float32) * float(rng.uniform(1.0, 5.0))
    return cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)


def render_row(row: Row, cfg: SyntheticConfig, products: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The JPEG bytes of ``row``; depends only on (seed, split, row index) and the SKU."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_CODES[row.split], row.index]))
    product, mask = products[row.sku.sku_id]
    if row.domain == "inshop":
        return encode_jpeg(render_inshop(product, mask, cfg.image_size, rng), INSHOP_JPEG_QUALITY, bgr=True)
    img = render_customer(product, mask, cfg.image_size, cfg.customer_difficulty, rng)
    return encode_jpeg(img, int(rng.integers(72, 93)), bgr=True)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def zip_info(arcname: str) -> zipfile.ZipInfo:
    """A zip entry with fixed metadata (time, mode, system) so archives are byte-reproducible."""
    info = zipfile.ZipInfo(arcname, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED  # JPEGs do not compress; stored is faster to read
    info.create_system = 3  # unix, whatever the host
    info.external_attr = 0o644 << 16
    return info


def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def generate(cfg: SyntheticConfig, out_dir: str | os.PathLike) -> dict:
    """Write the four official files for ``cfg`` into ``out_dir`` (an empty staging folder).

    Returns a summary (counts per split and domain) for the log. The caller makes the result
    atomic (``products10k.raw.download`` builds into a staging folder and renames it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skus = make_catalogue(cfg)
    train, test, usage = make_rows(cfg, skus)
    product_height = round(0.9 * cfg.image_size)  # ~1:1 with the largest in-shop placement
    products = {sku.sku_id: render_product(sku, product_height) for sku in skus}

    # Our threads already fill the cores; cv2's own pool on top would only oversubscribe them.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with tqdm(total=len(train) + len(test), desc="synthetic images", unit="img") as bar:
            for split, rows in (("train", train), ("test", test)):
                # ordered_map yields in row order whatever the thread scheduling, so the bytes
                # never depend on n_jobs; closing it on an error cancels the queued rows.
                tasks = [(row, cfg, products) for row in rows]
                jpegs = ordered_map(render_row, tasks, resolve_n_jobs(cfg.n_jobs, len(rows)), "synthetic")
                with zipfile.ZipFile(out / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf, closing(jpegs):
                    for row, data in zip(rows, jpegs, strict=True):
                        zf.writestr(zip_info(f"{split}/{row.name}"), data)
                        bar.update(1)
    finally:
        cv2.setNumThreads(cv2_threads)

    _write_csv(
        out / "train.csv",
        ["name", "class", "group", "domain"],
        ([r.name, r.sku.sku_id, r.sku.group_id, r.domain] for r in train),
    )
    _write_csv(
        out / "test_kaggletest.csv",
        ["name", "class", "Usage", "domain"],
        ([r.name, r.sku.sku_id, u, r.domain] for r, u in zip(test, usage, strict=True)),
    )
    summary = {
        "skus": len(skus),
        "groups": cfg.num_groups,
        "train_images": len(train),
        "train_inshop": sum(r.domain == "inshop" for r in train),
        "test_images": len(test),
        "test_customer": sum(r.domain == "customer" for r in test),
        "test_public": usage.count("Public"),
    }
    logger.info("synthetic data: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
