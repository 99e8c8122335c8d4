"""Classification metrics for the evaluate, index and submit stages (numpy and pandas only: the
ground floor, beside scores.py).

Everything works from the top-k label indices per row (``topk_indices``), so one pass over the
(N, K) logits serves top-1, top-5 and every slice (Public/Private, head/tail, in-shop/customer,
per group). Rows whose label is negative (a test SKU absent from the training label map) count
as errors, as they would on Kaggle: no prediction can name them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def hits_at(topk: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row: is the label among the first ``k`` predictions."""
    labels = np.asarray(labels)
    return (topk[:, :k] == labels[:, None]).any(axis=1)


def mean_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy per true class, averaged over the classes present (balanced accuracy)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    correct = pd.Series(np.asarray(pred) == labels)
    return float(correct.groupby(labels).mean().mean())


def hit_rates(hits: dict[str, np.ndarray], mask: np.ndarray) -> dict:
    """Each hit array's mean over the rows of ``mask``, and their count: ``{"top1": .., "n": ..}``."""
    out = {name: float(h[mask].mean()) for name, h in hits.items()}
    out["n"] = int(mask.sum())
    return out


def leaderboard_masks(usage) -> dict[str, np.ndarray]:
    """The rows of Kaggle's two leaderboards, from a test table's ``Usage`` column."""
    usage = pd.Series(usage).astype(str).str.lower().to_numpy()
    return {split: usage == split for split in ("public", "private")}


def split_metrics(
    topk: np.ndarray,
    rows: pd.DataFrame,
    n_train: dict[int, int] | pd.Series,
    tail_max_images: int,
) -> dict:
    """Metrics of one split from its top-k predictions and its prepared CSV rows.

    ``rows`` needs ``label`` and ``domain``; ``Usage`` (test) adds ``public``/``private``.
    ``n_train`` maps label -> training-image count; a label with at most ``tail_max_images``
    training images is in the tail. Slices with no rows are left out rather than reported as NaN,
    so ``dvc metrics diff`` shows only numbers that mean something.
    """
    labels = rows["label"].to_numpy()
    if len(labels) != len(topk):
        raise ValueError(f"{len(topk)} predictions for {len(labels)} rows")
    if len(labels) == 0:
        return {"n": 0}
    hits1 = hits_at(topk, labels, 1)
    hits5 = hits_at(topk, labels, 5)
    out = hit_rates({"top1": hits1, "top5": hits5}, np.ones(len(labels), bool))
    out["mean_class_acc"] = mean_class_accuracy(topk[:, 0], labels)

    counts = pd.Series(labels).map(pd.Series(n_train)).fillna(0).to_numpy()
    slices = {"head": counts > tail_max_images, "tail": counts <= tail_max_images}
    if "Usage" in rows:
        slices.update(leaderboard_masks(rows["Usage"]))
    domain = rows["domain"].astype(str).to_numpy()
    slices["inshop"] = domain == "inshop"
    slices["customer"] = domain == "customer"
    for name, mask in slices.items():
        if mask.any():
            # top-5 only for the leaderboard splits: the table `dvc metrics show` prints stays readable
            leaderboard = name in ("public", "private")
            out[name] = hit_rates({"top1": hits1, "top5": hits5} if leaderboard else {"top1": hits1}, mask)
    return out


def per_group_table(topk: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1/top-5 per SKU group: columns group, n, top1, top5; worst group first."""
    labels = rows["label"].to_numpy()
    frame = pd.DataFrame(
        {
            "group": rows["group"].to_numpy(),
            "top1": hits_at(topk, labels, 1).astype(float),
            "top5": hits_at(topk, labels, 5).astype(float),
        }
    )
    table = frame.groupby("group", sort=True).agg(
        n=("top1", "size"), top1=("top1", "mean"), top5=("top5", "mean")
    )
    table = table.reset_index().sort_values(["top1", "group"], kind="stable")
    # the group id as text: a plot axis of names, not a numeric scale
    table["group"] = table["group"].astype(str)
    return table.reset_index(drop=True)


def confused_pairs(
    pred: np.ndarray, labels: np.ndarray, skus: np.ndarray, groups: dict | None = None, top: int = 20
) -> pd.DataFrame:
    """The SKU pairs most often mistaken for each other (both directions counted), most first.

    Columns: pair ("a <-> b" in SKU ids), sku_a, sku_b, a_as_b, b_as_a, count, same_group.
    ``skus`` maps label index -> SKU id; ``groups`` optionally maps SKU id -> group.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    wrong = (pred != labels) & (labels >= 0)
    cols = ["pair", "sku_a", "sku_b", "a_as_b", "b_as_a", "count", "same_group"]
    if not wrong.any() or top == 0:
        return pd.DataFrame(columns=cols)
    true_sku = np.asarray(skus)[labels[wrong]]
    pred_sku = np.asarray(skus)[pred[wrong]]
    frame = pd.DataFrame({"a": np.minimum(true_sku, pred_sku), "b": np.maximum(true_sku, pred_sku)})
    frame["a_as_b"] = (true_sku < pred_sku).astype(int)  # true is the smaller id: a predicted as b
    frame["b_as_a"] = 1 - frame["a_as_b"]
    table = frame.groupby(["a", "b"], sort=True).agg(a_as_b=("a_as_b", "sum"), b_as_a=("b_as_a", "sum"))
    table["count"] = table["a_as_b"] + table["b_as_a"]
    table = table.reset_index().rename(columns={"a": "sku_a", "b": "sku_b"})
    table = table.sort_values(["count", "sku_a", "sku_b"], ascending=[False, True, True], kind="stable")
    table = table.head(top).reset_index(drop=True)
    table["pair"] = table["sku_a"].astype(str) + " <-> " + table["sku_b"].astype(str)
    if groups is not None:
        group_of = pd.Series(groups)
        ga, gb = table["sku_a"].map(group_of), table["sku_b"].map(group_of)
        table["same_group"] = (ga == gb) & ga.notna()
    else:
        table["same_group"] = False
    return table[cols]
