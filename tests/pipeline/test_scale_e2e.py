"""The scale rehearsal (presets/scale.yaml) scaled down to 300 SKUs, through the real dvc CLI.

The full rehearsal (9,691 SKUs, 197k images) is a benchmark (benchmarks/bench_scale.py); this
runs the same preset's code paths end to end - the synthetic totals mode, the val split from
head SKUs only, two ensemble members, top-k predictions files, the block-wise ensemble - at a
size a test can afford, and checks the bounds that matter at full size.
"""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, dvc, make_project


def scaled_down_scale_preset() -> dict:
    update = yaml.safe_load((ROOT / "presets" / "scale.yaml").read_text())
    update["data"]["synthetic"].update(
        {
            "num_groups": 30,
            "num_skus": 300,
            "train_images": 2400,
            "test_images": 900,
            "train_max_per_sku": 200,
        }
    )
    update["ensemble"]["members"] = {"m0": {}, "m1": {"train.seed": 1}}
    update["evaluate"]["phases"] = ["finetune_accuracy"]
    update.setdefault("submit", {})["reference"] = "finetune_accuracy"  # the reference must be evaluated
    update["prepare"]["n_jobs"] = 1
    return update


@pytest.mark.e2e
def test_scale_preset_runs_end_to_end_with_bounded_outputs(tmp_path):
    project = make_project(tmp_path / "project", scaled_down_scale_preset())
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert "m2" not in params["ensemble"]["members"]
    dvc(project, "repro", "submit")  # what the bounds below read (not index or export)

    prepared = project / "data" / "prepared"
    report = json.loads((prepared / "report.json").read_text())["counts"]
    assert report["skus"] == 300 and report["groups"] == 30 and report["test"] == 900
    assert report["train"] + report["val"] == 2400
    # val comes from SKUs with >= 20 images only; every image of the others is trained on
    label_map = pd.read_csv(prepared / "label_map.csv")
    val = pd.read_csv(prepared / "val.csv")
    n_train = label_map.set_index("sku")["n_train"]  # train.csv only
    images = n_train.add(val["sku"].value_counts(), fill_value=0)
    assert len(val) and (images[val["sku"].unique()] >= 20).all()
    assert report["skus_all_images_trained"] == int((images < 20).sum()) > 150

    # predictions: the top-100 of 300 classes per row, not all 300
    with np.load(project / "predictions" / "finetune_accuracy" / "m0.npz") as npz:
        assert npz["test_topk_labels"].shape == (900, 100) and npz["test_topk_labels"].dtype == np.int32
        assert npz["test_topk_logits"].dtype == np.float32 and "test_logits" not in npz.files

    sub = pd.read_csv(project / "submissions" / "submission.csv", dtype={"name": str})
    assert len(sub) == 900 and sub["class"].isin(label_map["sku"]).all()
    metrics = json.loads((project / "metrics" / "submission.json").read_text())
    assert metrics["ensemble"]["size"] == 2 and metrics["test"]["n"] == 900
    assert 0.0 <= metrics["ensemble"]["max_prob_error"] < 1.0
    member = json.loads((project / "metrics" / "m0" / "finetune_accuracy.json").read_text())
    assert {"top1", "tta"} <= set(member["test"]) and "views" in member["test"]["tta"]
    live = json.loads((project / "dvclive" / "m0" / "train" / "metrics.json").read_text())
    assert 0.0 <= live["data_wait"] <= 1.0
