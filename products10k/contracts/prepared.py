"""The prepared-data contract: the CSVs ``prepare`` writes and their one checked reader.

Training, evaluation and submission read the prepared files only through this module, so none of
them depends on the prepare stage's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from products10k.common import DataError

#: columns of ``train.csv`` / ``val.csv`` (and ``balanced.csv``, a subset of train's rows)
PREPARED_COLUMNS = [
    "name",
    "label",
    "sku",
    "group",
    "domain",
    "shard",
    "offset",
    "length",
    "width",
    "height",
]
#: ``test.csv`` adds the Kaggle leaderboard split
TEST_COLUMNS = [*PREPARED_COLUMNS, "Usage"]
#: columns of ``label_map.csv`` every reader needs (prepare also writes ``group`` and ``n_train``)
LABEL_MAP_COLUMNS = ["label", "sku"]
#: all columns of ``label_map.csv``
LABEL_MAP_ALL_COLUMNS = [*LABEL_MAP_COLUMNS, "group", "n_train"]


def _plain(value):
    """A numpy scalar as the Python value it holds (error messages show 7, not np.int64(7))."""
    return value.item() if isinstance(value, np.generic) else value


def read_label_map(path: str | Path, columns: Sequence[str] = LABEL_MAP_COLUMNS) -> pd.DataFrame:
    """Read label_map.csv with ``columns``; labels must be exactly 0..K-1 in order (index = label).

    Training needs only ``label`` and ``sku``; evaluation and submission also read ``group`` and
    ``n_train`` (pass :data:`LABEL_MAP_ALL_COLUMNS`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label map not found (run the prepare stage)")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have: {', '.join(df.columns)})")
    df = df.sort_values("label").reset_index(drop=True)
    expected = np.arange(len(df))
    bad = np.flatnonzero(df["label"].to_numpy() != expected)
    if len(bad):
        raise DataError(
            f"{path}: column 'label' must be 0..{len(df) - 1} without gaps; "
            f"row {int(bad[0]) + 2} has {df['label'].iloc[bad[0]]!r}"
        )
    return df


def _integer_column(df: pd.DataFrame, col: str, low: int, path: Path, expected: str) -> np.ndarray:
    """``df[col]`` as int64; the first value that is not an integer >= ``low`` fails naming
    the file, its line (header = line 1) and the column."""
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(np.isnan(values) | (values < low) | (values != np.floor(values)))
    if len(bad):
        raise DataError(
            f"{path}: row {int(bad[0]) + 2} column '{col}' is {_plain(df[col].iloc[bad[0]])!r}, "
            f"expected {expected}"
        )
    return values.astype(np.int64)


def read_prepared(
    path: str | Path,
    label_map: pd.DataFrame | None = None,
    usage: bool = False,
    allow_empty: bool = False,
) -> pd.DataFrame:
    """Read a prepared split CSV (train/val/test/balanced): the one reader of that contract.

    Checks, each failing with the file, the line (header = line 1) and the column: every column
    of :data:`PREPARED_COLUMNS` (plus ``Usage`` with ``usage``, i.e. the test split) is present;
    at least one row unless ``allow_empty``; ``offset``/``length``/``width``/``height`` are
    non-negative integers; ``label`` is an integer >= 0, or -1 in the test split (a test SKU the
    training set lacks, counted as an error by evaluation). With ``label_map`` (from
    :func:`read_label_map`), ``label`` must also be one of its labels and ``sku`` must agree with
    the map's SKU of that label. Integer columns come back as int64, ``name`` as str.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared CSV not found (run the prepare stage)")
    df = pd.read_csv(path, dtype={"name": str})
    need = TEST_COLUMNS if usage else PREPARED_COLUMNS
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have: {', '.join(df.columns)})")
    if df.empty and not allow_empty:
        raise DataError(f"{path}: no rows")
    for col in ("offset", "length", "width", "height"):
        df[col] = _integer_column(df, col, 0, path, "a non-negative integer")
    low = -1 if usage else 0
    expected = "-1 or a label" if usage else "a label"
    if label_map is not None:
        expected += f" 0..{len(label_map) - 1} of the label map"
    else:
        expected = "-1 or a non-negative integer" if usage else "a non-negative integer"
    labels = _integer_column(df, "label", low, path, expected)
    if label_map is not None:
        too_big = np.flatnonzero(labels >= len(label_map))
        if len(too_big):
            raise DataError(
                f"{path}: row {int(too_big[0]) + 2} column 'label' is {int(labels[too_big[0]])}, "
                f"expected {expected} (it has only {len(label_map)} labels)"
            )
    df["label"] = labels
    if label_map is not None:
        known = np.flatnonzero(labels >= 0)
        map_sku = label_map["sku"].to_numpy()[labels[known]]
        mismatch = np.flatnonzero(map_sku != df["sku"].to_numpy()[known])
        if len(mismatch):
            row = int(known[mismatch[0]])
            raise DataError(
                f"{path}: row {row + 2}: label {labels[row]} has sku {_plain(df['sku'].iloc[row])}, "
                f"but the label map says sku {_plain(map_sku[mismatch[0]])} (column 'sku'; "
                "prepared files from different runs?)"
            )
    return df.reset_index(drop=True)
