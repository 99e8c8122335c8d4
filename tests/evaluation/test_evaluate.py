"""The evaluate stage on a tiny prepared dataset and checkpoint: outputs, metrics, bad input."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from products10k.contracts.shards import ImageStore
from products10k.evaluation.views import build_views
from products10k.metrics import hits_at
from products10k.models.checkpoint import load_model
from products10k.scores import load_predictions
from tests.helpers import (
    EVAL_SKUS,
    config,
    make_checkpoint,
    make_eval_data,
    stage_module,
    write_project_params,
)


def _params(tmp_path, **sections):
    params = {
        "ensemble": {"members": {"m0": {}}, "weights": "fit"},
        "evaluate": {"batch_size": 4, "gallery_size": 3, "gallery_tile": 48, "tail_max_images": 3},
        "tta": {"scales": [1.0, 1.25], "crops": "center", "flip": True},
    }
    params.update(sections)
    return write_project_params(tmp_path / "params.yaml", params)


def _argv(tmp_path, prepared, ckpt, params, phase="train"):
    out = tmp_path / "out"
    return [
        "--params", str(params), "--member", "m0", "--phase", phase, "--checkpoint", str(ckpt),
        "--label-map", str(prepared / "label_map.csv"), "--train", str(prepared / "train.csv"),
        "--val", str(prepared / "val.csv"), "--test", str(prepared / "test.csv"),
        "--images-root", str(prepared),
        "--metrics", str(out / "metrics" / f"{phase}.json"),
        "--predictions", str(out / "predictions" / phase / "m0.npz"),
        "--per-group", str(out / "plots" / "per_group.csv"),
        "--confused", str(out / "plots" / "confused_pairs.csv"),
        "--gallery", str(out / "plots" / "errors.png"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_eval_data(tmp_path_factory.mktemp("prepared"))


def test_evaluate_stage_writes_metrics_predictions_and_plots(tmp_path, prepared):
    ckpt = tmp_path / "models" / "m0" / "train" / "best.pt"
    make_checkpoint(ckpt, resolution=32)
    stage_module("evaluate").main(_argv(tmp_path, prepared, ckpt, _params(tmp_path)))
    out = tmp_path / "out"

    metrics = json.loads((out / "metrics" / "train.json").read_text())
    for key in ("top1", "top5", "mean_class_acc", "n", "tail", "inshop"):
        assert key in metrics["val"]
    assert metrics["val"]["n"] == 4 and metrics["test"]["n"] == 9
    assert metrics["test"]["public"]["n"] + metrics["test"]["private"]["n"] == 9
    assert metrics["test"]["inshop"]["n"] == 4 and metrics["test"]["customer"]["n"] == 5
    # n_train is 3 for every SKU and tail_max_images 3: all known SKUs are tail, none head
    assert "head" not in metrics["test"] and metrics["test"]["tail"]["n"] == 9
    tta = metrics["val"]["tta"]["views"]
    assert set(tta) == {
        "all", "32px-center", "32px-center-flip", "40px-center", "40px-center-flip",
        "without_32px-center", "without_32px-center-flip", "without_40px-center", "without_40px-center-flip",
    }  # fmt: skip
    assert set(metrics["test"]["tta"]["views"]) == set(tta)
    assert metrics["views"] == 4 and metrics["resolution"] == 32
    # test.top1 is the single centre crop (the paper's protocol): the view "32px-center" alone
    assert metrics["test"]["top1"] == pytest.approx(metrics["test"]["tta"]["views"]["32px-center"])
    assert metrics["val"]["top1"] == pytest.approx(tta["32px-center"])
    assert metrics["test"]["tta"]["top1"] == pytest.approx(metrics["test"]["tta"]["views"]["all"])

    # the saved top-k reproduces the reported numbers; test rows keep the test CSV's order
    preds = load_predictions(out / "predictions" / "train" / "m0.npz", "m0")
    test = pd.read_csv(prepared / "test.csv")
    assert preds.test.names.tolist() == test["name"].tolist()
    assert preds.skus.tolist() == EVAL_SKUS and preds.test.topk_labels.shape == (9, 4)  # k = min(top_k, K)
    top = preds.test.topk_labels  # the TTA average: what the ensemble and the submission use
    assert hits_at(top, test["label"].to_numpy(), 1).mean() == pytest.approx(metrics["test"]["tta"]["top1"])
    assert metrics["test"]["top5"] == pytest.approx(8 / 9)  # K = 4: all but the unknown SKU
    assert metrics["test"]["tta"]["top5"] == pytest.approx(8 / 9)
    assert tta["all"] == pytest.approx((preds.val.topk_labels[:, 0] == preds.val.labels).mean())
    # k = K here: the kept probabilities are the whole softmax, and the label's log-prob is among them
    np.testing.assert_allclose(preds.test.topk_probs().sum(1), 1.0, rtol=1e-5)
    known = preds.test.labels >= 0
    label_prob = (preds.test.topk_probs() * (top == preds.test.labels[:, None]))[known].sum(1)
    np.testing.assert_allclose(np.exp(preds.test.label_logprob[known]), label_prob, rtol=1e-5)
    assert np.isnan(preds.test.label_logprob[~known]).all()

    groups = pd.read_csv(out / "plots" / "per_group.csv")
    assert list(groups.columns) == ["group", "n", "top1", "top5"]
    assert sorted(groups["group"].tolist()) == [1, 2, 3] and groups["n"].sum() == 9
    pairs = pd.read_csv(out / "plots" / "confused_pairs.csv")
    assert list(pairs.columns) == ["pair", "sku_a", "sku_b", "a_as_b", "b_as_a", "count", "same_group"]
    gallery = cv2.imread(str(out / "plots" / "errors.png"))
    assert gallery is not None and gallery.shape[1] == 6 + 3 * (48 + 6)
    n_errors = int(round((1 - metrics["test"]["top1"]) * 9))
    rows = max(1, min(3, n_errors))
    assert gallery.shape[0] == 36 + rows * (48 + 34 + 6) + 6


def test_missing_checkpoint_message(tmp_path, prepared, caplog):
    ckpt = tmp_path / "models" / "m0" / "finetune_accuracy" / "best.pt"
    argv = _argv(tmp_path, prepared, ckpt, _params(tmp_path), phase="finetune_accuracy")
    with pytest.raises(SystemExit):
        stage_module("evaluate").main(argv)
    assert "ensemble member 'm0', phase 'finetune_accuracy'" in caplog.text
    assert str(ckpt) in caplog.text and "not found" in caplog.text
    assert not (tmp_path / "out").exists()  # nothing written


def test_checkpoint_from_another_label_map_is_named(tmp_path, prepared, caplog):
    ckpt = tmp_path / "other.pt"
    make_checkpoint(ckpt, skus=[1001, 1002, 2001, 3003])
    with pytest.raises(SystemExit):
        stage_module("evaluate").main(_argv(tmp_path, prepared, ckpt, _params(tmp_path)))
    assert f"checkpoint {ckpt} was trained on a different label map" in caplog.text
    assert "label_map.csv" in caplog.text and "SKU 3003" in caplog.text
    assert not (tmp_path / "out").exists()


def test_unknown_params_key_and_phase_fail_at_start(tmp_path, prepared, caplog):
    ckpt = tmp_path / "best.pt"
    params = _params(tmp_path, evaluate={"batch_sise": 4})
    with pytest.raises(SystemExit):
        stage_module("evaluate").main(_argv(tmp_path, prepared, ckpt, params))
    assert "unknown key 'evaluate.batch_sise'" in caplog.text
    with pytest.raises(SystemExit):
        stage_module("evaluate").main(_argv(tmp_path, prepared, ckpt, _params(tmp_path), phase="warmup"))
    assert "phase 'warmup' is not in evaluate.phases" in caplog.text


def test_single_crop_without_a_matching_tta_view_and_no_val_rows(tmp_path, prepared):
    # TTA at 1.25x only: the paper's 32 px centre crop is computed as one more view, outside the
    # average; an empty val.csv (prepare.val_fraction: 0) leaves val out instead of failing
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt, resolution=32)
    empty_val = tmp_path / "val.csv"
    empty_val.write_text((prepared / "val.csv").read_text().splitlines()[0] + "\n")
    params = _params(tmp_path, tta={"scales": [1.25], "crops": "center", "flip": False})
    argv = _argv(tmp_path, prepared, ckpt, params)
    argv[argv.index("--val") + 1] = str(empty_val)
    stage_module("evaluate").main(argv)
    metrics = json.loads((tmp_path / "out" / "metrics" / "train.json").read_text())
    assert metrics["val"] == {"n": 0} and metrics["views"] == 1
    assert set(metrics["test"]["tta"]["views"]) == {"all", "40px-center"}
    # the single crop by hand, one image at a time
    model, _ = load_model(ckpt)
    test = pd.read_csv(prepared / "test.csv")
    store = ImageStore(prepared)
    tf = build_views(config("tta", scales=[1.0], flip=False), 32, None)[0]
    with torch.inference_mode():
        pred = [int(model(tf.base.transform()(store.read_row(r))[None]).argmax()) for _, r in test.iterrows()]
    expected = (np.array(pred) == test["label"].to_numpy()).mean()
    assert metrics["test"]["top1"] == pytest.approx(expected)
    preds = load_predictions(tmp_path / "out" / "predictions" / "train" / "m0.npz")
    assert len(preds.val) == 0 and len(preds.test) == 9
