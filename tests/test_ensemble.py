"""Ensemble weights: the val log-likelihood fit, given weights, probability averaging."""

import numpy as np
import pytest
from scipy.special import softmax

from products10k.config import from_dict
from products10k.ensemble import combine, fit_weights, log_likelihood, resolve_weights
from products10k.errors import ConfigError
from products10k.params import EnsembleConfig


def _member(labels, k, strength, rng):
    """Logits with the true class boosted by ``strength`` (0 = pure noise)."""
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += strength
    return logits


def test_fit_prefers_the_informative_member_and_stays_on_the_simplex():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=500)
    good, noise = _member(labels, 20, 4.0, rng), _member(labels, 20, 0.0, rng)
    w = fit_weights([noise, good], labels)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] > 0.9
    # the fitted weights beat equal weights on the objective they maximise
    fitted = log_likelihood(combine([noise, good], w), labels)
    equal = log_likelihood(combine([noise, good], [0.5, 0.5]), labels)
    assert fitted > equal


def test_fit_finds_interior_optimum_of_complementary_members():
    # each member is right on a different half of the rows: the best mix uses both
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=400)
    a, b = _member(labels, 10, 0.0, rng), _member(labels, 10, 0.0, rng)
    a[np.arange(200), labels[:200]] += 6
    b[np.arange(200, 400), labels[200:]] += 6
    w = fit_weights([a, b], labels)
    assert w == pytest.approx([0.5, 0.5], abs=0.05)


def test_fit_skips_unlabelled_rows_and_single_member():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, size=50)
    labels[:10] = -1
    assert fit_weights([rng.normal(size=(50, 5))], labels).tolist() == [1.0]
    w = fit_weights([rng.normal(size=(50, 5)), rng.normal(size=(50, 5))], labels)
    assert w.sum() == pytest.approx(1.0)


def test_resolve_weights_modes():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=60)
    logits = [rng.normal(size=(60, 5)), rng.normal(size=(60, 5))]
    assert resolve_weights("equal", ["a", "b"], logits, labels) == {"a": 0.5, "b": 0.5}
    assert resolve_weights({"a": 3, "b": 1}, ["a", "b"], logits, labels) == {"a": 0.75, "b": 0.25}
    fitted = resolve_weights("fit", ["a", "b"], logits, labels)
    assert sum(fitted.values()) == pytest.approx(1.0)


def test_combine_is_a_probability_average():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)) * 5
    probs = combine([a, b], [0.25, 0.75])
    assert probs.sum(1) == pytest.approx(np.ones(4), abs=1e-5)
    assert probs == pytest.approx(0.25 * softmax(a, 1) + 0.75 * softmax(b, 1), abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        combine([a, b[:, :3]], [0.5, 0.5])


def _ens(members, weights):
    return from_dict(EnsembleConfig, {"members": members, "weights": weights}, prefix="ensemble")


def test_weights_config_is_checked_against_members():
    members = {"m0": {}, "m1": {"train.resolution": 224}}
    cfg = _ens(members, {"m0": 1, "m1": 2})
    assert cfg.weights == {"m0": 1, "m1": 2}
    with pytest.raises(ConfigError, match="unknown member 'm2'"):
        _ens(members, {"m0": 1, "m1": 1, "m2": 1})
    with pytest.raises(ConfigError, match="no entry for member 'm1'"):
        _ens(members, {"m0": 1})
    with pytest.raises(ConfigError, match="'fit', 'equal'"):
        _ens(members, "best")
    with pytest.raises(ConfigError, match="weights.m0"):
        _ens(members, {"m0": -1, "m1": 1})


def test_blockwise_softmax_matches_the_whole_array(monkeypatch):
    import products10k.ensemble as ens

    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(50, 9)) * 10, rng.integers(0, 9, size=50)
    monkeypatch.setattr(ens, "BLOCK_ROWS", 7)  # 50 rows = 7 full blocks + a partial one
    ref = softmax(logits, axis=1)
    np.testing.assert_allclose(ens.true_class_probs(logits, labels), ref[np.arange(50), labels], rtol=1e-10)
    np.testing.assert_allclose(ens.combine([logits], [1.0]), ref, atol=1e-6)
