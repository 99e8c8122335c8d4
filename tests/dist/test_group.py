"""DDP through torchrun, 2 CPU processes (gloo) training the real phase: as two nodes meeting at a
c10d rendezvous, compared with one process with the same global batch, and with a worker killed
mid-epoch under torchrun's restarts, compared with the uninterrupted run. (That each rank gets its
own samples is tests/training/test_data.py's; here a wrong split would change the weights.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from products10k.training.loop import PhasePaths
from tests.helpers import ROOT, free_port, make_training_data, train_phase, write_params

# A finetune from an init checkpoint. Deterministic inputs (square images, no flip, resize = crop)
# and eval-mode BatchNorm take the per-rank batch statistics and augmentation streams out: 2 ranks
# x micro-batch 4 then take the same optimizer steps as 1 process x 2 accumulated micro-batches of
# 4, the short last update (20 images = 8 + 8 + 4) included.
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
LAUNCH = [sys.executable, "-m", "products10k.dist.launch", "--params", "params.yaml"]


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """The data, an init checkpoint (one single-process epoch) and the finetune of it by one process
    with the same global batch: the reference for the distributed runs."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_training_data(root / "data", num_classes=4, train_per_class=5, val_per_class=2, size=(32, 32))
    params = write_params(root / "one.yaml", train=DETERMINISTIC, **{PHASE: FINETUNE})
    paths = PhasePaths(data / "train.csv", data / "val.csv", data / "label_map.csv", data, root / "train")
    train_phase(params, "train", "m0", paths)
    init = root / "train" / "best.pt"
    params = write_params(
        root / "one.yaml", train={**DETERMINISTIC, "grad_accum": 2}, **{PHASE: FINETUNE}, dist=GLOO
    )
    paths = PhasePaths(
        data / "train.csv", data / "val.csv", data / "label_map.csv", data, root / "one", init=init
    )
    train_phase(params, PHASE, "m0", paths)
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


@pytest.fixture(scope="module")
def two_nodes(finetune):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1 as two
    nodes with their own folders. The joining node starts first, so c10d (which orders the nodes
    by host name, then agent pid) would make it rank 0; the node that runs dvc must get rank 0."""
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
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
    assert not any(k.startswith("module.") for k in ddp["model"])  # the raw model's, not DDP's wrapper
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
    metrics = json.loads((main / "dvclive" / PHASE / "metrics.json").read_text())
    assert metrics["step"] == 1 and 0.0 <= metrics["val"]["top1"] <= 1.0  # rank 0's DVCLive, 2 epochs
    assert not (other / "models").exists() and not (other / "dvclive").exists()  # it wrote nothing
    agent_pid, joiner_pid = two_nodes["pids"]
    if joiner_pid < agent_pid:  # c10d made the joiner rank 0: the ranks were renumbered
        assert "torchrun's rank 1 is rank 0" in two_nodes["log"]["main"]


def _pause_env(pause: Path) -> dict:
    """Every worker stops at epoch 2's pause point until ``pause/released`` exists (common.pause_point)."""
    pause.mkdir()
    return {**os.environ, "OMP_NUM_THREADS": "1", "PRODUCTS10K_PAUSE_AT": "train epoch 2",
            "PRODUCTS10K_PAUSE_DIR": str(pause)}  # fmt: skip


def _kill_a_worker_in_epoch_2(pause: Path, agents: list, cwd: Path) -> None:
    """When both workers are inside epoch 2, SIGKILL the one running in ``cwd``; then let the rest
    (and the workers torchrun restarts) go through."""
    pids, deadline = pause / "pids", time.monotonic() + 240
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        for agent in agents:
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][-3000:]
        time.sleep(0.2)
    victim = [pid for pid in pids.read_text().split() if Path(f"/proc/{pid}/cwd").resolve() == cwd.resolve()]
    os.kill(int(victim[-1]), signal.SIGKILL)
    (pause / "released").touch()


def _assert_resumed_as_uninterrupted(node: Path, log: str, two_nodes) -> None:
    assert f"resuming {PHASE}@m0" in log and "after epoch 1" in log, log[-3000:]
    resumed = _weights(node / "models" / PHASE / "last.pt")
    uninterrupted = _weights(two_nodes["main"] / "models" / PHASE / "last.pt")
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert resumed["train_state"]["global_step"] == uninterrupted["train_state"]["global_step"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_a_worker_killed_mid_epoch_is_restarted_and_the_phase_ends_as_if_uninterrupted(finetune, two_nodes):
    """torchrun --max-restarts (dist.max_restarts): one of two gloo workers is SIGKILLed during
    epoch 2; the agent restarts both, they resume from epoch 1's last.pt and finish the phase."""
    node = _node(finetune, "node-elastic", {"nproc_per_node": 2, "max_restarts": 1}, with_init=True)
    env = _pause_env(node / "pause")
    agent = subprocess.Popen(
        [*LAUNCH, *NODE_ARGS], cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _kill_a_worker_in_epoch_2(node / "pause", [agent], node)
    log = agent.communicate(timeout=300)[0]
    assert agent.returncode == 0, log[-3000:]
    _assert_resumed_as_uninterrupted(node, log, two_nodes)


def test_a_node_losing_its_worker_rejoins_and_the_phase_ends_as_if_uninterrupted(finetune, two_nodes):
    """The same across two c10d nodes: the joining node's worker is SIGKILLed in epoch 2; its agent
    opens a new rendezvous round, the DVC node's agent joins it, the ranks are renumbered again and
    the joiner, which never holds a checkpoint, resumes from the last.pt rank 0 broadcasts."""
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "max_restarts": 1}
    main = _node(finetune, "elastic-dvc", dist, with_init=True)
    other = _node(finetune, "elastic-other", dist, with_init=False)
    env = _pause_env(finetune["root"] / "elastic-pause")
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    joiner = subprocess.Popen([*LAUNCH, "--joining", *NODE_ARGS], cwd=other, **popen)
    agent = subprocess.Popen([*LAUNCH, *NODE_ARGS], cwd=main, **popen)
    _kill_a_worker_in_epoch_2(finetune["root"] / "elastic-pause", [agent, joiner], other)
    log = agent.communicate(timeout=300)[0]
    other_log = joiner.communicate(timeout=300)[0]
    assert agent.returncode == 0 and joiner.returncode == 0, log[-3000:] + other_log[-3000:]
    _assert_resumed_as_uninterrupted(main, log, two_nodes)
    assert not (other / "models").exists()  # the joiner still wrote nothing


def test_nodes_that_read_different_params_both_fail_naming_the_key(finetune):
    """A joining node whose params.yaml differs (a `dvc exp run -S` applied on the first node only)
    would train another model under the same DDP gradients: every rank stops, naming the key."""
    dist = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    main = _node(finetune, "differ-dvc", dist, with_init=True)
    other = _node(finetune, "differ-other", dist, with_init=False)
    write_params(
        other / "params.yaml", train=DETERMINISTIC, **{PHASE: {**FINETUNE, "lr": 0.01}}, dist={**GLOO, **dist}
    )
    popen = dict(env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    joiner = subprocess.Popen([*LAUNCH, "--joining", *NODE_ARGS], cwd=other, text=True, **popen)
    agent = subprocess.Popen([*LAUNCH, *NODE_ARGS], cwd=main, text=True, **popen)
    logs = [agent.communicate(timeout=300)[0], joiner.communicate(timeout=300)[0]]
    assert agent.returncode != 0 and joiner.returncode != 0
    for log in logs:
        assert f"{PHASE}.lr=0.01" in log and "same params.yaml" in log, log[-3000:]
    assert not (main / "models" / PHASE).exists()  # nothing trained, nothing written


def test_every_rank_reaches_the_same_verdict_on_params_even_a_key_only_rank_0_has(monkeypatch):
    """check_same_params decides from the gathered dicts alone: a rank that lacks a key rank 0 has
    raises too, instead of going on to a collective the others never reach."""
    from products10k.common import ConfigError
    from products10k.dist import group as distributed

    every = [{"train": {"lr": 0.1, "ema": True}}, {"train": {"lr": 0.1}}]

    def gather(out, obj, group=None):  # what all_gather_object hands each rank: everybody's params
        out[:] = [distributed._flatten(p) for p in every]

    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    monkeypatch.setattr(distributed, "_host_group", lambda: None)
    for rank, params in enumerate(every):
        info = distributed.DistInfo(rank=rank, world=2)
        with pytest.raises(ConfigError, match=r"rank 1 reads train\.ema='<unset>', rank 0 True"):
            distributed.check_same_params(params, info, "params.yaml")


def test_the_gloo_side_group_under_nccl_waits_dist_timeout_s(monkeypatch):
    """evaluate and index gather host arrays over a gloo group beside NCCL: it must give up on a dead
    peer after dist.timeout_s like the default group, not after gloo's own 30 minutes."""
    import datetime

    from products10k.dist import group as distributed
    from tests.helpers import config

    threads = torch.get_num_threads()
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "_join_process_group", lambda rank, world, options: rank)
    made = {}
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: made.update(kw) or "gloo-group")
    try:
        distributed.init_distributed(config("dist", timeout_s=12, backend="gloo"))
        assert distributed._host_group() == "gloo-group"
        assert made == {"backend": "gloo", "timeout": datetime.timedelta(seconds=12)}
    finally:
        distributed._HOST_GROUP = None
        torch.set_num_threads(threads)


def _one_process_and_two_ranks(root: Path, data: Path, rows: Path, train: dict, **sections) -> None:
    """The ``train`` phase on ``rows``' train.csv and val.csv, trained in one process with
    grad_accum 2 (into ``root/one``) and through the launcher with 2 gloo ranks (into ``root/two``):
    the same global batch."""
    one = write_params(root / "one.yaml", train={**train, "grad_accum": 2}, dist=GLOO, **sections)
    paths = PhasePaths(rows / "train.csv", rows / "val.csv", data / "label_map.csv", data, root / "one")
    train_phase(one, "train", "m0", paths)
    write_params(root / "params.yaml", train=train, dist={**GLOO, "nproc_per_node": 2}, **sections)
    rel = rows.relative_to(root)
    args = [
        str(ROOT / "stages" / "train.py"), "--phase", "train", "--member", "m0", "--params", "params.yaml",
        "--train-csv", f"{rel}/train.csv", "--val-csv", f"{rel}/val.csv", "--label-map", "data/label_map.csv",
        "--images", "data", "--out", "two",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*LAUNCH, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _assert_same_weights(ref: dict, ddp: dict) -> None:
    for key, value in ref["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)


def test_folds_under_torchrun_train_what_one_process_trains(tmp_path):
    """cv.folds: 2 through the launcher with 2 gloo ranks: each fold's model and the refit end as one
    process with the same global batch ends (the fold loop runs in step on every rank)."""
    from products10k.folds import write_folds

    data = make_training_data(
        tmp_path / "data", num_classes=4, train_per_class=5, val_per_class=2, size=(32, 32)
    )
    folds = tmp_path / "folds"
    write_folds(data / "train.csv", data / "val.csv", folds / "train.csv", folds / "val.csv", 2, 0)
    _one_process_and_two_ranks(tmp_path, data, folds, DETERMINISTIC, cv={"folds": 2, "seed": 0})
    for sub in ("fold0", "fold1", "."):
        ref, ddp = _weights(tmp_path / "one" / sub / "last.pt"), _weights(tmp_path / "two" / sub / "last.pt")
        assert ddp["train_state"]["global_step"] == ref["train_state"]["global_step"] > 0
        _assert_same_weights(ref, ddp)


def test_metric_loss_on_pk_batches_under_torchrun_trains_what_one_process_trains(tmp_path):
    """train.sampler pk + metric_loss_weight with 2 gloo ranks: each rank's micro-batch is the one
    a single process with grad_accum 2 sees, so the batch-wise contrastive loss, its gradient
    through DDP's forward and the weights end the same."""
    data = make_training_data(
        tmp_path / "data", num_classes=4, train_per_class=5, val_per_class=2, size=(32, 32)
    )
    pk = {**DETERMINISTIC, "sampler": "pk", "pk_images": 2, "metric_loss_weight": 1.0, "drop_last": True}
    _one_process_and_two_ranks(tmp_path, data, data, pk)
    ref, ddp = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    # 16 of 20 draws: 2 updates of 8
    assert ddp["train_state"]["global_step"] == ref["train_state"]["global_step"] == 2
    _assert_same_weights(ref, ddp)
    losses = [r["train/loss"] for r in ref["history"]]
    assert [r["train/loss"] for r in ddp["history"]] == pytest.approx(losses)
