"""What Kaggle does with the submission, done here: score it against the labelled test list
(Public and Private rows, as the leaderboard would) and upload it with the official CLI."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pandas as pd

from products10k.common import Products10kError
from products10k.contracts import kaggle
from products10k.metrics import hit_rates, leaderboard_masks

log = logging.getLogger(__name__)


def score_submission(submission: pd.DataFrame, topk: pd.DataFrame, test_list: pd.DataFrame) -> dict:
    """Top-1 (and top-k) against the labelled test list: all rows, Public and Private.

    Returns {} when the list has no labels (an unlabelled test set cannot be scored locally).
    """
    if "class" not in test_list.columns or test_list["class"].isna().all():
        return {}
    truth = test_list.set_index(test_list["name"].astype(str))
    labelled = truth["class"].notna()
    merged = (
        submission.assign(name=submission["name"].astype(str))
        .set_index("name")
        .join(truth[["class"]].rename(columns={"class": "truth"}), how="inner")
    )
    merged = merged[merged["truth"].notna()]
    hit1 = (merged["class"].to_numpy() == merged["truth"].to_numpy().astype(np.int64)).astype(float)
    k_cols = [c for c in topk.columns if c.startswith("class_")]
    tk = topk.assign(name=topk["name"].astype(str)).set_index("name").loc[merged.index, k_cols].to_numpy()
    hitk = (tk == merged["truth"].to_numpy().astype(np.int64)[:, None]).any(axis=1).astype(float)
    hits = {"top1": hit1, f"top{len(k_cols)}": hitk}
    out = {**hit_rates(hits, np.ones(len(hit1), bool)), "n": int(labelled.sum())}
    if "Usage" in truth.columns:
        for split, mask in leaderboard_masks(truth.loc[merged.index, "Usage"]).items():
            if mask.any():
                out[split] = hit_rates(hits, mask)
    return out


def kaggle_submit(
    competition: str, path: str | os.PathLike, message: str, timeout_s: float, env: dict | None = None
) -> str:
    """Upload with the Kaggle CLI; returns its output (the key blanked). Never waits on a prompt.

    The CLI and credentials are checked first (a missing CLI or ``kaggle.json`` otherwise ends in
    a traceback deep inside the kaggle package); :func:`products10k.kaggle.run` closes stdin and
    sets a timeout, so that an interactive prompt or a stalled upload fails the stage instead of
    hanging it, and blanks the Kaggle key out of the output quoted in errors and logs.
    """
    env = dict(os.environ if env is None else env)
    exe = shutil.which("kaggle", path=env.get("PATH"))
    if exe is None:
        raise Products10kError(
            "submit.kaggle.enabled is true but the 'kaggle' CLI is not on PATH "
            "(pip install kaggle, or set submit.kaggle.enabled: false)"
        )
    try:
        kaggle.kaggle_credentials(env)
    except kaggle.CredentialsNotFound:
        raise Products10kError(
            "submit.kaggle.enabled is true but no Kaggle credentials were found: set KAGGLE_USERNAME and "
            "KAGGLE_KEY, or put kaggle.json in ~/.kaggle (or $KAGGLE_CONFIG_DIR)"
        ) from None
    cmd = kaggle.submit_command(competition, path, message, executable=exe)
    log.info("uploading %s to Kaggle competition %s", path, competition)
    result = kaggle.run(cmd, timeout_s, env=env)
    if result.timed_out:
        raise Products10kError(
            f"kaggle competitions submit did not finish within {timeout_s:g}s (submit.kaggle.timeout_s)"
        )
    output = result.output.strip()
    if result.returncode != 0:
        raise Products10kError(
            f"kaggle competitions submit failed with exit code {result.returncode}: {output[-2000:]}"
        )
    log.info("kaggle: %s", output)
    return result.output
