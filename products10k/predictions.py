"""The predictions file between ``evaluate`` and ``submit``, and what both stages check.

Kept apart from ``evaluation`` so that ``submit`` (which only ensembles saved logits) depends on
the file format, not on the model, TTA and plotting code that produced it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from products10k import atomic
from products10k.datasets import read_label_map as read_label_map_checked
from products10k.errors import ConfigError, DataError, Products10kError

PREDICTION_KEYS = (
    "val_logits",
    "val_names",
    "val_labels",
    "test_logits",
    "test_names",
    "test_labels",
    "skus",
)


def require_evaluated_phase(phase: str, phases, where: str, key: str = "phase") -> None:
    """Raise ConfigError unless ``phase`` is one of ``evaluate.phases`` (``key`` names its source)."""
    if phase not in phases:
        raise ConfigError(f"{where}: {key} '{phase}' is not in evaluate.phases ({', '.join(phases)})")


def read_label_map(path: str | Path) -> pd.DataFrame:
    """label_map.csv with ``label`` 0..K-1 in order, ``sku`` and ``n_train`` (checked)."""
    df = read_label_map_checked(path)
    for col in ("n_train", "group"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column '{col}' (have: {', '.join(df.columns)})")
    return df


def save_predictions(path: str | Path, **arrays) -> None:
    """Write the prediction arrays as one uncompressed ``.npz`` (atomically).

    Object arrays (pandas string columns) are stored as fixed-width unicode so that the file
    loads with ``allow_pickle=False``: a predictions file must never be able to run code.
    """
    arrays = {
        k: (np.asarray(v).astype(str) if np.asarray(v).dtype == object else v) for k, v in arrays.items()
    }
    with atomic.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_predictions(path: str | Path, member: str = "") -> dict[str, np.ndarray]:
    """Read an evaluate ``.npz``; a missing file or key names the member and the file."""
    path = Path(path)
    who = f"ensemble member '{member}': " if member else ""
    if not path.is_file():
        raise Products10kError(f"{who}predictions {path} not found (run its evaluate stage)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in PREDICTION_KEYS if k not in data.files]
        if missing:
            raise DataError(f"{who}{path}: missing array '{missing[0]}' (written by an older evaluate?)")
        return {k: data[k] for k in data.files}
