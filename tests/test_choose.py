"""products10k/choose.py: the val estimate of the test metric, logit adjustment, and the choice on val."""

import json

import numpy as np
import pandas as pd
import pytest

from products10k.choose import (
    adjust,
    best,
    coverage,
    estimate,
    row_weights,
    score_taus,
    target_prior,
)
from products10k.common import ConfigError, DataError
from products10k.estimate import paired_gain
from products10k.scores import SplitScores, save_predictions
from products10k.submission.submit import ChoiceSpec, make_submission
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


def _choice_inputs(tmp_path, val_labels, rights: dict) -> dict:
    """make_submission's arguments for candidates whose val top-1 is right where ``rights`` says."""
    tl = _test_list()
    tl.to_csv(tmp_path / "test.csv", index=False)
    label_map = tmp_path / "label_map.csv"  # train's mix: SKU 0 four times SKU 2, as in val
    pd.DataFrame(
        {"label": range(4), "sku": [501, 502, 503, 504], "group": [1, 1, 2, 2], "n_train": [8, 1, 2, 1]}
    ).to_csv(label_map, index=False)
    candidates = {}
    for name, right in rights.items():
        (tmp_path / name).mkdir()
        _candidate(tmp_path / name / "m0.npz", val_labels, right, tl["name"].to_numpy())
        candidates[name] = {"m0": tmp_path / name / "m0.npz"}
    return {
        "members": ["m0"], "candidates": candidates, "weights_spec": "equal",
        "label_map_path": label_map, "test_list_path": tmp_path / "test.csv",
        "out": tmp_path / "sub.csv", "top_k_out": tmp_path / "top5.csv", "top_k": 3,
        "report_path": _report(tmp_path / "report.json", tmp_path / "test.csv"),
    }  # fmt: skip


def _spec(target_prior, reference, taus=(0.0,)):
    return ChoiceSpec(target_prior=target_prior, taus=taus, reference=reference, confidence=0.95, rerank_k=50)


def test_the_submission_is_chosen_by_the_val_estimate_not_by_val_top1(tmp_path):
    # val in train's mix, 200 rows of SKU 0 and 50 of SKU 2 (a val large enough to tell these apart).
    # "head" is right on SKU 0 only (top-1 0.8), "tail" on SKU 2 only (0.2), "both" on 3/4 of SKU 0
    # and 1/2 of SKU 2 (0.7)
    val_labels = np.array([0] * 200 + [2] * 50)
    both = np.r_[np.arange(200) % 4 != 0, np.arange(50) % 2 == 0]
    common = _choice_inputs(
        tmp_path, val_labels, {"head": val_labels == 0, "tail": val_labels == 2, "both": both}
    )
    # uniform over the two val SKUs: head 0.5, tail 0.5, both (0.75 + 0.5) / 2 = 0.625, +0.125 over head
    metrics = make_submission(**common, choice=_spec("uniform", "head"))
    choice = metrics["choice"]
    assert choice["candidate"] == "both" and choice["val_estimate"] == pytest.approx(0.625)
    assert choice["gain"] == pytest.approx(0.125) and choice["gain_interval"][0] > 0
    assert [c["candidate"] for c in choice["candidates"]] == ["head", "tail", "both"]  # params order
    assert choice["reference"] == {"candidate": "head", "tau": 0.0} and choice["compared"] == 2
    # in train's mix the plain top-1 decides: head, the reference, is the best there
    assert make_submission(**common, choice=_spec("train", "both"))["choice"]["candidate"] == "head"
    json.dumps(metrics)  # the metrics file takes it as it is


def test_a_lead_inside_vals_noise_keeps_the_reference_and_a_real_gain_is_taken(tmp_path):
    """The issue's case: a candidate ahead of the reference on val by less than its noise."""
    rng = np.random.default_rng(0)
    val_labels = np.repeat([0, 1, 2, 3], 30)  # 120 val rows, uniform target
    ref = rng.random(120) < 0.6
    near = ref.copy()  # the reference but for 6 rows: 4 wrong ones made right, 2 right ones wrong
    near[rng.choice(np.flatnonzero(~ref), 4, replace=False)] = True
    near[rng.choice(np.flatnonzero(ref), 2, replace=False)] = False  # +2 rows of 120: +0.017
    far = ref | (rng.random(120) < 0.6)  # right wherever the reference is and on ~60% of the rest
    common = _choice_inputs(tmp_path, val_labels, {"ref": ref, "near": near})
    metrics = make_submission(**common, choice=_spec("uniform", "ref", taus=(0.0, 0.5)))
    choice = metrics["choice"]
    assert choice["highest_estimate"]["candidate"] == "near"  # the plain argmax would have left it
    assert choice["candidate"] == "ref" and choice["tau"] == 0.0
    near_row = next(c for c in choice["candidates"] if c["candidate"] == "near" and c["tau"] == 0.0)
    low, high = near_row["gain_interval"]
    assert 0 < near_row["gain"] < high and low < 0
    assert choice["compared"] == 3 and choice["interval_level"] == pytest.approx(1 - 0.05 / 3)

    (tmp_path / "b").mkdir()
    common = _choice_inputs(tmp_path / "b", val_labels, {"ref": ref, "near": near, "far": far})
    choice = make_submission(**common, choice=_spec("uniform", "ref"))["choice"]
    assert choice["candidate"] == "far" and choice["gain_interval"][0] > 0


def test_the_paired_interval_is_the_one_a_row_bootstrap_gives():
    """paired_gain's standard error against a bootstrap of the rows, weights attached (3,000 draws)."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.repeat(np.arange(10), 20), np.arange(10, 40)]  # 10 head SKUs x 20, 30 singletons
    weights = row_weights(labels, np.full(40, 1 / 40))
    hits_a, hits_b = rng.random(len(labels)) < 0.7, rng.random(len(labels)) < 0.6
    gain, se = paired_gain(hits_a, hits_b, weights)
    assert gain == pytest.approx(
        estimate(hits_a, np.ones_like(labels), weights) - estimate(hits_b, np.ones_like(labels), weights)
    )
    d = hits_a.astype(float) - hits_b
    draws = rng.integers(0, len(labels), (3000, len(labels)))
    boot = (weights[draws] * d[draws]).sum(axis=1) / weights[draws].sum(axis=1)
    assert se == pytest.approx(boot.std(), rel=0.1)
    # the singletons weigh as much as the head SKUs: a bootstrap within SKUs would see half the noise
    assert paired_gain(hits_a, hits_a, weights) == (0.0, 0.0)
    assert np.isnan(paired_gain(hits_a, hits_b, np.zeros(len(labels)))[0])


def test_a_sku_without_training_images_is_not_pushed_first_by_logit_adjustment():
    """n_train 0 (every image of a SKU excluded): log 0 would be -inf and tau x that a +inf bonus."""
    from products10k.estimate import log_train_prior

    prior = log_train_prior(pd.DataFrame({"n_train": [8, 0, 1]}))
    assert np.isfinite(prior).all() and prior[1] == prior[2]
    labels, probs = np.array([[0, 1]]), np.array([[0.9, 0.1]], dtype=np.float32)
    assert adjust(labels, probs, prior, 1.0)[0][0, 0] == 0  # the 8-image SKU's lead survives
