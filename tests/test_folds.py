"""products10k/folds.py: K folds stratified by SKU, the folds stage's tables, each model's rows."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from products10k.common import ConfigError, DataError
from products10k.folds import (
    FOLD_COLUMN,
    assign_folds,
    check_folds,
    fold_dir,
    fold_plan,
    fold_tables,
    fold_view,
    out_of_fold,
    write_folds,
)


def _skus():
    # a long tail: 40, 12, 7, 3, 2 images and two single-image SKUs
    counts = {101: 40, 102: 12, 103: 7, 104: 3, 105: 2, 106: 1, 107: 1}
    return pd.Series([sku for sku, n in counts.items() for _ in range(n)]), counts


def test_folds_are_stratified_by_sku_and_spread_small_skus():
    skus, counts = _skus()
    fold = assign_folds(skus, 5, seed=0)
    table = pd.DataFrame({"sku": skus, "fold": fold})
    for sku, n in counts.items():
        got = table.loc[table["sku"] == sku, "fold"]
        if n == 1:  # never held out: its fold's model would not know the SKU
            assert (got == -1).all()
            continue
        per_fold = got.value_counts().reindex(range(5), fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1  # as even as the count allows
        if n < 5:  # one image in each of n folds
            assert got.nunique() == n and per_fold.max() == 1
    # SKUs smaller than the fold count start at a random fold each: 50 two-image SKUs fill every fold
    pairs = assign_folds(pd.Series(np.repeat(np.arange(50), 2)), 5, seed=0)
    assert np.bincount(pairs, minlength=5).min() >= 10
    assert np.array_equal(fold, assign_folds(skus, 5, seed=0))  # the seed alone decides
    assert not np.array_equal(fold, assign_folds(skus, 5, seed=1))
    with pytest.raises(ValueError, match="folds must be >= 2"):
        assign_folds(skus, 1, seed=0)


def test_every_fold_model_knows_every_sku_and_the_folds_cover_the_pool_once():
    skus, _ = _skus()
    pool = pd.DataFrame({"name": [f"{i}.jpg" for i in range(len(skus))], "sku": skus})
    pool[FOLD_COLUMN] = assign_folds(pool["sku"], 4, seed=3)
    held = []
    for fold in range(4):
        train, val = fold_view(pool, pool, fold)
        assert set(train["sku"]) == set(pool["sku"])  # no fold's model misses a SKU
        assert not set(train["name"]) & set(val["name"])
        held += list(val["name"])
    assert sorted(held) == sorted(pool.loc[pool[FOLD_COLUMN] >= 0, "name"])  # each once
    assert list(out_of_fold(pool, 4)["name"]) == held  # the OOF order: fold 0's rows first
    refit_train, refit_val = fold_view(pool, pool, None)
    assert len(refit_train) == len(pool) and refit_val.empty


def test_without_folds_the_tables_pass_through():
    train = pd.DataFrame({"name": ["a.jpg"], "sku": [1]})
    val = pd.DataFrame({"name": ["b.jpg"], "sku": [1]})
    assert fold_tables(train, val, 0, 0) == (train, val)
    assert fold_view(train, val, None) == (train, val)
    with pytest.raises(ConfigError, match="fold 2 asked of tables without folds"):
        fold_view(train, val, 2)
    assert fold_plan(0) == [None] and fold_plan(3) == [0, 1, 2, None]
    assert out_of_fold(val, 0) is val


def test_fold_paths_sit_inside_the_phase_folders():
    assert fold_dir(Path("models/m0/train/best.pt"), 2) == Path("models/m0/train/fold2/best.pt")
    assert fold_dir(Path("models/m0/train"), 0) == Path("models/m0/train/fold0")
    assert fold_dir(Path("models/m0/train/best.pt"), None) == Path("models/m0/train/best.pt")


def test_a_stale_folds_table_is_named(tmp_path):
    pool = pd.DataFrame({"name": ["a", "b"], FOLD_COLUMN: [0, 2]})
    check_folds(pool, 3, "val.csv")
    with pytest.raises(DataError, match="val.csv: rows of fold 2, but cv.folds is 2: re-run the folds stage"):
        check_folds(pool, 2, "val.csv")
    with pytest.raises(DataError, match="cv.folds is 0: re-run the folds stage"):
        check_folds(pool, 0, "val.csv")
    with pytest.raises(DataError, match="no 'fold' column, but cv.folds is 3"):
        check_folds(pool.drop(columns=FOLD_COLUMN), 3, "val.csv")


def test_the_folds_stage_copies_the_single_split_byte_for_byte_and_pools_under_cv(tmp_path):
    header = "name,label,sku,group,domain,shard,offset,length,width,height\n"
    rows = [f"{i}.jpg,{i % 3},{100 + i % 3},7,inshop,shard-00000.bin,{i * 10},10,48,48\n" for i in range(12)]
    (tmp_path / "train.csv").write_text(header + "".join(rows[:9]))
    (tmp_path / "val.csv").write_text(header + "".join(rows[9:]))
    out = tmp_path / "out"
    write_folds(tmp_path / "train.csv", tmp_path / "val.csv", out / "train.csv", out / "val.csv", 0, 0)
    assert (out / "train.csv").read_bytes() == (tmp_path / "train.csv").read_bytes()
    assert (out / "val.csv").read_bytes() == (tmp_path / "val.csv").read_bytes()

    write_folds(tmp_path / "train.csv", tmp_path / "val.csv", out / "train.csv", out / "val.csv", 2, 0)
    pooled = pd.read_csv(out / "train.csv", dtype=str)
    assert (out / "val.csv").read_bytes() == (out / "train.csv").read_bytes()
    assert list(pooled["name"]) == [f"{i}.jpg" for i in range(12)]  # train's rows, then val's
    assert pooled.drop(columns=FOLD_COLUMN).to_csv(index=False) == header + "".join(
        rows
    )  # values as they were
    assert set(pooled[FOLD_COLUMN]) == {"0", "1"}
    with pytest.raises(DataError, match="already has a 'fold' column"):
        write_folds(out / "train.csv", out / "val.csv", tmp_path / "x.csv", tmp_path / "y.csv", 2, 0)
