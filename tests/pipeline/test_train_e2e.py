"""The three training phases through the real dvc CLI, then a resolution experiment.

download -> prepare -> balance -> train@m0 -> finetune_balanced@m0 -> finetune_accuracy@m0 of the
tiny pipeline's run (torchrun with 1 process, as dvc.yaml builds it), then
`dvc exp run -S train.resolution=40` and `dvc metrics diff` on the DVCLive metrics.
"""

import json

import pytest
import torch

from products10k.config import PHASES
from tests.helpers import dvc, run


@pytest.mark.e2e
def test_three_phases_then_resolution_experiment(reference_pipeline, tmp_path):
    # a copy of the tiny pipeline's run (tests/pipeline/conftest.py): this test commits and runs
    # an experiment there
    project = reference_pipeline.copy(tmp_path / "project")
    for phase in PHASES:
        assert f"{phase}@m0" in reference_pipeline.stages
        best = torch.load(project / "models" / "m0" / phase / "best.pt", weights_only=True)
        assert best["phase"] == phase and best["resolution"] == 32
        assert (project / "dvclive" / "m0" / phase / "metrics.json").is_file()
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    assert any("dvclive/m0/finetune_accuracy/metrics.json" in str(v) for v in shown.values())
    plots = dvc(project, "plots", "show", "--json").stdout
    assert "dvclive/m0/train/plots/metrics" in plots

    # nothing changed: a second repro runs nothing
    again = dvc(project, "repro", "finetune_accuracy@m0")
    assert "Running stage" not in again.stdout

    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "baseline")
    dvc(project, "exp", "run", "finetune_accuracy@m0", "-S", "train.resolution=40")
    for phase in PHASES:
        last = torch.load(project / "models" / "m0" / phase / "last.pt", weights_only=True)
        # persisted outs are not resumed across settings: each phase re-ran at the new resolution
        assert last["resolution"] == 40 and last["resize"] == 46
        assert len(last["history"]) == last["epochs"]
    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    changed = {path for path, metrics in diff.items() if "dvclive/m0/" in path and metrics}
    assert {f"dvclive/m0/{p}/metrics.json" for p in PHASES} <= changed, diff
    params_diff = json.loads(dvc(project, "params", "diff", "--json").stdout)
    resolution = params_diff["params.yaml"]["train.resolution"]
    assert (resolution["old"], resolution["new"]) == (32, 40)
    exps = dvc(project, "exp", "show", "--json")
    assert exps.returncode == 0
