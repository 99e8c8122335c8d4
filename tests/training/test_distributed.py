"""DDP through torchrun: 2 CPU processes (gloo) training the real phase, watched through its callbacks
and compared with one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from products10k.training import checkpoint as ckpt_lib
from products10k.training.loop import PhasePaths, run_phase
from tests.helpers import ROOT, make_training_data, write_params

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


# --- several nodes and elastic restarts: a finetune from an init checkpoint, 2 ranks -----------------
#
# Deterministic inputs (square images, no flip, resize = crop) and eval-mode BatchNorm take the
# per-rank batch statistics and augmentation streams out: 2 ranks x micro-batch 4 then take the
# same optimizer steps as 1 process x 2 accumulated micro-batches of 4, the short last update
# (20 images = 8 + 8 + 4) included.
DETERMINISTIC = {
    "epochs": 1, "batch_size": 8, "resolution": 32, "resize": 32, "hflip": 0.0, "freeze_bn": True,
    "drop_last": False,  # keep the short last update: its normalisation is what is tested
    "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "step", "warmup_epochs": 0,
}  # fmt: skip
FINETUNE = {"epochs": 2, "lr": 0.05, "warmup_epochs": 0, "checkpoint": "last"}
GLOO = {"backend": "gloo", "threads": 1, "timeout_s": 120}
PHASE = "finetune_balanced"
# the stage command as every node runs it: relative paths, resolved in each node's own folder
NODE_ARGS = [
    str(ROOT / "stages" / "train.py"), "--phase", PHASE, "--member", "m0", "--params", "params.yaml",
    "--train-csv", "data/train.csv", "--val-csv", "data/val.csv", "--label-map", "data/label_map.csv",
    "--images", "data", "--init", "models/train/best.pt",
    "--out", f"models/{PHASE}", "--live", f"dvclive/{PHASE}",
]  # fmt: skip
LAUNCH = [sys.executable, "-m", "products10k.training.launch", "--params", "params.yaml"]


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """The data, an init checkpoint (one single-process epoch) and the finetune of it by one process
    with the same global batch: the reference for the distributed runs."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_training_data(root / "data", num_classes=4, train_per_class=5, val_per_class=2, size=(32, 32))
    params = write_params(root / "one.yaml", train=DETERMINISTIC, **{PHASE: FINETUNE})
    paths = PhasePaths(data / "train.csv", data / "val.csv", data / "label_map.csv", data, root / "train")
    run_phase(params, "train", "m0", paths)
    init = root / "train" / "best.pt"
    params = write_params(
        root / "one.yaml", train={**DETERMINISTIC, "grad_accum": 2}, **{PHASE: FINETUNE}, dist=GLOO
    )
    paths = PhasePaths(
        data / "train.csv", data / "val.csv", data / "label_map.csv", data, root / "one", init=init
    )
    run_phase(params, PHASE, "m0", paths)
    return {"root": root, "data": data, "init": init, "one": root / "one" / "last.pt"}


def _node(finetune, name: str, dist: dict, with_init: bool) -> Path:
    """A node's own folder: the prepared data (dvc pull) and, on the node that runs dvc, the init."""
    node = finetune["root"] / name
    shutil.copytree(finetune["data"], node / "data")
    if with_init:
        (node / "models" / "train").mkdir(parents=True)
        shutil.copy(finetune["init"], node / "models" / "train" / "best.pt")
    write_params(node / "params.yaml", train=DETERMINISTIC, **{PHASE: FINETUNE}, dist={**GLOO, **dist})
    return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(finetune):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1 as two
    nodes with their own folders. The joining node starts first, so c10d (which orders the nodes
    by host name, then agent pid) would make it rank 0; the node that runs dvc must get rank 0."""
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}"}
    main = _node(finetune, "node-dvc", dist, with_init=True)
    other = _node(finetune, "node-other", dist, with_init=False)  # never holds the init checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    joiner = subprocess.Popen([*LAUNCH, "--joining", *NODE_ARGS], cwd=other, **popen)
    agent = subprocess.Popen([*LAUNCH, *NODE_ARGS], cwd=main, **popen)
    out = {"main": agent.communicate(timeout=300)[0], "other": joiner.communicate(timeout=300)[0]}
    assert agent.returncode == 0 and joiner.returncode == 0, out["main"][-3000:] + out["other"][-3000:]
    return {"main": main, "other": other, "log": out, "pids": (agent.pid, joiner.pid)}


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_two_nodes_match_one_process_with_the_same_global_batch(finetune, two_nodes):
    assert "rank 1/2 joined the gloo process group" in two_nodes["log"]["other"]
    ddp = _weights(two_nodes["main"] / "models" / PHASE / "last.pt")
    ref = _weights(finetune["one"])
    assert ddp["train_state"]["global_step"] == ref["train_state"]["global_step"] == 6  # 3 updates x 2
    for key, value in ref["model"].items():  # no EMA: the saved weights are the trained ones
        if value.is_floating_point():
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    assert [r["train/loss"] for r in ddp["history"]] == pytest.approx(
        [r["train/loss"] for r in ref["history"]]
    )


def test_the_node_that_runs_dvc_holds_rank_0_and_every_output(two_nodes):
    main, other = two_nodes["main"], two_nodes["other"]
    assert sorted(p.name for p in (main / "models" / PHASE).iterdir()) == ["best.pt", "last.pt"]
    assert (main / "dvclive" / PHASE / "metrics.json").is_file()
    assert not (other / "models").exists() and not (other / "dvclive").exists()  # it wrote nothing
    agent_pid, joiner_pid = two_nodes["pids"]
    if joiner_pid < agent_pid:  # c10d made the joiner rank 0: the ranks were renumbered
        assert "torchrun's rank 1 is rank 0" in two_nodes["log"]["main"]


def test_a_worker_killed_mid_epoch_is_restarted_and_the_phase_ends_as_if_uninterrupted(finetune, two_nodes):
    """torchrun --max-restarts (dist.max_restarts): one of two gloo workers is SIGKILLed during
    epoch 2; the agent restarts both, they resume from epoch 1's last.pt and finish the phase."""
    node = _node(finetune, "node-elastic", {"nproc_per_node": 2, "max_restarts": 1}, with_init=True)
    pause = node / "pause"
    pause.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRODUCTS10K_PAUSE_AT": "train epoch 2",
           "PRODUCTS10K_PAUSE_DIR": str(pause)}  # fmt: skip
    agent = subprocess.Popen(
        [*LAUNCH, *NODE_ARGS], cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pids = pause / "pids"
    deadline = time.monotonic() + 240
    while not (pids.exists() and len(pids.read_text().split()) == 2):  # both ranks inside epoch 2
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(int(pids.read_text().split()[1]), signal.SIGKILL)
    (pause / "released").touch()  # the restarted workers go through
    log = agent.communicate(timeout=300)[0]
    (pause / "log.txt").write_text(log)
    assert agent.returncode == 0, log[-3000:]
    assert f"resuming {PHASE}@m0" in log and "after epoch 1" in log

    resumed = _weights(node / "models" / PHASE / "last.pt")
    uninterrupted = _weights(two_nodes["main"] / "models" / PHASE / "last.pt")
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert resumed["train_state"]["global_step"] == uninterrupted["train_state"]["global_step"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
