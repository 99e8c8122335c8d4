"""One training phase (train / finetune_balanced / finetune_accuracy), single-process or DDP.

``run_phase`` is what ``stages/train.py`` calls and reads as the phase does: build the state
(data, model, optimizer, resume point), then per epoch ``train_one_epoch``, ``validate`` and, on
rank 0, ``best.pt`` / ``last.pt`` written atomically and the epoch logged with DVCLive.
``best.pt`` is the phase's output, the weights the next phase and evaluation read: the epoch with
the best val top-1 (``checkpoint: best``) or the final epoch (``checkpoint: last``).

Determinism and resume: every random stream of an epoch (sampler order, DataLoader worker
seeds, albumentations' own generator, dropout) is re-seeded from ``(seed, epoch, rank)`` at the
start of the epoch, so a run resumed from ``last.pt`` (end of the last complete epoch) follows
the same path as an uninterrupted one. ``last.pt`` carries the optimizer/scheduler/scaler/EMA
state and a fingerprint of the settings; a checkpoint made with other settings is not resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from products10k.common import (
    ConfigError,
    Products10kError,
    file_sha256,
    pause_point,
    save_torch,
    seed_everything,
)
from products10k.config import (
    DistConfig,
    EvaluateConfig,
    ModelConfig,
    PhaseConfig,
    load_yaml,
    member_params,
    phase_config,
    section,
)
from products10k.estimate import val_weights
from products10k.prepared.contract import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.training import checkpoint as ckpt_lib
from products10k.training.data import ClassBalancedSampler, EpochSampler, PreparedImageDataset
from products10k.training.devices import amp_dtype, host_transfer, needs_grad_scaler
from products10k.training.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_object,
    check_same_params,
    cleanup,
    init_distributed,
)
from products10k.training.losses import PhaseLoss, log_prior
from products10k.training.model import create_model, input_normalization, model_config_dict
from products10k.training.optim import create_scheduler, current_lr
from products10k.training.transforms import eval_transform, resolve_resize, train_transform

log = logging.getLogger(__name__)

#: settings that may change between a kill and a resume without changing the result. Not
#: num_workers: each DataLoader worker draws its own augmentation stream (seeded from the epoch's
#: generator and its worker id; none = the main process's), so another count augments otherwise.
RESUME_SAFE_KEYS = ("compile", "eval_batch_size")
#: progress-bar refresh, in steps: reading the running loss is a host-device sync
BAR_EVERY = 50
#: part of the resume fingerprint: a last.pt whose optimizer state is laid out otherwise (the
#: parameter groups before timm's create_optimizer_v2) is not resumed
OPTIMIZER_LAYOUT = "timm-v2"


@dataclass(frozen=True)
class PhasePaths:
    """Every file a phase reads or writes (all from the stage's command line)."""

    train_csv: Path
    val_csv: Path
    label_map: Path
    images: Path
    out: Path
    live: Path | None = None
    init: Path | None = None  # checkpoint to start from (finetune phases)


@dataclass
class Callbacks:
    """Observers of a running phase; the stage passes none, tests watch the phase through them."""

    on_batch: Callable[[PhaseState, torch.Tensor, torch.Tensor], None] | None = None  # index, weight
    on_epoch_end: Callable[[PhaseState, int], None] | None = None  # after epoch (0-based)
    on_end: Callable[[PhaseState], None] | None = None


@dataclass
class PhaseState:
    """Everything one rank holds while it trains a phase; built by :func:`build_state`."""

    phase: str
    member: str
    paths: PhasePaths
    cfg: PhaseConfig
    model_cfg: ModelConfig
    info: DistInfo
    label_map: pd.DataFrame
    normalize: dict  # the backbone's input normalisation (timm's pretrained config), kept in checkpoints
    resize: int
    micro_batch: int  # per rank and forward pass: batch_size / (world x grad_accum)
    # computed once: len(sampler) shards the whole epoch's order (O(images)), too slow per step
    batches_per_epoch: int
    amp_dtype: torch.dtype | None
    non_blocking: bool  # asynchronous host-to-device copies (CUDA only)
    train_ds: PreparedImageDataset
    val_ds: PreparedImageDataset
    train_sampler: EpochSampler | ClassBalancedSampler
    val_sampler: EpochSampler
    raw: nn.Module  # the model itself: what is saved, EMA'd and clipped
    model: nn.Module  # what runs forward: raw, DDP-wrapped and/or compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    criterion: PhaseLoss
    fingerprint: str
    # per val row: its weight in the val estimate of the test metric (products10k/estimate.py)
    val_weight: torch.Tensor
    global_step: int = 0
    best_top1: float = -1.0
    best_estimate: float = -1.0  # what checkpoint: best selects on
    history: list[dict] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """The SKU id of every label, in label order."""
        return [int(s) for s in self.label_map["sku"]]

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as ``model``: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.raw

    @property
    def name(self) -> str:
        return f"{self.phase}@{self.member}"


# --- the phase ---------------------------------------------------------------------------------


def run_phase(
    params_path: str | Path, phase: str, member: str, paths: PhasePaths, callbacks: Callbacks | None = None
) -> dict:
    """Train one phase of one ensemble member; see the module docstring."""
    callbacks = callbacks or Callbacks()
    where = str(params_path)
    params = member_params(load_yaml(params_path), member, where)
    dist_cfg = section(params, "dist", DistConfig, where)
    info = init_distributed(dist_cfg)
    try:  # the process group is closed on every path, errors included
        check_same_params(params, info, where)
        state = build_state(params, where, phase, member, paths, info, dist_cfg)
        start = resume(state)
        live = _Live(paths.live, info.is_main)
        for row in state.history:  # a resumed run's curves start at epoch 1, not at the resume
            live.log_epoch(row)
        _log_start(state)
        for epoch in range(start, state.cfg.epochs):
            # lr as the epoch starts (the schedule is stepped per update within the epoch)
            row = {"epoch": epoch + 1, "lr": current_lr(state.optimizer)}
            row.update(train_one_epoch(state, epoch, callbacks.on_batch))
            # checkpoint: last, or no val split (prepare.val_fraction: 0): best.pt = the last epoch
            improved = True
            if len(state.val_ds):
                row.update(validate(state))
                if state.cfg.checkpoint == "best":
                    # the best epoch by val's estimate of the test metric (val weighted to
                    # evaluate.target_prior), not by val top-1, which follows train's SKU mix
                    improved = row["val/estimate"] > state.best_estimate
                state.best_top1 = max(state.best_top1, row["val/top1"])
                state.best_estimate = max(state.best_estimate, row["val/estimate"])
                row["val/best_top1"] = state.best_top1
                row["val/best_estimate"] = state.best_estimate
            state.history.append(row)
            if info.is_main:
                save_epoch(state, epoch, row, improved)
                live.log_epoch(row)
                _log_epoch(state, epoch, row)
            if callbacks.on_epoch_end is not None:
                callbacks.on_epoch_end(state, epoch)
        if callbacks.on_end is not None:
            callbacks.on_end(state)
        live.end()
        return {"best_val_top1": state.best_top1, "history": state.history, "is_main": info.is_main}
    finally:
        cleanup(info)


# --- building the state ------------------------------------------------------------------------


def build_state(
    params: dict, where: str, phase: str, member: str, paths: PhasePaths, info: DistInfo, dist_cfg: DistConfig
) -> PhaseState:
    """Read the data, build the model, optimizer and schedule of ``phase`` on this rank."""
    cfg = phase_config(params, phase, where)
    model_cfg = section(params, "model", ModelConfig, where)
    if phase != "train" and paths.init is None:
        raise ConfigError(f"phase '{phase}' needs --init (the previous phase's best.pt)")
    per_step = info.world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"{where}: {phase}.batch_size={cfg.batch_size} is not divisible by "
            f"dist.nproc_per_node ({info.world}) x {phase}.grad_accum ({cfg.grad_accum})"
        )
    micro_batch = cfg.batch_size // per_step
    resize = resolve_resize(cfg.resolution, cfg.resize)
    normalize = input_normalization(model_cfg.arch)
    label_map = read_label_map(paths.label_map, LABEL_MAP_ALL_COLUMNS)
    target_spec = section(params, "evaluate", EvaluateConfig, where).target_prior
    train_df = read_prepared(paths.train_csv, label_map)
    val_df = read_prepared(paths.val_csv, label_map, allow_empty=True)
    train_ds = PreparedImageDataset(train_df, paths.images, train_transform(cfg, normalize), min_side=resize)
    val_tf = eval_transform(resize, cfg.resolution, normalize)
    val_ds = PreparedImageDataset(val_df, paths.images, val_tf, min_side=resize)
    val_weight = torch.as_tensor(val_weights(val_df["label"].to_numpy(), label_map, target_spec))
    batching = {"batch_size": micro_batch, "global_batch": cfg.batch_size if cfg.drop_last else None}
    if cfg.sampler == "class_balanced":
        train_sampler = ClassBalancedSampler(train_ds.labels, info.rank, info.world, cfg.seed, **batching)
    else:
        train_sampler = EpochSampler(len(train_ds), info.rank, info.world, True, cfg.seed, **batching)
    # eval mode uses running BN statistics: a 1-sample batch is fine there
    val_sampler = EpochSampler(len(val_ds), info.rank, info.world, shuffle=False)
    batches_per_epoch = math.ceil(len(train_sampler) / micro_batch)
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)

    raw = _initial_model(model_cfg, label_map, paths, cfg.seed, info)
    _prepare_head(raw, cfg, state_name=f"{member}/{phase}")
    if dist_cfg.sync_bn and info.enabled and info.device.type == "cuda":
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    raw.to(info.device)
    if cfg.channels_last:
        raw.to(memory_format=torch.channels_last)
    # timm's factory: no weight decay on biases, norm parameters and GeM's p (ndim <= 1)
    optimizer = create_optimizer_v2(
        raw, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    # timm's EMA warm-up: decay = min(ema_decay, 1 - (1 + step)^-2/3) counted from this phase's
    # start, so a 3-epoch finetune's EMA moves (a fixed 0.998 from step 0 would keep ~96% of the
    # initial weights over ~20 updates)
    ema = ModelEmaV3(raw, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    model: nn.Module = raw
    if info.enabled:
        model = DDP(raw, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    dtype = amp_dtype(cfg.amp, info.device)
    return PhaseState(
        phase=phase,
        member=member,
        paths=paths,
        cfg=cfg,
        model_cfg=model_cfg,
        info=info,
        label_map=label_map,
        normalize=normalize,
        resize=resize,
        micro_batch=micro_batch,
        batches_per_epoch=batches_per_epoch,
        amp_dtype=dtype,
        non_blocking=host_transfer(info.device)["non_blocking"],
        train_ds=train_ds,
        val_ds=val_ds,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        raw=raw,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg, updates_per_epoch),
        scaler=torch.amp.GradScaler(info.device.type, enabled=needs_grad_scaler(dtype)),
        criterion=_criterion(cfg, train_ds.labels, len(label_map), f"{member}/{phase}"),
        # rank 0 alone resumes and writes checkpoints: only its node need hold the input files
        fingerprint=fingerprint(phase, member, cfg, model_cfg, info.world, paths, target_spec)
        if info.is_main
        else "",
        val_weight=val_weight,
    )


def _initial_model(
    model_cfg: ModelConfig, label_map: pd.DataFrame, paths: PhasePaths, seed: int, info: DistInfo
) -> nn.Module:
    """A new model (ImageNet weights if configured) or, for a finetune, the previous phase's: read
    by rank 0 and broadcast, as another node need not hold the previous phase's checkpoint."""
    seed_everything(seed)  # identical initial weights on every rank
    if paths.init is None:
        return create_model(model_cfg, len(label_map))
    init = broadcast_object(ckpt_lib.read_checkpoint(paths.init) if info.is_main else None, info)
    meta = ckpt_lib.metadata(init)
    ckpt_lib.check_arch(meta, model_cfg.arch, paths.init)
    ckpt_lib.check_labels(meta, label_map, paths.init, paths.label_map)
    # the init checkpoint holds all weights: ImageNet weights are not needed
    model = create_model(model_cfg, len(label_map), pretrained=False)
    ckpt_lib.load_state(model, init["model"], paths.init, model_cfg.arch)
    log.info(
        "initialised from %s (phase %s, epoch %s, val top-1 %.4f)",
        paths.init,
        meta.get("phase"),
        meta.get("epoch"),
        meta.get("val_top1", float("nan")),
    )
    return model


def _prepare_head(raw: nn.Module, cfg: PhaseConfig, state_name: str) -> None:
    """cRT's two switches: a re-initialised head (from the phase's seed, the same on every rank)
    and a fixed backbone, whose parameters then get no gradient and no optimizer state."""
    if cfg.reset_head:
        raw.head.reset_parameters()
        log.info("%s: head re-initialised", state_name)
    if cfg.freeze_backbone:
        frozen = 0
        for name, p in raw.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(False)
                frozen += p.numel()
        trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        log.info("%s: backbone frozen (%d parameters fixed, %d trained)", state_name, frozen, trained)


def _criterion(cfg: PhaseConfig, labels, num_classes: int, state_name: str) -> PhaseLoss:
    """The phase's loss; balanced softmax offsets the logits by the log of the SKU mix the sampler
    draws (train's counts under ``random``; uniform, so no offset, under ``class_balanced``)."""
    offset = None
    if cfg.loss == "balanced_softmax":
        if cfg.sampler == "class_balanced":
            log.info("%s: balanced_softmax under class_balanced sampling (a uniform mix) is CE", state_name)
        else:
            offset = log_prior(labels, num_classes)
    return PhaseLoss(cfg.label_smoothing, cfg.accuracy_loss_weight, offset)


def fingerprint(
    phase: str,
    member: str,
    cfg: PhaseConfig,
    model_cfg: ModelConfig,
    world: int,
    paths: PhasePaths,
    target_prior: str = "train",
) -> str:
    """Hash of everything a resumed run must share with the killed one."""
    blob = {
        "target_prior": target_prior,  # the best epoch's criterion
        "phase": phase,
        "member": member,
        "cfg": cfg.model_dump(exclude=set(RESUME_SAFE_KEYS)),
        "model": model_cfg.model_dump(),
        "world": world,
        "optimizer_layout": OPTIMIZER_LAYOUT,
        "train_csv": file_sha256(paths.train_csv),
        "label_map": file_sha256(paths.label_map),
        "init": file_sha256(paths.init) if paths.init else None,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# --- one epoch ---------------------------------------------------------------------------------


def train_one_epoch(
    state: PhaseState,
    epoch: int,
    on_batch: Callable[[PhaseState, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Train ``epoch`` (0-based) on this rank; return its loss, top-1, throughput and data wait."""
    cfg, info = state.cfg, state.info
    loader = _epoch_loader(state, epoch)
    state.model.train()
    if cfg.freeze_bn:
        freeze_batchnorm(state.raw)
    if cfg.freeze_backbone:  # fixed features: BN statistics, dropout and drop-path as at inference
        state.raw.backbone.eval()
        state.raw.pool.eval()
    bar = tqdm(
        loader,
        total=state.batches_per_epoch,
        desc=f"{state.name} epoch {epoch + 1}/{cfg.epochs}",
        disable=not info.is_main,
        leave=False,
        mininterval=1.0,
    )
    update_sizes = state.train_sampler.update_sizes(state.micro_batch, cfg.grad_accum)
    # running sums stay on the device: reading them every step would sync the host with the GPU
    # each step; they are read for the progress bar every BAR_EVERY steps and at the end
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss*w, correct*w, w
    # first step of this update whose loss was NaN/inf (-1: none), kept on the device: it is read
    # only once per update, and only when the update has to stop
    bad_step = torch.full((), -1, dtype=torch.long, device=info.device)
    data_wait = 0.0  # seconds blocked on the DataLoader: the loader starves the GPU if large
    t0 = time.perf_counter()
    state.optimizer.zero_grad(set_to_none=True)
    batches = iter(bar)
    for step in range(state.batches_per_epoch):
        t_wait = time.perf_counter()
        try:
            images, target, index, weight = next(batches)
        except StopIteration:
            break
        data_wait += time.perf_counter() - t_wait
        images, target, weight = _to_device(state, images, target, weight)
        last_micro = (step + 1) % cfg.grad_accum == 0 or (step + 1) == state.batches_per_epoch
        # the update's gradient is the mean over its global sample count (x world: DDP averages)
        scale = info.world / max(float(update_sizes[step // cfg.grad_accum]), 1.0)
        logits, loss_sum = _forward_backward(state, images, target, weight, scale, bad_step, step, last_micro)
        if last_micro:
            optimizer_step(state, bad_step, epoch, step)
            bad_step.fill_(-1)
            pause_point(f"train epoch {epoch + 1}")  # kill tests: that epoch in flight
        with torch.no_grad():
            hits = ((logits.argmax(1) == target).float() * weight).sum()
            sums += torch.stack([loss_sum.detach().double(), hits.double(), weight.sum().double()])
        if on_batch is not None:
            on_batch(state, index, weight.cpu())
        if info.is_main and step % BAR_EVERY == 0:
            running_loss, _, running_count = sums.tolist()
            bar.set_postfix(
                loss=f"{running_loss / max(running_count, 1):.3f}", lr=f"{current_lr(state.optimizer):.2e}"
            )
    bar.close()
    elapsed = time.perf_counter() - t0
    loss_sum, correct, count, data_wait = all_reduce_sum([*sums.tolist(), data_wait], info)
    return {
        "train/loss": loss_sum / max(count, 1.0),
        "train/top1": correct / max(count, 1.0),
        "throughput": count / max(elapsed, 1e-9),  # images/s over all ranks
        "epoch_time_s": elapsed,
        # share of the epoch spent waiting for batches (mean over ranks): near 0 = compute-bound
        "data_wait": data_wait / info.world / max(elapsed, 1e-9),
    }


def _epoch_loader(state: PhaseState, epoch: int) -> DataLoader:
    """The training loader of ``epoch``, every random stream re-seeded from (seed, epoch, rank)."""
    seed = _epoch_seed(state.cfg.seed, epoch, state.info.rank)
    torch.manual_seed(seed)
    np.random.seed(seed)
    state.train_sampler.set_epoch(epoch)
    state.train_ds.transform.set_random_seed(seed)  # used when num_workers == 0
    return _loader(state, state.train_ds, state.train_sampler, state.micro_batch, seed)


def _forward_backward(
    state: PhaseState,
    images: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    bad_step: torch.Tensor,
    step: int,
    last_micro: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's forward and backward; return its logits and weighted loss sum.

    Gradients accumulate locally until the update's last micro-batch, where DDP all-reduces them.
    """
    sync = contextlib.nullcontext()
    if state.info.enabled and not last_micro:
        sync = state.model.no_sync()
    with sync:
        with _autocast(state):
            logits = state.model(images, target)
            loss_sum = state.criterion(logits, target, weight, reduction="sum")
        finite = torch.isfinite(loss_sum.detach())
        bad_step.copy_(torch.where((bad_step < 0) & ~finite, step, bad_step))
        # A NaN/inf loss poisons its gradients (x NaN; exactly x 1.0 otherwise), so the DDP
        # all-reduce makes them non-finite on every rank and all ranks stop at once.
        poison = torch.where(finite, 1.0, float("nan")).to(loss_sum.dtype)
        state.scaler.scale(loss_sum * poison * scale).backward()
    return logits, loss_sum


def optimizer_step(state: PhaseState, bad_step: torch.Tensor, epoch: int, step: int) -> None:
    """Clip, check finiteness (one host sync per update), step; stop on NaN/inf.

    The gradients are DDP-averaged, so their norm - and the decision to stop - is the same on
    every rank without another collective. With fp16 loss scaling an inf gradient is the
    scaler's routine overflow (it skips the step and lowers the scale), so there only a NaN/inf
    loss stops; its flag is all-reduced as the loss is local to a rank.
    """
    cfg, scaler, optimizer = state.cfg, state.scaler, state.optimizer
    params = [p for p in state.raw.parameters() if p.grad is not None]
    norm = None
    if cfg.clip_grad is not None:
        scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    if scaler.is_enabled():
        stop = all_reduce_sum([float(bad_step >= 0)], state.info)[0] > 0
    else:
        if norm is None:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        stop = not bool(torch.isfinite(norm))
    if stop:
        first_bad = int(bad_step)
        if first_bad >= 0:
            raise _non_finite(state, "loss is", epoch, first_bad)
        raise _non_finite(state, "another rank's loss or the gradients are", epoch, step)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.scheduler.step_update(state.global_step)
    if state.ema is not None:
        state.ema.update(state.raw, step=state.global_step)


def _non_finite(state: PhaseState, what: str, epoch: int, step: int) -> Products10kError:
    return Products10kError(
        f"{state.name}: {what} NaN/inf at epoch {epoch + 1}, step {step + 1} "
        f"(global step {state.global_step}); stopped before the optimizer step. The last good "
        f"checkpoint is kept in {state.paths.out / 'last.pt'}. Lower {state.phase}.lr, enable "
        "clip_grad or use amp: off."
    )


@torch.no_grad()
def validate(state: PhaseState) -> dict:
    """Loss and top-1 of the evaluated model (EMA if on) on val, counts summed over ranks."""
    info, cfg = state.info, state.cfg
    model = state.eval_model
    model.eval()
    eval_bs = cfg.eval_batch_size or 2 * state.micro_batch * cfg.grad_accum
    loader = _loader(state, state.val_ds, state.val_sampler, eval_bs, cfg.seed)
    ce = nn.CrossEntropyLoss(reduction="none")
    # loss*w, hits*w, w, hits*estimate weight, estimate weight: on the device, no per-step sync
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)
    for images, target, index, weight in tqdm(
        loader, desc="validate", disable=not info.is_main, leave=False, mininterval=1.0
    ):
        # the estimate's weight of each row; DDP's padding rows (weight 0) count for nothing
        est = (state.val_weight[index] * weight.double()).to(info.device)
        images, target, weight = _to_device(state, images, target, weight)
        with _autocast(state):
            logits = model(images)  # the head computes in float32 (Products10kNet.forward)
        loss = (ce(logits.float(), target) * weight).sum()
        hit = (logits.argmax(1) == target).double()
        hits = (hit * weight).sum()
        sums += torch.stack([loss.double(), hits, weight.sum().double(), (hit * est).sum(), est.sum()])
    loss_sum, correct, count, est_hits, est_total = all_reduce_sum(sums.tolist(), info)
    return {
        "val/loss": loss_sum / max(count, 1.0),
        "val/top1": correct / max(count, 1.0),
        "val/estimate": est_hits / est_total if est_total > 0 else 0.0,
    }


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of a model in train mode back into eval mode; return how many.

    Eval-mode BN normalises with (and never updates) its running statistics, while its affine
    weight and bias still get gradients: the standard remedy for finetuning on few images.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)


def _worker_init(worker_id: int) -> None:
    # albumentations keeps its own RNG: without this every worker would replay the same stream
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % (2**32))


def _loader(state: PhaseState, ds, sampler, batch_size: int, seed: int) -> DataLoader:
    workers = state.cfg.num_workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=host_transfer(state.info.device)["pin_memory"],
        drop_last=False,  # the training sampler keeps whole global batches (train.drop_last)
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,  # fresh, epoch-seeded workers: resume-exact augmentation
    )


def _to_device(state: PhaseState, images, target, weight):
    device, non_blocking = state.info.device, state.non_blocking
    images = images.to(device, non_blocking=non_blocking)
    if state.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = target.to(device, non_blocking=non_blocking)
    weight = weight.to(device, dtype=torch.float32, non_blocking=non_blocking)
    return images, target, weight


def _autocast(state: PhaseState):
    if state.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.info.device.type, dtype=state.amp_dtype)


# --- checkpoints and resume --------------------------------------------------------------------


def save_epoch(state: PhaseState, epoch: int, row: dict, improved: bool) -> None:
    """Rank 0: ``best.pt`` if val improved (every epoch with ``checkpoint: last``), then ``last.pt``
    (its presence marks the epoch complete)."""
    state.paths.out.mkdir(parents=True, exist_ok=True)
    top1 = row.get("val/top1", float("nan"))
    if improved:
        save_torch(state.paths.out / "best.pt", checkpoint(state, epoch + 1, top1, with_state=False))
    save_torch(state.paths.out / "last.pt", checkpoint(state, epoch + 1, top1, with_state=True))


#: the per-epoch figures that measure the machine, not the model
TIMINGS = ("throughput", "epoch_time_s", "data_wait")


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def checkpoint(state: PhaseState, epoch: int, val_top1: float, with_state: bool) -> dict:
    """The checkpoint contract (products10k.training.checkpoint) of ``state`` after ``epoch``."""
    ck = {
        "model": {k: v.detach().cpu() for k, v in state.eval_model.state_dict().items()},
        "model_config": model_config_dict(state.model_cfg, len(state.label_map)),
        "labels": state.labels,
        "phase": state.phase,
        "member": state.member,
        "epoch": epoch,
        "epochs": state.cfg.epochs,
        "resolution": state.cfg.resolution,
        "resize": state.resize,
        "normalize": dict(state.normalize),
        "val_top1": float(val_top1),
        "best_val_top1": float(state.best_top1),
        "best_val_estimate": float(state.best_estimate),
        "phase_config": state.cfg.model_dump(),
        # last.pt keeps the whole history (a resume replays it into DVCLive); best.pt, the published
        # model, leaves out the wall-clock figures, so that the same training gives the same bytes:
        # its hash names the model in the next phase's resume fingerprint, preprocess.json and the
        # index's meta.json
        "history": [row if with_state else _without_timings(row) for row in state.history],
        "fingerprint": state.fingerprint,
    }
    if with_state:
        ck["train_state"] = {
            # the raw weights only when they differ from ck["model"] (EMA): without EMA the
            # evaluated weights are the raw ones, and a second copy would add 100 MB at 9.7k SKUs
            "model": state.raw.state_dict() if state.ema is not None else None,
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else None,
            # no RNG states: every random stream is re-seeded per epoch (see the docstring)
            "global_step": int(state.global_step),
        }
    return ck


def resume(state: PhaseState) -> int:
    """Load ``last.pt`` into ``state`` when it is a run of the same settings; return the start epoch.

    Rank 0 reads and checks it and broadcasts it: every rank resumes from the same state, including
    those on nodes that never held the file (an elastic restart on several nodes).
    """
    last = state.paths.out / "last.pt"
    ck = broadcast_object(_resume_checkpoint(state) if state.info.is_main else None, state.info)
    if ck is None:
        return 0
    state.history = list(ck.get("history", []))
    state.best_top1 = float(ck.get("best_val_top1", -1.0))
    state.best_estimate = float(ck.get("best_val_estimate", -1.0))
    if ck["epoch"] >= state.cfg.epochs:
        # killed after its final last.pt but before DVC recorded the stage: nothing to redo
        log.info("%s is this phase's finished run (epoch %d): keeping it", last, ck["epoch"])
        return int(ck["epoch"])
    st = ck["train_state"]
    state.raw.load_state_dict(st["model"] if st.get("model") is not None else ck["model"])
    state.optimizer.load_state_dict(st["optimizer"])
    state.scheduler.load_state_dict(st["scheduler"])
    state.scaler.load_state_dict(st["scaler"])
    if state.ema is not None and st.get("ema") is not None:
        state.ema.load_state_dict(st["ema"])
    state.global_step = int(st["global_step"])
    state.scheduler.step_update(state.global_step)
    log.info("resuming %s from %s after epoch %d", state.name, last, ck["epoch"])
    return int(ck["epoch"])


def _resume_checkpoint(state: PhaseState) -> dict | None:
    """Rank 0: ``last.pt`` if it is a run of these settings (its fingerprint), else None."""
    out = state.paths.out
    last = out / "last.pt"
    if out.is_dir():
        # temp files of a save interrupted by SIGKILL (atomic_path names them .<name>.*)
        for stale in out.glob(".*.pt.*"):
            stale.unlink(missing_ok=True)
    if not last.is_file():
        return None
    try:
        ck = ckpt_lib.read_checkpoint(last)
    except Products10kError as exc:
        log.warning("not resuming: %s", exc)
        return None
    if ck.get("fingerprint") != state.fingerprint or "train_state" not in ck:
        log.info("%s was made with other settings/data: starting the phase afresh", last)
        return None
    return ck


# --- logging -----------------------------------------------------------------------------------


class _Live:
    """DVCLive on rank 0; a no-op elsewhere. Never edits dvc.yaml or creates experiments."""

    def __init__(self, path: Path | None, enabled: bool):
        self.live = None
        if path is not None and enabled:
            from dvclive import Live

            self.live = Live(dir=str(path), dvcyaml=False, save_dvc_exp=False)

    def log_epoch(self, row: dict) -> None:
        if self.live is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


def _log_start(state: PhaseState) -> None:
    cfg, info = state.cfg, state.info
    log.info(
        "%s: %d train / %d val images, %d classes, %s at %d (resize %d), "
        "%d epoch(s), batch %d = %d rank(s) x %d x accum %d, device %s, amp %s",
        state.name,
        len(state.train_ds),
        len(state.val_ds),
        len(state.label_map),
        state.model_cfg.arch,
        cfg.resolution,
        state.resize,
        cfg.epochs,
        cfg.batch_size,
        info.world,
        state.micro_batch,
        cfg.grad_accum,
        info.device,
        state.amp_dtype,
    )


def _log_epoch(state: PhaseState, epoch: int, row: dict) -> None:
    log.info(
        "%s epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f estimate %.4f "
        "(best %.4f) | lr %.2e | %.1f img/s, data wait %.0f%%",
        state.name,
        epoch + 1,
        state.cfg.epochs,
        row["train/loss"],
        row["train/top1"],
        row.get("val/loss", float("nan")),
        row.get("val/top1", float("nan")),
        row.get("val/estimate", float("nan")),
        state.best_estimate,
        row["lr"],
        row["throughput"],
        100 * row["data_wait"],
    )
