"""Kills at any moment lose nothing: `dvc repro` SIGKILLed inside one stage after another, restarted
each time, ends with exactly the results of an uninterrupted run.

The whole process group is killed (dvc, torchrun and the stage's Python), as a power cut or the
OOM killer would, inside download, prepare, a training epoch, evaluate, index, submit and export, in
the order the run reaches them. After each kill: every output a user or DVC reads is either absent
or whole (it parses), and the killed stage is not recorded in dvc.lock. The last restart runs to the
end; its metrics, submission, predictions, index and exported model equal the uninterrupted run's
byte for byte (same install, same machine).
"""

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

# (stage, a path whose appearance shows the stage at work or None, seconds to wait after that)
KILLS = [
    ("download", None, 1.0),
    ("prepare", None, 2.5),
    ("train@m0", "dvclive/m0/train", 1.0),  # DVCLive has started: inside the epoch
    ("evaluate@m0-train", None, 3.0),
    ("index@m0", None, 3.0),
    ("submit", None, 1.5),
    ("export", None, 3.0),
]


def kill_inside(project: Path, stage: str, trigger: str | None, delay: float) -> str:
    """Start `dvc repro`, SIGKILL its process group ``delay`` s after ``stage`` starts (and ``trigger``
    exists); return the output up to the kill."""
    env = _env() | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes every child with it
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"Running stage '{stage}'"):
                deadline = time.time() + 300
                while trigger and not (project / trigger).exists() and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"the run ended before stage {stage} started:\n{''.join(lines)}")
    finally:
        proc.stdout.close()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return "".join(lines)


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
    assert [order.index(s) for s, _, _ in KILLS] == sorted(order.index(s) for s, _, _ in KILLS)
    project = make_project(tmp_path / "project", tiny_params())
    for stage, trigger, delay in KILLS:
        kill_inside(project, stage, trigger, delay)
        assert stage not in locked_stages(project), f"{stage} finished before the kill: shorten its delay"
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
