"""DDP set-up for ``torchrun``: NCCL on CUDA, gloo on CPU; a plain ``python`` run is world size 1.

torchrun exports RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; without them the
script runs single-process with no process group, so the same code serves a laptop and 8 GPUs.

Rank 0 alone writes files (checkpoints, DVCLive, the evaluate and index outputs), so on several
nodes it must run on the node whose DVC workspace records the stage. torchrun's c10d rendezvous
numbers the nodes in an order of its own (host name, then agent pid), so the launcher marks that
node's processes (``OUTPUT_NODE_ENV``, products10k.dist.launch) and :func:`init_distributed`
renumbers the ranks to put them first. The other nodes read nothing rank 0 has not sent them: the
initial weights and the resume state are broadcast (:func:`broadcast_object`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from products10k.common import ConfigError
from products10k.config import DistConfig
from products10k.dist.devices import configure_cuda, ddp_backend, host_cores
from products10k.dist.launch import OUTPUT_NODE_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


@contextmanager
def process_group(cfg: DistConfig, params: dict, where: str) -> Iterator[DistInfo]:
    """Every stage's distributed mode (train, evaluate, index): join the torchrun process group if
    torchrun started this process (one process otherwise), check that every rank read the same
    ``params`` (the stage's whole params, read once by the stage script from ``where``), and leave
    the group on every path, errors included."""
    info = init_distributed(cfg)
    try:
        check_same_params(params, info, where)
        yield info
    finally:
        cleanup(info)


def init_distributed(cfg: DistConfig) -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        _check_gpu_count(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        configure_cuda(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = ddp_backend(cfg.backend, cuda)
        options = dict(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
        global _TIMEOUT
        _TIMEOUT = options["timeout"]  # the gloo side group under NCCL waits as long (_host_group)
        rank = _join_process_group(rank, world, options)
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        # ranks share the cores: oversubscribing threads makes every rank slower
        torch.set_num_threads(host_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return DistInfo(rank=rank, local_rank=local_rank, world=world, device=device)


def _check_gpu_count(local_rank: int, gpus: int) -> None:
    """One GPU per process: more processes on a node than its visible GPUs is a params error (CUDA
    would say "invalid device ordinal")."""
    if local_rank >= gpus:
        raise ConfigError(
            f"params.yaml: dist.nproc_per_node starts process {local_rank} on a node with {gpus} visible "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one "
            "process per GPU, so set dist.nproc_per_node to at most the GPU count"
        )


#: the TCPStore of torchrun's rendezvous (env://), kept for the life of the process: the process
#: that hosts it must not drop it while the others still use it (a regrouping makes a new group on it)
_STORE = None


def _join_process_group(rank: int, world: int, options: dict) -> int:
    """Join the process group, the output node's processes first; return this process's rank.

    torchrun's ranks stand unless the launcher marked the node that holds the DVC workspace
    (``OUTPUT_NODE_ENV``) and c10d put another node first: then the group is made again on the same
    store, with the ranks rotated so that the marked node's come first (see the module docstring).
    """
    global _STORE
    _STORE, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=options["timeout"]))
    group_store = dist.PrefixStore("products10k/torchrun", _STORE)
    dist.init_process_group(store=group_store, rank=rank, world_size=world, **options)
    marks: list = [None] * world
    dist.all_gather_object(marks, os.environ.get(OUTPUT_NODE_ENV) == "1", group=_host_group())
    marked = [r for r, m in enumerate(marks) if m]
    if not marked:  # started by hand (torchrun ...), not by the launcher: torchrun's order stands
        return rank
    first, local = marked[0], int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if marked != list(range(first, first + local)):
        raise ConfigError(
            f"ranks {marked} were all started as the output node: start one node with the DVC stage "
            "(dvc repro / dvc exp run) and every other node with "
            "`python -m products10k.dist.launch --join <stage>`"
        )
    if first == 0:
        return rank
    # torchrun gives each node a contiguous block of ranks: a rotation keeps every block whole
    new_rank = (rank - first) % world
    cleanup(DistInfo(world=world))
    group_store = dist.PrefixStore("products10k/output-node-first", _STORE)
    dist.init_process_group(store=group_store, rank=new_rank, world_size=world, **options)
    log.info("torchrun's rank %d is rank %d: the output node's processes come first", rank, new_rank)
    return new_rank


def check_same_params(params: dict, info: DistInfo, where: str) -> None:
    """Fail on every rank, naming the key, when the ranks read different params.

    A joining node reads its own ``params.yaml``; one that differs (a ``dvc exp run -S`` applied on
    the first node only) would train another model on each node while DDP averages their gradients,
    or hang at a collective the others never reach.
    """
    if not info.enabled:
        return
    flat = _flatten(params)
    every: list = [None] * info.world
    dist.all_gather_object(every, flat, group=_host_group())
    for rank, theirs in enumerate(every):
        # from the gathered dicts only, never this rank's own: every rank must reach the same verdict,
        # or the ones that pass wait at the next collective for the ones that raised
        keys = sorted(set(every[0]) | set(theirs), key=str)
        differ = [k for k in keys if every[0].get(k, "<unset>") != theirs.get(k, "<unset>")]
        if differ:
            key = differ[0]
            raise ConfigError(
                f"{where}: rank {rank} reads {key}={theirs.get(key, '<unset>')!r}, rank 0 "
                f"{every[0].get(key, '<unset>')!r} ({len(differ)} key(s) differ): every node needs the "
                "same params.yaml (copy it from the node that runs dvc)"
            )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (a picklable object through host memory); as is single-process."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_host_group())
    return box[0]


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over ranks (a no-op single-process)."""
    if not info.enabled:
        return list(values)
    backend = dist.get_backend()
    device = info.device if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shard_bounds(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Every rank's rows ``[start, stop)`` for inference: contiguous runs of whole batches.

    Each rank then forms exactly the batches one process would (same rows, same batch shape), so
    its arithmetic is the single process's and the merged outputs can equal it byte for byte.
    Ranks past the last batch get an empty range.
    """
    batches = -(-n // batch_size)
    edges = [min(n, (r * batches // world) * batch_size) for r in range(world + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def shard_of(n: int, batch_size: int, info: DistInfo) -> slice:
    """This rank's rows of ``n`` (:func:`shard_bounds`); all of them in a single process."""
    start, stop = shard_bounds(n, batch_size, info.world)[info.rank]
    return slice(start, stop)


def gather_rows(arrays: dict[str, np.ndarray], n: int, batch_size: int, info: DistInfo):
    """Rank 0: each array's rows from every rank's shard, in row order; other ranks: None.

    ``arrays`` holds this rank's rows of ``n`` (sharded by :func:`shard_of` with ``batch_size``),
    same keys, dtypes and trailing shapes on every rank (an empty shard sends (0, ...) arrays).
    Rank 0 preallocates each (n, ...) array and receives every shard straight into its rows, so
    a 142k x 1,536 gallery is held once, not once per rank plus a concatenated copy. Point-to-point
    over gloo on the host (a gloo group beside NCCL on GPUs): the arrays live in host memory.
    """
    if not info.enabled:
        return arrays
    bounds = shard_bounds(n, batch_size, info.world)
    group = _host_group()
    if not info.is_main:
        for key in sorted(arrays):
            if len(arrays[key]):
                dist.send(torch.from_numpy(np.ascontiguousarray(arrays[key])), dst=0, group=group)
        return None
    merged = {}
    for key in sorted(arrays):
        mine = arrays[key]
        out = np.empty((n, *mine.shape[1:]), dtype=mine.dtype)
        for rank, (start, stop) in enumerate(bounds):
            if rank == 0:
                out[start:stop] = mine
            elif stop > start:
                dist.recv(torch.from_numpy(out[start:stop]), src=rank, group=group)
        merged[key] = out
    return merged


_HOST_GROUP = None
_TIMEOUT: datetime.timedelta | None = None  # dist.timeout_s of the process group


def _host_group():
    """The process group for host (CPU) tensors: the default one under gloo, a gloo one beside NCCL."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        # dist.timeout_s, as the default group: without it gloo waits its own 30 minutes for a dead peer
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return _HOST_GROUP


def cleanup(info: DistInfo) -> None:
    global _HOST_GROUP
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None
