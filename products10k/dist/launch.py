"""How the pipeline's torch stages start: plain Python, or torchrun on one node or several.

    python -m products10k.dist.launch --params params.yaml stages/train.py --phase train ...
    python -m products10k.dist.launch --params params.yaml --single-node stages/evaluate.py ...
    python -m products10k.dist.launch --join train@m0 finetune_balanced@m0 ...  # other nodes

dvc.yaml starts train, the finetunes, evaluate and index through this; it reads ``dist`` from
``--params``:

- ``nnodes: 1`` and ``nproc_per_node: 1`` and no restarts: the script runs in this very process
  (``exec``). torchrun's agent and a second interpreter cost ~3 s of start-up per stage for
  nothing there, which adds up over the three phases, every DVC experiment and every test run.
- one node, several processes: ``torchrun --standalone --nproc_per_node=N`` (DDP: one process
  per GPU, or gloo ranks on a CPU), with ``--max-restarts`` when ``dist.max_restarts`` > 0.
- ``nnodes > 1``: ``torchrun --nnodes --rdzv-backend=c10d --rdzv-endpoint --rdzv-id
  --max-restarts`` on this node. The node running ``dvc repro`` / ``dvc exp run`` hosts the
  rendezvous (``dist.rdzv_endpoint`` is its address) and its processes become ranks 0.. (rank 0
  writes the outputs there, products10k.dist.group). Every other node runs
  ``--join <stage> ...``: the same stage commands, read from dvc.yaml, one after another, in the
  same commit with the same params and the prepared data pulled (``dvc pull data/prepared``).

``--single-node`` (evaluate, index): the ranks of this node only, whatever ``dist.nnodes`` says;
inference is sharded over its GPUs, never over nodes. ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

# products10k.common and .config are imported where they are needed: in the one-process case
# (the default, every stage of a laptop run) pydantic and NumPy would double the launcher's 0.2 s
MODULE = "products10k.dist.launch"
#: set to 1 on the node that holds the DVC workspace: its processes become ranks 0.. and write
#: the outputs (products10k.dist.group). Here, not there: the launcher imports no torch.
OUTPUT_NODE_ENV = "PRODUCTS10K_OUTPUT_NODE"
#: A fresh store for the workers of every rendezvous round. torchrun's default shares the
#: rendezvous store with them across restarts, and a restarted worker can then read the address
#: of a dead one from the round before (pytorch/pytorch#135712, #167288): measured here, 3 of 5
#: restarts of 2 gloo workers failed with "connectFullMesh ... Connection refused".
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def command(
    cfg,
    script: str,
    args: list[str],
    *,
    single_node: bool = False,
    joining: bool = False,
    where: str = "params",
) -> tuple[list[str], dict[str, str]]:
    """The argv that runs ``script`` with ``args`` as ``cfg`` (a DistConfig, read from ``where``)
    asks, and the environment it adds."""
    from products10k.common import ConfigError

    if single_node or cfg.nnodes == 1:
        restarts = 0 if single_node else cfg.max_restarts
        if cfg.nproc_per_node == 1 and restarts == 0:
            return [sys.executable, script, *args], {}
        run = [*_torchrun(), "--standalone", f"--nproc_per_node={cfg.nproc_per_node}"]
        if restarts:
            run.append(f"--max-restarts={restarts}")
        return [*run, script, *args], dict(TORCHRUN_ENV)
    if not cfg.rdzv_endpoint:
        raise ConfigError(
            f"{where}: dist.nnodes is {cfg.nnodes} but dist.rdzv_endpoint is not set: set it to HOST:PORT of "
            "the node that runs dvc (e.g. node0.cluster:29400), reachable from every node"
        )
    run_id = cfg.rdzv_id or _run_id(script, args)
    run = [
        *_torchrun(),
        f"--nnodes={cfg.nnodes}",
        f"--nproc_per_node={cfg.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={cfg.rdzv_endpoint}",
        f"--rdzv-id={run_id}",
        # The node that runs dvc hosts the rendezvous store, the others only connect to it (never
        # c10d's guess from host names, which a DNS alias defeats). Both wait up to dist.timeout_s:
        # join_timeout for the missing nodes, read_timeout for the store (c10d's default, 60 s,
        # would fail a node that joins 2 minutes before the node that runs dvc gets to the phase).
        f"--rdzv-conf=join_timeout={cfg.timeout_s},read_timeout={cfg.timeout_s},"
        f"is_host={'false' if joining else 'true'}",
        f"--max-restarts={cfg.max_restarts}",
    ]
    return [*run, script, *args], {**TORCHRUN_ENV, **({} if joining else {OUTPUT_NODE_ENV: "1"})}


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _run_id(script: str, args: list[str]) -> str:
    """The same on every node (they run the same stage command), different between stages."""
    return "products10k-" + hashlib.sha256(shlex.join([script, *args]).encode()).hexdigest()[:12]


def stage_argv(stage: str, repo: str | Path = ".") -> list[str]:
    """The launcher arguments of a dvc.yaml stage's command (``train@m0`` -> ``--params ...``)."""
    from products10k.common import ConfigError, Products10kError

    try:
        from dvc.repo import Repo  # DVC resolves foreach/matrix stages and ${} in their commands
    except ImportError as exc:  # the light runtime install has no dvc
        raise Products10kError("--join needs dvc: pip install products10k[pipeline]") from exc
    try:
        with Repo(str(repo)) as dvc_repo:
            stages = dvc_repo.stage.collect(stage)
    except Exception as exc:  # DVC's own errors name the stage, the file or the missing repo
        raise ConfigError(f"--join {stage}: {exc}") from exc
    if len(stages) != 1:  # a foreach group's name (train) stands for all its stages (train@m0, ...)
        names = ", ".join(s.addressing for s in stages)
        raise ConfigError(f"--join {stage}: that is {len(stages)} stages ({names}): name each in dvc's order")
    argv = shlex.split(stages[0].cmd)
    if argv[:3] != ["python", "-m", MODULE]:
        raise ConfigError(f"--join {stage}: its command is not `python -m {MODULE} ...`: {stages[0].cmd}")
    return argv[3:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--params", type=Path, help="params.yaml: its dist section")
    p.add_argument("--single-node", action="store_true", help="this node's processes only (inference)")
    p.add_argument("--join", metavar="STAGE", nargs="+",
                   help="join these stages' runs (in turn) started on the node that runs dvc")  # fmt: skip
    p.add_argument("--joining", action="store_true", help=argparse.SUPPRESS)  # what --join runs
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("script", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    if ns.join and len(ns.join) > 1:  # one phase after another, as dvc runs them on the first node
        for stage in ns.join:
            extra = ["--dry-run"] if ns.dry_run else []
            sys.stdout.flush()
            done = subprocess.run([sys.executable, "-m", MODULE, "--join", stage, *extra], check=False)
            if done.returncode:
                sys.exit(f"error: --join {stage} failed (exit status {done.returncode})")
        return
    if not ns.join and ns.script and ns.params and _one_process(ns.params):
        _run([sys.executable, ns.script, *ns.args], {}, ns.dry_run)
        return
    from products10k.common import ConfigError, Products10kError
    from products10k.config import DistConfig, load_yaml, section

    stage = ns.join[0] if ns.join else None
    try:
        if stage:
            extra = ["--dry-run"] if ns.dry_run else []
            ns = parse_args(["--joining", *extra, *stage_argv(stage)])
        if ns.params is None or ns.script is None:
            raise ConfigError("give --params PARAMS SCRIPT [ARGS...] or --join STAGE")
        cfg = section(load_yaml(ns.params), "dist", DistConfig, where=ns.params)
        if ns.joining and (ns.single_node or cfg.nnodes == 1):
            raise ConfigError(
                f"--join {stage}: this stage runs on one node ({ns.params}: dist.nnodes is "
                f"{cfg.nnodes}{'; inference never spans nodes' if ns.single_node else ''}): nothing to join"
            )
        run, env = command(
            cfg, ns.script, ns.args, single_node=ns.single_node, joining=ns.joining, where=str(ns.params)
        )
    except Products10kError as exc:
        sys.exit(f"error: {exc}")
    _run(run, env, ns.dry_run)


def _one_process(params: Path) -> bool:
    """Whether ``dist`` plainly asks for one process on one node, without restarts: the default,
    decided from the YAML alone. Anything else, or anything odd, takes the validated path (and the
    stage script validates ``dist`` again either way)."""
    try:
        dist = (yaml.safe_load(params.read_text()) or {}).get("dist")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    if not isinstance(dist, dict):
        return False
    one = {"nproc_per_node": 1, "nnodes": 1, "max_restarts": 0}
    return all(type(dist.get(key)) is int and dist[key] == value for key, value in one.items())


def _run(run: list[str], env: dict[str, str], dry_run: bool) -> None:
    if dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(run), sep=" " if env else "")
        return
    sys.stdout.flush()
    os.execve(run[0], run, {**os.environ, **env})


if __name__ == "__main__":
    main()
