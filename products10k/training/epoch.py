"""One epoch of a phase: the training steps (micro-batches, accumulation, NaN/inf stops) and
validation (loss, top-1 and the val estimate of the test metric), with the loaders they read.

Every random stream of an epoch is seeded from ``(seed, epoch, rank)``: the sampler's order and
dropout as the epoch starts, each sample's augmentation by the seed the sampler gives it
(datasets.SeededSamples). A resumed run follows the uninterrupted one's path, with any number of
DataLoader workers, and the workers persist across the phase's epochs (timm's loaders do too):
no worker start-up per epoch."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from products10k.common import (
    Products10kError,
    pause_point,
)
from products10k.data.datasets import SeededSamples
from products10k.dist.devices import host_transfer
from products10k.dist.group import (
    all_reduce_sum,
)
from products10k.training.optim import current_lr
from products10k.training.state import PhaseState

log = logging.getLogger("products10k.training.loop")  # one logger for the whole loop, as before its split

#: progress-bar refresh, in steps: reading the running loss is a host-device sync
BAR_EVERY = 50


def train_one_epoch(
    state: PhaseState,
    epoch: int,
    on_batch: Callable[[PhaseState, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Train ``epoch`` (0-based) on this rank; return its loss, top-1, throughput and data wait."""
    cfg, info = state.cfg, state.info
    loader = _epoch_loader(state, epoch)
    state.net.model.train()
    if cfg.freeze_bn:
        freeze_batchnorm(state.net.raw)
    if cfg.freeze_backbone:  # fixed features: BN statistics, dropout and drop-path as at inference
        state.net.raw.backbone.eval()
        state.net.raw.pool.eval()
    bar = tqdm(
        loader,
        total=state.data.batches_per_epoch,
        desc=f"{state.name} epoch {epoch + 1}/{cfg.epochs}",
        disable=not info.is_main,
        leave=False,
        mininterval=1.0,
    )
    update_sizes = state.data.train_sampler.update_sizes(state.data.micro_batch, cfg.grad_accum)
    # running sums stay on the device: reading them every step would sync the host with the GPU
    # each step; they are read for the progress bar every BAR_EVERY steps and at the end
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss*w, correct*w, w
    # first step of this update whose loss was NaN/inf (-1: none), kept on the device: it is read
    # only once per update, and only when the update has to stop
    bad_step = torch.full((), -1, dtype=torch.long, device=info.device)
    data_wait = 0.0  # seconds blocked on the DataLoader: the loader starves the GPU if large
    t0 = time.perf_counter()
    state.net.optimizer.zero_grad(set_to_none=True)
    batches = iter(bar)
    for step in range(state.data.batches_per_epoch):
        t_wait = time.perf_counter()
        try:
            images, target, index, weight = next(batches)
        except StopIteration:
            break
        data_wait += time.perf_counter() - t_wait
        images, target, weight = _to_device(state, images, target, weight)
        last_micro = (step + 1) % cfg.grad_accum == 0 or (step + 1) == state.data.batches_per_epoch
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
                loss=f"{running_loss / max(running_count, 1):.3f}",
                lr=f"{current_lr(state.net.optimizer):.2e}",
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
    """The training loader, set to ``epoch``: its order, and each sample's augmentation seed, drawn
    from (seed, epoch, rank); dropout's stream (this process's) seeded from them too."""
    seed = _epoch_seed(state.cfg.seed, epoch, state.info.rank)
    torch.manual_seed(seed)
    np.random.seed(seed)
    state.data.train_sampler.set_epoch(epoch)
    if state.data.train_loader is None:
        samples = SeededSamples(state.data.train_sampler)
        state.data.train_loader = _loader(state, state.data.train_ds, samples, state.data.micro_batch)
    return state.data.train_loader


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
        sync = state.net.model.no_sync()
    with sync:
        with _autocast(state):
            features = None
            if state.net.criterion.metric_weight > 0:
                logits, features = state.net.model(images, target, with_features=True)
            else:
                logits = state.net.model(images, target)
            loss_sum = state.net.criterion(logits, target, weight, reduction="sum", features=features)
        finite = torch.isfinite(loss_sum.detach())
        bad_step.copy_(torch.where((bad_step < 0) & ~finite, step, bad_step))
        # A NaN/inf loss poisons its gradients (x NaN; exactly x 1.0 otherwise), so the DDP
        # all-reduce makes them non-finite on every rank and all ranks stop at once.
        poison = torch.where(finite, 1.0, float("nan")).to(loss_sum.dtype)
        state.net.scaler.scale(loss_sum * poison * scale).backward()
    return logits, loss_sum


def optimizer_step(state: PhaseState, bad_step: torch.Tensor, epoch: int, step: int) -> None:
    """Clip, check finiteness (one host sync per update), step; stop on NaN/inf.

    The gradients are DDP-averaged, so their norm - and the decision to stop - is the same on
    every rank without another collective. With fp16 loss scaling an inf gradient is the
    scaler's routine overflow (it skips the step and lowers the scale), so there only a NaN/inf
    loss stops; its flag is all-reduced as the loss is local to a rank.
    """
    cfg, scaler, optimizer = state.cfg, state.net.scaler, state.net.optimizer
    params = [p for p in state.net.raw.parameters() if p.grad is not None]
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
    state.progress.global_step += 1
    state.net.scheduler.step_update(state.progress.global_step)
    if state.net.ema is not None:
        state.net.ema.update(state.net.raw, step=state.progress.global_step)


def _non_finite(state: PhaseState, what: str, epoch: int, step: int) -> Products10kError:
    return Products10kError(
        f"{state.name}: {what} NaN/inf at epoch {epoch + 1}, step {step + 1} "
        f"(global step {state.progress.global_step}); stopped before the optimizer step. The last good "
        f"checkpoint is kept in {state.paths.out / 'last.pt'}. Lower {state.phase}.lr, enable "
        "clip_grad or use amp: off."
    )


@torch.no_grad()
def validate(state: PhaseState) -> dict:
    """Loss and top-1 of the evaluated model (EMA if on) on val, counts summed over ranks."""
    info, cfg = state.info, state.cfg
    model = state.net.eval_model
    model.eval()
    eval_bs = cfg.eval_batch_size or 2 * state.data.micro_batch * cfg.grad_accum
    loader = _loader(state, state.data.val_ds, state.data.val_sampler, eval_bs, persistent=False)
    ce = nn.CrossEntropyLoss(reduction="none")
    # loss*w, hits*w, w, hits*estimate weight, estimate weight: on the device, no per-step sync
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)
    for images, target, index, weight in tqdm(
        loader, desc="validate", disable=not info.is_main, leave=False, mininterval=1.0
    ):
        # the estimate's weight of each row; DDP's padding rows (weight 0) count for nothing
        est = (state.data.val_weight[index] * weight.double()).to(
            info.device, non_blocking=state.net.non_blocking
        )
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


def _loader(state: PhaseState, ds, sampler, batch_size: int, persistent: bool = True) -> DataLoader:
    """``persistent``: the workers live as long as the loader (the training loader's: the phase).
    Validation's are started per epoch: idle through the training epoch, they would hold their
    memory next to the training workers' on every rank."""
    workers = state.data.num_workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=host_transfer(state.info.device)["pin_memory"],
        drop_last=False,  # the training sampler keeps whole global batches (train.drop_last)
        # nothing random happens in a worker that a sample's own seed does not set
        persistent_workers=persistent and workers > 0,
        # the workers' base seed, drawn at every new iterator (each epoch without persistent workers,
        # once with them), from a generator of its own: from the global one it would shift the
        # dropout stream by the worker count and at a resume
        generator=torch.Generator().manual_seed(state.cfg.seed),
    )


def _to_device(state: PhaseState, images, target, weight):
    device, non_blocking = state.info.device, state.net.non_blocking
    images = images.to(device, non_blocking=non_blocking)
    if state.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = target.to(device, non_blocking=non_blocking)
    weight = weight.to(device, dtype=torch.float32, non_blocking=non_blocking)
    return images, target, weight


def _autocast(state: PhaseState):
    if state.net.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.info.device.type, dtype=state.net.amp_dtype)
