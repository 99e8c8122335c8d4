"""The balance stage: the paper's balanced subset, at most ``per_class`` random images per SKU.

``per_class: null`` keeps every image: the finetunes then see all of train, and with
``sampler: class_balanced`` draw every SKU alike from all its images (class-balanced sampling over
the whole set, the common alternative to the paper's small subset; cRT's data).

The output keeps the input's columns and row order (the rows are a subset of ``train.csv``), so the
training code reads it exactly like ``train.csv``. SKUs with fewer images keep all of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from products10k.common import DataError, write_csv
from products10k.config import BalanceConfig
from products10k.config.stage import StageFiles, option

log = logging.getLogger(__name__)


def balanced_mask(skus: pd.Series, per_class: int, seed: int) -> pd.Series:
    """Boolean mask (aligned with ``skus``) keeping at most ``per_class`` random rows per SKU."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    # Shuffle once, then keep the first per_class rows of each SKU in the shuffled order.
    shuffled = skus.sample(frac=1.0, random_state=seed)
    keep = shuffled.groupby(shuffled, sort=False).cumcount() < per_class
    return keep.reindex(skus.index)


def balance_table(train: pd.DataFrame, per_class: int | None, seed: int) -> pd.DataFrame:
    """The rows of ``train`` kept by :func:`balanced_mask`, in their original order (all: None)."""
    if per_class is None:
        return train
    return train[balanced_mask(train["sku"], per_class, seed)]


def balance(train_csv: str | os.PathLike, out_csv: str | os.PathLike, cfg: BalanceConfig) -> pd.DataFrame:
    """Read ``train_csv``, write the balanced subset to ``out_csv`` (atomically) and return it."""
    train_csv = Path(train_csv)
    if not train_csv.is_file():
        raise DataError(f"{train_csv}: file not found (run the prepare stage first)")
    # All columns as text: the output reproduces the input's values byte for byte.
    train = pd.read_csv(train_csv, dtype=str, keep_default_na=False)
    if "sku" not in train.columns:
        raise DataError(
            f"{train_csv}, line 1, column 'sku': missing column 'sku'"
            f" (header has: {', '.join(train.columns)})"
        )
    if (train["sku"] == "").any():
        line = int(train.index[train["sku"] == ""][0]) + 2
        raise DataError(f"{train_csv}, line {line}, column 'sku': empty SKU")
    out = balance_table(train, cfg.per_class, cfg.seed)
    write_csv(out_csv, out)
    log.info(
        "balanced subset: %d of %d images, %d SKUs, %s",
        len(out),
        len(train),
        out["sku"].nunique(),
        "every image" if cfg.per_class is None else f"at most {cfg.per_class} per SKU",
    )
    return out


@dataclass
class BalanceFiles(StageFiles):
    """The balance stage's files (its command line: stages/balance.py)."""

    train: Path = option("prepared train.csv")
    out: Path = option("balanced CSV to write (same columns as --train)")
