"""How the training stages start: ``torchrun`` when several processes are asked for, else plain Python.

    python -m products10k.training.launch --nproc-per-node N stages/train.py --phase train ...

dvc.yaml's training commands go through this with ``dist.nproc_per_node``. With N > 1 it becomes
``torchrun --standalone --nproc_per_node=N`` (DDP, one process per GPU or, on a CPU, per gloo rank);
with N = 1 the script runs in this very process (``exec``): torchrun's agent and its second
interpreter cost ~3 s of start-up per stage for nothing there, which adds up over the three phases,
every DVC experiment and every test run. The script reads ``WORLD_SIZE`` / ``RANK`` from torchrun
when present and is a single process without them (products10k.training.distributed).
"""

from __future__ import annotations

import argparse
import os
import sys


def command(nproc_per_node: int, script: str, args: list[str]) -> list[str]:
    """The argv that runs ``script`` with ``args`` on ``nproc_per_node`` processes."""
    if nproc_per_node < 1:
        raise SystemExit(f"--nproc-per-node must be >= 1 (dist.nproc_per_node), got {nproc_per_node}")
    if nproc_per_node == 1:
        return [sys.executable, script, *args]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
    ]
    return [*torchrun, script, *args]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m products10k.training.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    argv = command(ns.nproc_per_node, ns.script, ns.args)
    sys.stdout.flush()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
