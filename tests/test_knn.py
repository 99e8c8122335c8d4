"""kNN vote, fusion and enrolment on hand-made vectors (real Faiss indexes)."""

import numpy as np
import pytest

from products10k.common import Products10kError
from products10k.knn import (
    build_gallery,
    enrol,
    fit_fusion_weight,
    fuse,
    knn_scores,
    knn_search,
    load_gallery,
    save_gallery,
    search,
    vote,
)
from products10k.scores import SplitScores


def unit(rows) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vote_probabilities_are_the_weighted_shares_smoothed():
    sims = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    labels = np.array([[2, 0, 2]])
    out = vote(sims, labels, 5, kind="softmax", temperature=0.1, smoothing=0.05, names=["q"], labels=[0])
    w = np.exp((sims[0] - 0.9) / 0.1)
    share2, share0 = (w[0] + w[2]) / w.sum(), w[1] / w.sum()
    assert out.topk_labels[0, :2].tolist() == [2, 0]
    probs = out.topk_probs()[0]
    assert probs[:2] == pytest.approx([0.95 * share2 + 0.01, 0.95 * share0 + 0.01], rel=1e-5)
    # the third kept label is unvoted (the lowest one not voted: 1) at the floor smoothing / K
    assert out.topk_labels[0, 2] == 1 and probs[2] == pytest.approx(0.01)
    # kept + the equal share of the K - k left-out labels sum to 1, as a predictions file assumes
    assert probs.sum() + (5 - 3) * 0.01 == pytest.approx(1.0, rel=1e-5)
    assert out.label_logprob[0] == pytest.approx(np.log(probs[1]), rel=1e-5)


def test_count_vote_and_a_label_with_no_vote():
    sims = np.array([[0.9, 0.1], [0.5, 0.4]], dtype=np.float32)
    out = vote(
        sims,
        np.array([[1, 1], [0, 1]]),
        3,
        kind="count",
        temperature=1,
        smoothing=0.3,
        names=["a", "b"],
        labels=[2, 1],
    )
    assert out.topk_labels[0].tolist() == [1, 0] and out.topk_labels[1].tolist() == [0, 1]  # tie: lower label
    assert out.topk_probs()[1] == pytest.approx([0.7 * 0.5 + 0.1, 0.7 * 0.5 + 0.1])
    # row 0's label 2 got no vote: its probability is the floor, finite for the fusion fit
    assert out.label_logprob[0] == pytest.approx(np.log(0.1), rel=1e-5)
    for row in out.topk_labels:
        assert len(set(row.tolist())) == len(row)


def test_knn_over_a_faiss_index_finds_the_nearest_reference():
    refs = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.9, 0.1, 0]])
    gallery = build_gallery(refs, [0, 1, 2, 0], ["a", "b", "c", "d"], [10, 20, 30], {"k": 2})
    sims, ids = search(gallery.index, unit([[0, 0.2, 1]]), 2, batch=1)
    assert ids[0, 0] == 2 and sims[0, 0] == pytest.approx(1 / np.sqrt(1.04), rel=1e-5)
    queries = unit([[1, 0.05, 0], [0.1, 1, 0]])
    scores = knn_scores(
        gallery, queries, ["x", "y"], [0, 1], k=2, kind="softmax", temperature=0.05, smoothing=0.01, batch=1
    )
    assert scores.topk_labels[:, 0].tolist() == [0, 1]
    # the same votes, with each query's similarity to its nearest reference (the index's closeness figure)
    same, nearest = knn_search(
        gallery, queries, ["x", "y"], [0, 1], k=2, kind="softmax", temperature=0.05, smoothing=0.01, batch=1
    )
    assert np.array_equal(same.topk_labels, scores.topk_labels)
    assert nearest == pytest.approx((queries @ refs.T).max(axis=1), rel=1e-5)


def test_fusion_weight_follows_the_better_source_and_fuse_mixes_probabilities():
    rng = np.random.default_rng(0)
    n, k = 200, 6
    labels = rng.integers(0, k, n)
    noisy = rng.normal(size=(n, k)).astype(np.float32)  # a classifier that knows nothing
    classifier = SplitScores.from_logits(np.arange(n).astype(str), labels, noisy, k)
    sims = np.ones((n, 1), np.float32)
    knn = vote(
        sims,
        labels[:, None],
        k,
        kind="count",
        temperature=1,
        smoothing=0.1,
        names=np.arange(n).astype(str),
        labels=labels,
    )  # a kNN that is always right
    weight = fit_fusion_weight(classifier, knn)
    assert weight > 0.9
    fused = fuse(classifier, knn, weight, k, top_k=k)
    assert (fused.topk_labels[:, 0] == labels).mean() == 1.0
    # weight 0 is the classifier alone
    alone = fuse(classifier, knn, 0.0, k, top_k=k)
    assert np.array_equal(alone.topk_labels[:, 0], classifier.topk_labels[:, 0])
    p = np.exp(alone.topk_logits)
    assert p == pytest.approx(classifier.topk_probs(), abs=1e-5)


def test_enrol_appends_new_skus_after_the_known_ones_and_save_load(tmp_path):
    gallery = build_gallery(unit([[1, 0, 0], [0, 1, 0]]), [0, 1], ["a", "b"], [10, 20], {"k": 1})
    added = enrol(gallery, unit([[0, 0, 1], [0.1, 0, 1], [0, 1, 0.1]]), [99, 99, 20], ["n1", "n2", "b2"])
    assert added == {"images": 3, "skus": 2, "new_skus": 1}
    assert gallery.skus.tolist() == [10, 20, 99] and gallery.labels.tolist() == [0, 1, 2, 2, 1]
    save_gallery(gallery, tmp_path / "index")
    again = load_gallery(tmp_path / "index")
    assert again.index.ntotal == 5 and again.names.tolist() == ["a", "b", "n1", "n2", "b2"]
    scores = knn_scores(
        again, unit([[0, 0.05, 1]]), ["q"], [-1], k=1, kind="count", temperature=1, smoothing=0.01, batch=8
    )
    assert again.skus[scores.topk_labels[0, 0]] == 99
    (tmp_path / "index" / "gallery.npz").unlink()
    with pytest.raises(Products10kError, match="gallery.npz is missing"):
        load_gallery(tmp_path / "index")
