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

Output is the official layout (``products10k.contracts.raw``): ``train.zip`` (``train/<n>.jpg``),
``test.zip`` (``test/<7 digits>.jpg``), ``train.csv`` (``name,class,group,domain``) and
``test_kaggletest.csv`` (``name,class,Usage,domain``). The same params give byte-identical files:
every image draws from its own RNG seeded by (seed, split, row), JPEGs are encoded by cv2 with
fixed settings, zip entries carry a fixed timestamp, and the worker count never changes the bytes.
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import cv2
from tqdm import tqdm

from products10k.common import ordered_map, resolve_n_jobs
from products10k.config import SyntheticConfig
from products10k.raw.catalogue import (
    make_catalogue,
    make_rows,
)
from products10k.raw.render import render_product, render_row

logger = logging.getLogger(__name__)

# Zip entries get this timestamp (the zip epoch) so that archives do not depend on the clock.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

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
