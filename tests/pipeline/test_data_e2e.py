"""download -> prepare -> balance through the real dvc CLI in a throw-away git repo."""

import json

import pandas as pd
import pytest
import yaml

from tests.helpers import dvc, make_project

TINY = {
    "data": {
        "source": "synthetic",
        "synthetic": {
            "num_groups": 2,
            "skus_per_group": 3,
            "train_max_per_sku": 8,
            "train_min_per_sku": 2,
            "test_per_sku": 2,
        },
    },
    # SKUs of 2-6 images: val from every SKU with >= 2 (the default 10 would leave val empty)
    "prepare": {"size": 64, "n_jobs": 1, "val_fraction": 0.15, "val_min_images": 2},
    "balance": {"per_class": 3},
}


def ran_stages(proc) -> set[str]:
    text = proc.stdout + proc.stderr
    return {name for name in ("download", "prepare", "balance") if f"Running stage '{name}'" in text}


@pytest.mark.e2e
def test_repro_balance_is_cached_and_reruns_only_what_changed(tmp_path):
    project = make_project(tmp_path / "project", TINY)

    first = dvc(project, "repro", "balance")
    assert ran_stages(first) == {"download", "prepare", "balance"}
    prepared = project / "data" / "prepared"
    train = pd.read_csv(prepared / "train.csv")
    balanced = pd.read_csv(prepared / "balanced.csv")
    assert balanced.columns.tolist() == train.columns.tolist()
    assert balanced["sku"].value_counts().max() <= 3
    assert set(balanced["name"]) <= set(train["name"])
    report = json.loads((prepared / "report.json").read_text())
    assert report["counts"]["excluded_train"] == 0 and report["counts"]["skus"] == 6
    assert sorted(p.name for p in (prepared / "images").iterdir()) == ["shard-00000.bin"]

    status = dvc(project, "status", "--json", "--with-deps", "balance")
    assert json.loads(status.stdout or "{}") == {}, status.stdout

    again = dvc(project, "repro", "balance")
    assert ran_stages(again) == set(), again.stdout

    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["prepare"]["val_fraction"] = 0.3
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    changed = dvc(project, "repro", "balance")
    assert ran_stages(changed) == {"prepare", "balance"}, changed.stdout
    assert len(pd.read_csv(prepared / "val.csv")) > report["counts"]["val"]
    status = dvc(project, "status", "--json", "--with-deps", "balance")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
