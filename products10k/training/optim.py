"""Learning-rate schedule of a phase (timm schedulers); the optimizer is timm's create_optimizer_v2.

The schedule is stepped per optimizer update (``step_update``) so warm-up is smooth even over a
fraction of an epoch; milestones and cosine length are still given in epochs, as in the paper
("×0.1 at epochs 20, 40, 60").
"""

from __future__ import annotations

import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from products10k.config import PhaseConfig


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
