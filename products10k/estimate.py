"""The val estimate of the test metric: val top-1 weighted to the SKU mix test follows.

Val is held out of the head SKUs in proportion to their images, so plain val top-1 follows train's
SKU mix; test may not (the embedded default's test is balanced; Products-10K's is its own mix).
Each val row gets its SKU's target mass shared among that SKU's val rows (``row_weights``), so the
weighted val mix is ``evaluate.target_prior`` restricted to the SKUs val has (``coverage`` says how
much of the target that is). Every choice made on val uses these weights: the best epoch
(training/state.py, epoch.py), the fusion weight (knn.py), the ensemble weights
(ensemble.py) and the submission itself (products10k/choose.py).

numpy and pandas only: the ground floor every stage family may import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from products10k.common import ConfigError, DataError


def target_prior(spec: str, label_map: pd.DataFrame) -> np.ndarray:
    """The target SKU mix as a (K,) distribution over training labels, from ``evaluate.target_prior``."""
    counts = label_map["n_train"].to_numpy(dtype=np.float64)
    if spec == "uniform":
        prior = np.ones(len(label_map))
    elif spec == "train":
        prior = counts
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"evaluate.target_prior: {spec} is not uniform, train or an existing CSV file")
        table = pd.read_csv(path)
        for column in ("sku", "weight"):
            if column not in table.columns:
                raise DataError(f"{path}: missing column '{column}' (sku,weight)")
        if (table["weight"] < 0).any() or not np.isfinite(table["weight"]).all():
            row = int(np.flatnonzero(~(table["weight"] >= 0).to_numpy())[0])
            raise DataError(f"{path}: row {row + 2}: weight must be a finite number >= 0")
        weights = table.groupby("sku")["weight"].sum()
        prior = label_map["sku"].map(weights).fillna(0.0).to_numpy(dtype=np.float64)
    if prior.sum() <= 0:
        raise DataError(f"evaluate.target_prior {spec}: no weight on any training SKU")
    return prior / prior.sum()


def row_weights(labels: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per val row: its SKU's target mass shared among that SKU's val rows (0 for unknown SKUs),
    so that the weighted val mix is the target restricted to the SKUs val has."""
    labels = np.asarray(labels)
    known = labels >= 0
    counts = np.bincount(labels[known], minlength=len(target)).astype(np.float64)
    weights = np.zeros(len(labels))
    weights[known] = target[labels[known]] / counts[labels[known]]
    return weights


def coverage(labels: np.ndarray, target: np.ndarray) -> float:
    """The share of the target's mass on SKUs that have val images: what the estimate stands on."""
    present = np.unique(np.asarray(labels)[np.asarray(labels) >= 0])
    return float(target[present].sum())


def estimate(top1: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Prior-corrected top-1: the weighted share of rows whose top-1 is their label."""
    total = weights.sum()
    return (
        float(((np.asarray(top1) == np.asarray(labels)) * weights).sum() / total)
        if total > 0
        else float("nan")
    )


def log_train_prior(label_map: pd.DataFrame) -> np.ndarray:
    """``log`` of the training SKU mix (``n_train``), what logit adjustment subtracts ``tau`` times; a
    SKU left without training images (all excluded) counts as one: ``log 0`` would be ``-inf`` and
    ``- tau x log prior`` would put that SKU first in every row that keeps it."""
    counts = np.clip(label_map["n_train"].to_numpy(dtype=np.float64), 1.0, None)
    return np.log(counts / counts.sum())


def val_weights(labels: np.ndarray, label_map: pd.DataFrame, spec: str) -> np.ndarray:
    """:func:`row_weights` of val ``labels`` for the ``evaluate.target_prior`` ``spec``."""
    return row_weights(labels, target_prior(spec, label_map))


def paired_gain(hits: np.ndarray, reference_hits: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """The gain of one output's estimate over a reference's on the same val rows, and its standard error.

    ``hits``/``reference_hits``: each row's top-1 is its label (0/1), ``weights``: :func:`row_weights`.
    The gain is ``estimate(hits) - estimate(reference_hits)`` = ``sum w d / sum w`` with ``d`` the
    per-row difference, a weighted ratio; its variance is the linearisation (sandwich) variance with
    the rows drawn independently: ``n / (n - 1) x sum w^2 (d - gain)^2 / (sum w)^2`` over the weighted
    rows, which a row bootstrap of the paired difference reproduces (tests/submission/test_choose.py).
    Rows are paired, so what both outputs get right or wrong alike costs nothing; a row of a SKU val
    holds once weighs as much as all the rows of a head SKU, and its variance shows it (a bootstrap
    within SKUs would call such a row certain). No weighted row: ``(nan, nan)``.
    """
    w = np.asarray(weights, dtype=np.float64)
    used = w > 0
    n = int(used.sum())
    if n == 0:
        return float("nan"), float("nan")
    w = w[used]
    d = np.asarray(hits, dtype=np.float64)[used] - np.asarray(reference_hits, dtype=np.float64)[used]
    total = w.sum()
    gain = float((w * d).sum() / total)
    if n == 1:
        return gain, float("inf") if d[0] != 0 else 0.0
    var = n / (n - 1) * float((w**2 * (d - gain) ** 2).sum()) / total**2
    return gain, float(np.sqrt(var))
