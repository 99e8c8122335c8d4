"""DDP through torchrun: 2 CPU processes (gloo) for one short epoch of the real stage script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from train_fixtures import make_prepared, phase_args, write_params

from products10k import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_epoch_sees_every_sample_once_and_checkpoint_matches(tmp_path):
    # 21 training images: not divisible by 2 ranks x batch 4, so the padding path is exercised
    data = make_prepared(tmp_path / "data", num_classes=3, train_per_class=7, val_per_class=3)
    params = write_params(
        tmp_path / "params.yaml",
        train={"epochs": 1, "batch_size": 8},
        dist={"nproc_per_node": 2, "backend": "gloo", "threads": 1, "timeout_s": 120},
    )
    debug = tmp_path / "debug"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "stages" / "train.py")]
    cmd += ["--params", str(params), *phase_args(data, tmp_path), "--debug-dir", str(debug)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1/2 joined the gloo process group" in proc.stderr

    n = len(pd.read_csv(data / "train.csv"))
    seen0 = json.loads((debug / "seen-rank0-epoch1.json").read_text())
    seen1 = json.loads((debug / "seen-rank1-epoch1.json").read_text())
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(n))  # every sample exactly once across ranks

    probe0 = torch.load(debug / "probe-rank0.pt")
    probe1 = torch.load(debug / "probe-rank1.pt")
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
