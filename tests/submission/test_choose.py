"""submission/choose.py: the val estimate of the test metric, logit adjustment, and the choice on val."""

import json

import numpy as np
import pandas as pd
import pytest

from products10k.common import ConfigError, DataError
from products10k.scores import SplitScores, save_predictions
from products10k.submission.choose import (
    adjust,
    best,
    coverage,
    estimate,
    row_weights,
    score_taus,
    target_prior,
)
from products10k.submission.submit import make_submission
from tests.submission.test_submit import _report, _test_list

LABEL_MAP = pd.DataFrame({"label": [0, 1, 2, 3], "sku": [501, 502, 503, 504], "n_train": [60, 30, 6, 4]})


def test_target_priors_uniform_train_and_a_file(tmp_path):
    assert np.allclose(target_prior("uniform", LABEL_MAP), 0.25)
    assert np.allclose(target_prior("train", LABEL_MAP), [0.6, 0.3, 0.06, 0.04])
    path = tmp_path / "mix.csv"
    path.write_text("sku,weight\n503,3\n504,1\n999,5\n")  # a SKU train lacks carries no weight here
    assert np.allclose(target_prior(str(path), LABEL_MAP), [0, 0, 0.75, 0.25])
    path.write_text("sku,weight\n503,3\n504,-1\n")
    with pytest.raises(DataError, match="row 3: weight"):
        target_prior(str(path), LABEL_MAP)
    with pytest.raises(ConfigError, match="evaluate.target_prior"):
        target_prior(str(tmp_path / "none.csv"), LABEL_MAP)


def test_the_estimate_reweights_val_to_the_target_mix():
    # val drawn in train's mix over the head SKUs 0 and 1: 6 + 3 rows; the classifier is right on
    # SKU 0 only. Plain top-1 2/3; a balanced test over those SKUs would read 1/2
    labels = np.array([0] * 6 + [1] * 3)
    top1 = np.zeros(9, dtype=int)
    uniform = target_prior("uniform", LABEL_MAP)
    assert estimate(top1, labels, row_weights(labels, uniform)) == pytest.approx(0.5)
    train = target_prior("train", LABEL_MAP)
    assert estimate(top1, labels, row_weights(labels, train)) == pytest.approx(2 / 3)
    assert coverage(labels, uniform) == pytest.approx(0.5) and coverage(labels, train) == pytest.approx(0.9)
    # a SKU train lacks (label -1) weighs nothing
    assert row_weights(np.array([-1, 0]), uniform).tolist() == [0.0, 0.25]


def test_logit_adjustment_moves_predictions_to_the_tail_of_a_skewed_prior():
    log_prior = np.log(np.array([0.9, 0.1]))
    labels = np.array([[0, 1], [0, 1]])
    probs = np.array([[0.55, 0.45], [0.95, 0.05]], dtype=np.float32)
    same_labels, same_probs = adjust(labels, probs, log_prior, 0.0)
    assert same_labels is labels and same_probs is probs
    moved, moved_probs = adjust(labels, probs, log_prior, 1.0)
    # 0.45 / 0.1 > 0.55 / 0.9: the rare SKU wins the close row; a confident row keeps its answer
    assert moved[:, 0].tolist() == [1, 0]
    assert np.allclose(moved_probs.sum(axis=1), 1.0) and (np.diff(moved_probs, axis=1) <= 0).all()


def test_best_prefers_the_estimate_then_the_earlier_choice():
    rows = score_taus("a", np.array([[0, 1]]), np.array([[0.6, 0.4]]), np.array([0]), np.ones(1),
                      np.log([0.5, 0.5]), (0.0, 1.0))  # fmt: skip
    assert [r.val_estimate for r in rows] == [1.0, 1.0] and best(rows).tau == 0.0
    nan = score_taus(
        "b", np.zeros((0, 2), int), np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), np.zeros(2), (0.0,)
    )
    assert best(nan).candidate == "b"


def _candidate(path, val_labels, val_right, test_names):
    """A predictions file whose val top-1 is right exactly where ``val_right`` says."""
    n = len(val_labels)
    logits = np.zeros((n, 4))
    wrong = (val_labels + 1) % 4
    logits[np.arange(n), np.where(val_right, val_labels, wrong)] = 5.0
    test = np.zeros((len(test_names), 4))
    save_predictions(
        path,
        val=SplitScores.from_logits([f"v{i}.jpg" for i in range(n)], val_labels, logits, k=4),
        test=SplitScores.from_logits(np.asarray(test_names), np.zeros(len(test_names), np.int64), test, k=4),
        skus=np.array([501, 502, 503, 504]),
    )


def test_the_submission_is_the_candidate_with_the_best_val_estimate_not_the_best_val_top1(tmp_path):
    tl = _test_list()
    tl.to_csv(tmp_path / "test.csv", index=False)
    label_map = tmp_path / "label_map.csv"  # train's mix: SKU 0 four times SKU 2, as in val
    pd.DataFrame(
        {"label": range(4), "sku": [501, 502, 503, 504], "group": [1, 1, 2, 2], "n_train": [8, 1, 2, 1]}
    ).to_csv(label_map, index=False)
    # val in train's mix: 8 rows of SKU 0, 2 of SKU 2. "head" is right on SKU 0 only (top-1 0.8),
    # "tail" on SKU 2 only (0.2), "both" on 6 of SKU 0 and 1 of SKU 2 (0.7)
    val_labels = np.array([0] * 8 + [2] * 2)
    rights = {
        "head": val_labels == 0,
        "tail": val_labels == 2,
        "both": np.array([True] * 6 + [False] * 2 + [True, False]),
    }
    candidates = {}
    for name, right in rights.items():
        (tmp_path / name).mkdir()
        _candidate(tmp_path / name / "m0.npz", val_labels, right, tl["name"].to_numpy())
        candidates[name] = {"m0": tmp_path / name / "m0.npz"}
    common = {
        "members": ["m0"], "candidates": candidates, "weights_spec": "equal",
        "label_map_path": label_map, "test_list_path": tmp_path / "test.csv",
        "out": tmp_path / "sub.csv", "top_k_out": tmp_path / "top5.csv", "top_k": 3,
        "report_path": _report(tmp_path / "report.json", tmp_path / "test.csv"),
    }  # fmt: skip
    # uniform over the two val SKUs: head 0.5, tail 0.5, both (0.75 + 0.5) / 2 = 0.625
    metrics = make_submission(**common, target_prior_spec="uniform")
    assert metrics["choice"]["candidate"] == "both" and metrics["choice"]["val_estimate"] == pytest.approx(
        0.625
    )
    assert {c["candidate"] for c in metrics["choice"]["candidates"]} == {"head", "tail", "both"}
    # in train's mix the plain top-1 decides: head
    assert make_submission(**common, target_prior_spec="train")["choice"]["candidate"] == "head"
    json.dumps(metrics)  # the metrics file takes it as it is


def test_a_sku_without_training_images_is_not_pushed_first_by_logit_adjustment():
    """n_train 0 (every image of a SKU excluded): log 0 would be -inf and tau x that a +inf bonus."""
    from products10k.estimate import log_train_prior

    prior = log_train_prior(pd.DataFrame({"n_train": [8, 0, 1]}))
    assert np.isfinite(prior).all() and prior[1] == prior[2]
    labels, probs = np.array([[0, 1]]), np.array([[0.9, 0.1]], dtype=np.float32)
    assert adjust(labels, probs, prior, 1.0)[0][0, 0] == 0  # the 8-image SKU's lead survives
