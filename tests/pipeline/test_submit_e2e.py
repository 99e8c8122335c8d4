"""From an empty workspace to a validated submission with the real dvc CLI (tiny config).

download -> prepare -> balance -> train -> finetune_balanced -> finetune_accuracy -> evaluate ->
index -> submit, and export, on a few synthetic SKUs at 32 px for one epoch per phase. Then: the
submission is checked against the official test list, `dvc metrics show` lists the three phases
(Table 1), kNN/fusion and the ONNX check, `dvc plots show` renders, the installed
`products10k-predict` names the raw test zip's images with the exported model and the index,
the default submission is the candidate with the best val estimate, `submit.phase: fused` re-runs
only submit, and a second run is a no-op.
"""

import json

import pandas as pd
import pytest
import yaml

from products10k.config import PHASES
from products10k.scores import load_predictions
from tests.helpers import dvc, make_project, run


@pytest.mark.e2e
def test_empty_workspace_to_validated_submission(reference_pipeline, tmp_path):
    # make_project(tiny_params()) + `dvc repro` (conftest.py), copied: this test changes its params
    project = reference_pipeline.copy(tmp_path / "project")

    sub_path = project / "submissions" / "submission.csv"
    sub = pd.read_csv(sub_path, dtype={"name": str})
    test_list = pd.read_csv(project / "data" / "raw" / "test_kaggletest.csv", dtype={"name": str})
    label_map = pd.read_csv(project / "data" / "prepared" / "label_map.csv")
    assert list(sub.columns) == ["name", "class"]
    assert sorted(sub["name"]) == sorted(test_list["name"]) and not sub["name"].duplicated().any()
    assert sub["class"].isin(label_map["sku"]).all()
    assert sub_path.read_text().splitlines()[0] == "name,class"
    top5 = pd.read_csv(project / "submissions" / "top5.csv", dtype={"name": str})
    assert top5["name"].tolist() == sub["name"].tolist() and (top5["class_1"] == sub["class"]).all()

    # the local leaderboard agrees with a direct comparison against the labelled test list
    score = json.loads((project / "metrics" / "submission.json").read_text())
    merged = sub.merge(test_list, on="name", suffixes=("", "_true"))
    assert score["test"]["top1"] == pytest.approx((merged["class"] == merged["class_true"]).mean())
    assert {"public", "private"} <= set(score["test"])
    assert score["ensemble"]["weights"] == {"m0": 1.0}

    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    for phase in PHASES:
        data = files[f"metrics/m0/{phase}.json"]["data"]
        assert {"top1", "top5", "public", "private"} <= set(data["test"]) and "top1" in data["val"]
        assert (project / "predictions" / phase / "m0.npz").is_file()
    assert "metrics/submission.json" in files

    retrieval = files["metrics/m0/retrieval.json"]["data"]
    assert {"classifier", "knn", "fused"} <= set(retrieval["test"]) and 0 <= retrieval["fusion_weight"] <= 1
    export = files["metrics/export.json"]["data"]
    assert export["top1_agreement"] == 1.0 and export["max_abs_logit_diff"] < 1e-3

    # the model people run, on the raw test archive: one row per image, every one readable
    out = tmp_path / "predicted.csv"
    run(project, "products10k-predict", "data/raw/test.zip", "--model", "models/export",
        "--index", "models/m0/index", "--mode", "fused", "--out", str(out))  # fmt: skip
    predicted = pd.read_csv(out)
    assert len(predicted) == len(test_list) and (predicted["status"] == "ok").all()
    assert predicted["sku_1"].isin(label_map["sku"]).all()

    # the default: the reference (train, tau 0) unless a choice's gain over it lies above zero, every
    # candidate recorded with its paired interval against the reference
    choice = score["choice"]
    assert {c["candidate"] for c in choice["candidates"]} == {*PHASES, "knn", "fused"}
    knn_test = [c["test_top1"] for c in choice["candidates"] if c["candidate"] == "knn" and c["tau"] == 0]
    assert knn_test == [pytest.approx(retrieval["test"]["knn"]["top1"], abs=1e-6)]  # rounded to 6 places
    assert choice["reference"] == {"candidate": "train", "tau": 0.0}
    assert choice["compared"] == len(choice["candidates"]) - 1
    leaving = [
        c for c in choice["candidates"] if c["gain_interval"][0] is not None and c["gain_interval"][0] > 0
    ]
    if leaving:
        assert choice["val_estimate"] == max(c["val_estimate"] for c in leaving)
    else:
        assert (choice["candidate"], choice["tau"]) == ("train", 0.0) and choice["gain"] == 0.0

    # the submission from the fused scores: only submit re-runs, and it scores the fused top-1
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["submit"]["phase"] = "fused"
    params["submit"]["logit_adjust"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(project, "repro")
    assert rerun.stdout.count("Running stage") == 1 and "Running stage 'submit'" in rerun.stdout
    fused = load_predictions(project / "predictions" / "fused" / "m0.npz").test
    sub = pd.read_csv(sub_path, dtype={"name": str}).set_index("name")
    skus = label_map.sort_values("label")["sku"].to_numpy()
    assert (sub.loc[fused.names, "class"].to_numpy() == skus[fused.topk_labels[:, 0]]).all()

    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    # per-group and confused-pairs bar charts (by their titles) and the error galleries, per phase
    assert html.count("Test top-1 per SKU group") == 3 and html.count("Most confused SKU pairs") == 3
    assert all(f"plots_m0_{phase}_errors.png" in html for phase in PHASES)

    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout + again.stderr


@pytest.mark.e2e
def test_two_member_ensemble_graph(tmp_path):
    """Each member gets its own evaluate stages; submit waits for every member's predictions of every
    phase and fused (submit.phase auto chooses among them, so it reads the whole folder)."""
    members = {"m0": {}, "m1": {"train.seed": 1, "train.resolution": 48}}
    project = make_project(
        tmp_path / "project",
        {"ensemble": {"members": members, "weights": "fit"}, "submit": {"phase": "finetune_balanced"}},
    )
    names = dvc(project, "stage", "list", "--name-only").stdout.split()
    assert {f"evaluate@{m}-{p}" for m in members for p in PHASES} <= set(names)
    dag = dvc(project, "dag", "--dot", "submit").stdout
    for m in members:
        for phase in PHASES:
            assert f'"evaluate@{m}-{phase}" -> "submit"' in dag
        assert f'"index@{m}" -> "submit"' in dag
