"""A team's DVC remote, as docs/pipeline.md documents it, with a local-folder remote.

The tiny pipeline's run (tests/pipeline/conftest.py) pushes its outputs; a fresh `git clone` pulls
them and `dvc repro` runs nothing, `dvc status` is clean; an experiment run in that clone is pushed
(`dvc exp push`) and pulled (`dvc exp pull`) into a third clone, which gets its results whole.
"""

import time

import pytest

from tests.helpers import dvc, run


def _size_mb(folder) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


@pytest.mark.e2e
def test_push_clone_pull_reproduces_nothing_and_experiments_travel(reference_pipeline, tmp_path):
    origin = reference_pipeline.copy(tmp_path / "origin")  # this test commits there
    remote = tmp_path / "remote"
    dvc(origin, "remote", "add", "-d", "team", str(remote))
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-q", "-m", "the pipeline's results, tracked by dvc.lock")
    t0 = time.perf_counter()
    dvc(origin, "push")
    push_s = time.perf_counter() - t0

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    t0 = time.perf_counter()
    dvc(clone, "pull")
    pull_s = time.perf_counter() - t0
    again = dvc(clone, "repro").stdout
    assert "Running stage" not in again, again  # everything is there: nothing to re-run
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    for name in ("submissions/submission.csv", "models/export/model.onnx", "metrics/submission.json"):
        assert (clone / name).read_bytes() == (origin / name).read_bytes(), name

    # an experiment in the clone: only submit re-runs; it travels through git refs and the remote
    out = dvc(clone, "exp", "run", "-n", "fused-submit", "-S", "submit.phase=fused").stdout
    assert out.count("Running stage") == 1 and "Running stage 'submit'" in out
    expected = (clone / "submissions" / "submission.csv").read_bytes()
    dvc(clone, "exp", "push", "origin", "fused-submit")
    third = tmp_path / "third"
    run(tmp_path, "git", "clone", "-q", str(origin), str(third))
    dvc(third, "exp", "pull", "origin", "fused-submit")
    assert "fused-submit" in dvc(third, "exp", "list", "--name-only").stdout
    dvc(third, "exp", "apply", "fused-submit")
    dvc(third, "pull")
    assert (third / "submissions" / "submission.csv").read_bytes() == expected
    assert dvc(third, "status").stdout.strip() == "Data and pipelines are up to date."
    print(f"remote: {_size_mb(remote):.1f} MB; dvc push {push_s:.1f} s, dvc pull {pull_s:.1f} s")
