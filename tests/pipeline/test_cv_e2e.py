"""`dvc exp run -S cv.folds=2` on the finished tiny pipeline, with the real dvc CLI: the folds stage
pools train and val, every phase trains two fold models and a refit, evaluate and index predict
val out of fold (each image by the model that held it out) and test by the folds' average, submit
chooses on that val, the index and export hold the refit, and a second run is a no-op."""

import json

import numpy as np
import pandas as pd
import pytest

from products10k.common import file_sha256
from products10k.config import PHASES
from products10k.folds import FOLD_COLUMN, out_of_fold
from products10k.scores import load_predictions
from tests.helpers import dvc


@pytest.mark.e2e
def test_two_folds_through_the_whole_pipeline(reference_pipeline, tmp_path):
    project = reference_pipeline.copy(tmp_path / "project")
    out = dvc(project, "exp", "run", "-S", "cv.folds=2").stdout
    assert "Running stage 'prepare'" not in out and "Running stage 'folds'" in out

    pool = pd.read_csv(project / "data" / "folds" / "val.csv", dtype={"name": str})
    prepared = [
        pd.read_csv(project / "data" / "prepared" / f, dtype={"name": str}) for f in ("train.csv", "val.csv")
    ]
    assert len(pool) == sum(map(len, prepared)) and set(pool[FOLD_COLUMN]) <= {-1, 0, 1}
    oof = out_of_fold(pool, 2)
    for phase in PHASES:
        models = project / "models" / "m0" / phase
        assert all((models / sub / "best.pt").is_file() for sub in ("fold0", "fold1", "."))
        preds = load_predictions(project / "predictions" / phase / "m0.npz")
        assert list(preds.val.names) == list(oof["name"])  # every held-out image, in OOF order
        assert np.array_equal(preds.val.labels, oof["label"].to_numpy())
        metrics = json.loads((project / "metrics" / "m0" / f"{phase}.json").read_text())
        assert metrics["cv"]["folds"] == 2 and "top1" in metrics["test_refit"]
        assert len(metrics["cv"]["test_fold_top1"]) == 2
        assert metrics["val"]["n"] == len(oof)

    retrieval = load_predictions(project / "predictions" / "knn" / "m0.npz")
    assert list(retrieval.val.names) == list(oof["name"])
    index_meta = json.loads((project / "models" / "m0" / "index" / "meta.json").read_text())
    refit = project / "models" / "m0" / "finetune_accuracy" / "best.pt"
    assert index_meta["checkpoint_sha256"] == file_sha256(refit)  # the refit's gallery

    choice = json.loads((project / "metrics" / "submission.json").read_text())["choice"]
    assert choice["val_rows"] == len(oof) and choice["val_coverage"] > 0
    sub = pd.read_csv(project / "submissions" / "submission.csv", dtype={"name": str})
    test_list = pd.read_csv(project / "data" / "raw" / "test_kaggletest.csv", dtype={"name": str})
    assert sorted(sub["name"]) == sorted(test_list["name"])

    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout + again.stderr
