"""Kills at any moment lose nothing: `dvc repro` SIGKILLed inside one stage after another, restarted
each time, ends with exactly the results of an uninterrupted run.

The whole process group is killed (dvc, torchrun and the stage's Python), as a power cut or the
OOM killer would, inside download, prepare, a training epoch, evaluate, index, submit and export, in
the order the run reaches them, each at a precise moment (``products10k.common.pause_point``: the
stage pauses there and the test kills it). After each kill: every output a user or DVC reads is either absent
or whole (it parses), and the killed stage is not recorded in dvc.lock. The last restart runs to the
end; its metrics, submission, predictions, index and exported model equal the uninterrupted run's
byte for byte (same install, same machine).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import _env, dvc, make_project, tiny_params
from tests.pipeline.conftest import RESULTS

# (stage, the moment inside it: a pause point of products10k.common.pause_point), in the run's order
KILLS = [
    ("download", "publish data/raw"),  # the raw files built, not yet renamed into place
    ("prepare", "prepare images"),  # shards half-written
    ("train@m0", "train epoch 1"),  # a training epoch in flight
    ("evaluate@m0-train", "publish train/m0.npz"),  # predictions written, not yet renamed
    ("index@m0", "publish m0/index"),  # the index folder staged, not yet swapped in
    ("submit", "publish submissions/submission.csv"),
    ("export", "publish models/export"),  # model.onnx checked and staged
]


def kill_at(project: Path, stage: str, point: str, pause_dir: Path) -> None:
    """Run `dvc repro` until a process reaches ``point`` inside ``stage``, then SIGKILL dvc's process
    group (dvc, torchrun, the stage) and the paused process itself, as a power cut would."""
    pids = pause_dir / "pids"
    pids.unlink(missing_ok=True)
    env = _env() | {"PRODUCTS10K_PAUSE_AT": point, "PRODUCTS10K_PAUSE_DIR": str(pause_dir)}
    log = pause_dir / "dvc.log"
    with open(log, "w") as out:
        # its own process group (start_new_session): the kill takes every child with it
        cmd = [sys.executable, "-m", "dvc", "repro"]
        proc = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 600
        while not pids.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        reached = pids.exists()
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids.read_text().split() if reached else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        proc.wait(timeout=60)
    text = log.read_text()
    assert reached, f"the run never reached {point!r}:\n{text}"
    running = [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]
    assert running and running[-1] == stage, f"{point!r} was reached in {running[-1:]}, not {stage}"


def check_whole(project: Path) -> None:
    """Every output a user or DVC would read is whole: it parses (absent is fine)."""
    for path in (project / "data" / "raw").glob("*.zip"):
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None, path
    for path in [*(project / "data").rglob("*.csv"), *(project / "submissions").glob("*.csv")]:
        pd.read_csv(path)
    for path in (project / "metrics").rglob("*.json"):
        json.loads(path.read_text())
    for path in (project / "predictions").rglob("*.npz"):
        with np.load(path, allow_pickle=False) as npz:
            [npz[k] for k in npz.files]
    for path in (project / "models").rglob("*.pt"):
        torch.load(path, weights_only=True)
    for folder in ("models/export", "models/m0/index"):  # published whole by a rename, or absent
        if (project / folder).exists():
            expected = {"models/export": {"model.onnx", "preprocess.json"}}.get(folder)
            names = {p.name for p in (project / folder).iterdir()}
            assert expected is None or expected <= names, names
            assert names, folder


def locked_stages(project: Path) -> set[str]:
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


@pytest.mark.e2e
def test_repro_killed_inside_every_stage_family_ends_as_an_uninterrupted_run(reference_pipeline, tmp_path):
    order = reference_pipeline.stages
    assert [order.index(s) for s, _ in KILLS] == sorted(order.index(s) for s, _ in KILLS)
    project = make_project(tmp_path / "project", tiny_params())
    for stage, point in KILLS:
        kill_at(project, stage, point, tmp_path)
        assert stage not in locked_stages(project)
        check_whole(project)
    final = dvc(project, "repro").stdout
    assert "Running stage 'download'" not in final  # finished stages are not redone
    assert dvc(project, "status").stdout.strip() == "Data and pipelines are up to date."

    reference = reference_pipeline.results
    for name in RESULTS:
        expected = sorted(p.relative_to(reference) for p in (reference / name).rglob("*") if p.is_file())
        got = sorted(p.relative_to(project) for p in (project / name).rglob("*") if p.is_file())
        assert got == expected, name  # no leftovers (staging folders, temp files) among the results
        for rel in expected:
            assert (project / rel).read_bytes() == (reference / rel).read_bytes(), rel
