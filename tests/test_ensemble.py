"""Ensemble weights: the val log-likelihood fit, given weights, probability averaging from top-k files."""

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from products10k.common import ConfigError
from products10k.config import EnsembleConfig, from_dict
from products10k.ensemble import cross_fit_fusion_weights, fit_fusion_weight, fit_weights, resolve_weights
from products10k.scores import SplitScores, combine_topk, log_likelihood


def _member(labels, k, strength, rng):
    """Logits with the true class boosted by ``strength`` (0 = pure noise)."""
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += strength
    return logits


def _label_logprob(logits, labels):
    return log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def _scores(logits, labels, k):
    return SplitScores.from_logits([f"r{i}" for i in range(len(labels))], labels, logits, k)


def test_fit_prefers_the_informative_member_and_stays_on_the_simplex():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=500)
    good, noise = _member(labels, 20, 4.0, rng), _member(labels, 20, 0.0, rng)
    lps = [_label_logprob(noise, labels), _label_logprob(good, labels)]
    w = fit_weights(lps, labels)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] > 0.9
    # the fitted weights beat equal weights on the objective they maximise
    members = [_scores(noise, labels, 20), _scores(good, labels, 20)]
    fitted = log_likelihood(combine_topk(members, list(w), 20, 5).label_logprob, labels)
    equal = log_likelihood(combine_topk(members, [0.5, 0.5], 20, 5).label_logprob, labels)
    assert fitted > equal


def test_fit_finds_interior_optimum_of_complementary_members():
    # each member is right on a different half of the rows: the best mix uses both
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=400)
    a, b = _member(labels, 10, 0.0, rng), _member(labels, 10, 0.0, rng)
    a[np.arange(200), labels[:200]] += 6
    b[np.arange(200, 400), labels[200:]] += 6
    w = fit_weights([_label_logprob(a, labels), _label_logprob(b, labels)], labels)
    assert w == pytest.approx([0.5, 0.5], abs=0.05)


def test_row_weights_move_the_fit_towards_the_rows_the_target_mix_weighs():
    """Member a is right on the 300 rows of a head SKU, b on the 100 rows of four tail SKUs.
    Unweighted, val's own mix favours a; weighted to a uniform SKU mix (the val estimate's row
    weights), the tail SKUs carry 4/5 of the mass and the fit moves to b."""
    from products10k.estimate import row_weights

    rng = np.random.default_rng(3)
    labels = np.concatenate([np.zeros(300, int), rng.integers(1, 5, size=100)])
    a, b = _member(labels, 5, 0.0, rng), _member(labels, 5, 0.0, rng)
    a[np.arange(300), 0] += 6
    b[np.arange(300, 400), labels[300:]] += 6
    lps = [_label_logprob(a, labels), _label_logprob(b, labels)]
    plain = fit_weights(lps, labels)
    weighted = fit_weights(lps, labels, row_weights(labels, np.full(5, 0.2)))
    assert plain[0] > 0.6 and weighted[1] > 0.6
    # rows of weight 0 count for nothing: b alone is fitted on the tail rows
    only_tail = fit_weights(lps, labels, (labels > 0).astype(float))
    assert only_tail[1] > 0.95


def test_fit_skips_unlabelled_rows_and_single_member():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=50)
    lp = [np.log(rng.uniform(0.1, 1, size=50)), np.log(rng.uniform(0.1, 1, size=50))]
    labels[:10] = -1
    lp[0][:10] = np.nan  # what evaluate writes for label -1
    assert fit_weights(lp[:1], labels).tolist() == [1.0]
    w = fit_weights(lp, labels)
    assert w.sum() == pytest.approx(1.0) and np.isfinite(w).all()


def test_resolve_weights_modes_and_the_no_val_fallback(caplog):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=60)
    val = [_scores(rng.normal(size=(60, 5)), labels, 5), _scores(rng.normal(size=(60, 5)), labels, 5)]
    assert resolve_weights("equal", ["a", "b"], val) == {"a": 0.5, "b": 0.5}
    assert resolve_weights({"a": 3, "b": 1}, ["a", "b"], val) == {"a": 0.75, "b": 0.25}
    fitted = resolve_weights("fit", ["a", "b"], val)
    assert sum(fitted.values()) == pytest.approx(1.0) and fitted != {"a": 0.5, "b": 0.5}
    # no val rows (prepare.val_fraction: 0): nothing to fit on, equal weights with a log line
    empty = [_scores(np.zeros((0, 5)), np.zeros(0, dtype=int), 5)] * 2
    with caplog.at_level("INFO"):
        assert resolve_weights("fit", ["a", "b"], empty) == {"a": 0.5, "b": 0.5}
    assert "no labelled val rows" in caplog.text


def test_combine_with_every_label_kept_is_the_exact_probability_average():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, size=9)
    a, b = rng.normal(size=(9, 6)), rng.normal(size=(9, 6)) * 5
    ens = combine_topk([_scores(a, labels, 6), _scores(b, labels, 6)], [0.25, 0.75], 6, k=6, block_rows=4)
    exact = 0.25 * softmax(a, 1) + 0.75 * softmax(b, 1)
    np.testing.assert_allclose(ens.probs, np.take_along_axis(exact, ens.labels, 1), atol=1e-6)
    assert ens.labels[:, 0].tolist() == exact.argmax(1).tolist()
    assert (ens.error_bound == 0).all() and not ens.uncertain_top1.any()
    np.testing.assert_allclose(ens.label_logprob, np.log(exact[np.arange(9), labels]), rtol=1e-5)


def test_combine_from_top_k_stays_within_its_stated_error_bound():
    # 3 members, 300 classes, only the top 10 kept: the estimate may differ from the exact
    # average, but never by more than the bound it reports, and top-1 is exact wherever the
    # margin exceeds twice that bound
    rng = np.random.default_rng(5)
    n, k_classes = 200, 300
    labels = rng.integers(0, k_classes, size=n)
    logits = [_member(labels, k_classes, s, rng) * 1.5 for s in (3.0, 2.0, 4.0)]
    weights = [0.2, 0.3, 0.5]
    ens = combine_topk([_scores(z, labels, 10) for z in logits], weights, k_classes, k=5, block_rows=64)
    exact = sum(w * softmax(z, 1) for w, z in zip(weights, logits, strict=True))
    est_error = np.abs(np.take_along_axis(exact, ens.labels, 1) - ens.probs).max(axis=1)
    assert (est_error <= ens.error_bound + 1e-6).all()
    assert (ens.error_bound > 0).all()  # the bound is real here, not trivially zero
    sure = ~ens.uncertain_top1
    assert sure.sum() > n // 2
    assert (ens.labels[sure, 0] == exact[sure].argmax(1)).all()
    # the label log-probability needs no estimate: it is exact
    np.testing.assert_allclose(ens.label_logprob, np.log(exact[np.arange(n), labels]), rtol=1e-5)


def _ens(members, weights):
    return from_dict(EnsembleConfig, {"members": members, "weights": weights}, prefix="ensemble")


def test_an_ensemble_of_fused_estimates_carries_their_bound(tmp_path):
    # The index stage's fused file holds estimated probabilities (classifier and kNN combined from
    # top-k blocks). An ensemble that uses it as a member (submit.phase: fused) must add that
    # estimate's own bound to its own, or the reported max_prob_error can be exceeded.
    from products10k.knn import fuse
    from products10k.scores import load_predictions, save_predictions

    rng = np.random.default_rng(134)  # one of the draws where the bound without it is exceeded
    n, num_classes, k = 200, 8, 2
    labels = rng.integers(0, num_classes, n)
    names = np.array([str(i) for i in range(n)])
    exact, blocks = {}, {}
    for name in ("classifier", "knn", "other"):
        logits = rng.normal(scale=rng.uniform(0.5, 4), size=(n, num_classes))
        exact[name] = softmax(logits, axis=1)
        blocks[name] = SplitScores.from_logits(names, labels, logits, k)
    w, v = rng.uniform(0.1, 0.9), rng.uniform(0.3, 1.0)
    fused = fuse(blocks["classifier"], blocks["knn"], w, num_classes, k)
    assert (fused.prob_error > 0).all()
    save_predictions(tmp_path / "fused.npz", val=fused, test=fused, skus=np.arange(num_classes))
    fused = load_predictions(tmp_path / "fused.npz").test  # the bound survives the file

    # every label's ensemble probability (k = K), against the exact average of the full softmaxes
    ens = combine_topk([fused, blocks["other"]], [v, 1 - v], num_classes, num_classes)
    truth = v * ((1 - w) * exact["classifier"] + w * exact["knn"]) + (1 - v) * exact["other"]
    error = np.abs(np.take_along_axis(truth, ens.labels, axis=1) - ens.probs).max(axis=1)
    assert (error <= ens.error_bound + 1e-6).all()
    without_fused_bound = ens.error_bound - v * fused.prob_error
    assert (error > without_fused_bound + 0.01).any()  # the bound before this fix: exceeded


def test_weights_config_is_checked_against_members():
    members = {"m0": {}, "m1": {"train.resolution": 224}}
    cfg = _ens(members, {"m0": 1, "m1": 2})
    assert cfg.weights == {"m0": 1, "m1": 2}
    with pytest.raises(ConfigError, match="unknown member 'm2'"):
        _ens(members, {"m0": 1, "m1": 1, "m2": 1})
    with pytest.raises(ConfigError, match="no entry for member 'm1'"):
        _ens(members, {"m0": 1})
    with pytest.raises(
        ConfigError, match=r"key 'ensemble.weights' is 'best': Input should be 'fit' or 'equal'"
    ):
        _ens(members, "best")
    with pytest.raises(ConfigError, match="weights.m0"):
        _ens(members, {"m0": -1, "m1": 1})


def test_the_fold_ensemble_is_the_mean_of_the_folds_probabilities_and_oof_rows_concatenate():
    """scores.mean_scores (test under cv) against the exact average; concat_scores (val under cv)."""
    from products10k.scores import concat_scores, mean_scores

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 12, size=40)
    folds = [rng.normal(size=(40, 12)) * 3 for _ in range(3)]
    mean = mean_scores([_scores(f, labels, 12) for f in folds], 12, 12)  # every label kept: exact
    exact = np.mean([softmax(f, axis=1) for f in folds], axis=0)
    assert np.array_equal(mean.topk_labels[:, 0], exact.argmax(axis=1))
    assert mean.topk_probs() == pytest.approx(np.take_along_axis(exact, mean.topk_labels, axis=1), abs=1e-6)
    assert np.exp(mean.label_logprob) == pytest.approx(exact[np.arange(40), labels], abs=1e-6)
    # top-5 files: the kept probabilities within the stated bound of the exact ones
    kept = mean_scores([_scores(f, labels, 5) for f in folds], 12, 5)
    err = np.abs(kept.topk_probs() - np.take_along_axis(exact, kept.topk_labels, axis=1)).max(axis=1)
    assert (err <= kept.prob_error + 1e-6).all()
    parts = [_scores(folds[0][:15], labels[:15], 5), _scores(folds[1][15:], labels[15:], 5)]
    joined = concat_scores(parts)
    assert len(joined) == 40 and np.array_equal(joined.labels, labels)
    assert np.array_equal(joined.topk_labels[15:], parts[1].topk_labels)


def test_the_fusion_weight_cross_fit_never_sees_the_part_it_fuses():
    """Each part's weight comes from the other parts only: rows of one part that would pull the
    weight (a kNN that is right exactly there) move every other part's weight and not their own."""
    rng = np.random.default_rng(0)
    n, k = 400, 10
    labels = rng.integers(0, k, size=n)
    classifier = _scores(_member(labels, k, 2.0, rng), labels, k)
    knn_logits = _member(labels, k, 0.5, rng)
    row_weight = np.ones(n)
    part, weights = cross_fit_fusion_weights(classifier, _scores(knn_logits, labels, k), row_weight, parts=10)
    assert len(weights) == 10 and np.bincount(part).tolist() == [40] * 10  # the rows dealt evenly

    knn_logits[part == 3, labels[part == 3]] += 8.0  # the kNN now certain and right on part 3
    again_part, again = cross_fit_fusion_weights(
        classifier, _scores(knn_logits, labels, k), row_weight, parts=10
    )
    assert np.array_equal(again_part, part)  # the parts depend on the rows, not on the scores
    assert again[3] == pytest.approx(weights[3], abs=1e-6)  # its own fit did not see it
    assert all(again[j] > weights[j] + 0.01 for j in range(10) if j != 3)  # every other fit did

    unlabelled = labels.copy()
    unlabelled[2:] = -1  # two labelled rows: two parts of one row each
    cls = _scores(_member(labels, k, 2.0, rng), unlabelled, k)
    part, weights = cross_fit_fusion_weights(cls, _scores(knn_logits, unlabelled, k), row_weight, parts=10)
    assert len(weights) == 2 and sorted(part[:2].tolist()) == [0, 1]
    unlabelled[1] = -1  # one labelled row: nothing to hold out, the weight fitted on all of val
    cls = _scores(_member(labels, k, 2.0, rng), unlabelled, k)
    knn = _scores(knn_logits, unlabelled, k)
    part, weights = cross_fit_fusion_weights(cls, knn, row_weight, parts=10)
    assert (part == 0).all() and weights == [pytest.approx(fit_fusion_weight(cls, knn, row_weight))]
