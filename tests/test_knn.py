"""kNN vote, fusion and enrolment on hand-made vectors (real Faiss indexes)."""

import numpy as np
import pytest

from products10k.common import Products10kError
from products10k.ensemble import fit_fusion_weight
from products10k.knn import (
    build_gallery,
    enrol,
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


def test_the_best_match_vote_names_a_sku_with_5_photos_beside_a_look_alike_with_200():
    """An enrolled SKU (5 gallery photos) and a trained look-alike (200, cosine 0.88 between their
    centres), queried with the first's photos: the k = 10 softmax vote goes to the look-alike with
    the most photos near the query, the best match per SKU does not; the look-alike's own photos
    are still named as it."""
    rng = np.random.default_rng(0)
    dim = 32

    def around(centre, n):
        x = centre + 0.4 * rng.normal(size=(n, dim)) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    new = rng.normal(size=dim)
    new /= np.linalg.norm(new)
    look_alike = new + 0.5 * rng.normal(size=dim) / np.sqrt(dim)
    look_alike /= np.linalg.norm(look_alike)
    vectors = np.concatenate([around(new, 5), around(look_alike, 200)])
    labels = np.r_[np.zeros(5, int), np.ones(200, int)]
    gallery = build_gallery(vectors, labels, [f"{i}.jpg" for i in range(205)], np.array([7, 8]), {})

    def named(queries, label: int, kind: str) -> float:
        names, labels = np.arange(len(queries)).astype(str), np.full(len(queries), label)
        scores, _ = knn_search(gallery, queries, names, labels, k=10, kind=kind, temperature=0.05,
                               smoothing=0.01, batch=64)  # fmt: skip
        return float((scores.topk_labels[:, 0] == label).mean())

    queries = around(new, 200)
    assert named(queries, 0, "best") >= 0.8 and named(queries, 0, "centroid") >= 0.8
    assert named(queries, 0, "expected_best") >= 0.8
    assert named(queries, 0, "softmax") <= 0.65 and named(queries, 0, "count") <= 0.5  # swamped
    for kind in ("best", "centroid", "expected_best"):
        assert named(around(look_alike, 200), 1, kind) >= 0.95  # the look-alike loses nothing


def test_centroid_prototypes_follow_enrolment_and_equal_a_gallery_built_whole():
    """The centroid rule scores each SKU by the cosine to its mean gallery vector; enrolling keeps the
    prototypes current (no read-back), equal to those of a gallery built with every vector at once."""
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(30, 8)))
    labels = np.repeat([0, 1, 2], 10)
    gallery = build_gallery(vectors[:20], labels[:20], np.arange(20).astype(str), [5, 6], {})
    protos = gallery.prototypes()
    assert np.allclose(protos.sums[1], vectors[10:20].sum(axis=0), atol=1e-5)
    assert protos.counts.tolist() == [10, 10]
    enrol(gallery, vectors[20:], np.full(10, 7), np.arange(20, 30).astype(str))
    assert gallery.cached_prototypes is not protos  # updated by enrol, not recomputed
    whole = build_gallery(vectors, labels, np.arange(30).astype(str), [5, 6, 7], {})
    assert np.allclose(gallery.cached_prototypes.sums, whole.prototypes().sums, atol=1e-5)
    assert gallery.cached_prototypes.counts.tolist() == [10, 10, 10]
    # a query at SKU 7's mean is named 7 with the highest probability; every SKU keeps a share
    mean = unit(vectors[20:].mean(axis=0, keepdims=True))
    scores = knn_scores(gallery, mean, ["q"], [2], k=3, kind="centroid", temperature=0.05,
                        smoothing=0.01, batch=8)  # fmt: skip
    assert gallery.skus[scores.topk_labels[0, 0]] == 7
    assert np.isclose(np.exp(scores.topk_logits[0]).sum(), 1.0, atol=1e-5)


def test_fusion_treats_an_enrolled_skus_classifier_score_as_unknown():
    from products10k.knn import fuse_with_enrolled

    # 3 trained SKUs (labels 0-2) and 1 enrolled (3); the classifier is sure of the look-alike (0),
    # the kNN's neighbours are mostly the enrolled SKU's
    logits = np.array([[8.0, 2.0, 1.0], [0.0, 5.0, 0.0]], np.float32)
    labels = np.array([[3, 0], [1, 2]])
    sims = np.array([[0.95, 0.90], [0.9, 0.5]], np.float32)
    knn = vote(sims, labels, 4, kind="best", temperature=0.1, smoothing=0.01, names=["a", "b"], labels=[3, 1])
    top, probs = fuse_with_enrolled(logits, knn, 0.5, 4, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)  # a distribution over all 4 SKUs
    assert top[0, 0] == 3  # named: a zero classifier score gave it 0.5 x p_knn, under the look-alike's
    p_knn = np.exp(knn.topk_logits[0, 0])
    assert 0.5 * p_knn < 0.5 * (1 - 1e-3) + 0.5 * np.exp(knn.topk_logits[0, 1])  # the old rule's loss
    assert top[1, 0] == 1  # a query of a trained SKU: as before

    # no enrolled SKU: the plain fusion
    plain_knn = vote(sims, np.array([[0, 1], [1, 2]]), 3, kind="softmax", temperature=0.1, smoothing=0.01,
                     names=["a", "b"], labels=[0, 1])  # fmt: skip
    top, probs = fuse_with_enrolled(logits, plain_knn, 0.3, 3, 3)
    cls = SplitScores.from_logits(np.array(["a", "b"]), np.array([0, 1]), logits, 3)
    expected = fuse(cls, plain_knn, 0.3, 3, 3)
    np.testing.assert_array_equal(top, expected.topk_labels)
    np.testing.assert_allclose(probs, np.exp(expected.topk_logits), rtol=1e-5)


def test_expected_best_weights_are_the_mean_best_of_every_draw_of_shots_photos():
    import itertools

    from products10k.votes import expected_max_weights

    rng = np.random.default_rng(5)
    for n, shots in ((7, 3), (10, 4), (9, 1), (5, 5), (3, 5)):
        sims = np.sort(rng.normal(size=n))[::-1]
        draws = [max(c) for c in itertools.combinations(sims, min(shots, n))]
        assert expected_max_weights(n, shots) @ sims == pytest.approx(np.mean(draws), rel=1e-9)


def test_expected_best_judges_every_sku_by_the_same_number_of_photos():
    """Two SKUs whose photos spread alike around the query, one with 5 photos and one with 200, in 200
    draws: the best of 200 photos beats the best of 5 by chance alone, so ``best`` names the larger
    SKU nearly every time; judged as if each had 5 photos, each is named about half the time."""
    dim = 16
    rng = np.random.default_rng(2)
    rule = dict(k=205, temperature=0.05, smoothing=0.01, batch=8)
    small_named = {"best": 0, "expected_best": 0}
    for _ in range(200):
        query = unit(rng.normal(size=(1, dim)))
        photos = unit(query + 0.9 * rng.normal(size=(205, dim)) / np.sqrt(dim))
        labels = np.r_[np.zeros(5, int), np.ones(200, int)]
        gallery = build_gallery(photos, labels, np.arange(205).astype(str), np.array([7, 8]), {})
        for kind in small_named:
            scores = knn_scores(gallery, query, ["q"], [0], kind=kind, shots=5, progress=False, **rule)
            small_named[kind] += int(scores.topk_labels[0, 0] == 0)
    assert small_named["best"] <= 10  # ~5/205 of the time
    assert 70 <= small_named["expected_best"] <= 130
    assert all(n > 0 for n in small_named.values())


def test_expected_best_reads_a_sharded_gallery_as_the_same_gallery_whole():
    import faiss

    from products10k.knn import Gallery

    rng = np.random.default_rng(4)
    vectors = unit(rng.normal(size=(40, 8)))
    labels = rng.integers(0, 5, 40)
    names = np.arange(40).astype(str)
    whole = build_gallery(vectors, labels, names, np.arange(5) + 100, {})
    shards = faiss.IndexShards(8, False, True)
    for part in (vectors[:25], vectors[25:]):
        shard = faiss.IndexFlatIP(8)
        shard.add(part)
        shards.add_shard(shard)
    sharded = Gallery(shards, labels, names, np.arange(5) + 100, {})
    queries = unit(rng.normal(size=(6, 8)))
    rule = dict(k=6, kind="expected_best", temperature=0.1, smoothing=0.01, batch=4, shots=3)
    a = knn_scores(whole, queries, np.arange(6), np.full(6, -1), **rule)
    b = knn_scores(sharded, queries, np.arange(6), np.full(6, -1), **rule)
    assert np.array_equal(a.topk_labels, b.topk_labels)
    np.testing.assert_allclose(a.topk_logits, b.topk_logits, rtol=1e-5)


def test_bench_enrol_impostor_baseline_is_the_mean_best_match_other_skus_photos_find():
    """bench_enrol's cohort rule (benchmarks/enrol_rules.py; measured there, not a retrieval.vote):
    each SKU's baseline against a brute force over every other SKU's photo, and the rule names the
    SKU whose best match stands furthest above its baseline, not the one with the higher raw best."""
    from benchmarks.enrol_rules import impostor_baseline, normalised_best

    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(30, 6)))
    labels = rng.integers(0, 4, 30)
    baseline = impostor_baseline(vectors, labels, 5, cohort=1000, chunk=7)  # label 4 has no photo
    for s in range(4):
        others = vectors[labels != s]
        assert baseline[s] == pytest.approx((others @ vectors[labels == s].T).max(axis=1).mean(), abs=1e-5)
    assert baseline[4] == 0.0
    sims = np.array([[0.90, 0.85, 0.80]])
    out = normalised_best(sims, np.array([[0, 1, 1]]), np.array([0.8, 0.5]), 2, temperature=0.05,
                          smoothing=0.0, names=["q"], labels=[1])  # fmt: skip
    assert out.topk_labels[0, 0] == 1  # 0.85 - 0.5 beats 0.90 - 0.8


def test_bench_enrol_whole_groups_holds_out_every_sku_of_a_group_and_no_other(tmp_path):
    """``--whole-groups``: the SKUs held out are whole groups (a new product line), the reduced
    label map and splits keep every other SKU, relabelled 0..K-1, and the enrolment rows are the
    held-out SKUs' first photos."""
    import pandas as pd

    from benchmarks.bench_enrol import hold_out
    from tests.helpers import EVAL_GROUPS, EVAL_SKUS, make_eval_data

    prepared = make_eval_data(tmp_path / "prepared")
    held, shots_rows, reduced = hold_out(prepared, tmp_path / "reduced", 1, 2, seed=0, whole_groups=True)
    group_of = dict(zip(EVAL_SKUS, EVAL_GROUPS, strict=True))
    groups = {group_of[int(s)] for s in held}
    assert len(groups) == 1 and sorted(held) == sorted(s for s, g in group_of.items() if g in groups)
    label_map = pd.read_csv(reduced / "label_map.csv")
    assert set(label_map["sku"]).isdisjoint(held) and label_map["label"].tolist() == [0, 1]
    for split in ("train", "val"):
        assert set(pd.read_csv(reduced / f"{split}.csv")["sku"]) == set(label_map["sku"])
    assert set(shots_rows["sku"]) == set(held) and shots_rows.groupby("sku").size().max() == 2


@pytest.mark.parametrize(
    "row, expected",
    [
        ("supcon", {"train.sampler": "pk", "train.metric_loss_weight": 1.0, "model.head": "linear"}),
        ("pk", {"train.sampler": "pk", "train.metric_loss_weight": 0.0}),
        ("supcon@0.3", {"train.sampler": "pk", "train.metric_loss_weight": 0.3}),
        ("arcface", {"model.head": "arcface", "train.sampler": "random"}),
        ("linear", {"model.head": "linear", "train.sampler": "random", "train.metric_loss_weight": 0.0}),
    ],
)
def test_bench_enrol_rows_train_the_stage_script_on_their_own_params(tmp_path, monkeypatch, row, expected):
    """Each trained row of bench_enrol runs the train stage on params.yaml with its own overrides."""
    import yaml

    from benchmarks import bench_enrol
    from benchmarks.harness import params as load_params

    seen = {}

    def fake_run(*args, cwd):
        tree = yaml.safe_load(open(args[args.index("--params") + 1]))
        seen.update({key: tree[key.split(".")[0]][key.split(".")[1]] for key in expected})

    monkeypatch.setattr(bench_enrol, "run", fake_run)
    monkeypatch.setattr(bench_enrol, "load_model", lambda path: ("model", {}))
    assert bench_enrol.train_row(row, load_params(), tmp_path, tmp_path, tmp_path) == ("model", {})
    assert seen == expected


def test_bench_enrol_data_is_generated_from_the_set_overrides(tmp_path, monkeypatch):
    """``--set data.synthetic.num_groups=24`` reaches the download and prepare stages (a larger set),
    not only the training rows: both stages read the overridden params file."""
    import yaml

    from benchmarks import bench_enrol
    from benchmarks.harness import params as load_params
    from products10k.config import apply_overrides

    groups = []

    def fake_run(*args, cwd):
        tree = yaml.safe_load(open(args[args.index("--params") + 1]))
        groups.append(tree["data"]["synthetic"]["num_groups"])

    monkeypatch.setattr(bench_enrol, "run", fake_run)
    params = apply_overrides(load_params(), {"data.synthetic.num_groups": 24}, "--set")
    bench_enrol.prepare_data(tmp_path, "default", params)
    assert groups == [24, 24]


def test_bench_enrol_splits_the_trained_skus_cost_by_the_enrolled_skus_group(tmp_path):
    """The trained SKUs' loss to an enrolment, split into the group-mates of an enrolled SKU and the
    rest: photos of a SKU sharing a held-out SKU's group count as mates, the others do not."""
    import pandas as pd

    from benchmarks.bench_enrol import cost_split, group_mates

    label_map = {"label": [0, 1, 2, 3], "sku": [1, 2, 3, 4], "group": [10, 10, 20, 20], "n_train": 5}
    pd.DataFrame(label_map).to_csv(tmp_path / "label_map.csv", index=False)
    mates = group_mates(tmp_path, pd.Series([2, 2, 3, 4]), held=[1])
    assert mates.tolist() == [True, True, False, False]
    split = cost_split(np.array([True, True, True, False]), np.array([False, True, True, False]), mates)
    assert split["group_mates"] == {"n_images": 2, "before": 1.0, "after": 0.5, "points_lost": 50.0}
    assert split["others"] == {"n_images": 2, "before": 0.5, "after": 0.5, "points_lost": 0.0}
