"""DDP through torchrun: 2 CPU processes (gloo) training the real phase, watched through its callbacks
and compared with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from products10k.training import checkpoint as ckpt_lib
from products10k.training.loop import PhasePaths, run_phase
from tests.helpers import ROOT, make_training_data, phase_args, write_params

# The phase as torchrun runs it, watched through run_phase's callbacks: every rank records the
# samples it trained on and, at the end, its parameters' digest and logits on a fixed input.
WATCHED_PHASE = """
import hashlib, json, sys
from pathlib import Path

import torch

from products10k.common import setup_logging
from products10k.training.loop import Callbacks, PhasePaths, run_phase

params, data, out = map(Path, sys.argv[1:4])
seen = []


def on_batch(state, index, weight):
    seen.extend(int(i) for i, w in zip(index, weight) if w > 0)


def on_end(state):
    rank = state.info.rank
    (out / f"seen-rank{rank}.json").write_text(json.dumps(sorted(seen)))
    size = state.cfg.resolution
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = state.eval_model.eval()
    with torch.no_grad():
        logits = model(x)
    digest = hashlib.sha256()
    for _, p in sorted(state.raw.named_parameters()):
        digest.update(p.detach().cpu().numpy().tobytes())
    probe = {"input": x, "logits": logits, "param_digest": digest.hexdigest()}
    torch.save(probe, out / f"probe-rank{rank}.pt")


setup_logging()
paths = PhasePaths(
    data / "train.csv", data / "val.csv", data / "label_map.csv", data,
    out / "models" / "train", live=out / "dvclive" / "train",
)
run_phase(params, "train", "m0", paths, Callbacks(on_batch=on_batch, on_end=on_end))
"""


def test_two_process_epoch_sees_every_sample_once_and_checkpoint_matches(tmp_path):
    # 21 training images: not divisible by 2 ranks x batch 4, so the padding path is exercised
    data = make_training_data(tmp_path / "data", num_classes=3, train_per_class=7, val_per_class=3)
    params = write_params(
        tmp_path / "params.yaml",
        train={"epochs": 1, "batch_size": 8, "drop_last": False},  # keep the short last batch
        dist={"nproc_per_node": 2, "backend": "gloo", "threads": 1, "timeout_s": 120},
    )
    script = tmp_path / "watched_phase.py"
    script.write_text(WATCHED_PHASE)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(params),
        str(data),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1/2 joined the gloo process group" in proc.stderr

    n = len(pd.read_csv(data / "train.csv"))
    seen0 = json.loads((tmp_path / "seen-rank0.json").read_text())
    seen1 = json.loads((tmp_path / "seen-rank1.json").read_text())
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(n))  # every sample exactly once across ranks

    probe0 = torch.load(tmp_path / "probe-rank0.pt")
    probe1 = torch.load(tmp_path / "probe-rank1.pt")
    assert probe0["param_digest"] == probe1["param_digest"]  # DDP kept the replicas identical

    # rank 0 alone wrote the checkpoints and DVCLive files; they load into a 1-process model
    assert sorted(p.name for p in (tmp_path / "models" / "train").iterdir()) == ["best.pt", "last.pt"]
    model, meta = ckpt_lib.load_model(tmp_path / "models" / "train" / "last.pt")
    assert meta["epoch"] == 1 and not any(k.startswith("module.") for k in model.state_dict())
    with torch.no_grad():
        logits = model(probe0["input"])
    assert torch.allclose(logits, probe0["logits"], atol=1e-5)
    metrics = json.loads((tmp_path / "dvclive" / "train" / "metrics.json").read_text())
    assert metrics["step"] == 0 and 0.0 <= metrics["val"]["top1"] <= 1.0


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """Results do not depend on the process count: 2 gloo ranks x micro-batch 4 and 1 process x
    2 accumulated micro-batches of 4 take the same optimizer steps, the short last update (20
    images = 8 + 8 + 4) included. Deterministic inputs (square images, no flip, resize = crop)
    and eval-mode BatchNorm take the per-rank batch statistics and augmentation streams out."""
    data = make_training_data(
        tmp_path / "data", num_classes=4, train_per_class=5, val_per_class=2, size=(32, 32)
    )
    train = {
        "epochs": 2, "batch_size": 8, "resolution": 32, "resize": 32, "hflip": 0.0, "freeze_bn": True,
        "drop_last": False,  # keep the short last update: its normalisation is what is tested
        "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "step", "warmup_epochs": 0,
    }  # fmt: skip
    dist = {"backend": "gloo", "threads": 1, "timeout_s": 120}
    two = write_params(tmp_path / "two.yaml", train=train, dist={**dist, "nproc_per_node": 2})
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "stages" / "train.py")]
    cmd += ["--params", str(two), *phase_args(data, tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one = write_params(
        tmp_path / "one.yaml", train={**train, "grad_accum": 2}, dist={**dist, "nproc_per_node": 1}
    )
    paths = PhasePaths(data / "train.csv", data / "val.csv", data / "label_map.csv", data, tmp_path / "one")
    run_phase(one, "train", "m0", paths)

    ddp = torch.load(tmp_path / "ddp" / "models" / "train" / "last.pt", weights_only=True)
    ref = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert ddp["train_state"]["global_step"] == ref["train_state"]["global_step"] == 6  # 3 updates x 2
    for key, value in ref["model"].items():  # no EMA: the saved weights are the trained ones
        if value.is_floating_point():
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    assert [r["train/loss"] for r in ddp["history"]] == pytest.approx(
        [r["train/loss"] for r in ref["history"]]
    )
