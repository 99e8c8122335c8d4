"""Faults: a run killed mid-phase resumes from last.pt and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from products10k.training.loop import PhasePaths
from tests.helpers import ROOT, config, make_training_data, phase_args, train_phase, write_params


def _epoch_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_killed_run_resumes_from_last_complete_epoch(tmp_path, sig):
    data = make_training_data(tmp_path / "data", num_classes=4, train_per_class=4, val_per_class=2)
    train = {"epochs": 3, "batch_size": 4, "resolution": 32, "ema": True, "ema_decay": 0.9}
    params = write_params(tmp_path / "params.yaml", train=train)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        "--params",
        str(params),
        *phase_args(data, run_dir),
    ]
    last = run_dir / "models" / "train" / "last.pt"

    # killed inside epoch 2, after its first update (products10k.common.pause_point), not by a timer
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**os.environ, "PRODUCTS10K_PAUSE_AT": "train epoch 2", "PRODUCTS10K_PAUSE_DIR": str(pause)}
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, **out)
    try:
        deadline = time.monotonic() + 180
        while not (pause / "pids").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -sig
    killed_at = _epoch_of(last)
    assert killed_at == 1

    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"after epoch {killed_at}" in done.stderr and "resuming train@m0" in done.stderr
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 3 and [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    curve = (run_dir / "dvclive" / "train" / "plots" / "metrics" / "val" / "top1.tsv").read_text()
    assert len(curve.splitlines()) == 4  # header + epochs 1-3, the pre-kill epochs replayed
    assert not list((run_dir / "models" / "train").glob(".*"))  # no stale temp files

    # the same phase uninterrupted (in-process) ends with the same weights: the resume is exact
    ref_dir = tmp_path / "ref"
    paths = _paths(data, ref_dir / "models")
    train_phase(params, "train", "m0", paths)
    reference = torch.load(ref_dir / "models" / "last.pt", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [r["val/top1"] for r in reference["history"]] == [r["val/top1"] for r in resumed["history"]]


def _paths(data: Path, out: Path) -> PhasePaths:
    """The train phase's paths on a make_training_data folder, checkpoints under ``out``."""
    return PhasePaths(data / "train.csv", data / "val.csv", data / "label_map.csv", data, out)


def test_settings_change_starts_afresh(tmp_path, caplog):
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    paths = _paths(data, tmp_path / "models")
    train_phase(write_params(tmp_path / "a.yaml", train={"epochs": 1}), "train", "m0", paths)
    fp = torch.load(paths.out / "last.pt", weights_only=True)["fingerprint"]
    # another resolution (e.g. `dvc exp run -S train.resolution=...` on a persisted out): no resume
    caplog.set_level("INFO", logger="products10k.training.loop")
    out = train_phase(
        write_params(tmp_path / "b.yaml", train={"epochs": 2, "resolution": 40}), "train", "m0", paths
    )
    last = torch.load(paths.out / "last.pt", weights_only=True)
    assert last["fingerprint"] != fp and last["resolution"] == 40 and len(out["history"]) == 2
    # a wrong resume would also end with 2 epochs of history: the log tells which path ran
    assert "starting the phase afresh" in caplog.text
    assert "resuming" not in caplog.text


def test_resume_without_ema_takes_the_raw_weights_from_the_single_stored_copy(tmp_path, caplog):
    # without EMA last.pt keeps one copy of the weights (train_state.model is None): resume uses it
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    paths = _paths(data, tmp_path / "m")
    params = write_params(tmp_path / "p.yaml", train={"epochs": 2})
    train_phase(params, "train", "m0", paths)
    last = torch.load(paths.out / "last.pt", weights_only=True)
    assert last["train_state"]["model"] is None
    # as if killed after epoch 1: the epoch-1 state with the weights it had then
    last["epoch"], last["history"] = 1, last["history"][:1]
    marker = next(k for k, v in last["model"].items() if v.is_floating_point())
    last["model"][marker] = torch.full_like(last["model"][marker], 0.125)
    torch.save(last, paths.out / "last.pt")
    caplog.set_level("INFO", logger="products10k.training.loop")

    loaded = {}
    real_load = torch.nn.Module.load_state_dict

    def spy(self, state, *args, **kw):
        if marker in state:
            loaded["value"] = state[marker].clone()
        return real_load(self, state, *args, **kw)

    import unittest.mock

    with unittest.mock.patch.object(torch.nn.Module, "load_state_dict", spy):
        out = train_phase(params, "train", "m0", paths)
    assert "resuming train@m0" in caplog.text and len(out["history"]) == 2
    assert torch.all(loaded["value"] == 0.125)  # the raw weights came from last.pt's "model"


def test_the_worker_count_changes_nothing_so_a_resume_may_change_it(tmp_path):
    # each sample is augmented from a seed of its own (datasets.SeededSamples), whichever worker loads
    # it: no worker, or two persistent ones over two epochs, train the same weights
    from products10k.training.loop import Callbacks, PhaseSettings, fingerprint

    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=6, val_per_class=1)
    augment = {"hflip": 0.5, "color_jitter": 0.4, "crop": "random_resized", "random_erasing": 0.5}
    weights, orders = [], []
    for workers in (0, 2):
        train = {"epochs": 2, "batch_size": 4, "resolution": 32, "num_workers": workers, **augment}
        # dropout on: its stream (the training process's) must not move with the worker count either
        params = write_params(tmp_path / f"w{workers}.yaml", model={"drop_rate": 0.5}, train=train)
        paths = _paths(data, tmp_path / f"w{workers}")
        seen: list[list[int]] = [[], []]  # the indices of each epoch, in order

        def on_batch(state, index, weight, seen=seen):
            seen[len(state.progress.history)].extend(index.tolist())

        train_phase(params, "train", "m0", paths, Callbacks(on_batch=on_batch))
        weights.append(torch.load(paths.out / "last.pt", weights_only=True)["model"])
        orders.append(seen)
    assert weights[0].keys() == weights[1].keys()
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differ, f"0 vs 2 workers: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert orders[0] == orders[1] and orders[1][0] != orders[1][1]  # the persistent loader's order moves

    paths = _paths(data, tmp_path / "models")
    model = config("model", pretrained=False)

    def fp(**train):
        cfg = config("train", **train)
        return fingerprint(
            PhaseSettings("train", "m0", cfg, model, config("dist"), "train", "p.yaml"), 1, paths
        )

    assert fp(num_workers=0) == fp(num_workers=4)
    assert fp(num_workers=0, eval_batch_size=8) == fp(num_workers=0, eval_batch_size=64)
    assert fp(num_workers=0) != fp(num_workers=0, hflip=0.0)
    # what auto settings resolved to counts: a CPU run (no loss scaler) is not resumed under fp16
    settings = PhaseSettings("train", "m0", config("train"), model, config("dist"), "train", "p.yaml")
    assert fingerprint(settings, 1, paths) != fingerprint(settings, 1, paths, "cuda", torch.float16)
