"""The index stage on a tiny prepared dataset and checkpoint: gallery, kNN against a brute-force
reference, fused predictions, metrics that match the files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.data.datasets import PreparedImageDataset
from products10k.data.transforms import embedding_transform
from products10k.knn import load_gallery
from products10k.metrics import split_metrics
from products10k.models.checkpoint import load_model
from products10k.scores import load_predictions
from tests.helpers import (
    ROOT,
    evaluate_argv,
    index_argv,
    index_params,
    make_eval_data,
    run_index,
    stage_module,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_eval_data(tmp_path_factory.mktemp("prepared"))


def _embeddings(ckpt, df, prepared):
    model, meta = load_model(ckpt)
    transform, resize = embedding_transform(meta)
    ds = PreparedImageDataset(df, prepared, transform, min_side=resize)
    with torch.no_grad():
        return model.embedding(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()


def test_index_stage_knn_matches_brute_force_and_metrics_match_the_files(tmp_path, prepared):
    ckpt = run_index(tmp_path, prepared, index_params(tmp_path, k=1))
    label_map = read_label_map(prepared / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    train = read_prepared(prepared / "train.csv", label_map)
    test = read_prepared(prepared / "test.csv", label_map, usage=True)

    gallery = load_gallery(tmp_path / "models" / "m0" / "index")
    assert gallery.index.ntotal == len(train) and gallery.labels.tolist() == train["label"].tolist()
    assert gallery.skus.tolist() == label_map["sku"].tolist()
    assert gallery.meta["checkpoint_sha256"] and gallery.meta["k"] == 1

    # 1-NN by hand, in NumPy from the model's own embeddings: the stage's kNN top-1 must agree
    sims = _embeddings(ckpt, test, prepared) @ _embeddings(ckpt, train, prepared).T
    expected = train["label"].to_numpy()[sims.argmax(1)]
    metrics = json.loads((tmp_path / "metrics" / "retrieval.json").read_text())
    n_train = dict(zip(label_map["label"], label_map["n_train"], strict=True))
    assert metrics["test"]["knn"]["top1"] == pytest.approx((expected == test["label"].to_numpy()).mean())
    # how close test sits to the training images, from the same embeddings (val optimism's figure)
    assert metrics["nearest_train_similarity"]["test"]["median"] == pytest.approx(
        np.median(sims.max(1)), abs=1e-4
    )

    knn = load_predictions(tmp_path / "predictions" / "knn" / "m0.npz")  # a submit candidate
    assert (knn.test.topk_labels[:, 0] == expected).all() and knn.test.names.tolist() == test["name"].tolist()
    fused = load_predictions(tmp_path / "predictions" / "fused" / "m0.npz")
    assert fused.test.names.tolist() == test["name"].tolist()
    block = split_metrics(fused.test.topk_labels, test, n_train, 3)
    assert metrics["test"]["fused"]["top1"] == pytest.approx(block["top1"])
    assert 0.0 <= metrics["fusion_weight"] <= 1.0
    assert gallery.meta["fusion_weight"] == metrics["fusion_weight_single_crop"]  # deploy's: one crop
    assert set(metrics["val"]) == {"classifier", "knn", "fused"}
    # val's fused rows are fused with a weight cross-fitted on the other parts of val: the file's
    # val rows are what the metrics read, and the in-sample fit's read is beside it
    val = read_prepared(prepared / "val.csv", label_map)
    cross_fit = metrics["fusion_weight_cross_fit"]
    assert (
        cross_fit["parts"] == min(10, len(val))
        and 0.0 <= cross_fit["weight_min"] <= cross_fit["weight_max"] <= 1
    )
    assert fused.val.names.tolist() == val["name"].tolist()
    val_top1 = split_metrics(fused.val.topk_labels, val, n_train, 3)["top1"]
    assert metrics["val"]["fused"]["top1"] == pytest.approx(val_top1) == cross_fit["val_top1"]["cross_fit"]
    classifier = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["test"]["classifier"]["top1"] == pytest.approx(classifier["test"]["tta"]["top1"])
    # fused probabilities are a distribution over the SKUs
    assert np.all(np.exp(fused.test.topk_logits).sum(1) <= 1.0 + 1e-4)


def test_index_stage_rejects_predictions_of_other_rows(tmp_path, prepared, caplog):
    params = index_params(tmp_path)
    ckpt = run_index(tmp_path, prepared, params)
    shorter = tmp_path / "test_shorter.csv"
    shorter.write_text("\n".join((prepared / "test.csv").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(SystemExit):
        stage_module("index").main(
            index_argv(
                params,
                ckpt,
                prepared,
                shorter,
                tmp_path / "predictions" / "train" / "m0.npz",
                tmp_path / "o2",
            )
        )
    assert "test rows are not those of the prepared test.csv" in caplog.text
    assert not (tmp_path / "o2" / "models").exists() and not (tmp_path / "o2" / "predictions").exists()


def test_the_deploy_fusion_weight_is_fitted_on_the_single_crop_logits_of_the_embedding_pass(
    tmp_path, prepared, monkeypatch
):
    """predict --mode fused has one centre crop of the classifier, not the evaluate stage's TTA
    average: the weight in the index's meta.json is fitted on what the embedding pass computes."""
    from products10k.ensemble import fit_fusion_weight
    from products10k.knn import knn_scores
    from products10k.retrieval import index as index_mod
    from products10k.scores import SplitScores

    label_map = read_label_map(prepared / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    val = read_prepared(prepared / "val.csv", label_map)
    labels = val["label"].to_numpy()
    # the single crop: confidently right on the first half of val, confidently wrong on the rest
    logits = np.full((len(val), len(label_map)), -5.0, np.float32)
    half = len(val) // 2
    logits[
        np.arange(len(val)), np.where(np.arange(len(val)) < half, labels, (labels + 1) % len(label_map))
    ] = 5.0
    real = index_mod.embed_rows
    seen = {}

    def embed_rows(model, meta, df, images_root, *, on_logits=None, **kw):
        vectors = real(model, meta, df, images_root, **kw)
        if on_logits is not None:  # val: kNN misled on the first half (their vectors rolled)
            vectors[:half] = np.roll(vectors[:half], 1, axis=0)
            on_logits(0, logits)
            seen["val"] = vectors
        return vectors

    monkeypatch.setattr(index_mod, "embed_rows", embed_rows)
    run_index(tmp_path, prepared, index_params(tmp_path, k=1))

    gallery = load_gallery(tmp_path / "models" / "m0" / "index")
    names = val["name"].to_numpy()
    meta = gallery.meta
    knn = knn_scores(gallery, seen["val"], names, labels, k=meta["k"], kind=meta["vote"],
                     temperature=meta["temperature"], smoothing=meta["smoothing"], batch=8)  # fmt: skip
    single = fit_fusion_weight(SplitScores.from_logits(names, labels, logits, 5), knn)
    metrics = json.loads((tmp_path / "metrics" / "retrieval.json").read_text())
    assert meta["fusion_weight"] == pytest.approx(single, abs=1e-6) == metrics["fusion_weight_single_crop"]
    assert abs(metrics["fusion_weight"] - single) > 0.05  # the TTA weight, which deploy used before


def test_evaluate_and_index_over_two_ranks_write_what_one_process_writes(tmp_path, prepared):
    """dist.nproc_per_node: 2 (gloo), launched as dvc.yaml does: each rank predicts and embeds its
    shard of whole batches (val's 4 rows are one batch: rank 0 has none), rank 0 merges and writes.
    Every output file equals the single process's, byte for byte."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    # one torch thread in each process: on a CPU the thread count changes float reduction orders,
    # so one process with 2 threads differs from 2 ranks of 1 in the last bits (sharding does not)
    params = yaml.safe_load(index_params(one).read_text())
    params["dist"].update(threads=1)
    (one / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ckpt = run_index(one, prepared, one / "params.yaml")
    params["dist"].update(nproc_per_node=2, backend="gloo", timeout_s=120)
    (two / "models" / "m0" / "train").mkdir(parents=True)
    (two / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ckpt, two / "models" / "m0" / "train" / "best.pt")
    ckpt2, classifier = two / "models" / "m0" / "train" / "best.pt", two / "predictions" / "train" / "m0.npz"
    launch = [sys.executable, "-m", "products10k.dist.launch", "--params", str(two / "params.yaml")]
    for script, argv in [
        ("evaluate", evaluate_argv(two / "params.yaml", ckpt2, prepared, two)),
        ("index", index_argv(two / "params.yaml", ckpt2, prepared, prepared / "test.csv", classifier, two)),
    ]:
        cmd = [*launch, "--single-node", str(ROOT / "stages" / f"{script}.py"), *argv]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "rank 1/2 joined the gloo process group" in proc.stderr

    outputs = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "params.yaml")
    assert len(outputs) >= 10 and Path("models/m0/index/index.faiss") in outputs
    written = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.name != "params.yaml")
    assert written == outputs
    for path in outputs:
        assert (two / path).read_bytes() == (one / path).read_bytes(), path


def test_the_enrolment_check_cuts_the_chosen_skus_to_their_first_shots_and_scores_each_vote():
    from types import SimpleNamespace

    import pandas as pd

    from products10k.knn import build_gallery
    from products10k.retrieval.index import enrolment_check

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    # SKU 0: 5 photos near its centre, 7 more near SKU 1's; SKU 1: 12 photos; SKU 2: only 5 (so it
    # cannot be the SKU chosen: the check needs more than enrol_shots training images)
    where = np.r_[np.zeros(5, int), np.ones(7, int), np.ones(12, int), np.full(5, 2)]
    names = [f"{sku}-{i:02d}.jpg" for sku, n in ((0, 12), (1, 12), (2, 5)) for i in range(n)]
    train = pd.DataFrame({"name": names, "label": np.r_[np.zeros(12, int), np.ones(12, int), np.full(5, 2)]})
    vectors = centres[where] + 0.05 * rng.normal(size=(len(where), 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    gallery = build_gallery(vectors, train["label"], train["name"], np.array([10, 11, 12]), {})
    # val: an exact copy of SKU 0's 9th photo (one of those cut) and of SKU 2's first
    val = train.iloc[[8, 24]].reset_index(drop=True)
    cfg = SimpleNamespace(k=3, enrol_shots=5, enrol_check_skus=1, temperature=0.05, smoothing=0.01,
                          search_batch=64, vote_shots=5)  # fmt: skip
    out = enrolment_check(gallery, vectors[[8, 24]], val, train, cfg)
    assert out["skus"] == 1 and out["val_rows"] == {"enrolled": 1, "trained": 1}
    assert set(out["by_vote"]) == {"softmax", "count", "best", "centroid", "expected_best"}
    for rule in out["by_vote"].values():
        assert rule["trained"]["top1"] == 1.0
        # the copy's own photo (similarity 1) is out of the search: what is near it is SKU 1's
        assert rule["enrolled"]["top1"] == 0.0
    sims, ids = gallery.index.search(vectors[[8]], 1)
    assert ids[0, 0] == 8  # without the cut, the query finds its own copy: the check above can fail

    # weighted as every val choice is: a trained row read right weighing 3, one read wrong weighing 1
    val3 = train.iloc[[8, 24, 25]].reset_index(drop=True)  # + a second photo of SKU 2 ...
    query = vectors[[8, 24, 25]].copy()
    query[2] = vectors[13]  # ... queried with a photo of SKU 1's: read wrong
    out = enrolment_check(gallery, query, val3, train, cfg, row_weight=np.array([1.0, 3.0, 1.0]))
    trained = out["by_vote"]["best"]["trained"]
    assert trained["top1_raw"] == 0.5 and trained["top1"] == 0.75 and trained["se"] > 0
