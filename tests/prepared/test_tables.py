"""CSV validation (errors name file, line and column) and the stratified train/val split."""

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedShuffleSplit

from products10k.common import DataError
from products10k.prepared.tables import (
    check_unseen_test_skus,
    load_test_table,
    load_train_table,
    make_label_map,
    split_train_val,
)

TRAIN = "name,class,group\n1.jpg,10,1\n2.jpg,10,1\n3.jpg,20,2\n4.jpg,30,2\n"
TEST = "name,class,Usage\n100.jpg,10,Public\n101.jpg,20,Private\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def train_table(tmp_path, text=TRAIN):
    return load_train_table(write(tmp_path, "train.csv", text))


def assert_error(exc_info, file, line, column):
    msg = str(exc_info.value)
    assert file in msg and f"line {line}," in msg and f"column '{column}'" in msg, msg


def test_valid_tables_are_typed(tmp_path):
    train = train_table(tmp_path)
    assert train["sku"].dtype == np.int64 and train["group"].dtype == np.int64
    assert train["line"].tolist() == [2, 3, 4, 5]
    assert set(train["domain"]) == {"unknown"}
    test = load_test_table(write(tmp_path, "test_kaggletest.csv", TEST), train)
    assert test["group"].tolist() == [1, 2]  # looked up from train by SKU
    assert test["Usage"].tolist() == ["Public", "Private"]


def test_domain_column_is_optional_and_checked(tmp_path):
    train = train_table(
        tmp_path, "name,class,group,domain\n1.jpg,1,1,inshop\n2.jpg,1,1,\n3.jpg,2,1,customer\n"
    )
    assert train["domain"].tolist() == ["inshop", "unknown", "customer"]
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group,domain\n1.jpg,1,1,inshop\n2.jpg,1,1,shelf\n")
    assert_error(info, "train.csv", 3, "domain")


def test_missing_column(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class\n1.jpg,10\n")
    assert_error(info, "train.csv", 1, "group")


def test_non_integer_class_names_the_line(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group\n1.jpg,10,1\n2.jpg,10,1\n3.jpg,1.5,2\n")
    assert_error(info, "train.csv", 4, "class")
    assert "'1.5'" in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group\n1.jpg,10,1\n\n2.jpg,abc,1\n")
    assert_error(info, "train.csv", 4, "class")


def test_empty_and_na_like_values_are_errors(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group\n1.jpg,10,\n")
    assert_error(info, "train.csv", 2, "group")
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group\n1.jpg,NA,1\n")
    assert_error(info, "train.csv", 2, "class")


def test_duplicate_names(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, TRAIN + "2.jpg,30,2\n")
    assert_error(info, "train.csv", 6, "name")
    assert "first at line 3" in str(info.value)


def test_names_with_folders_are_refused(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, "name,class,group\n../etc/passwd,1,1\n")
    assert_error(info, "train.csv", 2, "name")


def test_sku_in_two_groups(tmp_path):
    with pytest.raises(DataError) as info:
        train_table(tmp_path, TRAIN + "5.jpg,20,7\n")
    assert_error(info, "train.csv", 6, "group")
    assert "SKU 20" in str(info.value) and "line 4" in str(info.value)


def test_test_name_also_in_train(tmp_path):
    train = train_table(tmp_path)
    with pytest.raises(DataError) as info:
        load_test_table(write(tmp_path, "test_kaggletest.csv", TEST + "3.jpg,20,Public\n"), train)
    assert_error(info, "test_kaggletest.csv", 4, "name")


def test_bad_usage_value(tmp_path):
    train = train_table(tmp_path)
    with pytest.raises(DataError) as info:
        load_test_table(write(tmp_path, "test_kaggletest.csv", TEST + "102.jpg,20,public\n"), train)
    assert_error(info, "test_kaggletest.csv", 4, "Usage")


def test_unseen_test_sku_is_kept_counted_and_gated(tmp_path):
    train = train_table(tmp_path)
    path = write(tmp_path, "test_kaggletest.csv", TEST + "102.jpg,99,Public\n")
    test = load_test_table(path, train)
    row = test[test["sku"] == 99].iloc[0]
    assert row["group"] == -1 and row["line"] == 4  # kept, with no group
    assert check_unseen_test_skus(test, train, path, 0.5) == {"rows": 1, "skus": 1, "first_line": 4}
    with pytest.raises(DataError) as info:
        check_unseen_test_skus(test, train, path, 0.0)
    assert_error(info, "test_kaggletest.csv", 4, "class")
    assert "SKU 99" in str(info.value) and "max_unseen_test_fraction" in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_train_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train.csv")) + ".*empty"):
        train_table(tmp_path, "")


def long_tail(n_skus=300, seed=0) -> pd.Series:
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, (40 * (np.arange(n_skus) + 1.0) ** -0.9).astype(int))
    counts[rng.choice(n_skus, 30, replace=False)] = 1  # some singletons
    skus = np.repeat(rng.permutation(np.arange(1000, 1000 + n_skus)), counts)
    return pd.Series(rng.permutation(skus))


def test_split_is_stratified_and_keeps_every_sku_in_train():
    skus = long_tail()
    f = 0.15
    is_val = split_train_val(skus, f, seed=0)
    counts = skus.value_counts()
    val_counts = skus[is_val].value_counts().reindex(counts.index, fill_value=0)
    train_counts = skus[~is_val].value_counts().reindex(counts.index, fill_value=0)
    assert (train_counts >= 1).all()  # every SKU keeps a training image
    assert (val_counts[counts == 1] == 0).all()  # singletons stay in train
    # Stratified: each SKU's share is its quota rounded down or up.
    quota = counts * f
    assert ((val_counts >= np.floor(quota)) & (val_counts <= np.ceil(quota))).all()
    eligible = counts[counts >= 2].sum()
    assert is_val.sum() == round(f * eligible)


def test_val_comes_only_from_skus_with_enough_images_and_the_tail_trains_on_all():
    skus = long_tail()
    counts = skus.value_counts()
    is_val = split_train_val(skus, 0.15, seed=0, min_images=20)
    val_counts = skus[is_val].value_counts()
    assert (counts[val_counts.index] >= 20).all()  # val SKUs are heads only
    small = counts[counts < 20].index
    assert not skus[is_val].isin(small).any()  # every tail image is a training image
    assert is_val.sum() == round(0.15 * counts[counts >= 20].sum())  # stratified over the heads
    assert len(val_counts) == (counts >= 20).sum()  # every head SKU gives some val images


def test_split_works_where_stratified_shuffle_split_refuses():
    skus = pd.Series(np.repeat(np.arange(30), 3))  # 90 rows, 30 SKUs: 10% val = 9 rows < 30 classes
    with pytest.raises(ValueError):
        next(StratifiedShuffleSplit(n_splits=1, test_size=0.1, random_state=0).split(skus, skus))
    is_val = split_train_val(skus, 0.1, seed=0)
    assert is_val.sum() == 9
    assert skus[is_val].value_counts().max() == 1


def test_split_high_fraction_still_leaves_one_train_image():
    skus = pd.Series(np.repeat(np.arange(20), 2))
    is_val = split_train_val(skus, 0.9, seed=0)
    assert (skus[~is_val].value_counts() == 1).all() and len(skus[~is_val].unique()) == 20


def test_split_is_seeded():
    skus = long_tail()
    a = split_train_val(skus, 0.2, seed=7)
    assert np.array_equal(a, split_train_val(skus, 0.2, seed=7))
    assert not np.array_equal(a, split_train_val(skus, 0.2, seed=8))
    assert not split_train_val(skus, 0.0, seed=7).any()


def test_label_map_is_contiguous_sorted_and_counts_kept_images(tmp_path):
    train = train_table(tmp_path, "name,class,group\n1.jpg,30,2\n2.jpg,10,1\n3.jpg,10,1\n4.jpg,20,1\n")
    kept = train[train["name"] != "4.jpg"]  # SKU 20 lost its only image
    lm = make_label_map(train, kept)
    assert lm.columns.tolist() == ["label", "sku", "group", "n_train"]
    assert lm["label"].tolist() == [0, 1, 2]
    assert lm["sku"].tolist() == [10, 20, 30]
    assert lm["group"].tolist() == [1, 1, 2]
    assert lm["n_train"].tolist() == [2, 0, 1]


def test_a_tail_leave_out_gives_val_the_smaller_skus_too():
    # 2 head SKUs of 20 images, tail SKUs of 5, 3 and 2 images
    skus = np.repeat([1, 2, 3, 4, 5], [20, 20, 5, 3, 2])
    without = split_train_val(skus, 0.2, seed=0, min_images=10)
    assert set(skus[without]) == {1, 2}  # val holds the head alone (val_tail_images 0, the paper preset)
    leave_out = split_train_val(skus, 0.2, seed=0, min_images=10, tail_images=1, tail_min_images=3)
    per_sku = pd.Series(skus[leave_out]).value_counts().to_dict()
    assert per_sku == {1: 4, 2: 4, 3: 1, 4: 1}  # the 2-image SKU keeps both: under tail_min_images
    assert np.array_equal(leave_out[skus <= 2], without[skus <= 2])  # the head's split is unchanged
    # every SKU keeps a training image, even when asked for more than it has
    many = split_train_val(skus, 0.2, seed=0, min_images=10, tail_images=9, tail_min_images=2)
    assert all((skus[~many] == s).any() for s in set(skus))
