"""K-fold cross-validation (``cv.folds``): every training image held out once, stratified by SKU.

With ``cv.folds: 0`` (the default) the folds stage passes prepare's single split through unchanged:
``data/folds/train.csv`` and ``val.csv`` are byte-for-byte prepare's, and nothing downstream
changes. With ``cv.folds: K`` (>= 2) prepare's train and val images are pooled and dealt into K
folds, and both tables hold the whole pool with a ``fold`` column: fold ``i``'s model trains on
the rows of its training table whose fold is not ``i`` (train.csv for the train phase, the balanced
subset for the finetunes) and is validated on val.csv's rows of fold ``i``. The K held-out folds
together are the **out-of-fold** (OOF) val, as large as train: every choice made on val (the best
epoch of each fold, the fusion and ensemble weights, tau, the submission) is made on it, tail
SKUs included, and the K fold models' test predictions are averaged (the fold ensemble). A last
model, the **refit**, trains on the whole pool with no val (its final epoch is its output): it is
the ``best.pt`` the next phase, the index's gallery and the export read.

How images are dealt: each SKU's images in a random order (``cv.seed``) go to folds ``o, o + 1,
...`` (mod K) from a random start ``o`` of their own, so a SKU's images spread over the folds as
evenly as its count allows and small SKUs do not all crowd fold 0. A SKU with fewer images than
folds has one image in each of that many folds and none in the others (its remaining images still
train every fold's model). A SKU with a single image is never held out (``fold`` -1): holding it
out would leave its fold's model without the SKU, so it would be no estimate of anything; it is in
every fold's training rows and in no val row, and the estimate's ``val_coverage`` says so.

Where the files are: fold ``i`` of a phase writes ``<out>/fold<i>/`` (best.pt, last.pt) inside the
phase's output folder, and the refit writes ``<out>`` itself (:func:`fold_dir`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k.common import ConfigError, DataError, write_bytes, write_csv
from products10k.config.stage import StageFiles, option

log = logging.getLogger(__name__)

#: the column of train.csv / val.csv / balanced.csv that carries each image's fold under cv
FOLD_COLUMN = "fold"


def assign_folds(skus: pd.Series, folds: int, seed: int) -> np.ndarray:
    """Each row's fold (0..folds-1; -1 for a SKU with one image), stratified by SKU (module docstring)."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    skus = pd.Series(np.asarray(skus), dtype=object).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    shuffled = skus.iloc[rng.permutation(len(skus))]
    place = shuffled.groupby(shuffled, sort=False).cumcount()
    size = shuffled.map(shuffled.value_counts())
    ids = sorted(skus.unique(), key=str)  # offsets drawn in a fixed SKU order: the seed alone decides
    start = dict(zip(ids, rng.integers(0, folds, len(ids)), strict=True))
    fold = (shuffled.map(start).astype(np.int64) + place) % folds
    fold[size < 2] = -1
    return fold.sort_index().to_numpy(dtype=np.int64)


def fold_tables(
    train: pd.DataFrame, val: pd.DataFrame, folds: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The folds stage's train and val tables: prepare's as they are (``folds`` 0), or the pool of
    both with its ``fold`` column, as train and as val (``folds`` >= 2)."""
    if folds == 0:
        return train, val
    pool = pd.concat([train, val], ignore_index=True)
    pool[FOLD_COLUMN] = assign_folds(pool["sku"], folds, seed)
    return pool, pool


def fold_plan(folds: int) -> list[int | None]:
    """The models a phase trains, in order: each fold's, then the refit (None); the single split's
    one model (None) without folds."""
    return [*range(folds), None]


def check_folds(val: pd.DataFrame, folds: int, where: str | Path) -> None:
    """``val`` (a folds-stage table) was dealt into ``folds`` folds, as params.yaml says."""
    has = FOLD_COLUMN in val.columns
    found = int(val[FOLD_COLUMN].max()) + 1 if has and len(val) else 0
    if folds and not has:
        raise DataError(
            f"{where}: no '{FOLD_COLUMN}' column, but cv.folds is {folds}: re-run the folds stage"
        )
    if not folds and has:
        raise DataError(f"{where}: has a '{FOLD_COLUMN}' column, but cv.folds is 0: re-run the folds stage")
    if folds and found > folds:
        raise DataError(f"{where}: rows of fold {found - 1}, but cv.folds is {folds}: re-run the folds stage")


def held_out(val: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Val's rows of fold ``fold``: what that fold's model predicts, out of fold."""
    return val[val[FOLD_COLUMN] == fold]


def fold_view(train: pd.DataFrame, val: pd.DataFrame, fold: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and val rows of one model: fold ``fold``'s (its training rows lack the fold,
    its val rows are the fold), the refit's (``None`` under cv: every row, no val), or the single
    split's (no fold column: the tables as they are)."""
    if FOLD_COLUMN not in val.columns:
        if fold is not None:
            raise ConfigError(f"fold {fold} asked of tables without folds (cv.folds: 0)")
        return train, val
    if fold is None:
        return train, val.iloc[:0]
    return train[train[FOLD_COLUMN] != fold], held_out(val, fold)


def out_of_fold(val: pd.DataFrame, folds: int) -> pd.DataFrame:
    """Val's rows in out-of-fold order, fold 0's first: the row order of every OOF predictions file
    (evaluate's and the index's must match row for row). Without folds: val as it is."""
    if not folds:
        return val
    return pd.concat([held_out(val, i) for i in range(folds)])


def fold_dir(path: Path, fold: int | None) -> Path:
    """Where fold ``fold``'s file of a phase's output ``path`` lives (``models/m0/train/best.pt`` ->
    ``models/m0/train/fold2/best.pt``; a folder likewise); the refit's (None) is ``path`` itself."""
    path = Path(path)
    if fold is None:
        return path
    if path.suffix:  # a file in the phase's folder
        return path.parent / f"fold{fold}" / path.name
    return path / f"fold{fold}"


def write_folds(
    train_csv: Path, val_csv: Path, out_train: Path, out_val: Path, folds: int, seed: int
) -> None:
    """The folds stage: prepare's tables copied byte for byte (``folds`` 0), or the pool dealt into
    folds written as both tables; logged with what each fold holds."""
    for path in (train_csv, val_csv):
        if not Path(path).is_file():
            raise DataError(f"{path}: prepared CSV not found (run the prepare stage)")
    if folds == 0:
        write_bytes(out_train, Path(train_csv).read_bytes())
        write_bytes(out_val, Path(val_csv).read_bytes())
        log.info("cv.folds 0: prepare's single split (%s, %s) passed through", train_csv, val_csv)
        return
    # as text: every value the prepared tables hold is written back as it was
    tables = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in (train_csv, val_csv)]
    if FOLD_COLUMN in tables[0].columns:
        raise DataError(
            f"{train_csv}: already has a '{FOLD_COLUMN}' column (not a table of the prepare stage?)"
        )
    pool, _ = fold_tables(*tables, folds, seed)
    write_csv(out_train, pool)
    write_csv(out_val, pool)
    sizes = pool[FOLD_COLUMN].value_counts().sort_index()
    held = pool[pool[FOLD_COLUMN] >= 0]
    log.info(
        "cv.folds %d: %d images of %d SKUs dealt into folds of %s images; %d SKUs held out in every fold's "
        "val, %d single-image SKUs never held out",
        folds, len(pool), pool["sku"].nunique(), "/".join(str(int(sizes.get(i, 0))) for i in range(folds)),
        int((held.groupby("sku")[FOLD_COLUMN].nunique() == folds).sum()),
        int((pool[FOLD_COLUMN] < 0).sum()),
    )  # fmt: skip


@dataclass
class FoldsFiles(StageFiles):
    """The folds stage's files (its command line: stages/folds.py)."""

    train: Path = option("prepared train.csv")
    val: Path = option("prepared val.csv")
    out_train: Path = option("the training table every phase reads")
    out_val: Path = option("the val table (under cv: every image)")
