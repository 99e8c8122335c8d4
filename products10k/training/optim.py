"""Optimizer and learning-rate schedule of a phase (torch optimizers, timm schedulers).

The schedule is stepped per optimizer update (``step_update``) so warm-up is smooth even over a
fraction of an epoch; milestones and cosine length are still given in epochs, as in the paper
("×0.1 at epochs 20, 40, 60").
"""

from __future__ import annotations

import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from products10k.config import PhaseConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norm parameters and GeM's p (the usual timm practice)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def create_optimizer(model: nn.Module, cfg: PhaseConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        # the paper: Adam with (L2) weight decay 1e-4
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: PhaseConfig, updates_per_epoch: int) -> Scheduler:
    """timm scheduler: ``step`` = ×gamma at ``milestones``; ``cosine`` = to ``min_lr`` over the phase."""
    common = {
        "num_epochs": cfg.epochs,
        "warmup_epochs": cfg.warmup_epochs,
        "warmup_lr": cfg.warmup_lr,
        "step_on_epochs": False,
        "updates_per_epoch": max(1, updates_per_epoch),
    }
    if cfg.schedule == "cosine":
        sched, _ = create_scheduler_v2(optimizer, sched="cosine", min_lr=cfg.min_lr, **common)
    else:
        # a milestone past the last epoch never fires: an empty list means a constant lr
        milestones = list(cfg.milestones) or [cfg.epochs + 1]
        sched, _ = create_scheduler_v2(
            optimizer, sched="multistep", decay_milestones=milestones, decay_rate=cfg.gamma, **common
        )
    sched.step_update(0)
    return sched


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
