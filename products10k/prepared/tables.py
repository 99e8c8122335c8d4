"""Loading, validation and splitting of the Products-10K metadata tables.

Every check runs vectorised over the whole table before any image is touched, and a failure is a
:class:`DataError` naming the file, the line (as a text editor shows it: the header is line 1, the
first data row line 2) and the column. Tables come back with typed columns:

- train: ``name`` (str), ``sku`` (int64), ``group`` (int64), ``domain`` (str), ``line`` (int64)
- test:  the same plus ``Usage`` (str); ``group`` is looked up from train by SKU.

``domain`` (inshop | customer) is an optional column only the synthetic data has; it becomes
``unknown`` where absent or empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from products10k.common import DataError
from products10k.contracts.raw import RAW_CSV_COLUMNS, TEST_CSV, TRAIN_CSV

USAGE_VALUES = ("Public", "Private")
DOMAIN_VALUES = ("inshop", "customer", "unknown")
_INT_PATTERN = r"[+-]?\d+"


def _where(path: str | os.PathLike, line: int, column: str) -> str:
    return f"{path}, line {line}, column '{column}'"


def read_table(path: str | os.PathLike, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as strings, check its header, and add each row's ``line`` number.

    Blank lines are kept while numbering (so ``line`` matches the file) and dropped afterwards.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # dtype=str + keep_default_na=False: validate the text exactly as written ("NA" is not NaN).
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty (expected a header with {', '.join(required)})") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{_where(path, 1, missing[0])}: missing column '{missing[0]}' "
            f"(header has: {', '.join(map(str, df.columns))})"
        )
    df = df.fillna("")  # short rows of a ragged file
    df["line"] = np.arange(2, len(df) + 2, dtype=np.int64)
    blank = (df.drop(columns="line") == "").all(axis=1)
    return df[~blank].reset_index(drop=True)


def _first(mask: pd.Series | np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _check_names(df: pd.DataFrame, path: Path) -> None:
    name = df["name"]
    bad = (name.str.strip() == "") | name.str.contains(r"[/\\]", regex=True) | name.isin([".", ".."])
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{_where(path, df['line'].iat[i], 'name')}: {name.iat[i]!r} is not a plain image file name"
            " (empty, or contains a folder separator)"
        )
    dup = name.duplicated(keep=False)
    if dup.any():
        i = _first(name.duplicated(keep="first"))
        first = _first(name == name.iat[i])
        raise DataError(
            f"{_where(path, df['line'].iat[i], 'name')}: duplicate name {name.iat[i]!r}"
            f" (first at line {df['line'].iat[first]})"
        )


def _to_int(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    text = df[column].str.strip()
    ok = text.str.fullmatch(_INT_PATTERN)
    if not ok.all():
        i = _first(~ok)
        raise DataError(f"{_where(path, df['line'].iat[i], column)}: {df[column].iat[i]!r} is not an integer")
    return text.astype("int64")


def _domain(df: pd.DataFrame, path: Path) -> pd.Series:
    if "domain" not in df.columns:
        return pd.Series("unknown", index=df.index, dtype="str")
    domain = df["domain"].str.strip().replace("", "unknown")
    _require_choice(df, "domain", domain, DOMAIN_VALUES, path)
    return domain


def _require_choice(df: pd.DataFrame, column: str, values: pd.Series, allowed, path: Path) -> None:
    """DataError at the first row whose cleaned ``values`` is not in ``allowed`` (shows the raw cell)."""
    bad = ~values.isin(allowed)
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{_where(path, df['line'].iat[i], column)}: {df[column].iat[i]!r} is not one of "
            f"{', '.join(allowed)}"
        )


def load_train_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``train.csv`` (name, class, group[, domain])."""
    path = Path(path)
    raw = read_table(path, RAW_CSV_COLUMNS[TRAIN_CSV])
    _check_names(raw, path)
    df = pd.DataFrame(
        {
            "name": raw["name"],
            "sku": _to_int(raw, "class", path),
            "group": _to_int(raw, "group", path),
            "domain": _domain(raw, path),
            "line": raw["line"],
        }
    )
    # Each SKU belongs to exactly one group: name the first row that disagrees with its SKU's first row.
    first_group = df.groupby("sku", sort=False)["group"].transform("first")
    bad = df["group"] != first_group
    if bad.any():
        i = _first(bad)
        sku = df["sku"].iat[i]
        first = _first(df["sku"] == sku)
        raise DataError(
            f"{_where(path, df['line'].iat[i], 'group')}: SKU {sku} is in group {df['group'].iat[i]} here"
            f" but in group {df['group'].iat[first]} at line {df['line'].iat[first]}"
            " (each SKU must be in exactly one group)"
        )
    if df.empty:
        raise DataError(f"{path}: no data rows")
    return df


def load_test_table(path: str | os.PathLike, train: pd.DataFrame) -> pd.DataFrame:
    """Read and validate ``test_kaggletest.csv`` (name, class, Usage[, domain]) against ``train``.

    No image name may be in both tables. A test SKU that train lacks is kept with group -1 (see
    :func:`check_unseen_test_skus`: Products-10K is a closed-set benchmark, so such a row can never
    be predicted right and counts as an error, as on Kaggle; more than a few means a wrong file).
    """
    path = Path(path)
    raw = read_table(path, RAW_CSV_COLUMNS[TEST_CSV])
    _check_names(raw, path)
    sku = _to_int(raw, "class", path)
    usage = raw["Usage"].str.strip()
    _require_choice(raw, "Usage", usage, USAGE_VALUES, path)
    in_train = raw["name"].isin(train["name"])
    if in_train.any():
        i = _first(in_train)
        name = raw["name"].iat[i]
        line = train["line"].iat[_first(train["name"] == name)]
        raise DataError(
            f"{_where(path, raw['line'].iat[i], 'name')}: test image {name!r} is also in the train table"
            f" (line {line}); the same image in train and test would leak labels"
        )
    sku_group = train.drop_duplicates("sku").set_index("sku")["group"]
    return pd.DataFrame(
        {
            "name": raw["name"],
            "sku": sku,
            "group": sku.map(sku_group).fillna(-1).astype("int64"),
            "domain": _domain(raw, path),
            "Usage": usage,
            "line": raw["line"],
        }
    )


def check_unseen_test_skus(test: pd.DataFrame, train: pd.DataFrame, path, max_fraction: float) -> dict:
    """Count the test rows whose SKU has no train rows; fail above ``max_fraction`` of the rows.

    Products-10K's test SKUs are all training SKUs (a closed-set classification benchmark scored by
    top-1 over SKU ids), so a few such rows are kept - they count as errors in every metric, as
    Kaggle would count them - while many mean the test list belongs to another dataset.
    Returns ``{"rows": n, "skus": m, "first_line": line or None}`` for report.json.
    """
    unseen = ~test["sku"].isin(train["sku"])
    n = int(unseen.sum())
    out = {"rows": n, "skus": int(test.loc[unseen, "sku"].nunique()), "first_line": None}
    if not n:
        return out
    i = _first(unseen)
    out["first_line"] = int(test["line"].iat[i])
    where = _where(Path(path), test["line"].iat[i], "class")
    if n > max_fraction * len(test):
        raise DataError(
            f"{where}: SKU {test['sku'].iat[i]} has no train images, and so have {n} of {len(test)} test "
            f"rows ({out['skus']} SKUs), more than prepare.max_unseen_test_fraction={max_fraction:g}: "
            "is this the test list of the same dataset as train.csv?"
        )
    return out


def split_train_val(
    skus: pd.Series | np.ndarray,
    val_fraction: float,
    seed: int,
    min_images: int = 2,
    tail_images: int = 0,
    tail_min_images: int = 3,
) -> np.ndarray:
    """Boolean mask of the rows held out for validation, stratified by SKU, seeded.

    Only SKUs with at least ``min_images`` images (and at least 2) give validation images: each
    gets about ``n * val_fraction`` (largest-remainder rounding with random tie-breaks, so the
    total is ``round(val_fraction * rows of those SKUs)``) and always keeps at least one image for
    training. Every image of every smaller SKU is trained on: on Products-10K most SKUs have under
    20 images, and holding one of five out would cost the tail what the paper's recipe trains on
    (the 1st-place Kaggle solution validated on SKUs with more than 20 images the same way).

    ``tail_images``: the smaller SKUs that still have at least ``tail_min_images`` images give this
    many each (a leave-out): without it val holds the head alone, and no estimate made on val can see
    what a method does to the tail (products10k/choose.py). It costs each such SKU one of its few
    training images; with 0, the split is exactly what it was before the option existed.

    Not ``StratifiedShuffleSplit``: it refuses splits where the validation (or training) part has
    fewer rows than there are classes - the usual case for a long-tailed catalogue with a small
    ``val_fraction`` - and does not promise every SKU a training image.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    codes, _ = pd.factorize(np.asarray(skus))
    n_rows = len(codes)
    is_val = np.zeros(n_rows, dtype=bool)
    if n_rows == 0 or val_fraction == 0.0:
        return is_val
    rng = np.random.default_rng(seed)
    counts = np.bincount(codes)
    eligible = counts >= max(2, min_images)
    quota = counts * val_fraction * eligible
    cap = np.maximum(counts - 1, 0)  # at least one training image per SKU
    n_val = np.minimum(np.floor(quota), cap).astype(np.int64)
    remainder = np.where(n_val < cap, quota - np.floor(quota), 0.0)
    extra = min(int(round(quota.sum())) - int(n_val.sum()), int(np.count_nonzero(remainder)))
    if extra > 0:
        # Largest remainders first, ties (all 2-image SKUs share one remainder) broken at random.
        order = np.lexsort((rng.random(len(counts)), -remainder))
        n_val[order[:extra]] += 1
    if tail_images > 0:
        tail = ~eligible & (counts >= max(2, tail_min_images))
        n_val[tail] = np.minimum(tail_images, cap[tail])
    # Random rank of every row within its SKU; the n_val lowest-ranked rows go to validation.
    perm = rng.permutation(n_rows)
    rank = np.empty(n_rows, dtype=np.int64)
    rank[perm] = pd.Series(codes[perm]).groupby(codes[perm]).cumcount().to_numpy()
    is_val = rank < n_val[codes]
    return is_val


def make_label_map(train: pd.DataFrame, trained: pd.DataFrame) -> pd.DataFrame:
    """``label, sku, group, n_train``: contiguous labels over the SKUs of the raw train table.

    Labels are assigned to every SKU of ``train`` (sorted by SKU id) even if all its images were
    excluded as unreadable, so one corrupt file does not renumber the classes; ``n_train`` counts
    the images of ``trained`` (the rows of train.csv: after exclusions and without the val split,
    i.e. what the model trains on and what head/tail is defined by) and may then be 0.
    """
    lm = train.drop_duplicates("sku")[["sku", "group"]].sort_values("sku").reset_index(drop=True)
    lm.insert(0, "label", np.arange(len(lm), dtype=np.int64))
    counts = trained["sku"].value_counts()
    lm["n_train"] = lm["sku"].map(counts).fillna(0).astype("int64")
    return lm
