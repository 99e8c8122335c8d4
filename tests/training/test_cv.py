"""Training under cv.folds: each fold's model on its training rows, validated on its held-out fold,
the refit on every image, finetunes from the same fold's model, and a re-run that trains nothing."""

import pandas as pd
import pytest
import torch

from products10k.folds import FOLD_COLUMN, write_folds
from products10k.prepared.balance import balance_table
from products10k.training.loop import Callbacks, PhasePaths
from tests.helpers import make_training_data, train_phase, write_params


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """The train phase and the balanced finetune under cv.folds: 2, with what each model saw."""
    root = tmp_path_factory.mktemp("cv")
    data = make_training_data(root / "data", num_classes=4, train_per_class=6, val_per_class=2)
    write_folds(
        data / "train.csv", data / "val.csv", root / "folds" / "train.csv", root / "folds" / "val.csv", 2, 0
    )
    pool = pd.read_csv(root / "folds" / "train.csv")
    balance_table(pool, 3, 0).to_csv(root / "folds" / "balanced.csv", index=False)
    params = write_params(root / "params.yaml", train={"epochs": 1}, cv={"folds": 2, "seed": 0})
    seen = []

    def record(state):
        seen.append(
            {
                "phase": state.phase,
                "fold": state.paths.fold,
                "train": set(state.data.train_ds.names),
                "val": set(state.data.val_ds.names),
                "init": state.paths.init,
                "out": state.paths.out,
            }
        )

    def paths(phase, csv, init=None):
        return PhasePaths(
            train_csv=root / "folds" / csv,
            val_csv=root / "folds" / "val.csv",
            label_map=data / "label_map.csv",
            images=data,
            out=root / "models" / phase,
            live=root / "dvclive" / phase,
            init=init,
        )

    results = {
        "train": train_phase(params, "train", "m0", paths("train", "train.csv"), Callbacks(on_end=record))
    }
    init = root / "models" / "train" / "best.pt"
    results["finetune_balanced"] = train_phase(
        params,
        "finetune_balanced",
        "m0",
        paths("finetune_balanced", "balanced.csv", init),
        Callbacks(on_end=record),
    )
    return root, pool, params, seen, results, paths


def test_each_fold_trains_without_its_fold_and_validates_on_it(cv_run):
    root, pool, _, seen, results, _ = cv_run
    trains = [s for s in seen if s["phase"] == "train"]
    assert [s["fold"] for s in trains] == [0, 1, None]  # the folds, then the refit
    for s in trains[:2]:
        fold_rows = set(pool.loc[pool[FOLD_COLUMN] == s["fold"], "name"])
        assert s["val"] == fold_rows and not s["train"] & fold_rows
        assert s["train"] | s["val"] == set(pool["name"])
        assert s["out"] == root / "models" / "train" / f"fold{s['fold']}"
        assert (s["out"] / "best.pt").is_file() and (root / "dvclive" / "train" / f"fold{s['fold']}").is_dir()
    refit = trains[2]
    assert refit["train"] == set(pool["name"]) and not refit["val"]
    assert refit["out"] == root / "models" / "train"
    assert len(results["train"]["folds"]) == 2
    # the three models differ: each fold's learnt from other images
    weights = [
        torch.load(root / "models" / "train" / sub / "best.pt", weights_only=True)["model"]
        for sub in ("fold0", "fold1", ".")
    ]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])


def test_a_finetune_fold_starts_from_the_same_folds_model_on_its_balanced_rows(cv_run):
    root, pool, _, seen, _, _ = cv_run
    balanced = pd.read_csv(root / "folds" / "balanced.csv")
    fine = [s for s in seen if s["phase"] == "finetune_balanced"]
    assert [s["fold"] for s in fine] == [0, 1, None]
    for s in fine[:2]:
        assert s["init"] == root / "models" / "train" / f"fold{s['fold']}" / "best.pt"
        assert s["train"] == set(balanced.loc[balanced[FOLD_COLUMN] != s["fold"], "name"])
        assert s["val"] == set(pool.loc[pool[FOLD_COLUMN] == s["fold"], "name"])
    assert fine[2]["init"] == root / "models" / "train" / "best.pt"


def test_a_rerun_finds_every_fold_done_and_trains_nothing(cv_run):
    root, _, params, _, _, paths = cv_run
    steps = []
    before = {p: p.read_bytes() for p in (root / "models" / "train").rglob("best.pt")}
    train_phase(
        params, "train", "m0", paths("train", "train.csv"), Callbacks(on_batch=lambda *a: steps.append(1))
    )
    assert steps == [] and len(before) == 3
    assert all(p.read_bytes() == b for p, b in before.items())
