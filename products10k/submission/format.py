"""The Kaggle submission file: built from ensemble scores, validated, aligned to the official test list.

Format (Products-10K on Kaggle): header ``name,class``, one row per image of the official
``test_kaggletest.csv``, ``class`` = the original SKU id (not the contiguous training label).
``validate_submission`` checks all of that before anything is written; outputs are written
atomically, so a failed check or a killed stage never leaves a partial submission behind.

Excluded test images. The prepare stage drops unreadable test images (missing, empty, truncated,
undecodable; at most ``prepare.max_bad_fraction``) and lists them under ``excluded`` in its
``report.json``; they have no prediction, yet Kaggle wants a row for every listed image. Exactly
those images get the **fallback**: the training prior (``n_train`` of label_map.csv, normalised),
so their class is the most frequent training SKU (the lowest label among ties) and their top-k the
k most frequent SKUs. They are scored like any other row (wrong unless the fallback SKU is right),
a warning says how many there are, and ``test.fallback_rows`` in the metrics counts them. Any
other test image without a prediction is still an error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from products10k.common import DataError
from products10k.scores import topk_indices

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["name", "class"]


def read_test_list(path: str | os.PathLike) -> pd.DataFrame:
    """The official test list (``name,class,Usage``); ``class``/``Usage`` may be absent (unlabelled)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: test list not found (run the download stage)")
    df = pd.read_csv(path, dtype={"name": str})
    if "name" not in df.columns:
        raise DataError(f"{path}: missing column 'name' (columns: {', '.join(df.columns)})")
    dup = df["name"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{path}: row {row + 2}: test image '{df['name'].iloc[row]}' is listed twice")
    return df


def build_submission(
    names: np.ndarray, top_labels: np.ndarray, top_scores: np.ndarray, label_skus: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The submission (name, class) and the top-k file (name, class_1.., score_1..).

    ``top_labels``/``top_scores`` are (N, k), best first, in training-label space;
    ``label_skus[label]`` is that label's SKU id.
    """
    names = np.asarray(names).astype(str)
    if len(names) != len(top_labels):
        raise DataError(f"{len(top_labels)} prediction rows for {len(names)} test names")
    skus = np.asarray(label_skus, dtype=np.int64)[top_labels]
    submission = pd.DataFrame({"name": names, "class": skus[:, 0]})
    topk = pd.DataFrame({"name": names})
    for j in range(top_labels.shape[1]):
        topk[f"class_{j + 1}"] = skus[:, j]
    for j in range(top_labels.shape[1]):
        topk[f"score_{j + 1}"] = np.round(top_scores[:, j].astype(np.float64), 6)
    return submission, topk


def validate_submission(
    submission: pd.DataFrame, test_list: pd.DataFrame, valid_skus, where: str = "submission"
) -> None:
    """Raise DataError unless ``submission`` is exactly what Kaggle expects for ``test_list``.

    Checks: columns exactly ``name,class`` (no index or extras), one row per test image, no
    duplicates, no names outside the list, integer classes that are SKU ids of the training label map.
    """
    cols = list(submission.columns)
    if cols != SUBMISSION_COLUMNS:
        raise DataError(f"{where}: columns are {cols}, expected exactly {SUBMISSION_COLUMNS}")
    names = submission["name"].astype(str)
    expected = test_list["name"].astype(str)
    if len(submission) != len(expected):
        missing = sorted(set(expected) - set(names))[:5]
        raise DataError(
            f"{where}: {len(submission)} rows but the test list has {len(expected)} images"
            + (f" (missing e.g. {', '.join(missing)})" if missing else "")
        )
    dup = names.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{where}: row {row + 2}: image '{names.iloc[row]}' appears more than once")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise DataError(f"{where}: {len(extra)} images not in the test list, e.g. '{extra[0]}'")
    cls = submission["class"]
    if not pd.api.types.is_integer_dtype(cls):
        raise DataError(f"{where}: column 'class' must hold integer SKU ids, got dtype {cls.dtype}")
    unknown = ~cls.isin(set(int(s) for s in valid_skus))
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(
            f"{where}: row {row + 2}: class {int(cls.iloc[row])} is not a SKU id of the training label map"
        )


def read_excluded_test_names(report_path: str | os.PathLike, test_list_path: str | os.PathLike) -> set[str]:
    """Names of the test images the prepare stage excluded, from its ``report.json``.

    The report's ``excluded`` entries carry the CSV they came from (``file``); those of the test
    list (same file name as ``test_list_path``, e.g. ``test_kaggletest.csv``) are returned.
    """
    path = Path(report_path)
    if not path.is_file():
        raise DataError(f"{path}: prepare report not found (run the prepare stage)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    excluded = report.get("excluded") if isinstance(report, dict) else None
    if not isinstance(excluded, list):
        raise DataError(f"{path}: no 'excluded' list (not a report.json of the prepare stage?)")
    table = Path(test_list_path).name
    names = set()
    for i, entry in enumerate(excluded):
        if not isinstance(entry, dict) or "file" not in entry or "name" not in entry:
            raise DataError(f"{path}: excluded[{i}] lacks 'file' or 'name': {entry!r}")
        if Path(str(entry["file"])).name == table:
            names.add(str(entry["name"]))
    return names


def fallback_scores(label_map: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The fallback row for an excluded test image: the top-``k`` of the training prior.

    ``n_train / sum(n_train)`` of label_map.csv: top-1 is the most frequent training SKU (the
    lowest label among ties). Returns (labels (k,), probabilities (k,)).
    """
    counts = label_map["n_train"].to_numpy(dtype=np.float64)
    if not counts.sum() > 0:
        raise DataError("label map: no training images (n_train is 0 for every SKU), so no fallback SKU")
    prior = (counts / counts.sum())[None, :]
    top = topk_indices(prior, k)
    return top[0], np.take_along_axis(prior, top, axis=1)[0].astype(np.float32)


def align_to_test_list(
    names: np.ndarray,
    rows: tuple[np.ndarray, ...],
    test_list: pd.DataFrame,
    where: str,
    excluded: set[str] | frozenset[str] = frozenset(),
    fallback: tuple[np.ndarray, ...] | None = None,
):
    """Reorder prediction rows into the test list's order; a count or name mismatch is an error.

    ``rows`` are arrays with one row per prediction (e.g. top-k labels and scores). A test image
    without a prediction is allowed only if its name is in ``excluded`` (the test images prepare
    excluded); its rows are then ``fallback`` (one row per array, see :func:`fallback_scores`).
    Returns the test list's names and the reordered arrays.
    """
    names = np.asarray(names).astype(str)
    expected = test_list["name"].astype(str).to_numpy()
    absent = ~np.isin(expected, names)
    filled = absent & np.isin(expected, list(excluded))
    if filled.any() and fallback is None:
        raise ValueError("excluded test images need a fallback row")
    if len(names) + int(filled.sum()) != len(expected):
        missing = sorted(set(expected[absent & ~filled]))[:5]
        extra = sorted(set(names) - set(expected))[:5]
        raise DataError(
            f"{where}: predictions for {len(names)} test images"
            + (f" (+{int(filled.sum())} excluded by prepare)" if filled.any() else "")
            + f" but the test list has {len(expected)}"
            + (f" (no prediction for e.g. {', '.join(missing)})" if missing else "")
            + (f" (not in the test list: e.g. {', '.join(extra)})" if extra else "")
        )
    index = pd.Index(names)
    if index.has_duplicates:
        raise DataError(f"{where}: test image '{index[index.duplicated()][0]}' is predicted twice")
    pos = index.get_indexer(expected)
    unexplained = (pos < 0) & ~filled
    if unexplained.any():
        raise DataError(f"{where}: no prediction for test image '{expected[unexplained][0]}'")
    out = []
    for i, array in enumerate(rows):
        reordered = array[np.maximum(pos, 0)]  # one copy, as fancy indexing always makes
        if filled.any():
            reordered[filled] = fallback[i]
        out.append(reordered)
    return expected, tuple(out)


# --- the submit stage ---


def log_fallback(fallback_names: np.ndarray, report_path, label_map: pd.DataFrame) -> None:
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    log.warning(
        "%d test image(s) excluded by prepare (%s) have no prediction; submitting the most "
        "frequent training SKU %d for them, scored as any other row (e.g. %s)",
        len(fallback_names),
        report_path,
        int(skus[int(np.argmax(label_map["n_train"].to_numpy()))]),
        ", ".join(fallback_names[:5]),
    )
