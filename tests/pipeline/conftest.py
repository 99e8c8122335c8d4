"""The tiny pipeline run once, uninterrupted, for every end-to-end test that needs it."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import dvc, make_project, tiny_params

#: what a finished run leaves for a user and for DVC: compared byte for byte after kills and restarts
RESULTS = ("metrics", "submissions", "models/export", "models/m0/index", "predictions")


@dataclass
class Reference:
    project: Path  # the project after `dvc repro`: read it, never change it (copy() to go on from it)
    results: Path  # a copy of RESULTS as the uninterrupted run left them
    stages: list[str]  # the stages in the order the run ran them

    def copy(self, dest: Path) -> Path:
        """The finished project (workspace, git, DVC cache) copied to ``dest``, for a test that goes
        on from it: pytest-xdist hands each worker whole files in an order of its own, so a test that
        committed or changed params in the shared project would change what the next one finds."""
        shutil.copytree(self.project, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def reference_pipeline(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    project = make_project(root / "project", tiny_params())
    out = dvc(project, "repro").stdout
    stages = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    for name in RESULTS:
        shutil.copytree(project / name, root / "results" / name)
    return Reference(project, root / "results", stages)
