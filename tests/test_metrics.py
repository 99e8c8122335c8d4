"""Metrics: top-k, balanced accuracy and slices, checked against scikit-learn and by hand."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from products10k.metrics import (
    confused_pairs,
    hits_at,
    mean_class_accuracy,
    per_group_table,
    split_metrics,
)
from products10k.scores import topk_indices


def test_topk_indices_sorted_best_first_and_ties_by_index():
    scores = np.array([[0.1, 0.5, 0.2, 0.5], [3.0, 2.0, 1.0, 0.0]])
    top = topk_indices(scores, 3)
    assert top.tolist() == [[1, 3, 2], [0, 1, 2]]
    # k larger than K clips to K
    assert topk_indices(scores, 10).shape == (2, 4)


def test_topk_indices_breaks_ties_across_the_kth_place_by_lower_index():
    # coarse integer scores: many ties at the k-th place, where argpartition alone picks arbitrarily
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(200, 30)).astype(np.float32)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert topk_indices(scores, 5).tolist() == expected.tolist()


def test_topk_matches_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 40))
    labels = rng.integers(0, 40, size=300)
    top = topk_indices(scores, 5)
    for k in (1, 5):
        ours = hits_at(top, labels, k).mean()
        ref = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(40))
        assert ours == pytest.approx(ref)


def test_mean_class_accuracy_matches_balanced_accuracy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, size=200)
    pred = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 7, size=200))
    assert mean_class_accuracy(pred, labels) == pytest.approx(balanced_accuracy_score(labels, pred))


def _rows():
    # 6 rows: labels 0,0,1,1,2,-1 (the last SKU is not in the training label map)
    return pd.DataFrame(
        {
            "label": [0, 0, 1, 1, 2, -1],
            "group": [10, 10, 10, 20, 20, 20],
            "domain": ["customer", "customer", "inshop", "customer", "unknown", "customer"],
            "Usage": ["Public", "Private", "Public", "Private", "Public", "Private"],
        }
    )


def test_split_metrics_slices_by_hand():
    rows = _rows()
    # top-1 right on rows 0, 2, 4; row 1 right only at rank 2; the -1 row can never be right
    topk = np.array(
        [[0, 1, 2], [1, 0, 2], [1, 0, 2], [0, 2, 1], [2, 0, 1], [0, 1, 2]],
    )
    n_train = {0: 30, 1: 3, 2: 5}  # head: label 0; tail (<= 5): labels 1, 2 and the unknown SKU
    m = split_metrics(topk, rows, n_train, tail_max_images=5)
    assert m["n"] == 6
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == pytest.approx(5 / 6)
    assert m["head"] == {"top1": 0.5, "n": 2}
    assert m["tail"]["n"] == 4 and m["tail"]["top1"] == pytest.approx(2 / 4)
    assert m["public"]["top1"] == pytest.approx(1.0) and m["public"]["n"] == 3
    assert m["private"]["top1"] == pytest.approx(0.0)
    assert m["inshop"] == {"top1": 1.0, "n": 1}
    assert m["public"]["top5"] == pytest.approx(1.0) and m["private"]["top5"] == pytest.approx(2 / 3)
    assert m["customer"]["n"] == 4 and m["customer"]["top1"] == pytest.approx(1 / 4)
    # per class over present classes 0, 1, 2, -1: (1/2 + 1/2 + 1 + 0) / 4
    assert m["mean_class_acc"] == pytest.approx(0.5)


def test_split_metrics_leaves_out_empty_slices():
    rows = _rows().drop(columns="Usage").assign(domain="unknown")
    topk = np.zeros((6, 3), dtype=int)
    m = split_metrics(topk, rows, {0: 100, 1: 100, 2: 100}, tail_max_images=5)
    assert "public" not in m and "inshop" not in m and "customer" not in m
    assert "tail" in m  # the unknown SKU has 0 training images
    with pytest.raises(ValueError, match="predictions for"):
        split_metrics(topk[:3], rows, {}, 5)


def test_per_group_table_worst_first():
    rows = _rows()
    topk = np.array([[0], [0], [0], [0], [0], [0]])
    table = per_group_table(topk, rows)
    assert table["group"].tolist() == ["20", "10"]
    assert table["n"].tolist() == [3, 3]
    assert table["top1"].tolist() == pytest.approx([0.0, 2 / 3])


def test_confused_pairs_counts_both_directions():
    skus = np.array([100, 200, 300])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([1, 1, 0, 0, 1, 0, 2, 1])  # 100->200 x2, 200->100 x1, 300->100, 300->200
    table = confused_pairs(pred, labels, skus, groups={100: 1, 200: 1, 300: 2}, top=2)
    assert table["pair"].tolist() == ["100 <-> 200", "100 <-> 300"]
    first = table.iloc[0]
    assert (first["a_as_b"], first["b_as_a"], first["count"]) == (2, 1, 3)
    assert table["same_group"].tolist() == [True, False]
    assert confused_pairs(labels, labels, skus).empty
